"""The ``haqmoe`` command line.

Exit codes: 0 success, 1 internal error (a bug: traceback with ``--debug``), 2 bad input
(missing file, unsupported model, text too short, ...: one line on stderr), 130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import HaqmoeError
from .common import GEN_OPTS, Method, app, check_output_dir, echo_summary, emit, state

# ------------------------------------------------------------------------- info
@app.command()
def info(model: str = typer.Argument("smollm2-135m", help="Embedded name, checkpoint dir, .gguf file or hub id."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Describe a model: architecture, parameters, experts, sizes (fp32 / bf16 / W8A8), the memory
    `quantize` and the W8A8 model will need, and the per-block linear groups.

    A checkpoint folder is described from its config and safetensors headers alone: no weight is
    read, so this takes seconds and almost no memory even for Mixtral-8x7B.
    """
    import torch

    from ..models.footprint import footprint
    from ..reliability.guard import available_bytes, estimate_quant_memory
    from ..sources import inspect_source

    seen = inspect_source(model, progress=state["progress"])
    skel, adapter = seen.model, seen.adapter
    cfg = skel.config
    blocks = adapter.blocks(skel)
    moe_blocks = [i for i, b in enumerate(blocks) if adapter.is_moe_block(b)]
    first = blocks[moe_blocks[0]] if moe_blocks else blocks[0]
    experts = adapter.experts(first)
    size = footprint(skel, adapter)
    calib = torch.zeros(128, 512, dtype=torch.long)  # quantize's default calibration
    need = {
        "quantize_rtn": estimate_quant_memory(skel, adapter, None, 8, streaming=True).total,
        "quantize_haq": estimate_quant_memory(skel, adapter, calib, 8, streaming=True).total,
        "w8a8_model": size.w8a8_bytes,  # eval/generate/run/serve: the int8 weights, mapped from the shards
    }
    payload = {
        "model": model, "model_type": cfg.model_type, "adapter": adapter.name,
        "parameters": size.parameters, "expert_parameters": size.expert_parameters,
        "layers": len(blocks), "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "moe_layers": len(moe_blocks),
        "experts_per_layer": int(experts.num_experts) if experts is not None else 0,
        "top_k": int(getattr(cfg, "num_experts_per_tok", 0) or 0),
        "quantized": seen.quant["quant"] if seen.quant else None,
        "sizes_gb": {"fp32": _gb(size.fp32_bytes), "bf16": _gb(size.bf16_bytes), "w8a8": _gb(size.w8a8_bytes),
                     "on_disk": None if seen.disk_bytes is None else _gb(seen.disk_bytes),
                     "largest_block_fp32": _gb(size.largest_block_fp32_bytes),  # what streaming holds at once
                     "outside_blocks_fp32": _gb(size.rest_fp32_bytes)},
        "memory_needed_gb": {k: _gb(v) for k, v in need.items()},
        "memory_available_gb": _gb(available_bytes()),
        "groups": [{"name": g.name, "prev_op": g.prev_op, "layers": list(g.layers), "routers": list(g.routers)}
                   for g in adapter.groups(first)],
    }
    shown = {**payload, "quantized": describe_quant(payload["quantized"])}
    human = "\n".join([f"{k}: {v}" for k, v in shown.items() if k != "groups"] + ["groups (one block):"] +
                      [f"  {g['name']}: {g['prev_op']} -> {', '.join(g['layers'])}" for g in payload["groups"]])
    emit(payload, as_json, human)


def _gb(n: int) -> float:
    return round(n / 1e9, 3)


def _spec_words(spec: dict) -> str:
    """``{'bits': 8, 'symmetric': False, 'granularity': 'channel', ...}`` -> "int8 asymmetric per channel"."""
    words = [f"int{spec.get('bits', '?')}", "symmetric" if spec.get("symmetric") else "asymmetric"]
    gran = spec.get("granularity")
    if gran == "group" and spec.get("group_size"):
        words.append(f"per group of {spec['group_size']}")
    elif gran:
        words.append(f"per {gran}")
    if "dynamic" in spec and gran in ("token", "tensor"):  # activation ranges: per call, or calibrated
        words.append("dynamic" if spec["dynamic"] else "static")
    return " ".join(words)


