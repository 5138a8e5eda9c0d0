"""HAQ quantization commands: ``quantize`` (one method -> checkpoint) and ``compare`` (many -> table)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from ..errors import HaqmoeError
from .common import METHOD_HELP_TEXT, Method, Order, app, check_output_dir, emit, state

DEFAULT_COMPARE = "fp32,rtn,smoothquant-0.5,smoothquant-0.8,awq,gptq,smooth,haq,haq-rank1,haq-rank2"


def _quant_config(method: str, w_bits: int, a_bits: int, w_sym: bool, a_sym: bool, static_acts: bool,
                  group_size: Optional[int]):
    from ..quant.config import QuantConfig

    for flag, bits in (("--w-bits", w_bits), ("--a-bits", a_bits)):
        if not 4 <= bits <= 8:
            raise HaqmoeError(f"{flag} {bits} is not supported (4-8 bits)")
    if group_size is not None and group_size < 1:
        raise HaqmoeError("--group-size must be positive")
    return QuantConfig.w8a8(method, w_sym, a_sym, w_bits, a_bits, a_dynamic=not static_acts, group_size=group_size)


def quantize_in_memory(lm, method: str, eval_data: str) -> str:
    """``haqmoe eval --quantize METHOD``: default options, calibration on other text than ``eval_data``."""
    from ..data.text import calibration_ids
    from ..quant.config import QuantConfig
    from ..quant.methods import MethodOptions, needs_calibration, quantize_with

    cfg = QuantConfig.w8a8(method)
    calib = None
    if needs_calibration(method, cfg):
        src = "wikitext2:valid" if eval_data.startswith("wikitext2") else "pydoc"
        calib = calibration_ids(lm.tokenizer, src, 32, 512, 0, eval_spec=eval_data)
    quantize_with(lm.model, lm.adapter, method, cfg, calib, MethodOptions(), state["progress"])
    return method


_BITS: dict = {}  # range checked in _quant_config (one clear error line)


def _check_partial(out: Path, resume: bool, overwrite: bool) -> None:
    """Never throw away an interrupted run's blocks by accident, nor resume one that is not there."""
    from ..reliability.resume import partial_dir

    part = partial_dir(out)
    if resume and not (part / "state.json").is_file():
        raise HaqmoeError(f"--resume: nothing to resume ({part / 'state.json'} does not exist)")
    if part.exists() and not resume and not overwrite:
        raise HaqmoeError(f"{part} holds an interrupted run: add --resume to continue it (same options) "
                          f"or --overwrite to start over")


