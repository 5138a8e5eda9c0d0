"""The experiments behind ``haqmoe cache-eval``, ``haqmoe simulate`` and bench/{cache,simulate}.py.

Two kinds of replay per cache row, kept apart on purpose:

- hit metrics (hit rate = resident when needed, demand hit rate, P(all resident), bytes) come from an *ideal copy*
  replay (copies complete instantly, prefetch limited only by the guess count), so they measure
  the policy and the guesses, not one machine's PCIe;
- ``decode_tok_s`` comes from a timed replay of the same configuration on a hardware profile.

Plans, per-layer slot allocations and LFU statistics come from a *profiling* trace; every number
is measured on a held-out trace.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from ..costs.curves import CostCurve, CostModel
from ..costs.hardware import HardwareProfile
from ..costs.roofline import cost_model_for, memory_plan
from ..costs.shapes import ModelSpec, model_spec, shape_for
from ..errors import HaqmoeError
from ..routing.guess import GuessPlan, guess_quality
from ..routing.mixtral import list_subjects, load_frac_vecs, split_subjects
from ..registry import SIM_POLICIES, kinds_for
from ..routing.sources import parse_source
from ..routing.synthetic import SyntheticConfig, synthetic_trace, trace_from_fractions
from ..routing.trace import RoutingTrace
from ..routing.trace_io import load_trace
from ..runtime.prefetch import PrefetchConfig
from ..runtime.simulator import CacheSpec, Replay, ReplayOptions, build_cache, spec_for_trace

MIXTRAL_LOCALITY = 0.2  # calibrated: held-out LRU ~61 % / Belady ~75 % at 128 of 256 experts, vs
# 59 % / 74 % measured on real Mixtral-8x7B decode traces (docs/design.md, Cost predictor)
IDEAL = CostModel(CostCurve(per_token_ms=1.0), CostCurve(), 0.0)


@dataclass
class TracePair:
    source: str
    plan: RoutingTrace  # profiling split (plans, allocation)
    eval: RoutingTrace  # held-out split
    kind: str  # "real trace" | "synthetic" | "synthetic-from-statistics"
    shape: str  # ModelSpec name used for timing
    router_guesses: np.ndarray | None = None  # the eval split's recorded router guesses, before learning


def with_learned_guesses(pair: TracePair) -> TracePair:
    """Replace the held-out split's guesses by what the engine guesses when given the profiling split
    (``--guess-trace``): per layer, the next router or the expert co-occurrence learned on ``plan``."""
    if pair.eval.guesses is None or pair.plan.guesses is None:
        return pair
    learned = GuessPlan.learn(pair.plan).apply(pair.eval)
    return replace(pair, eval=replace(pair.eval, guesses=learned), router_guesses=pair.eval.guesses)


def split_trace(trace: RoutingTrace, held_out: float = 0.5) -> tuple[RoutingTrace, RoutingTrace]:
    """Split by request: first part profiles, the rest is held out (at least one request each)."""
    R = trace.num_requests
    if R < 2:
        raise HaqmoeError("a held-out evaluation needs a trace with at least 2 requests")
    cut = min(max(1, int(round(R * (1 - held_out)))), R - 1)
    return trace.select_requests(range(cut)), trace.select_requests(range(cut, R))


def static_oracle_hit(trace: RoutingTrace, slots: int, per_request: bool = True) -> float:
    """Hit rate of the best static placement of ``slots`` experts (any per-layer split), chosen knowing
    the replayed trace itself: per request (re-placed for each request for free) or one for all.
    An upper bound for every plan, pinned or re-planned per request, on that trace."""
    parts = [trace.request(r) for r in range(trace.num_requests)] if per_request else [trace]
    hits = total = 0
    for part in parts:
        L, E = part.num_layers, part.num_experts
        counts = np.stack([np.bincount(part.experts[:, l].ravel().astype(np.int64), minlength=E) for l in range(L)])
        hits += int(np.sort(counts.ravel())[::-1][:slots].sum())
        total += int(counts.sum())
    return hits / max(total, 1)


def mixtral_pair(requests: int = 8, tokens_per_request: int = 100, locality: float = MIXTRAL_LOCALITY,
                 guess_recall: float | None = None, seed: int = 0) -> TracePair:
    """Decode-like Mixtral-8x7B traces from the real per-prompt MMLU statistics: the plan side
    samples prompts of the build subjects, the held-out side prompts of the other subjects."""
    build, held = split_subjects(list_subjects())
    rng = np.random.default_rng(seed)

    def fractions(subjects: list[str]) -> np.ndarray:
        pc = load_frac_vecs(subjects)
        idx = rng.choice(len(pc.counts), requests, replace=False)
        c = pc.counts[idx]
        return c / np.maximum(c.sum(axis=2, keepdims=True), 1)

    plan = trace_from_fractions(fractions(build), tokens_per_request, locality=locality, seed=seed + 1)
    ev = trace_from_fractions(fractions(held), tokens_per_request, locality=locality, seed=seed + 2,
                              guess_accuracy=guess_recall)
    return TracePair("mixtral-8x7b", plan, ev, "synthetic-from-statistics", "mixtral-8x7b")


def synthetic_pair(num_layers: int = 30, requests: int = 8, tokens_per_request: int = 100, seed: int = 0,
                   guess_recall: float | None = None) -> TracePair:
    tr = synthetic_trace(SyntheticConfig(num_layers=num_layers, requests=requests,
                                         tokens_per_request=tokens_per_request, guess_accuracy=guess_recall,
                                         seed=seed))
    plan, ev = split_trace(tr)
    return TracePair("synthetic", plan, ev, "synthetic", "smollm2-moe")


def tiny_pair(family: str, requests: int = 8, tokens_per_request: int = 256, guess_width: int = 4,
              layers: int = 4) -> TracePair:
    """Real (not sampled) routing of a tiny random MoE with distinct experts (models/tiny.py) on
    WikiText-2 valid text: SmolLM2 token ids folded into the tiny vocabulary, next-layer guesses
    recorded, so prefetch replays exactly. Split by request like any profiled trace."""
    # transformers and the model loaders take seconds to import: only tiny:FAMILY needs them
    from ..data.text import load_text, tokenize
    from ..models.adapters import adapter_for
    from ..sources import load_model
    from ..models.tiny import tiny_model
    from ..routing.profile import trace_windows

    model = tiny_model(family, layers=layers)
    ids = tokenize(load_model("smollm2-135m", progress=False).tokenizer, load_text("wikitext2:valid")).reshape(-1)
    need = requests * tokens_per_request
    if ids.numel() < need:
        raise HaqmoeError(f"wikitext2:valid has {ids.numel()} tokens, {need} needed")
    windows = (ids[:need] % model.config.vocab_size).view(requests, tokens_per_request)
    tr = trace_windows(model, adapter_for(model), windows, guess_width)
    tr.meta["model"] = f"tiny-{family}"
    plan, ev = split_trace(tr)
    return with_learned_guesses(TracePair(f"tiny-{family}", plan, ev, "real trace (tiny random model)", "smollm2-moe"))


def load_pair(source: str, held_out: float = 0.5, shape: str | None = None) -> TracePair:
    """The traces to replay of a routing-data spec (``routing/sources.py``): ``mixtral-stats``, ``synthetic``,
    ``tiny:FAMILY`` or a trace directory written by ``haqmoe profile``."""
    p = parse_source(source).require("replay")
    if p.kind == "mixtral-stats":
        return mixtral_pair()
    if p.kind == "synthetic":
        return synthetic_pair()
    if p.kind == "tiny":
        return tiny_pair(p.arg)
    path = Path(source)
    if not path.exists():
        raise HaqmoeError(f"trace {source} does not exist (a trace directory; or {kinds_for('replay')})")
    tr = load_trace(path)
    plan, ev = split_trace(tr, held_out)
    name = str(tr.meta.get("model", path.name))
    kind = "real generations (prompts prefilled; decode tokens measured)" if is_generation(tr) else "real trace"
    return with_learned_guesses(TracePair(name, plan, ev, kind, shape or shape_for(name)))


def is_generation(trace: RoutingTrace) -> bool:
    """Prompts and generated tokens (``haqmoe profile --generate``): replayed as served, each prompt one
    batched prefill, metrics over the generated tokens."""
    return trace.decode is not None and bool(trace.decode.any()) and not bool(trace.decode.all())


def slots_for(frac: float, trace: RoutingTrace) -> int:
    return max(1, int(round(frac * trace.num_layers * trace.num_experts)))


def replay_once(pair: TracePair, policy: str, slots: int, decision: str, prefetch: bool,
                cost: CostModel, profile: HardwareProfile, spec: ModelSpec, scope: str = "layer",
                async_admit: bool = False, plan: dict | None = None, pin_frac: float = 0.5,
                guess_recall: float | Sequence[float] | None = None, lfu_half_life: float = 32.0,
                exact: bool = False, lookahead: int = 1) -> dict:
    tr = pair.eval
    cache = build_cache(CacheSpec(policy, slots, scope, pin_frac, plan, lfu_half_life), tr.num_layers,
                        tr.num_experts, tr.top_k, spec.expert_bytes("w8a8"), pair.plan, tr.experts, tr.offsets)
    pf = PrefetchConfig(prefetch, exact=exact, guess_recall=guess_recall, lookahead=lookahead)
    opt = ReplayOptions(decision, async_admit, prefetch=pf, served=is_generation(tr))
    res = Replay(tr, cache, cost, profile, spec, options=opt).run()
    return res.summary()


def cache_rows(pair: TracePair, profile: HardwareProfile, fracs: Iterable[float], policies: Iterable[str],
               prefetch_modes: Iterable[bool] = (False, True), decision: str = "always-transfer",
               scope: str = "layer", guess_recall: float | None = None, exact: bool = False,
               progress: bool = False) -> list[dict]:
    """One row per (cache fraction, policy, prefetch): the layout of bench/results/cache.md. A fraction
    whose per-layer pool is smaller than one token's top-k (e.g. a quarter of 4 experts, top-2) cannot
    serve a token and is left out."""
    spec = spec_for_trace(pair.eval, model_spec(pair.shape))
    cost = cost_model_for(profile, spec)
    tr = pair.eval
    fracs = [f for f in fracs if slots_for(f, tr) // tr.num_layers >= tr.top_k]
    grid = [(f, p, pf) for f in fracs for p in policies for pf in prefetch_modes]
    rows = []
    for frac, policy, pf in tqdm(grid, desc=f"cache-eval {pair.source}", disable=not progress, leave=False):
        slots = slots_for(frac, pair.eval)
        common = dict(scope=scope, guess_recall=guess_recall, exact=exact)
        hit = replay_once(pair, policy, slots, "always-transfer", pf, IDEAL, profile, spec, **common)
        timed = replay_once(pair, policy, slots, decision, pf, cost, profile, spec, **common)
        rows.append({
            "source": pair.source, "cache_frac": frac, "slots": slots, "policy": policy, "prefetch": pf,
            "hit_rate": hit["hit_rate"], "demand_hit_rate": hit["demand_hit_rate"],
            "p_all_resident": hit["p_all_resident"], "bytes_moved_gb": hit["bytes_moved_gb"],
            "gb_per_token": hit["bytes_moved_gb"] / max(pair.eval.num_tokens, 1),
            "decode_tok_s": timed["decode_tok_s"],
            "kind": f"{pair.kind}; hits: ideal-copy replay; tok/s: simulated {profile.name}, {decision}, "
                    f"{spec.name} W8A8 shape",
        })
    return rows


def guess_rows(pair: TracePair) -> list[dict]:
    """Per-layer guess recall / precision on the held-out trace (its generated tokens, for a generation
    trace): the learned per-layer choice, and ``router_only_recall`` of the next router alone (what the
    trace recorded)."""
    if pair.eval.guesses is None:
        return []
    ev, router_guesses = pair.eval, pair.router_guesses
    if is_generation(ev):  # as the replay: the generated tokens (a prompt's experts are fetched by its prefill)
        keep = ev.decode
        ev = RoutingTrace(ev.experts[keep], ev.num_experts, np.array([0, int(keep.sum())]), guesses=ev.guesses[keep])
        router_guesses = None if router_guesses is None else router_guesses[keep]
    q = guess_quality(ev)
    router = guess_quality(ev, guesses=router_guesses)["recall"] if router_guesses is not None else q["recall"]
    return [{"source": pair.source, "layer": l, "recall": r, "precision": p, "router_only_recall": ro,
             "kind": pair.kind} for l, (r, p, ro) in enumerate(zip(q["recall"], q["precision"], router))]


# ------------------------------------------------------------------------------- simulate


def prompt_trace(pair: TracePair, tokens: int, seed: int = 7) -> np.ndarray:
    """A [tokens, L, k] prompt for prefill: one held-out request's routing, resampled to length."""
    rng = np.random.default_rng(seed)
    req = pair.eval.request(0).experts
    idx = rng.integers(0, len(req), tokens)
    return req[idx]


