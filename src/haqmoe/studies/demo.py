"""``haqmoe demo``: the product tour on the embedded models, minutes on 2 CPU cores.

1. perplexity of the dense SmolLM2 and its MoEfied MoE (experts that differ): FP32, RTN W8A8 and HAQ W8A8;
2. routing profile of the MoE on WikiText-2 valid (build) and test (held out);
3. placement plans by three strategies, their per-layer held-out hit rates;
4. a few sentences generated through the collaborative runtime (GPU tier emulated on the CPU when
   no GPU is present) with the plan pinned and an LRU cache, with telemetry;
5. ``demo-report/``: report.md + report.json + PNG plots.
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ..data.text import calibration_ids, eval_windows, load_text, tokenize  # noqa: E402
from ..eval.perplexity import perplexity  # noqa: E402
from ..io import atomic_write_text  # noqa: E402
from ..models.embedded import DENSE, MOEFIED  # noqa: E402
from ..paths import shared_data_dir  # noqa: E402
from ..quant.config import QuantConfig  # noqa: E402
from ..quant.methods import MethodOptions, quantize_with  # noqa: E402
from ..results import markdown_table, run_meta, write_results  # noqa: E402
from ..sources import load_model  # noqa: E402

STRATEGIES = ("global-frequency", "two-stage", "latency-balanced")
PROMPTS = ("The history of the Roman Empire", "Photosynthesis is the process by which")


def _texts() -> tuple[str, str]:
    """(calibration/build text, evaluation text): never the same text."""
    if shared_data_dir() is not None:
        return "wikitext2:valid", "wikitext2:test"
    return "pydoc", "pydoc"  # offline fresh install: pydoc only (windows split below)


def _ppl_rows(windows: int, calib_samples: int, progress: bool) -> list[dict]:
    calib_src, eval_src = _texts()
    rows = []
    for name in (DENSE, MOEFIED):
        for method in ("fp32", "rtn", "haq"):
            lm = load_model(name, progress=progress)
            ids = tokenize(lm.tokenizer, load_text(eval_src))
            wins = eval_windows(ids, 2048, windows) if eval_src != calib_src else \
                eval_windows(ids[:, ids.shape[1] // 2:], 2048, windows)
            quant_s = 0.0
            if method != "fp32":
                calib = calibration_ids(lm.tokenizer, calib_src, calib_samples, 512, 0) \
                    if eval_src != calib_src else None
                if calib is None:  # pydoc only: calibrate on its first half, evaluate on the second
                    from ..data.text import sample_windows

                    calib = sample_windows(ids[:, : ids.shape[1] // 2], calib_samples, 512, 0)
                start = time.perf_counter()
                quantize_with(lm.model, lm.adapter, method, QuantConfig.w8a8(method), calib,
                              MethodOptions(), progress)
                quant_s = time.perf_counter() - start
            res = perplexity(lm.model, wins, progress=progress, desc=f"{name} {method}")
            rows.append({"model": name, "method": method, "ppl": res.ppl, "windows": res.windows,
                         "tokens": res.tokens, "quant_seconds": round(quant_s, 1), "eval_seconds": round(res.seconds, 1)})
    base = {r["model"]: r["ppl"] for r in rows if r["method"] == "fp32"}
    for r in rows:
        r["delta_ppl_pct"] = 100 * (r["ppl"] / base[r["model"]] - 1)
    return rows


def _placement(progress: bool, requests: int = 8, seqlen: int = 256):
    from ..routing.evaluate import evaluate_trace, request_counts
    from ..routing.placement import Budget, build_plan, make_strategy
    from ..routing.profile import trace_windows
    from ..routing.stats import stats_from_trace
    from ..costs.hardware import DEFAULT_PROFILE
    from ..costs.planning import planning_costs_for

    lm = load_model(MOEFIED, progress=progress)
    build_src, eval_src = _texts()
    ids_b = tokenize(lm.tokenizer, load_text(build_src))
    ids_e = tokenize(lm.tokenizer, load_text(eval_src))
    if build_src == eval_src:
        half = ids_b.shape[1] // 2
        ids_b, ids_e = ids_b[:, :half], ids_e[:, half:]
    build = trace_windows(lm.model, lm.adapter, eval_windows(ids_b, seqlen, requests), progress=progress)
    held = trace_windows(lm.model, lm.adapter, eval_windows(ids_e, seqlen, requests), progress=progress)
    stats = stats_from_trace(build, source=build_src)
    budget = Budget.of(stats, experts=stats.counts.size // 2)
    profile = planning_costs_for(DEFAULT_PROFILE, MOEFIED, build.num_layers, build.num_experts, build.top_k)
    plans, rows = {}, []
    for name in STRATEGIES:
        plan = build_plan(make_strategy(name, profile, request_counts(build, 25)), stats, budget)
        hit = evaluate_trace(plan, held)
        plans[name] = (plan, hit)
        rows.append({"strategy": name, "budget": plan.size, "mean_hit": hit.mean, "std_hit": hit.std,
                     "gap_hit": hit.gap})
    return plans, rows


def _generate(plan, progress: bool) -> tuple[list[dict], dict]:
    import tempfile

    from ..runtime.engine import CollaborativeEngine, EngineConfig, SamplingConfig, latency_stats

    with tempfile.TemporaryDirectory() as tmp:
        path = plan.save(Path(tmp) / "plan.json")
        lm = load_model(MOEFIED, progress=progress)
        engine = CollaborativeEngine(lm, EngineConfig(emulate_gpu=True, cache_policy="pinned+lru",
                                                      decision="predictor", plan=str(path),
                                                      slots_per_layer=max(len(r) for r in plan.resident) + 1))
    outs, token_ms, prefill = [], [], []
    for prompt in PROMPTS:
        gen = engine.generate(prompt, SamplingConfig(max_new_tokens=24))
        outs.append({"prompt": prompt, "text": gen.text.strip()})
        token_ms += gen.token_ms
        prefill.append(gen.prefill_ms)
    summary = engine.summary() | latency_stats(token_ms) | {"prefill_ms": float(np.mean(prefill)),
                                                            "token_ms": token_ms}
    return outs, summary


def _plots(report: Path, ppl_rows: list[dict], plans: dict, tele: dict) -> list[str]:
    names = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['model']}\n{r['method']}" for r in ppl_rows]
    ax.bar(labels, [r["ppl"] for r in ppl_rows], color=["#888" if r["method"] == "fp32" else
                                                        "#d62728" if r["method"] == "rtn" else "#2ca02c"
                                                        for r in ppl_rows])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("WikiText-2 perplexity: FP32 vs W8A8 (RTN, HAQ)")
    ax.set_ylim(min(r["ppl"] for r in ppl_rows) * 0.95, max(r["ppl"] for r in ppl_rows) * 1.03)
    fig.tight_layout()
    fig.savefig(report / "ppl.png", dpi=110)
    names.append("ppl.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, (plan, hit) in plans.items():
        ax.plot(np.arange(len(hit.per_layer)), hit.per_layer, marker="o", ms=3,
                label=f"{name} (mean {hit.mean:.1f}%, std {hit.std:.1f})")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("held-out hit rate (%)")
    ax.set_title("Per-layer GPU hit rate of placement plans (50% of experts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "hit_rate.png", dpi=110)
    names.append("hit_rate.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(tele["token_ms"], bins=20, color="#1f77b4")
    ax.axvline(tele["p50_ms"], color="k", ls="--", label=f"p50 {tele['p50_ms']:.0f} ms")
    ax.axvline(tele["p95_ms"], color="r", ls=":", label=f"p95 {tele['p95_ms']:.0f} ms")
    ax.set_xlabel("decode latency per token (ms)")
    ax.set_ylabel("tokens")
    ax.set_title(f"Collaborative runtime decode latency (prefill mean {tele['prefill_ms']:.0f} ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "latency.png", dpi=110)
    names.append("latency.png")
    plt.close(fig)
    return names


def run_demo(windows: int = 2, report_dir: Path = Path("demo-report"), progress: bool = True,
             calib_samples: int = 8) -> dict:
    console = Console()
    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    console.print("[bold]haqmoe demo[/bold] 1/4: perplexity FP32 vs RTN vs HAQ (W8A8)")
    ppl_rows = _ppl_rows(windows, calib_samples, progress)
    table = Table(title=f"Perplexity, {_texts()[1]}, {windows} x 2048 tokens")
    for col in ("model", "method", "ppl", "Δppl %", "quant s"):
        table.add_column(col)
    for r in ppl_rows:
        table.add_row(r["model"], r["method"], f"{r['ppl']:.3f}", f"{r['delta_ppl_pct']:+.2f}", f"{r['quant_seconds']:.0f}")
    console.print(table)

    console.print("[bold]2/4[/bold]: routing profile and placement plans (held-out hit rate)")
    plans, place_rows = _placement(progress)
    console.print(markdown_table(place_rows))

    console.print("[bold]3/4[/bold]: generation through the collaborative runtime")
    outs, tele = _generate(plans["latency-balanced"][0], progress)
    for o in outs:
        console.print(f"[cyan]{o['prompt']}[/cyan] {o['text']}")
    keys = ("hit_rate", "cpu_expert_calls", "gpu_expert_calls", "bytes_moved", "prefill_ms", "p50_ms", "p95_ms")
    console.print("  ".join(f"{k}={tele[k]:.3g}" if isinstance(tele[k], float) else f"{k}={tele[k]}" for k in keys))

    console.print("[bold]4/4[/bold]: writing the report")
    plots = _plots(report, ppl_rows, plans, tele)
    meta = run_meta(seconds=round(time.perf_counter() - start, 1), texts=_texts())
    write_results(report / "ppl.json", ppl_rows, meta, "Perplexity")
    md = ["# haqmoe demo report", "",
          f"Embedded models, {meta['machine']}, {meta['seconds']} s in all.", "",
          f"## Perplexity ({_texts()[1]}, {windows} windows of 2048; calibration {calib_samples} x 512 "
          f"of {_texts()[0]})", "", markdown_table(ppl_rows), "![perplexity](ppl.png)", "",
          "## Expert placement (built on the calibration text, evaluated on held-out text)", "",
          markdown_table(place_rows), "![hit rate](hit_rate.png)", "",
          "## Collaborative runtime (latency-balanced plan pinned + LRU, predictor)", "",
          *[f"- **{o['prompt']}** {o['text']}" for o in outs], "",
          markdown_table([{k: tele[k] for k in keys}]), "![latency](latency.png)", "",
          "GPU tier emulated on the CPU when no GPU is present: hit rates and transfers are real "
          "decisions of the runtime, latencies are CPU latencies.", ""]
    atomic_write_text(report / "report.md", "\n".join(md))
    console.print(f"report: {report / 'report.md'} (plots: {', '.join(plots)})")
    return {"ppl": ppl_rows, "placement": place_rows, "generation": outs, "telemetry": tele}
