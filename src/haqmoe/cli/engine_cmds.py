"""Engine commands: ``run`` (generate with telemetry) and ``bench-runtime`` (latency per policy)."""

from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..costs.hardware import DEFAULT_PROFILE, PROFILE_HELP
from ..errors import HaqmoeError
from ..registry import CACHE_POLICIES, DECISION_POLICIES, ENGINE_CACHE_POLICIES, choices_help
from ..runtime.cache import MAX_LOOKAHEAD
from .common import GEN_OPTS, app, echo_summary, emit, state

if TYPE_CHECKING:  # the runtime loads torch: imported where a command runs, not for --help
    from ..runtime.engine import EngineConfig

# the registry's names as the choices of --policy and --cache-policy
DecisionPolicy = Enum("DecisionPolicy", {n: n for n in DECISION_POLICIES}, type=str)
EngineCachePolicy = Enum("EngineCachePolicy", {n: n for n in ENGINE_CACHE_POLICIES}, type=str)


@dataclass(frozen=True)
class EngineOption:
    """One engine option of the CLI: the ``EngineConfig`` field it sets, its type and its typer option."""
    field: str
    type: object
    option: object


ENGINE_OPTIONS = {  # every engine command's options, in --help order (engine_options puts them in place)
    "policy": EngineOption("decision", DecisionPolicy, typer.Option(
        "predictor", help="Non-resident experts: " + choices_help(DECISION_POLICIES) + ".")),
    "cache_policy": EngineOption("cache_policy", EngineCachePolicy, typer.Option(
        "lru", help="GPU cache eviction: "
        + choices_help({n: CACHE_POLICIES[n] for n in ENGINE_CACHE_POLICIES}) + ".")),
    "slots": EngineOption("slots_per_layer", Optional[int], typer.Option(
        None, min=0, help="GPU expert slots per layer (default: as many as GPU memory holds beside the other "
        "weights, a 4096-token KV cache and 1 GiB; emulated: plan size, else half).")),
    "gpu_memory": EngineOption("gpu_memory", Optional[str], typer.Option(
        None, help="GPU memory the engine may use, e.g. 24GB (default: all that is free); the expert slots are "
        "sized to it.")),
    "plan": EngineOption("plan", Optional[str], typer.Option(None, help="Placement plan JSON from `haqmoe plan`.")),
    "device": EngineOption("device", str, typer.Option("auto", help="auto | cpu | cuda.")),
    "emulate_gpu": EngineOption("emulate_gpu", bool, typer.Option(
        False, help="Run the GPU-tier path (cache, copies, predictor) on the CPU.")),
    "profile": EngineOption("profile", str, typer.Option(
        DEFAULT_PROFILE, help=PROFILE_HELP + " The cost model when no GPU is measured.")),
    "exec_mode": EngineOption("exec_mode", str, typer.Option(
        "fake", "--exec", help="Quantized execution: fake | dequant | real | auto.")),
    "prefetch": EngineOption("prefetch", int, typer.Option(
        0, min=0, help="Experts to prefetch per layer ahead (GPU tier; 0 = off), copied while the copy engine "
        "would otherwise idle during the current layer.")),
    "lookahead": EngineOption("lookahead", int, typer.Option(
        1, min=1, max=MAX_LOOKAHEAD, help="With --prefetch: guess and prefetch the experts of layers l+1 .. l+N "
        "at layer l (1 = the next layer only). Moves copies earlier, never changes the output.")),
    "guess_trace": EngineOption("guess_trace", Optional[str], typer.Option(
        None, help="Trace from `haqmoe profile` of this model: prefetch learns, per layer, whether expert "
        "co-occurrence guesses better than the next router.")),
    "admit": EngineOption("admit", Optional[bool], typer.Option(
        None, "--admit/--no-admit", help="Also copy experts served on the CPU into the GPU cache for their next "
        "use (background admission, while the copy engine is idle). Default: on for predictor, balanced and "
        "split without --plan (else one-token misses never fill the cache), off for the peer policies and with "
        "a plan.")),
    "compile_decode": EngineOption("compile", bool, typer.Option(
        False, "--compile", help="Compile the decode step (torch.compile over a static KV cache, replayed as "
        "CUDA graphs around the eager experts). For CUDA: on the CPU a MoE step breaks into small graphs and "
        "gets slower. The first decode steps compile (seconds to minutes); needs a C++ compiler on the CPU.")),
    "skip_below": EngineOption("skip_below", float, typer.Option(
        0.0, min=0.0, max=1.0, help="Miss lever (GPU tier): skip a missed expert whose router weight, "
        "renormalised over the token's top-k, is below this; the token's other experts' weights are rescaled "
        "to the sum they had, a token's top expert always runs. Changes the output (0 = off, exact).")),
    "low_below": EngineOption("low_below", float, typer.Option(
        0.0, "--low-precision-below", min=0.0, max=1.0, help="Miss lever (GPU tier): a missed expert whose "
        "renormalised router weight is below this (and not skipped) runs on the CPU from an int4 copy (groups "
        "of 128 input columns, built at load): about half the bytes to read. Changes the output (0 = off, no "
        "copy built).")),
    "low_all": EngineOption("low_all", bool, typer.Option(
        False, "--low-precision-all", help="With --low-precision-below > 0: every miss not skipped is served "
        "from the int4 copy, a token's top expert's too.")),
}


ENGINE_OPTIONS_HERE = object()  # the default of an engine_options command's EngineConfig parameter