def describe_quant(quant: dict | None) -> str:
    """``info``'s one-line reading of a checkpoint's quantization metadata (``--json`` keeps the dict):
    the method, then weights and activations in words, not a Python dict."""
    if not quant:
        return "no (float weights)"
    parts = [str(quant.get("method", "?"))]
    for key, label in (("weights", "weights"), ("acts", "activations")):
        if isinstance(quant.get(key), dict):
            parts.append(f"{label} {_spec_words(quant[key])}")
    if quant.get("quantize_routers"):
        parts.append("routers quantized")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


# ------------------------------------------------------------------------- eval
_EXEC_HELP = "Quantized execution: fake, dequant, real (int8 GEMM) or auto (measured per shape)."
_INT8_HEAD_HELP = ("With --exec real/auto: lm_head (and a tied embedding) as int8 too; faster decode, not part "
                   "of the W8A8 recipe.")


def exec_name(mode: str, quantized: bool) -> str:
    """The execution reported in output, spelt as ``--exec`` takes it (``real``: precision's ``int8``);
    ``float`` for a model with no quantized layer, where nothing is fake-quantized."""
    if not quantized:
        return "float"
    return "real" if mode == "int8" else mode


def _execute(lm, exec_mode: str, int8_lm_head: bool) -> str:
    """Convert a loaded model's quantized modules to the requested execution mode (its reported name,
    ``exec_name``, returned)."""
    from ..quant.modules import QuantExperts, QuantLinear
    from ..exec.precision import convert, normalize_mode

    mode = normalize_mode(exec_mode)
    if int8_lm_head and mode not in ("int8", "auto"):
        raise HaqmoeError("--int8-lm-head needs --exec real or auto")
    if mode != "fake" and not convert(lm.model, mode, int8_lm_head=int8_lm_head).counts:
        raise HaqmoeError(f"--exec {exec_mode} needs a quantized model ({lm.name} has no quantized layers: "
                          "`haqmoe quantize` it first)")
    quantized = mode != "fake" or any(isinstance(m, (QuantLinear, QuantExperts)) for m in lm.model.modules())
    return exec_name(mode, quantized)


@app.command("eval")
def eval_cmd(model: str = typer.Argument("smollm2-135m", help="Model source (see `haqmoe info --help`)."),
             data: str = typer.Option("wikitext2:test", help="Text source: wikitext2:SPLIT, wikitext2-tokens:SPLIT, "
                                                             "c4, pydoc, or a file path."),
             seqlen: int = typer.Option(2048, min=2, help="Window length (tokens)."),
             windows: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N windows."),
             batch_size: int = typer.Option(1, min=1, help="Windows per forward pass."),
             quantize: Optional[Method] = typer.Option(None, help="Quantize in memory before evaluating."),
             exec_mode: str = typer.Option("fake", "--exec", help=_EXEC_HELP),
             int8_lm_head: bool = typer.Option(False, "--int8-lm-head", help=_INT8_HEAD_HELP),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
             out: Optional[Path] = typer.Option(None, help="Also write the result as a results JSON/MD.")) -> None:
    """Perplexity by the standard protocol (non-overlapping windows of the tokenized text)."""
    from ..data.text import eval_windows, load_text, tokenize
    from ..eval.perplexity import perplexity
    from ..models.base import context_of
    from ..sources import load_model

    lm = load_model(model, progress=state["progress"])
    context = context_of(lm.model.config)
    if context and seqlen > context:
        raise HaqmoeError(f"--seqlen {seqlen} exceeds {model}'s context of {context} tokens")
    if quantize is not None and lm.quant is not None:
        raise HaqmoeError(f"{model} is already quantized ({lm.quant['quant']['method']}): --quantize needs a "
                          "float model")
    wins = eval_windows(tokenize(lm.tokenizer, load_text(data)), seqlen, windows)
    method = "fp32" if lm.quant is None else lm.quant["quant"]["method"]
    if quantize is not None:
        from .quant_cmds import quantize_in_memory

        method = quantize_in_memory(lm, quantize.value, data)
    exec_mode = _execute(lm, exec_mode, int8_lm_head)
    res = perplexity(lm.model, wins, batch_size, state["progress"])
    row = {"model": model, "method": method, "exec": exec_mode, "data": data, **res.as_dict()}
    if out is not None:
        from ..results import run_meta, write_results

        write_results(out, [row], run_meta(), f"Perplexity of {model}")
    emit(row, as_json, f"{model} [{method}] on {data}: ppl {res.ppl:.4f} "
                        f"({res.windows} windows x {seqlen}, {res.tokens} tokens, {res.seconds:.1f} s)")