def simulate_rows(pair: TracePair, profile: HardwareProfile, policies: Iterable[str] = tuple(SIM_POLICIES),
                  budget_gb: float | None = None, prefill_tokens: int = 512, guess_recall: float | None = None,
                  case: str | None = None, progress: bool = False, lookahead: int = 1) -> list[dict]:
    """Rows of bench/results/simulate.md: decode tok/s, prefill ms, latency percentiles, GPU memory vs FP16,
    per policy (``lookahead``: layers ahead the prefetching policies guess)."""
    spec = spec_for_trace(pair.eval, model_spec(pair.shape))
    mem = memory_plan(profile, spec, "w8a8", budget_gb)
    fp16_gb = (spec.nonexpert_bytes("fp16") + mem.slots * spec.expert_bytes("fp16")) / 1e9 + mem.reserved_gb
    cost = cost_model_for(profile, spec)
    prompt = prompt_trace(pair, prefill_tokens)
    rows = []
    for name in tqdm(list(policies), desc="simulate", disable=not progress, leave=False):
        if name not in SIM_POLICIES:
            raise HaqmoeError(f"unknown policy {name!r} (choose from {', '.join(SIM_POLICIES)})")
        cpol, decision, async_admit, pf = SIM_POLICIES[name]
        s = replay_once(pair, cpol, mem.slots, decision, pf, cost, profile, spec, async_admit=async_admit,
                        guess_recall=guess_recall, lookahead=lookahead)
        cache = build_cache(CacheSpec(cpol, mem.slots), spec.num_layers, spec.num_experts, spec.top_k,
                            spec.expert_bytes("w8a8"), pair.plan)
        pre = Replay(pair.eval, cache, cost, profile, spec, options=ReplayOptions(decision)).prefill(prompt)
        rows.append({
            "case": case or f"sim-{pair.source.split('-')[0]}-{profile.name.removeprefix('rtx')}", "policy": name,
            "decode_tok_s": s["decode_tok_s"], "prefill_ms_512": pre, "latency_p50_ms": s["latency_p50_ms"],
            "latency_p99_ms": s["latency_p99_ms"], "latency_std_ms": s["latency_std_ms"],
            "hit_rate": s["hit_rate"], "gpu_mem_gb": mem.total_gb, "gpu_mem_fp16_gb": fp16_gb,
            "bytes_moved_gb": s["bytes_moved_gb"], "predicted_decode_tok_s": None,
            "slots": mem.slots, "n_critical": s["n_critical"], "kind": f"simulated ({pair.kind})",
        })
    return rows


