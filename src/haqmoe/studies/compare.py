"""``haqmoe compare``: many methods, one model, one calibration set, one evaluator, one table.

Rows are named by labels: ``fp32``, a method name, or a method with options joined by '-':
``smoothquant-0.8`` (α), ``haq-rank1`` / ``gptq-act`` (column order), ``haq-auto`` (statistic),
``haq-paper`` (the paper's exact recipe: absmax statistic, natural order). ``ct:PATH`` (or ``NAME=ct:PATH``)
evaluates a checkpoint written by another tool (compressed-tensors, e.g. llm-compressor) on the same
windows; its quantization time comes from the ``peer_meta.json`` our peer scripts write beside it.
Each row records PPL, ΔPPL vs FP32, quantization wall time and peak resident memory.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..data.text import calibration_ids, eval_windows, load_text, tokenize
from ..errors import HaqmoeError
from ..eval.perplexity import perplexity
from ..io import atomic_write_text
from ..quant.config import QuantConfig
from ..quant.ctformat import load_compressed_tensors
from ..quant.gptq import ORDERS
from ..quant.methods import METHODS, MethodOptions, needs_calibration, quantize_with
from ..reliability.resume import BlockCheckpoint, partial_dir, run_fingerprint
from ..results import run_meta, write_results
from ..sources import load_model


@dataclass(frozen=True)
class RowSpec:
    label: str
    method: str  # "fp32", a METHODS name, or "external"
    opts: MethodOptions
    path: str | None = None  # external checkpoint


def parse_label(label: str, base: MethodOptions) -> RowSpec:
    name, sep, rest = label.partition("=")
    if sep and rest.startswith("ct:"):  # NAME=ct:PATH names an external row
        return RowSpec(name, "external", base, rest[3:])
    if label.startswith("ct:"):
        return RowSpec(label, "external", base, label[3:])
    if label in ("fp32", "fp"):
        return RowSpec("fp32", "fp32", base)
    method, *parts = label.split("-")
    if method not in METHODS:
        raise HaqmoeError(f"unknown method in '{label}' (methods: fp32, {', '.join(METHODS)}, ct:PATH)")
    opts = base
    for p in parts:
        if p in ORDERS:
            opts = replace(opts, order=p)
        elif p in ("absmax", "absmean", "auto"):
            opts = replace(opts, stat=p)
        elif p == "paper":
            opts = replace(opts, stat="absmax", order="natural")
        else:
            try:
                opts = replace(opts, alpha=float(p))
            except ValueError:
                raise HaqmoeError(f"cannot parse option '{p}' in '{label}'") from None
    return RowSpec(label, method, opts)


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak_gb`` over the watched span."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def peak_gb(self) -> float:
        return self.peak / 2**30


def external_quant_seconds(path: str) -> float:
    """The peer's own quantization time, if its script recorded one (bench/peers writes peer_meta.json)."""
    meta = Path(path) / "peer_meta.json"
    try:
        return float(json.loads(meta.read_text())["quant_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


@dataclass
class CompareSetup:
    model: str
    quant: QuantConfig
    eval_data: str = "wikitext2:test"
    seqlen: int = 2048
    windows: int | None = None  # None: all
    calib: str = "wikitext2:valid"
    calib_samples: int = 128
    calib_len: int = 512
    seed: int = 0


def run_row(spec: RowSpec, setup: CompareSetup, wins: torch.Tensor, calib: torch.Tensor | None,
            progress: bool, work: Path | None = None) -> dict:
    """One row. ``work``: a directory for the row's progress (finished quantization blocks, evaluated
    windows); a rerun with the same directory continues where a killed run stopped."""
    gc.collect()
    seconds = 0.0
    quant_file = None if work is None else work / "quant.json"
    with PeakRSS() as mem:
        if spec.method == "external":
            model = load_compressed_tensors(spec.path).model
            seconds = external_quant_seconds(spec.path)
        else:
            lm = load_model(setup.model, progress=progress)
            if lm.quant is not None:
                raise HaqmoeError(f"{setup.model} is already quantized; compare needs the FP model")
            model = lm.model
            if spec.method != "fp32":
                quant = replace(setup.quant, method=spec.method)
                rep = quantize_with(model, lm.adapter, spec.method, quant, calib, spec.opts, progress,
                                    _block_checkpoint(work, model, lm.adapter.layers, calib, spec, quant))
                seconds = rep.seconds
        quant_peak = mem.peak_gb
    if quant_file is not None:  # a resumed row reports the larger peak of its runs
        if quant_file.is_file():
            quant_peak = max(quant_peak, json.loads(quant_file.read_text())["peak_rss_gb"])
        atomic_write_text(quant_file, json.dumps({"peak_rss_gb": quant_peak}))
    res = perplexity(model, wins, 1, progress, desc=spec.label,
                     progress_file=None if work is None else work / "nll.json")
    del model
    return {"model": setup.model, "method": spec.label, "ppl": round(res.ppl, 4), "windows": res.windows,
            "tokens": res.tokens, "quant_seconds": round(seconds, 1), "peak_rss_gb": round(quant_peak, 2),
            "eval_seconds": round(res.seconds, 1)}


def _block_checkpoint(work: Path | None, model, layers: str, calib: torch.Tensor | None, spec: RowSpec,
                      quant: QuantConfig):
    if work is None or calib is None:
        return None

    return BlockCheckpoint.open(work / "quant", run_fingerprint(model, calib, (spec, quant)), quant, resume=True,
                                layers=layers, start_over="rerun without --resume to start over")


def add_deltas(rows: list[dict]) -> None:
    fp = next((r["ppl"] for r in rows if r["method"] == "fp32"), None)
    for r in rows:
        if fp:
            r["delta_ppl"] = round(r["ppl"] - fp, 4)
            r["delta_pct"] = round(100 * (r["ppl"] - fp) / fp, 2)


def bar_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib  # here: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["method"] for r in rows]
    ppl = [r["ppl"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    colors = ["#888" if lbl == "fp32" else ("#d62728" if lbl.startswith("haq") else "#1f77b4") for lbl in labels]
    ax.bar(labels, ppl, color=colors)
    lo, hi = min(ppl), max(ppl)
    ax.set_ylim(lo - 0.5 * (hi - lo + 0.01), hi + 0.2 * (hi - lo + 0.01))
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    for i, v in enumerate(ppl):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    plt.xticks(rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


_SETUP_KEYS = ("eval_data", "seqlen", "windows", "calib", "calib_samples", "calib_len", "seed", "quant")


def resumable_rows(out: Path, model: str, meta: dict) -> dict[str, dict]:
    """Rows of an earlier run of the same setup in ``out``, by label; a different setup reuses nothing.

    A full-test-set table is hours of CPU time per model; resuming lets it be built across sessions
    without ever mixing rows measured on different windows or calibration sets.
    """
    if not out.exists():
        return {}
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        raise HaqmoeError(f"{out} exists but is not a results file; move it away or pass another --out") from None
    same = all(old.get("meta", {}).get(k) == meta[k] for k in _SETUP_KEYS)
    return {r["method"]: r for r in old.get("rows", []) if same and r.get("model") == model}


def run_compare(setup: CompareSetup, labels: list[str], out: Path, base: MethodOptions = MethodOptions(),
                progress: bool = True, notes: str = "", command: str | None = None,
                resume: bool = False) -> list[dict]:
    """Run every row, writing ``out`` (.json/.md/.png) after each so a long run is never lost.

    ``resume``: keep rows already in ``out`` that were measured with the same setup (same model,
    windows, calibration, quantization config) and run only the missing labels; a row a kill
    interrupted continues from its finished quantization blocks and evaluated windows (OUT.partial/).
    """
    specs = [parse_label(lbl, base) for lbl in labels]
    tok = load_model(setup.model, progress=progress).tokenizer
    wins = eval_windows(tokenize(tok, load_text(setup.eval_data)), setup.seqlen, setup.windows)
    calib = None
    if any(s.method not in ("fp32", "external") and needs_calibration(s.method, setup.quant) for s in specs):
        calib = calibration_ids(tok, setup.calib, setup.calib_samples, setup.calib_len, setup.seed,
                                eval_spec=setup.eval_data)
    meta = run_meta(command, eval_data=setup.eval_data, seqlen=setup.seqlen, windows=int(wins.shape[0]),
                    calib=setup.calib, calib_samples=setup.calib_samples, calib_len=setup.calib_len,
                    seed=setup.seed, quant=setup.quant.as_dict())
    out = Path(out).with_suffix(".json")
    title = (f"{setup.model}: W{setup.quant.weights.bits}A{setup.quant.acts.bits if setup.quant.acts else 16} "
             f"methods on {setup.eval_data} ({int(wins.shape[0])} windows x {setup.seqlen})")
    done = resumable_rows(out, setup.model, meta) if resume else {}
    work = _work_dir(out, {"model": setup.model, **{k: meta[k] for k in _SETUP_KEYS}}, resume)
    rows: list[dict] = []
    for spec in specs:
        start = time.perf_counter()
        if spec.label in done:
            rows.append(done[spec.label])
            continue
        row_work = work / spec.label.replace("/", "_")
        rows.append(run_row(spec, setup, wins, calib, progress, row_work))
        rows[-1]["row_seconds"] = round(time.perf_counter() - start, 1)
        add_deltas(rows)
        if progress:
            print(rows[-1], flush=True)
        write_results(out, rows, meta, title, notes)
        bar_plot(rows, out.with_suffix(".png"), title)
        shutil.rmtree(row_work, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def _work_dir(out: Path, setup: dict, resume: bool) -> Path:
    """``OUT.partial/``: progress of unfinished rows, kept only for a resume of the same setup."""
    work = partial_dir(out)
    setup = json.dumps(setup, sort_keys=True)
    if work.exists() and not (resume and (work / "setup.json").is_file()
                              and (work / "setup.json").read_text() == setup):
        shutil.rmtree(work)
    atomic_write_text(work / "setup.json", setup)
    return work
