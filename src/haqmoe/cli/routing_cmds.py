"""Routing commands: profile (record traces), plan (build a placement), placement-eval (held-out hit rates)."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..costs.hardware import DEFAULT_PROFILE, PROFILE_HELP
from ..errors import HaqmoeError
from ..registry import COST_STRATEGIES, STRATEGIES, choices_help, source_help
from .common import app, emit, state  # noqa: F401

# Placement strategies (registry.py): the choices of --strategy
Strategy = Enum("Strategy", {n: n for n in STRATEGIES}, type=str)


@app.command()
def profile(model: str = typer.Argument("smollm2-moe", help="MoE model source (see `haqmoe info --help`)."),
            out: Path = typer.Option(..., "--out", "-o", help="Trace directory to write."),
            data: str = typer.Option("wikitext2:valid", help="Text source (wikitext2:SPLIT, pydoc, or a path)."),
            seqlen: int = typer.Option(512, min=1, help="Tokens per request (one window = one request)."),
            requests: Optional[int] = typer.Option(16, min=1, help="Number of requests (windows); all if omitted."),
            guess_width: int = typer.Option(4, min=0, help="Next-layer router ranking kept for prefetch (0: none)."),
            chunk: int = typer.Option(4, min=1, help="Requests per chunk file (resume granularity)."),
            generate: int = typer.Option(0, min=0, help="Greedy tokens generated after each window, their routing "
                                         "flagged decode (what caches and prefetch see when serving; no stop at end of "
                                         "sequence; 0: none)."),
            resume: bool = typer.Option(False, help="Continue an interrupted trace in --out."),
            overwrite: bool = typer.Option(False, help="Replace an existing trace."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Run a MoE model over text and record per token and MoE layer its top-k experts and router weights."""
    # torch and transformers load on use, not at CLI start-up
    from ..routing.profile import ProfileConfig, profile_to_disk
    from ..routing.trace_io import load_trace
    from ..sources import load_model

    if out.exists() and not out.is_dir():  # before the model loads
        raise HaqmoeError(f"--out {out} is a file: a trace is a directory")
    start = time.perf_counter()
    lm = load_model(model, progress=state["progress"])
    cfg = ProfileConfig(data, seqlen, requests, guess_width, chunk, generate)
    path = profile_to_disk(lm, cfg, out, resume=resume, overwrite=overwrite, progress=state["progress"])
    tr = load_trace(path)
    decode = int(tr.decode.sum()) if tr.decode is not None else 0
    payload = {"model": model, "out": str(path), "tokens": tr.num_tokens, "decode_tokens": decode,
               "requests": tr.num_requests,
               "layers": tr.num_layers, "experts": tr.num_experts, "top_k": tr.top_k,
               "seconds": round(time.perf_counter() - start, 1)}
    emit(payload, as_json, f"wrote trace {path}: {tr.num_requests} requests, {tr.num_tokens} tokens "
                           f"({decode} generated), "
                           f"{tr.num_layers} MoE layers x {tr.num_experts} experts (top-{tr.top_k}), "
                           f"{payload['seconds']} s")


_PROFILE_HELP = PROFILE_HELP + " Expert costs of the routing data's model on it (costs/)."
_SOURCE_HELP = source_help("stats")