@app.command()
def quantize(model: str = typer.Argument(..., help="Model source to quantize."),
             out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
             method: Method = typer.Option(Method.haq, help=METHOD_HELP_TEXT + "."),
             alpha: float = typer.Option(0.5, help="SmoothQuant migration strength."),
             order: Order = typer.Option(Order.natural, help="GPTQ column order (gptq, haq)."),
             stat: str = typer.Option("absmax", help="Smoothing statistic: absmax, absmean or auto (search both)."),
             grid: int = typer.Option(20, min=1, help="Smoothing exponents searched in [0, 1]."),
             damp: float = typer.Option(0.01, min=0.0, help="GPTQ dampening (fraction of mean diag H)."),
             device: str = typer.Option("auto", help="Where GPTQ runs: auto (CUDA when present), cpu or cuda. "
                                        "On the CPU the result is bit-identical run to run."),
             w_bits: int = typer.Option(8, **_BITS, help="Weight bits (4-8)."),
             a_bits: int = typer.Option(8, **_BITS, help="Activation bits (4-8)."),
             w_sym: bool = typer.Option(False, "--w-sym/--w-asym", help="Symmetric weights (default asym)."),
             a_sym: bool = typer.Option(False, "--a-sym/--a-asym", help="Symmetric activations (default asym)."),
             static_acts: bool = typer.Option(False, "--static-acts/--dynamic-acts",
                                              help="Per-tensor static (calibrated) activation ranges instead "
                                                   "of per-token dynamic."),
             group_size: Optional[int] = typer.Option(None, help="Per-group weight scales (default per channel)."),
             calib: str = typer.Option("wikitext2:valid", help="Calibration text (never the evaluation text)."),
             calib_samples: int = typer.Option(128, min=1, help="Calibration windows."),
             calib_len: int = typer.Option(512, min=8, help="Calibration window length (tokens)."),
             seed: int = typer.Option(0, help="Calibration sampling seed."),
             int8_lm_head: bool = typer.Option(False, "--int8-lm-head", help="Also store lm_head (and a tied "
                                               "embedding) as int8 rows: a smaller checkpoint and faster "
                                               "decode, not part of the W8A8 recipe (SmolLM2: weights 0.41x "
                                               "-> 0.25x of fp32, +0.2 % PPL)."),
             overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
             resume: bool = typer.Option(False, help="Continue an interrupted run from OUT.partial/ (same "
                                         "options): the result is identical to an uninterrupted run."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Quantize a model to W8A8 and write a sharded checkpoint (int8 weights, scales, zero points,
    folded smoothing), one decoder block at a time: a safetensors source is read block by block
    from its shards, so memory holds one block (the embedding and lm_head only while calibration
    inputs are captured), never the model. GPTQ runs on CUDA where present (--device).

    Every finished block is a shard under OUT.partial/; after a crash or kill, rerun with --resume.
    """
    from ..quant.methods import MethodOptions
    from ..quant.stream import CalibSpec, quantize_checkpoint

    if stat not in ("absmax", "absmean", "auto"):
        raise HaqmoeError(f"--stat must be absmax, absmean or auto, got '{stat}'")
    cfg = _quant_config(method.value, w_bits, a_bits, w_sym, a_sym, static_acts, group_size)
    opts = MethodOptions(alpha=alpha, order=order.value, stat=stat, grid=grid, damp=damp, seed=seed, device=device)
    check_output_dir(out, overwrite, model)
    _check_partial(out, resume, overwrite)
    start = time.perf_counter()
    report = quantize_checkpoint(model, out, method.value, cfg, opts, CalibSpec(calib, calib_samples, calib_len, seed),
                                 int8_lm_head, state["progress"], resume, overwrite)
    payload = {"model": model, "out": str(out), "method": method.value, "quant_seconds": round(report.seconds, 1),
               "seconds": round(time.perf_counter() - start, 1), "fallbacks": len(report.fallbacks)}
    emit(payload, as_json, f"wrote {method.value} checkpoint to {out} (quantized in {report.seconds:.1f} s, "
                           f"{payload['seconds']:.1f} s total)")


@app.command()
def compare(model: str = typer.Argument("smollm2-135m", help="FP model to quantize with every method."),
            methods: str = typer.Option(DEFAULT_COMPARE, help="Comma-separated rows: fp32, a method, or "
                                        "method-OPTION (smoothquant-0.8, haq-rank1, haq-auto), or ct:PATH "
                                        "(a compressed-tensors checkpoint, e.g. from llm-compressor)."),
            out: Path = typer.Option(Path("compare.json"), "--out", "-o", help="Results file (.json; .md and "
                                     ".png written beside it)."),
            data: str = typer.Option("wikitext2:test", help="Evaluation text."),
            seqlen: int = typer.Option(2048, min=2, help="Evaluation window length."),
            windows: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N windows."),
            calib: str = typer.Option("wikitext2:valid", help="Calibration text."),
            calib_samples: int = typer.Option(128, min=1),
            calib_len: int = typer.Option(512, min=8),
            seed: int = typer.Option(0),
            w_bits: int = typer.Option(8, **_BITS),
            a_bits: int = typer.Option(8, **_BITS),
            w_sym: bool = typer.Option(False, "--w-sym/--w-asym"),
            a_sym: bool = typer.Option(False, "--a-sym/--a-asym"),
            static_acts: bool = typer.Option(False, "--static-acts/--dynamic-acts"),
            resume: bool = typer.Option(False, "--resume", help="Keep rows already in --out that were measured "
                                        "with the same setup; run only the missing ones, continuing an "
                                        "interrupted row from its saved blocks and windows (OUT.partial/)."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Run several methods on one model and calibration set; write a PPL / time / memory table and plot."""
    from ..studies.compare import CompareSetup, run_compare
    from ..quant.methods import MethodOptions

    cfg = _quant_config("haq", w_bits, a_bits, w_sym, a_sym, static_acts, None)
    labels = [m.strip() for m in methods.split(",") if m.strip()]
    if not labels:
        raise HaqmoeError("--methods is empty")
    setup = CompareSetup(model, cfg, data, seqlen, windows, calib, calib_samples, calib_len, seed)
    rows = run_compare(setup, labels, out, MethodOptions(seed=seed), state["progress"], resume=resume)
    human = "\n".join(f"{r['method']:>18}: ppl {r['ppl']:.4f} ({r.get('delta_pct', 0):+.2f} %), "
                      f"quant {r['quant_seconds']:.1f} s, peak {r['peak_rss_gb']:.2f} GB" for r in rows)
    emit({"rows": rows, "out": str(out)}, as_json, human + f"\nwrote {Path(out).with_suffix('.json')}")