def engine_config(**values) -> EngineConfig:
    """The ``EngineConfig`` of engine options' values, checked before any model loads (a bad size or a
    missing plan fails in a second, not after minutes of loading)."""
    from ..reliability.guard import parse_bytes
    from ..runtime.engine import EngineConfig, plan_path

    values = {name: getattr(v, "value", v) for name, v in values.items()}  # the enum choices as their names
    if values.get("gpu_memory") is not None:
        budget = parse_bytes(values["gpu_memory"])
        if budget <= 0:
            raise HaqmoeError(f"--gpu-memory must be positive, got '{values['gpu_memory']}'")
        values["gpu_memory"] = budget
    if "plan" in values:
        values["plan"] = plan_path(values["plan"])
    return EngineConfig(**{ENGINE_OPTIONS[name].field: v for name, v in values.items()})


def engine_options(*, without: tuple[str, ...] = ()):
    """Decorate a command whose parameter ``NAME: EngineConfig = ENGINE_OPTIONS_HERE`` stands for every
    engine option (but ``without``): typer sees the options in its place, the command gets them as
    one checked config under NAME. One declaration for run, bench-runtime and serve, so their options
    cannot drift apart."""
    names = [name for name in ENGINE_OPTIONS if name not in without]

    def decorate(command):
        signature = inspect.signature(command)
        [slot] = [p.name for p in signature.parameters.values() if p.default is ENGINE_OPTIONS_HERE]
        params = []
        for p in signature.parameters.values():
            if p.name == slot:
                params += [inspect.Parameter(n, p.POSITIONAL_OR_KEYWORD, default=ENGINE_OPTIONS[n].option,
                                             annotation=ENGINE_OPTIONS[n].type) for n in names]
            elif isinstance(p.annotation, str):  # typer needs the types, not their names
                params.append(p.replace(annotation=eval(p.annotation, command.__globals__)))
            else:
                params.append(p)

        @functools.wraps(command)
        def with_engine(**kwargs):
            kwargs[slot] = engine_config(**{n: kwargs.pop(n) for n in names})
            return command(**kwargs)

        with_engine.__signature__ = signature.replace(parameters=params)
        with_engine.__annotations__ = {p.name: p.annotation for p in params}
        return with_engine
    return decorate


def build_engine(model: str, cfg: EngineConfig):
    """Load the model and put the collaborative engine around it."""
    from ..sources import load_model
    from ..runtime.engine import CollaborativeEngine

    return CollaborativeEngine(load_model(model, progress=state["progress"]), cfg)


NO_GPU_TIER = ("no GPU tier (torch sees no CUDA device; --emulate-gpu runs the GPU-tier path on the CPU): "
               "every expert runs on the CPU")


def warn_without_gpu_tier(engine, policies: int = 1) -> None:
    """Say plainly that the collaborative part is off, rather than print a hit rate of nothing."""
    if engine.cache is None:
        extra = f"; the {policies} policies cannot differ" if policies > 1 else ""
        typer.echo(f"haqmoe: note: {NO_GPU_TIER}{extra}", err=True)


@app.command()
@engine_options()
def run(model: str = typer.Argument("smollm2-moe", help="MoE model source (embedded name, directory, ...)."),
        prompt: str = GEN_OPTS["prompt"], chat: bool = GEN_OPTS["chat"], max_tokens: int = GEN_OPTS["max_tokens"],
        temperature: float = GEN_OPTS["temperature"], top_p: float = GEN_OPTS["top_p"], seed: int = GEN_OPTS["seed"],
        engine: EngineConfig = ENGINE_OPTIONS_HERE,
        as_json: bool = typer.Option(False, "--json", help="Machine-readable output (no streaming).")) -> None:
    """Generate from a prompt through the collaborative runtime, streaming text, then telemetry."""
    from ..runtime.engine import SamplingConfig, decode_tok_s, latency_stats

    engine = build_engine(model, engine)
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
@engine_options(without=("policy",))
def bench_runtime(model: str = typer.Argument("smollm2-moe", help="MoE model source."),
                  policies: str = typer.Option("always-transfer,always-cpu,predictor,balanced,split",
                                               help="Comma-separated decision policies to compare: "
                                                    + ", ".join(DECISION_POLICIES) + "."),
                  prompt_tokens: int = typer.Option(128, min=1, help="Prompt length (tokens of WikiText/pydoc)."),
                  max_tokens: int = typer.Option(32, min=2, help="Decode tokens per run."),
                  engine: EngineConfig = ENGINE_OPTIONS_HERE,
                  out: Optional[Path] = typer.Option(None, help="Write results JSON + markdown here."),
                  as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Prefill and decode latency, tokens/s, p50/p95/p99, hit rate and bytes moved, per policy."""
    from dataclasses import replace

    from ..data.text import load_text, tokenize
    from ..runtime.engine import SamplingConfig, decode_tok_s, latency_stats

    cfg, rows = engine, []
    names = [p.strip() for p in policies.split(",") if p.strip()]
    for policy in names:
        engine = build_engine(model, replace(cfg, decision=policy))
        if not rows:
            warn_without_gpu_tier(engine, len(names))
        ids = tokenize(engine.tokenizer, load_text("pydoc"))[:, :prompt_tokens]
        # compiled decode warms up on the timed run's cache length, with enough steps to compile and record
        engine.warm_up(*((ids, SamplingConfig(max_new_tokens=max_tokens)) if cfg.compile
                         else (ids[:, :8], SamplingConfig(max_new_tokens=2))))
        gen = engine.generate(ids, SamplingConfig(max_new_tokens=max_tokens))
        lat = latency_stats(gen.token_ms)
        s = engine.summary()
        rows.append({"policy": policy, "device": s["device"], "compiled": cfg.compile, "prefill_ms": gen.prefill_ms,
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
