"""Engine commands: ``run`` (generate with telemetry) and ``bench-runtime`` (latency per policy)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from enum import Enum

import typer

from ..costs.hardware import DEFAULT_PROFILE, PROFILE_HELP
from ..errors import HaqmoeError
from ..registry import CACHE_POLICIES, DECISION_POLICIES, ENGINE_CACHE_POLICIES, choices_help
from ..runtime.cache import MAX_LOOKAHEAD
from .common import GEN_OPTS, app, echo_summary, emit, state

# the registry's names as the choices of --policy and --cache-policy
DecisionPolicy = Enum("DecisionPolicy", {n: n for n in DECISION_POLICIES}, type=str)
EngineCachePolicy = Enum("EngineCachePolicy", {n: n for n in ENGINE_CACHE_POLICIES}, type=str)

_ENGINE_OPTS = dict(
    policy=typer.Option("predictor", help="Non-resident experts: " + choices_help(DECISION_POLICIES) + "."),
    cache_policy=typer.Option("lru", help="GPU cache eviction: " + choices_help({n: CACHE_POLICIES[n] for n in
                                                                           ENGINE_CACHE_POLICIES}) + "."),
    slots=typer.Option(None, min=0, help="GPU expert slots per layer (default: as many as GPU memory holds "
                       "beside the other weights, a 4096-token KV cache and 1 GiB; emulated: plan size, else half)."),
    gpu_memory=typer.Option(None, help="GPU memory the engine may use, e.g. 24GB (default: all that is free); "
                            "the expert slots are sized to it."),
    plan=typer.Option(None, help="Placement plan JSON from `haqmoe plan`."),
    device=typer.Option("auto", help="auto | cpu | cuda."),
    emulate_gpu=typer.Option(False, help="Run the GPU-tier path (cache, copies, predictor) on the CPU."),
    profile=typer.Option(DEFAULT_PROFILE, help=PROFILE_HELP + " The cost model when no GPU is measured."),
    exec_mode=typer.Option("fake", "--exec", help="Quantized execution: fake | dequant | real | auto."),
    prefetch=typer.Option(0, min=0, help="Experts to prefetch per layer ahead (GPU tier; 0 = off), copied "
                          "while the copy engine would otherwise idle during the current layer."),
    lookahead=typer.Option(1, min=1, max=MAX_LOOKAHEAD, help="With --prefetch: guess and prefetch the experts "
                           "of layers l+1 .. l+N at layer l (1 = the next layer only). Moves copies earlier, never "
                           "changes the output."),
    guess_trace=typer.Option(None, help="Trace from `haqmoe profile` of this model: prefetch learns, per layer, "
                             "whether expert co-occurrence guesses better than the next router."),
    admit=typer.Option(None, "--admit/--no-admit", help="Also copy experts served on the CPU into the GPU cache "
                       "for their next use (background admission, while the copy engine is idle). Default: on "
                       "for predictor, balanced and split without --plan (else one-token misses never fill the "
                       "cache), off for the peer policies and with a plan."),
    compile_decode=typer.Option(False, "--compile", help="Compile the decode step (torch.compile over a static "
                                "KV cache, replayed as CUDA graphs around the eager experts). For CUDA: on the "
                                "CPU a MoE step breaks into small graphs and gets slower. The first decode steps "
                                "compile (seconds to minutes); needs a C++ compiler on the CPU."),
    skip_below=typer.Option(0.0, min=0.0, max=1.0, help="Miss lever (GPU tier): skip a missed expert whose "
                            "router weight, renormalised over the token's top-k, is below this; the token's other "
                            "experts' weights are rescaled to the sum they had, a token's top expert always runs. "
                            "Changes the output (0 = off, exact)."),
    low_below=typer.Option(0.0, "--low-precision-below", min=0.0, max=1.0, help="Miss lever (GPU tier): a missed "
                           "expert whose renormalised router weight is below this (and not skipped) runs on the "
                           "CPU from an int4 copy (groups of 128 input columns, built at load): about half the "
                           "bytes to read. Changes the output (0 = off, no copy built)."),
    low_all=typer.Option(False, "--low-precision-all", help="With --low-precision-below > 0: every miss not "
                         "skipped is served from the int4 copy, a token's top expert's too."),
)


def build_engine(model: str, policy: str, cache_policy: str, slots: Optional[int], plan: Optional[str],
                 device: str, emulate_gpu: bool, profile: str, exec_mode: str, prefetch: int = 0,
                 guess_trace: Optional[str] = None, admit: Optional[bool] = None, compile_decode: bool = False,
                 gpu_memory: Optional[str] = None, skip_below: float = 0.0, low_below: float = 0.0,
                 low_all: bool = False, lookahead: int = 1):
    from ..sources import load_model
    from ..reliability.guard import parse_bytes
    from ..runtime.engine import CollaborativeEngine, EngineConfig, plan_path

    policy, cache_policy = str(getattr(policy, "value", policy)), str(getattr(cache_policy, "value", cache_policy))
    budget = parse_bytes(gpu_memory) if gpu_memory is not None else None  # bad sizes fail before the load
    if budget is not None and budget <= 0:
        raise HaqmoeError(f"--gpu-memory must be positive, got '{gpu_memory}'")
    lm = load_model(model, progress=state["progress"])
    cfg = EngineConfig(device=device, emulate_gpu=emulate_gpu, slots_per_layer=slots, gpu_memory=budget,
                       cache_policy=cache_policy,
                       decision=policy, plan=plan_path(plan), profile=profile, exec_mode=exec_mode,
                       prefetch=prefetch, guess_trace=guess_trace, admit=admit, compile=compile_decode,
                       skip_below=skip_below, low_below=low_below, low_all=low_all, lookahead=lookahead)
    return CollaborativeEngine(lm, cfg)


NO_GPU_TIER = ("no GPU tier (torch sees no CUDA device; --emulate-gpu runs the GPU-tier path on the CPU): "
               "every expert runs on the CPU")


def warn_without_gpu_tier(engine, policies: int = 1) -> None:
    """Say plainly that the collaborative part is off, rather than print a hit rate of nothing."""
    if engine.cache is None:
        extra = f"; the {policies} policies cannot differ" if policies > 1 else ""
        typer.echo(f"haqmoe: note: {NO_GPU_TIER}{extra}", err=True)


@app.command()
def run(model: str = typer.Argument("smollm2-moe", help="MoE model source (embedded name, directory, ...)."),
        prompt: str = GEN_OPTS["prompt"], chat: bool = GEN_OPTS["chat"], max_tokens: int = GEN_OPTS["max_tokens"],
        temperature: float = GEN_OPTS["temperature"], top_p: float = GEN_OPTS["top_p"], seed: int = GEN_OPTS["seed"],
        policy: DecisionPolicy = _ENGINE_OPTS["policy"],
        cache_policy: EngineCachePolicy = _ENGINE_OPTS["cache_policy"],
        slots: Optional[int] = _ENGINE_OPTS["slots"], gpu_memory: Optional[str] = _ENGINE_OPTS["gpu_memory"],
        plan: Optional[str] = _ENGINE_OPTS["plan"],
        device: str = _ENGINE_OPTS["device"], emulate_gpu: bool = _ENGINE_OPTS["emulate_gpu"],
        profile: str = _ENGINE_OPTS["profile"], exec_mode: str = _ENGINE_OPTS["exec_mode"],
        prefetch: int = _ENGINE_OPTS["prefetch"], guess_trace: Optional[str] = _ENGINE_OPTS["guess_trace"],
        admit: Optional[bool] = _ENGINE_OPTS["admit"], compile_decode: bool = _ENGINE_OPTS["compile_decode"],
        skip_below: float = _ENGINE_OPTS["skip_below"], low_below: float = _ENGINE_OPTS["low_below"],
        low_all: bool = _ENGINE_OPTS["low_all"], lookahead: int = _ENGINE_OPTS["lookahead"],
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output (no streaming).")) -> None:
    """Generate from a prompt through the collaborative runtime, streaming text, then telemetry."""
    from ..runtime.engine import SamplingConfig, decode_tok_s, latency_stats

    engine = build_engine(model, policy, cache_policy, slots, plan, device, emulate_gpu, profile, exec_mode,
                          prefetch, guess_trace, admit, compile_decode, gpu_memory, skip_below, low_below, low_all,
                          lookahead)
    warn_without_gpu_tier(engine)
    sampling = SamplingConfig(max_tokens, temperature, top_p, seed)
    msgs = [{"role": "user", "content": prompt}] if chat else prompt
    gen = None
    for delta, gen in engine.stream(msgs, sampling):
        if not as_json:
            sys.stdout.write(delta)
            sys.stdout.flush()
    lat = latency_stats(gen.token_ms)
    payload = {"text": gen.text, "tokens": len(gen.tokens), "prompt_tokens": gen.prompt_tokens,
               "prefill_ms": gen.prefill_ms, "decode_tok_s": decode_tok_s(gen.token_ms),
               **{f"latency_{k}": v for k, v in lat.items()}, **engine.summary()}
    if as_json:
        emit(payload, True, "")
    else:
        payload.pop("hit_rate_per_layer", None)
        echo_summary(payload)


@app.command("bench-runtime")
def bench_runtime(model: str = typer.Argument("smollm2-moe", help="MoE model source."),
                  policies: str = typer.Option("always-transfer,always-cpu,predictor,balanced,split",
                                               help="Comma-separated decision policies to compare: "
                                                    + ", ".join(DECISION_POLICIES) + "."),
                  prompt_tokens: int = typer.Option(128, min=1, help="Prompt length (tokens of WikiText/pydoc)."),
                  max_tokens: int = typer.Option(32, min=2, help="Decode tokens per run."),
                  cache_policy: EngineCachePolicy = _ENGINE_OPTS["cache_policy"],
                  slots: Optional[int] = _ENGINE_OPTS["slots"],
                  gpu_memory: Optional[str] = _ENGINE_OPTS["gpu_memory"],
                  plan: Optional[str] = _ENGINE_OPTS["plan"], device: str = _ENGINE_OPTS["device"],
                  emulate_gpu: bool = _ENGINE_OPTS["emulate_gpu"], profile: str = _ENGINE_OPTS["profile"],
                  exec_mode: str = _ENGINE_OPTS["exec_mode"], prefetch: int = _ENGINE_OPTS["prefetch"],
                  guess_trace: Optional[str] = _ENGINE_OPTS["guess_trace"],
                  admit: Optional[bool] = _ENGINE_OPTS["admit"], compile_decode: bool = _ENGINE_OPTS["compile_decode"],
                  skip_below: float = _ENGINE_OPTS["skip_below"], low_below: float = _ENGINE_OPTS["low_below"],
                  low_all: bool = _ENGINE_OPTS["low_all"], lookahead: int = _ENGINE_OPTS["lookahead"],
                  out: Optional[Path] = typer.Option(None, help="Write results JSON + markdown here."),
                  as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Prefill and decode latency, tokens/s, p50/p95/p99, hit rate and bytes moved, per policy."""
    from ..data.text import load_text, tokenize
    from ..runtime.engine import SamplingConfig, decode_tok_s, latency_stats

    rows = []
    names = [p.strip() for p in policies.split(",") if p.strip()]
    for policy in names:
        engine = build_engine(model, policy, cache_policy, slots, plan, device, emulate_gpu, profile, exec_mode,
                              prefetch, guess_trace, admit, compile_decode, gpu_memory, skip_below, low_below,
                              low_all, lookahead)
        if not rows:
            warn_without_gpu_tier(engine, len(names))
        ids = tokenize(engine.tokenizer, load_text("pydoc"))[:, :prompt_tokens]
        # compiled decode warms up on the timed run's cache length, with enough steps to compile and record
        engine.warm_up(*((ids, SamplingConfig(max_new_tokens=max_tokens)) if compile_decode
                         else (ids[:, :8], SamplingConfig(max_new_tokens=2))))
        gen = engine.generate(ids, SamplingConfig(max_new_tokens=max_tokens))
        lat = latency_stats(gen.token_ms)
        s = engine.summary()
        rows.append({"policy": policy, "device": s["device"], "compiled": compile_decode, "prefill_ms": gen.prefill_ms,
                     "prompt_tokens": gen.prompt_tokens, "decode_tok_s": decode_tok_s(gen.token_ms),
                     "latency_p50_ms": lat["p50_ms"], "latency_p95_ms": lat["p95_ms"],
                     "latency_p99_ms": lat["p99_ms"], "latency_std_ms": lat["std_ms"],
                     "hit_rate": s.get("hit_rate"), "demand_hit_rate": s.get("demand_hit_rate"),
                     "prefetch_copies": s.get("prefetch_copies"), "prefetch_hits": s.get("prefetch_hits"),
                     "bytes_moved_gb": s.get("bytes_moved", 0) / 1e9,
                     "cpu_expert_calls": s["cpu_expert_calls"], "gpu_expert_calls": s["gpu_expert_calls"],
                     "split_expert_calls": s["split_expert_calls"],
                     **{k: v for k, v in s.items() if k.startswith("host_")}})  # per decode token, by phase
    if out is not None:
        from ..results import run_meta, write_results

        write_results(out, rows, run_meta(), f"Runtime benchmark: {model}")
    emit({"rows": rows}, as_json, runtime_table(rows))


_TABLE = (("policy", "policy", "{}"), ("device", "device", "{}"), ("prefill ms", "prefill_ms", "{:.1f}"),
          ("decode tok/s", "decode_tok_s", "{:.2f}"), ("p50 ms", "latency_p50_ms", "{:.1f}"),
          ("p95 ms", "latency_p95_ms", "{:.1f}"), ("p99 ms", "latency_p99_ms", "{:.1f}"),
          ("hit rate", "hit_rate", "{:.3f}"), ("GB moved", "bytes_moved_gb", "{:.3f}"),
          ("CPU calls", "cpu_expert_calls", "{}"), ("GPU calls", "gpu_expert_calls", "{}"),
          ("split calls", "split_expert_calls", "{}"))


def runtime_table(rows: list[dict]) -> str:
    """``bench-runtime``'s human output: one aligned row per policy under labelled columns (``--json``
    gives every field, the host time by phase included); a missing value (no GPU tier: no hit rate)
    shows as "-"."""
    def cell(row: dict, key: str, fmt: str) -> str:
        return "-" if row.get(key) is None else fmt.format(row[key])

    table = [[label for label, _, _ in _TABLE]] + [[cell(r, k, f) for _, k, f in _TABLE] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_TABLE))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in table)