def plot_cache(rows: list[dict], path: str | Path) -> Path:
    """One panel per policy: the hit rate (resident when needed) and the demand hit rate across cache
    sizes, with and without prefetch, the Belady bound dashed in every panel (one figure per trace source)."""
    import matplotlib  # heavy: only plots need it (keeps `haqmoe simulate` / `cache-eval` start-up short)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, len(policies), figsize=(3.2 * len(policies), 3.2), sharey=True, squeeze=False)
    bound = sorted((r["cache_frac"], r["hit_rate"]) for r in rows if r["policy"] == "belady" and not r["prefetch"])
    for ax, pol in zip(axes[0], policies):
        for pf, style in ((False, "o-"), (True, "s-")):
            pts = sorted((r["cache_frac"], r["demand_hit_rate"], r["hit_rate"]) for r in rows
                         if r["policy"] == pol and r["prefetch"] == pf)
            if not pts:
                continue
            x = [p[0] for p in pts]
            ax.plot(x, [p[2] for p in pts], style, label="resident when needed" + (" (prefetch)" if pf else ""))
            if pf:
                ax.plot(x, [p[1] for p in pts], "s:", alpha=0.6, label="demand hit (prefetch on)")
        if bound:
            ax.plot([b[0] for b in bound], [b[1] for b in bound], "k--", lw=1, label="Belady (no prefetch)")
        ax.set_title(pol)
        ax.set_xlabel("cache size (fraction of experts)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("rate")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(str(rows[0]["source"]) if rows else "")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