@app.command()
def plan(source: str = typer.Argument(..., help=_SOURCE_HELP),
         out: Path = typer.Option(..., "--out", "-o", help="Plan JSON to write."),
         strategy: Strategy = typer.Option("latency-balanced", help=choices_help(STRATEGIES) + "."),
         budget: Optional[int] = typer.Option(None, help="GPU slots in experts (over all layers)."),
         budget_gb: Optional[float] = typer.Option(None, help="GPU memory for experts in GB (instead of --budget)."),
         profile: str = typer.Option(DEFAULT_PROFILE, help=_PROFILE_HELP),
         expert_dtype: str = typer.Option("int8", help="Expert storage for byte budgets: int8 or fp16."),
         window: int = typer.Option(2, min=1, help="Path window in layers (path-frequency, two-stage)."),
         top_k_per_layer: Optional[int] = typer.Option(None, help="two-stage Stage I count per layer."),
         supplement_k_per_layer: Optional[int] = typer.Option(None, help="two-stage Stage II count per layer."),
         request_len: Optional[int] = typer.Option(25, min=1, help="Request length the latency strategies "
                                                                   "optimise for (tokens)."),
         decode_tokens: int = typer.Option(32, min=0, help="Generated tokens per request in the latency "
                                                           "objective (routed like the prompt)."),
         overwrite: bool = typer.Option(False, help="Replace an existing plan file."),
         as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Build a GPU expert placement plan (per layer: resident experts, bytes, expected hit rate)."""
    # numpy and the routing library load on use: `haqmoe --help` and the other commands start without them
    from ..costs.planning import planning_costs_for
    from ..routing.placement import Budget, build_plan, make_strategy
    from ..routing.sources import load_source

    strategy = strategy.value

    if out.exists() and not overwrite:
        raise HaqmoeError(f"plan {out} exists (use --overwrite)")
    if expert_dtype not in ("int8", "fp16"):
        raise HaqmoeError(f"--expert-dtype must be int8 or fp16, got '{expert_dtype}'")
    if (budget is None) == (budget_gb is None):  # before the routing data loads; Budget.of knows no flag names
        raise HaqmoeError("plan needs one GPU budget: --budget N (expert slots over all layers) or --budget-gb GB "
                          f"(memory for experts){'' if budget is None else ', not both'}")
    src = load_source(source)
    stats = src.stats(window)
    prof = planning_costs_for(profile, src.model, *src.shape, stats.top_k, "fp16" if expert_dtype == "fp16" else "w8a8")
    ebytes = prof.expert_bytes
    b = Budget.of(stats, budget, None if budget_gb is None else budget_gb * 1e9, ebytes)
    rc = src.requests(request_len, seed=1) if strategy in COST_STRATEGIES and src.requests_fn else None
    p = build_plan(make_strategy(strategy, prof, rc, top_k_per_layer=top_k_per_layer,
                                 supplement_k_per_layer=supplement_k_per_layer,
                                 decode_tokens=decode_tokens), stats, b, ebytes)
    p.model = p.model or src.model
    p.params["source"] = source
    p.save(out)
    d = p.to_json()
    payload = {"out": str(out), "strategy": strategy, "experts": p.size, "bytes": d["bytes"],
               "expected_hit_mean": d["expected_hit_mean"], "layers": p.num_layers, "num_experts": p.num_experts,
               "profile": prof.name}
    emit(payload, as_json, f"wrote {strategy} plan {out}: {p.size} of {p.num_layers * p.num_experts} experts "
                           f"({d['bytes'] / 1e9:.2f} GB at {prof.name}'s expert size), "
                           f"build-set hit {100 * d['expected_hit_mean']:.1f}%")


@app.command("placement-eval")
def placement_eval(plans: list[Path] = typer.Argument(..., help="Plan JSON files (haqmoe plan)."),
                   on: str = typer.Option(..., "--on", help="Held-out routing data. " + _SOURCE_HELP),
                   request_len: list[int] = typer.Option([25, 50, 100], min=1, help="Request lengths for per-request "
                                                                                    "hit and latency (repeatable)."),
                   profile: str = typer.Option(DEFAULT_PROFILE, help=_PROFILE_HELP),
                   decode_tokens: int = typer.Option(32, min=0, help="Generated tokens per request in the "
                                                                     "latency estimate."),
                   out: Optional[Path] = typer.Option(None, help="Write results JSON + markdown here."),
                   plot: Optional[Path] = typer.Option(None, help="Write a per-layer hit-rate plot (PNG)."),
                   as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Hit rates of plans on routing NOT used to build them: per layer, mean/std/gap, per request, latency."""
    # numpy, tqdm and the routing library load on use: `haqmoe --help` and the other commands start without them
    from tqdm import tqdm

    from ..costs.planning import planning_costs_for
    from ..routing.evaluate import HitSummary, expected_latency_ms, layer_hit, per_request_hit
    from ..routing.placement import Plan
    from ..routing.sources import load_source, shares_data

    src = load_source(on)
    L, E = src.shape
    prof = planning_costs_for(profile, src.model, L, E, 0)
    loaded = [Plan.load(p, L, E) for p in plans]
    lengths = [n for n in request_len if src.requests_fn is not None and src.has_requests(n)]
    if src.requests_fn is not None and lengths != list(request_len):
        typer.echo(f"note: {on} has no request of {sorted(set(request_len) - set(lengths))} tokens; "
                   "those lengths are left out", err=True)
    rows, per_layer = [], {}
    for path, p in tqdm(list(zip(plans, loaded)), desc="evaluate", disable=not state["progress"]):
        in_sample = shares_data(p.params.get("source", ""), on)
        for n in [None, *lengths]:
            if n is None:
                hit = HitSummary.of(layer_hit(p.mask(), src.counts))
                per_layer[f"{path.stem} ({p.strategy})"] = hit.per_layer
            else:
                hit = per_request_hit(p.mask(), src.requests(n, seed=2))
            lat = expected_latency_ms(p, src.requests(n, seed=2), prof, decode_tokens) \
                if src.requests_fn is not None and src.has_requests(n) else None
            rows.append({"plan": str(path), "strategy": p.strategy, "budget": p.size, "in_sample": in_sample,
                         "request_len": "full" if n is None else n, "mean_hit": round(hit.mean, 2),
                         "std_hit": round(hit.std, 2), "gap_hit": round(hit.gap, 2),
                         "expected_latency_ms": None if lat is None else round(lat, 2),
                         "per_layer_hit": [round(float(x), 2) for x in hit.per_layer]})
    if out is not None:
        from ..results import run_meta, write_results  # imports torch and transformers (their versions)

        write_results(out, rows, run_meta(), f"Placement evaluation on {on}",
                      f"Hit rate in percent across {L} MoE layers; latency under profile {profile}.",
                      [c for c in rows[0] if c != "per_layer_hit"] if rows else None)
    if plot is not None:
        _plot_layers(per_layer, plot, on)
    human = "\n".join(f"{r['strategy']:>18} {r['budget']:>4} n={r['request_len']!s:>4}: mean {r['mean_hit']:.2f}% "
                      f"std {r['std_hit']:.2f} gap {r['gap_hit']:.2f}"
                      + ("" if r["expected_latency_ms"] is None else f"  latency {r['expected_latency_ms']:.1f} ms")
                      + ("  (IN-SAMPLE: the plan was built on this data)" if r["in_sample"] else "")
                      for r in rows)
    emit({"on": on, "profile": prof.name, "rows": rows}, as_json, human)


def _plot_layers(per_layer: dict, path: Path, title: str) -> None:
    import matplotlib  # heavy: only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, hit in per_layer.items():
        ax.plot(range(len(hit)), hit, marker="o", ms=3, label=f"{name}: mean {hit.mean():.1f}%")
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("hit rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"per-layer hit rate on {title}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@app.command("routing-stats")
def routing_stats(source: str = typer.Argument(..., help=_SOURCE_HELP),
                  window: int = typer.Option(2, min=1, help="Path window in layers (1 = per-layer top-k set)."),
                  held_out: Optional[str] = typer.Option(None, help="A second trace: report how many of its paths "
                                                                    "were seen in SOURCE, per window."),
                  plot: Optional[Path] = typer.Option(None, help="Write heat map + path distribution (PNG)."),
                  as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Expert frequency, load skew, entropy and activation-path statistics of routing data."""
    # numpy and the routing library load on use: `haqmoe --help` and the other commands start without them
    import numpy as np

    from ..routing.sources import load_source
    from ..routing.stats import entropy_bits, load_skew, path_coverage, summary
    from ..routing.trace_io import check_model

    src = load_source(source)
    st = src.stats(window)
    payload = {"source": source, **summary(st),
               "frequency": np.round(st.frequency, 4).tolist(),
               "entropy_bits": np.round(entropy_bits(st), 3).tolist(),
               "load_skew": np.round(load_skew(st), 3).tolist()}
    if held_out is not None:
        other = load_source(held_out)
        if other.trace is None:
            raise HaqmoeError("--held-out needs a trace directory (per-token paths)")
        check_model(*other.shape, *src.shape, f"--held-out {held_out}")
        ws = sorted({1, window, 4, st.num_layers} & set(range(1, st.num_layers + 1)))
        payload["held_out_path_coverage"] = {w: round(path_coverage(src.stats(w), other.trace), 4) for w in ws}
    if plot is not None:
        from ..studies.plots import plot_stats  # matplotlib: only plots need it

        plot_stats(st, plot, source, src.trace)
    human = (f"{source}: {st.num_layers} MoE layers x {st.num_experts} experts (top-{st.top_k}), {st.tokens} tokens\n"
             f"entropy {payload['entropy_bits_mean']:.3f} of {payload['entropy_bits_max']:.0f} bits, "
             f"load skew mean {payload['load_skew_mean']:.2f} max {payload['load_skew_max']:.2f}, "
             f"{payload['distinct_paths']} distinct paths (window {window})"
             + ("" if held_out is None else "\nheld-out paths seen: " + ", ".join(
                 f"w={w}: {100 * c:.1f}%" for w, c in payload["held_out_path_coverage"].items())))
    emit(payload, as_json, human)