# --------------------------------------------------------------------- generate
# Decode speed-ups quoted by --help and the README, from one results file (fused kernel on, SmolLM2
# quantized with --int8-lm-head, 2 threads): real-int8-lm-head-compiled and -aot over real-int8-lm-head.
SPEEDUPS = {"compile": "1.45x", "aot": "1.80x", "source": "bench/results/int8_kernel.md"}
@app.command()
def generate(model: str = typer.Argument("smollm2-135m", help="Model source (see `haqmoe info --help`)."),
             prompt: str = GEN_OPTS["prompt"], chat: bool = GEN_OPTS["chat"], max_tokens: int = GEN_OPTS["max_tokens"],
             temperature: float = GEN_OPTS["temperature"], top_p: float = GEN_OPTS["top_p"],
             seed: int = GEN_OPTS["seed"],
             exec_mode: str = typer.Option("fake", "--exec", help=_EXEC_HELP),
             int8_lm_head: bool = typer.Option(False, "--int8-lm-head", help=_INT8_HEAD_HELP),
             compile_decode: bool = typer.Option(False, "--compile", help="Compile the decode step (torch.compile, "
                                                 "static KV cache; dense models: SmolLM2 --exec real, int8 lm_head, "
                                                 f"{SPEEDUPS['compile']} eager's decode, {SPEEDUPS['source']}; a "
                                                 "warm-up generation compiles first, needs a C++ compiler)."),
             aot: bool = typer.Option(False, "--aot", help="Generate through an ahead-of-time compiled package "
                                      "(torch.export + AOTInductor; dense models, and MoE models with --exec real whose "
                                      "experts run on the fused int8 CPU op; SmolLM2 --exec real, int8 lm_head, "
                                      f"{SPEEDUPS['aot']} eager's decode, {SPEEDUPS['source']}). Built once per "
                                      "model and 256-token cache bucket (minutes), then cached; needs a C++ "
                                      "compiler."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output (no streaming).")) -> None:
    """Generate from a prompt with the whole model on one device, as transformers runs it (dense or MoE;
    `haqmoe run` is the collaborative CPU-GPU runtime for MoE models), streaming text, then timings."""
    import time

    import torch
    from transformers import TextStreamer

    from ..models.base import encode_prompt
    from ..sources import load_model

    if aot and compile_decode:
        raise HaqmoeError("--aot and --compile are two ways to compile the decode: pick one")
    lm = load_model(model, progress=state["progress"])
    exec_mode = _execute(lm, exec_mode, int8_lm_head)
    ids = encode_prompt(lm.tokenizer, lm.model.config, [{"role": "user", "content": prompt}] if chat else prompt)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    options = dict(max_new_tokens=max_tokens, pad_token_id=lm.tokenizer.eos_token_id, **sampling)
    extra, compile_s, aot_gen = dict, None, None
    if aot:
        from ..exec.aot import AotGenerator

        t = time.perf_counter()
        aot_gen = AotGenerator.for_model(lm.model, ids.shape[1] + max_tokens,
                                         log=lambda s: typer.echo(s, err=True) if state["progress"] else None)
        compile_s = time.perf_counter() - t
    elif compile_decode:
        from ..exec.compiled import compiled_decode_kwargs

        extra = lambda: compiled_decode_kwargs(lm.model, ids.shape[1] + max_tokens)  # noqa: E731 (fresh cache)
        t = time.perf_counter()
        with torch.inference_mode():
            lm.model.generate(ids, **{**options, "max_new_tokens": min(max_tokens, 3)}, **extra())
        compile_s = time.perf_counter() - t
    stamps: list[float] = []  # the prompt, then each new token

    class Streamer(TextStreamer):
        def put(self, value):
            stamps.append(time.perf_counter())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not as_json:
                super().on_finalized_text(text, stream_end)

    torch.manual_seed(seed)
    streamer = Streamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        if aot_gen is not None:
            gen_cfg = lm.model.generation_config
            out = aot_gen.generate(ids, max_tokens, temperature=temperature, top_k=gen_cfg.top_k, top_p=top_p,
                                   eos_token_id=gen_cfg.eos_token_id, streamer=streamer)
        else:
            out = lm.model.generate(ids, streamer=streamer, **options, **extra())
    tokens = out[0, ids.shape[1]:].tolist()
    decode_s = stamps[-1] - stamps[1] if len(stamps) > 2 else 0.0
    payload = {"model": model, "exec": exec_mode, "compiled": compile_decode, "aot": aot,
               "text": lm.tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens),
               "prompt_tokens": int(ids.shape[1]), "prefill_ms": 1e3 * (stamps[1] - stamps[0]),
               "decode_tok_s": (len(stamps) - 2) / decode_s if decode_s > 0 else None, "compile_s": compile_s}
    if as_json:
        emit(payload, True, "")
    else:
        echo_summary(payload)


# ---------------------------------------------------------------------- upcycle
@app.command()
def upcycle(model: str = typer.Argument("smollm2-135m", help="Dense Llama-family model to upcycle."),
            out: Path = typer.Option(..., "--out", "-o", help="Output Mixtral checkpoint directory."),
            experts: int = typer.Option(8, min=1, help="Experts per layer."),
            top_k: int = typer.Option(2, min=1, help="Experts per token."),
            calib: str = typer.Option("pydoc", help="Text whose hidden states seed the k-means routers."),
            samples: int = typer.Option(16, min=1, help="Calibration windows."),
            seqlen: int = typer.Option(512, min=8, help="Calibration window length."),
            seed: int = typer.Option(0, help="Random seed."),
            overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Build a Mixtral-layout MoE from a dense model (sparse upcycling, k-means routers)."""
    from ..models.upcycle import UpcycleConfig, upcycle_to_dir
    from ..sources import load_model

    check_output_dir(out, overwrite, model)
    upcycle_to_dir(load_model(model, progress=state["progress"]), out, UpcycleConfig(experts, top_k, calib, samples, seqlen, seed),
                   state["progress"], overwrite)
    emit({"model": model, "out": str(out), "experts": experts, "top_k": top_k}, as_json,
          f"wrote upcycled MoE ({experts} experts, top-{top_k}) to {out}")


# ------------------------------------------------------------------------- demo
@app.command()
def demo(windows: int = typer.Option(2, min=1, help="WikiText-2 test windows (2048 tokens) per perplexity row."),
         calib_samples: int = typer.Option(8, min=1, help="Calibration windows (512 tokens) for HAQ."),
         report_dir: Path = typer.Option(Path("demo-report"), help="Where the report is written.")) -> None:
    """The product tour: HAQ vs RTN perplexity, routing profile, placement, collaborative generation."""
    from ..studies.demo import run_demo

    run_demo(windows=windows, report_dir=report_dir, progress=state["progress"], calib_samples=calib_samples)


# Command modules of the later pipeline stages register themselves on the shared app.
from . import engine_cmds, model_cmds, quant_cmds, routing_cmds, runtime_cmds, serve_cmds  # noqa: E402,F401


def _disk_full(exc: BaseException) -> bool:
    import errno

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return "No space left on device" in str(exc)  # e.g. safetensors' SafetensorError wraps the OS error


def main(argv: list[str] | None = None) -> None:
    """Entry point: turns HaqmoeError into one clean line and a meaningful exit code."""
    import warnings

    warnings.formatwarning = lambda msg, *_args, **_kw: f"haqmoe: warning: {msg}\n"  # no source lines
    try:
        import typer.main

        from ..config import apply_config

        group = typer.main.get_command(app)
        argv, defaults = apply_config(list(sys.argv[1:] if argv is None else argv), group)  # --config FILE.toml
        rc = group.main(args=argv, prog_name="haqmoe", standalone_mode=False, default_map=defaults)
        if isinstance(rc, int) and rc != 0:  # typer turns Ctrl-C into Exit(130), *returned* when not standalone
            if rc == 130:
                typer.echo("haqmoe: interrupted (rerun with --resume where the command supports it)", err=True)
            sys.exit(rc)
    except HaqmoeError as exc:
        if state["debug"]:
            raise
        typer.echo(f"haqmoe: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("haqmoe: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # typer's (vendored) click usage errors carry their exit code
        from typer import exceptions as tx
        from typer._click import exceptions as cx

        if isinstance(exc, cx.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, tx.Exit):  # Exit/Abort live in typer.exceptions, not the vendored click
            sys.exit(exc.exit_code)
        if isinstance(exc, tx.Abort):
            sys.exit(130)
        if _disk_full(exc) and not state["debug"]:
            where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
            typer.echo(f"haqmoe: error: disk full{where}: {getattr(exc, 'strerror', None) or 'no space left'}; outputs are written atomically, so "
                       f"nothing half-written was left: free space or choose another output directory", err=True)
            sys.exit(2)
        if state["debug"]:
            raise
        typer.echo(f"haqmoe: internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":  # python -m haqmoe.cli.main (the benches profile through it)
    main()
