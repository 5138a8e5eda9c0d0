"""Runtime commands: run, bench-runtime, simulate, cache-eval, measure-profile."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..costs.hardware import DEFAULT_PROFILE, PROFILE_HELP, load_profile
from ..errors import HaqmoeError
from ..io import atomic_write_text
from ..registry import CACHE_POLICIES, DECISION_POLICIES, SIM_POLICIES, choices_help, source_help
from ..runtime.cache import MAX_LOOKAHEAD
from .common import app, emit, state  # noqa: F401

_SOURCE_HELP = source_help("replay")


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HaqmoeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise HaqmoeError(f"{what} is empty")
    return vals


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


@app.command("cache-eval")
def cache_eval(source: str = typer.Argument("mixtral-stats", help=_SOURCE_HELP),
               fracs: str = typer.Option("0.25,0.5,0.625", help="Cache sizes as fractions of all experts."),
               policies: str = typer.Option("static,lru,lfu,pinned+lru,lru+alloc,pinned+lfu+alloc,freq-oracle,belady",
                                            help="Cache policies, comma-separated: "
                                                 + choices_help(CACHE_POLICIES, "; ") + "."),
               prefetch: str = typer.Option("both", help="Prefetch: off, on or both."),
               exact: bool = typer.Option(False, help="Replay the trace's own guesses (error if it has none)."),
               guess_recall: Optional[float] = typer.Option(None, help="Top-k recall of synthetic guesses "
                                                            "(traces without guesses; default 0.8)."),
               scope: str = typer.Option("layer", help="Slot pools: layer or global."),
               profile: str = typer.Option(DEFAULT_PROFILE, help=PROFILE_HELP + " For tok/s."),
               decision: str = typer.Option("always-transfer", help="Decision policy of the timed replay: "
                                            + choices_help(DECISION_POLICIES) + "."),
               held_out: float = typer.Option(0.5, min=0.1, max=0.9, help="Share of requests held out."),
               out: Optional[Path] = typer.Option(None, help="Write results JSON/MD (+ a .png plot)."),
               as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Hit rate (resident when needed) and demand hit rate per cache policy, with and without prefetch."""
    # torch (next-layer guesses) and the simulator load on use, not at CLI start-up
    from ..results import run_meta, write_results
    from ..studies.experiments import cache_rows, guess_rows, load_pair, plot_cache

    modes = {"off": (False,), "on": (True,), "both": (False, True)}
    if prefetch not in modes:
        raise HaqmoeError(f"--prefetch must be off, on or both, got {prefetch!r}")
    prof = load_profile(profile)
    pair = load_pair(source, held_out)
    rows = cache_rows(pair, prof, _floats(fracs, "--fracs"), _names(policies), modes[prefetch], decision, scope,
                      guess_recall, exact, state["progress"])
    guesses = guess_rows(pair)
    payload = {"rows": rows, "guess_quality": guesses}
    if out is not None:
        write_results(out, rows, run_meta(), f"Cache policies on {pair.source}")
        payload["plot"] = str(plot_cache(rows, Path(out).with_suffix(".png")))
    human = "\n".join(f"cache {r['cache_frac']:<5} {r['policy']:<18} prefetch={str(r['prefetch']):<5} "
                      f"hit (resident when needed) {r['hit_rate']:.3f}  demand hit {r['demand_hit_rate']:.3f}  "
                      f"P(all) {r['p_all_resident']:.3f}  moved {r['bytes_moved_gb']:.1f} GB  "
                      f"decode {r['decode_tok_s']:.1f} tok/s" for r in rows)
    emit(payload, as_json, f"{pair.source} ({pair.kind}), held-out {pair.eval.num_tokens} tokens\n{human}")


@app.command()
def simulate(source: str = typer.Argument("mixtral-stats", help=_SOURCE_HELP),
             profile: str = typer.Option(DEFAULT_PROFILE, help=PROFILE_HELP),
             policies: str = typer.Option(",".join(SIM_POLICIES),
                                          help="Runtime policies to compare, comma-separated: "
                                               + ", ".join(SIM_POLICIES) + " (registry.py SIM_POLICIES)."),
             budget_gb: Optional[float] = typer.Option(None, help="GPU memory budget (default: the profile's)."),
             prefill_tokens: int = typer.Option(512, min=1, help="Prompt length of the prefill estimate."),
             guess_recall: Optional[float] = typer.Option(None, help="Top-k recall of prefetch guesses."),
             lookahead: int = typer.Option(1, min=1, max=MAX_LOOKAHEAD, help="Layers ahead the prefetching "
                                           "policies guess and prefetch (1: the next layer; farther: synthetic "
                                           "guesses of the recall runtime/prefetch.py assumes)."),
             out: Optional[Path] = typer.Option(None, help="Write results JSON/MD."),
             as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Predict decode/prefill latency and GPU memory of a MoE model on a hardware profile."""
    # torch (next-layer guesses) and the simulator load on use, not at CLI start-up
    from ..results import run_meta, write_results
    from ..studies.experiments import load_pair, simulate_rows

    prof = load_profile(profile)
    pair = load_pair(source)
    rows = simulate_rows(pair, prof, _names(policies), budget_gb, prefill_tokens, guess_recall,
                         progress=state["progress"], lookahead=lookahead)
    if out is not None:
        write_results(out, rows, run_meta(profile=prof.name), f"Simulated {pair.source} on {prof.name}")
    human = "\n".join(f"{r['policy']:<16} decode {r['decode_tok_s']:6.2f} tok/s  prefill({prefill_tokens}) "
                      f"{r['prefill_ms_512']:7.1f} ms  p50 {r['latency_p50_ms']:.1f} p99 {r['latency_p99_ms']:.1f} "
                      f"std {r['latency_std_ms']:.2f} ms  hit {r['hit_rate']:.3f}  GPU {r['gpu_mem_gb']:.1f} GB "
                      f"(FP16 {r['gpu_mem_fp16_gb']:.1f})" for r in rows)
    emit({"rows": rows}, as_json, f"{pair.source} on {prof.description}\n{human}")


@app.command("measure-profile")
def measure_profile_cmd(out: Path = typer.Option(..., "-o", "--out", help="Profile JSON to write."),
                        name: str = typer.Option("measured", help="Profile name.")) -> None:
    """Measure this machine's hardware profile (GPU and PCIe bandwidth, int8/fp16 throughput, host memory
    bandwidth, CPU int8/fp32 throughput) for `simulate --profile FILE.json`. Needs a CUDA GPU."""
    from ..runtime.calibrate import measure_profile  # torch: loads on use, not at CLI start-up

    if out.suffix != ".json":
        raise HaqmoeError(f"--out must be a .json file (got {out})")
    prof = measure_profile(name)
    atomic_write_text(out, prof.to_json() + "\n")
    emit({"profile": str(out)}, False, f"wrote {out}: {prof.description}; H2D {prof.h2d_gb_s:.1f} GB/s, GPU "
                                       f"{prof.gpu_mem_bw_gb_s:.0f} GB/s, host {prof.cpu_mem_bw_gb_s:.1f} GB/s")
