"""Trace-driven simulator: replay routing traces against a hardware profile.

The replay drives the same ``ExpertCache`` and ``CostModel`` the real engine uses, over a
timeline of three resources: the GPU stream, the CPU, and one host-to-device copy engine
(copies run one after another, FIFO: demand copies, then prefetches, then background
admissions). Per MoE layer: attention on the GPU, then the layer's experts - resident ones on
the GPU, misses on the CPU or copied in and run on the GPU, as the decision policy says (decide.py:
the engine's own decisions, docs/design.md, Cost predictor) - with CPU and GPU experts of the same
layer overlapping; the layer ends when both are done. Layers are sequential (the next layer needs
this layer's output).

Decode replays token by token; prefill replays a batch (n tokens per expert) per layer.
Without prefetch and with ``always-transfer`` the cache sees exactly a demand-paging sequence,
so its hit rate is the classic one (LRU, Belady, ...).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import numpy as np

from ..costs.curves import SPLIT_STEPS, CostModel, copied_share
from ..costs.hardware import HardwareProfile
from ..costs.roofline import head_ms, nonexpert_layer_ms
from ..costs.shapes import ModelSpec
from ..errors import HaqmoeError
from ..routing.trace import RoutingTrace
from .cache import CacheConfig, ExpertCache, LayerStats
from .policies import allocate_slots, cache_policy, equal_slots, make_policy
from .decide import (LayerRecord, Rules, admit_misses, decide_layer, layer_end, miss_weights, routed_counts,
                     scratch_slots)
from .prefetch import PrefetchConfig, guesses_for, prefetch_budget_ms, prefetch_guesses


# ------------------------------------------------------------------------ plans and caches
def frequency_plan(trace: RoutingTrace, per_layer: Sequence[int]) -> dict[int, list[int]]:
    """The per-layer most frequent experts of a (profiling) trace: a simple placement plan."""
    plan = {}
    for l in range(trace.num_layers):
        counts = np.bincount(trace.experts[:, l].ravel().astype(np.int64), minlength=trace.num_experts)
        order = np.lexsort((np.arange(trace.num_experts), -counts))  # by count, ties by id
        plan[l] = [int(e) for e in order[: int(per_layer[l])]]
    return plan


@dataclass
class CacheSpec:
    """A cache to build: policy name, total slots, scope; ``plan_trace`` is the profiling trace
    that plans (pins) and per-layer slot allocation are computed from (never the replayed one)."""

    policy: str = "lru"
    total_slots: int = 0
    scope: str = "layer"
    pin_frac: float = 0.5  # pinned+...: share of each layer's slots given to the plan
    plan: Mapping[int, Sequence[int]] | None = None  # explicit plan (else frequency plan)
    lfu_half_life: float = 32.0
    warm: bool = True  # fill dynamic slots with the next most frequent experts at load (no counters)


def build_cache(spec: CacheSpec, num_layers: int, num_experts: int, top_k: int, expert_bytes: int,
                plan_trace: RoutingTrace | None = None, replay_experts: np.ndarray | None = None,
                replay_offsets: np.ndarray | None = None) -> ExpertCache:
    pol = cache_policy(spec.policy)
    if spec.total_slots <= 0:
        raise HaqmoeError("the GPU expert cache needs at least one slot per layer (got 0 slots)")
    L, E = num_layers, num_experts
    total = min(spec.total_slots, L * E)
    needs_plan = pol.pinned or pol.alloc
    if needs_plan and spec.plan is None and plan_trace is None:
        raise HaqmoeError(f"cache policy {spec.policy!r} needs a plan or a profiling trace to build one from")
    if plan_trace is not None and (plan_trace.num_layers, plan_trace.num_experts) != (L, E):
        raise HaqmoeError(f"the plan trace has {plan_trace.num_layers} layers x {plan_trace.num_experts} experts, "
                          f"the replayed model {L} x {E}: a plan for another model")
    if pol.alloc:
        slots = allocate_slots(plan_trace.experts, E, total, min_slots=top_k)
    else:
        slots = equal_slots(total, L, E)
    pinned: dict[int, list[int]] = {}
    if pol.pinned:
        frac = 1.0 if pol.static else spec.pin_frac
        counts = [int(round(frac * s)) for s in slots]
        if spec.plan is not None:
            pinned = {int(l): list(spec.plan.get(l, []))[: counts[l]] for l in range(L)}
            if any(e < 0 or e >= E for v in pinned.values() for e in v):
                raise HaqmoeError(f"the plan names experts outside 0..{E - 1}: a plan for another model")
        else:
            pinned = frequency_plan(plan_trace, counts)
    config = CacheConfig(L, E, slots if spec.scope == "layer" else total, spec.scope, expert_bytes, pinned)
    policy = make_policy(spec.policy, replay_experts, spec.lfu_half_life, replay_offsets)
    cache = ExpertCache(config, policy)
    if not pol.static:
        cache.check_fits(top_k)
        if spec.warm and plan_trace is not None:
            _warm(cache, plan_trace)
    return cache


def _warm(cache: ExpertCache, plan_trace: RoutingTrace) -> None:
    """Load time: fill the free slots with the profile's most frequent experts, as an engine
    would before the first request, then reset the counters (the copies are not traffic)."""
    order = frequency_plan(plan_trace, [plan_trace.num_experts] * plan_trace.num_layers)
    depth = 0
    while depth < plan_trace.num_experts and any(cache._free):
        for l in range(plan_trace.num_layers):
            if cache._free[cache.pool_of(l)]:
                cache.admit(l, order[l][depth])
        depth += 1
    cache.stats = type(cache.stats).zeros(plan_trace.num_layers)


# ---------------------------------------------------------------------------- the replay
@dataclass
class ReplayOptions:
    decision: str = "always-transfer"  # predictor | always-transfer | always-cpu | balanced | split
    async_admit: bool = False  # copy CPU-served misses into the cache in the background
    async_backlog: float = 1.0  # ... only while at most this many whole copies are queued
    # buffers outside the cache for split parts and streamed experts (None: the engine's, decide.scratch_slots)
    scratch_slots: int | None = None
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    # as served: per request, its prompt tokens (decode flag False) as one batched prefill, then its decode
    # tokens one by one; counters and latencies are the decode tokens' (needs a trace with decode flags)
    served: bool = False
    skip_below: float = 0.0  # miss lever: a miss whose renormalised router weight is below this is skipped
    # (costs nothing; needs a trace with router weights)
    low_below: float = 0.0  # ... served from its low-precision copy (CostModel.low_costs)
    low_all: bool = False  # ... every miss not skipped (with low_below > 0)


@dataclass
class ReplayResult:
    token_ms: np.ndarray  # per decoded token latency
    prefill_ms: float
    stats: dict  # cache counters per layer (LayerStats.as_dict)
    p_all_resident: np.ndarray  # [L]
    decisions: dict
    streamed_bytes: int  # copies that were not cached (no evictable slot; the copied part of a split)
    expert_bytes: int
    n_critical: float

    def summary(self) -> dict:
        """``hit_rate`` and the prefetch counters as the engine reports them (LayerStats.rates)."""
        stats = LayerStats(**{k: np.asarray(v) for k, v in self.stats.items()})
        ms = self.token_ms
        moved = int(stats.bytes_moved.sum()) + self.streamed_bytes
        return {
            **stats.rates(),
            "p_all_resident": float(self.p_all_resident.mean()) if len(self.p_all_resident) else 0.0,
            "bytes_moved_gb": moved / 1e9,
            "decode_tok_s": float(1e3 / ms.mean()) if len(ms) else 0.0,
            "latency_p50_ms": float(np.percentile(ms, 50)) if len(ms) else 0.0,
            "latency_p95_ms": float(np.percentile(ms, 95)) if len(ms) else 0.0,
            "latency_p99_ms": float(np.percentile(ms, 99)) if len(ms) else 0.0,
            "latency_std_ms": float(ms.std()) if len(ms) else 0.0,
            "prefill_ms": self.prefill_ms,
            "n_critical": self.n_critical,
            **{f"n_{k}": v for k, v in self.decisions.items()},
        }


class Replay:
    """One replay of a trace through a cache and a cost model on a timeline."""

    def __init__(self, trace: RoutingTrace, cache: ExpertCache, cost: CostModel, profile: HardwareProfile,
                 spec: ModelSpec, precision: str = "w8a8", options: ReplayOptions | None = None) -> None:
        self.opt = options or ReplayOptions()
        if (cache.config.num_layers, cache.config.num_experts) != (trace.num_layers, trace.num_experts):
            raise HaqmoeError("cache and trace disagree on layers x experts")
        self.trace, self.cache, self.cost = trace, cache, cost
        self.profile, self.spec, self.precision = profile, spec, precision
        opt = self.opt
        scratch = scratch_slots(opt.decision, trace.top_k) if opt.scratch_slots is None else opt.scratch_slots
        self.rules = Rules(opt.decision, scratch, opt.async_admit, opt.async_backlog, opt.skip_below, opt.low_below,
                           opt.low_all)
        if self.rules.needs_weights and trace.weights is None:
            raise HaqmoeError("the miss levers need a trace with router weights")
        self.copies = cache.copies
        self.log: list[LayerRecord] | None = None  # set to [] to record every layer's decisions
        self.decisions: Counter = Counter()
        self.streamed = 0
        L = trace.num_layers
        self.all_res = np.zeros(L, dtype=np.int64)
        self.steps = np.zeros(L, dtype=np.int64)
        self.clock = 0.0
        pf = self.opt.prefetch
        self.guesses = guesses_for(trace, pf)
        self.num_guesses = pf.num_guesses or trace.top_k

    def layer(self, l: int, needed: Mapping[int, int], now: float, start: float, ne_ms: float,
              count_step: bool = False, guesses: Sequence[Sequence[int]] | None = None,
              weights: Mapping[int, float] | None = None) -> float:
        """One MoE layer for ``needed`` (expert -> tokens, in routing order) starting at ``start``, its
        attention and router taking ``ne_ms``; ``now`` is the eviction policy's clock. The decisions are
        decide.py's, the prefetch of ``guesses`` (per distance d, the guesses for layer l+d) prefetch.py's;
        this adds their times up. Returns when the layer ends."""
        cache, cost, rules = self.cache, self.cost, self.rules
        r = start + ne_ms  # router output known
        decisions = decide_layer(cache, cost, rules, l, needed, now, r, weights)
        for d in decisions:
            self.decisions["gpu" if d.kind == "hit" else d.kind] += 1
            if d.kind == "stream":
                self.streamed += cache.config.expert_bytes
            elif d.kind == "split" or (d.kind == "low" and 0 < d.k < SPLIT_STEPS):  # the copied rows
                low = self.cost.low_ratio if d.kind == "low" else 1.0
                self.streamed += int(cache.config.expert_bytes * low * copied_share(d.k))
            elif d.kind == "low" and d.k == 0:  # the int4 copy, copied whole
                self.streamed += int(cache.config.expert_bytes * self.cost.low_ratio)
        end = layer_end(decisions, r, self.profile.host_sync_ms, self.profile.cpu_gpu_overlap)
        if count_step:
            self.steps[l] += 1
            self.all_res[l] += all(d.kind == "hit" for d in decisions)
        prefetched = []
        if guesses:
            budget = prefetch_budget_ms(decisions, r, self.opt.prefetch.budget_layers)
            prefetched = prefetch_guesses(cache, cost, l, guesses, r, budget)
            self.decisions["prefetch_copy"] += len(prefetched)
        admitted = admit_misses(cache, cost, rules, l, decisions, r)
        if admitted:
            self.decisions["background_copy"] += len(admitted)
        if self.log is not None:
            self.log.append(LayerRecord(now, l, decisions, admitted, prefetched, [list(g) for g in guesses or []]))
        return end

    def prefill(self, tokens: np.ndarray, at: int = 0, weights: np.ndarray | None = None) -> float:
        """Batched prefill of ``tokens`` ([P, L, k]): per layer, n tokens per expert, on the policy clock of
        trace token ``at`` (a served prompt: its last token, so what follows is the decode's future)."""
        P, L = tokens.shape[0], tokens.shape[1]
        start = self.clock
        t = start
        for l in range(L):
            ne = nonexpert_layer_ms(self.profile, self.spec, self.precision, P, P)
            w = None if weights is None else miss_weights(tokens[:, l], weights[:, l])
            t = self.layer(l, routed_counts(tokens[:, l]), self.clock_now(at, l), t, ne, weights=w)
        t += head_ms(self.profile, self.spec, 1)
        self.clock = t
        return t - start

    def clock_now(self, token: int, layer: int) -> float:
        return token + layer / self.trace.num_layers

    def decode(self, token_ids: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        L = self.trace.num_layers
        out = np.empty(len(token_ids))
        for i, (t, pos) in enumerate(zip(token_ids, positions)):
            start = self.clock
            clk = start
            for l in range(L):
                ne = nonexpert_layer_ms(self.profile, self.spec, self.precision, 1, int(pos) + 1)
                g = self._guesses(t, l)
                w = self._weights(t, l)
                clk = self.layer(l, routed_counts(self.trace.experts[t, l]), self.clock_now(t, l), clk, ne, True, g, w)
            clk += head_ms(self.profile, self.spec, 1)
            self.clock = clk
            out[i] = clk - start
        return out

    def _guesses(self, t: int, l: int) -> list[np.ndarray] | None:
        """Token ``t``'s guesses at layer ``l`` for the layers ahead that exist, cut to the guesses considered."""
        if self.guesses is None:
            return None
        ahead = min(len(self.guesses), self.trace.num_layers - 1 - l)
        return [self.guesses[d][t, l, : self.num_guesses] for d in range(ahead)]

    def _weights(self, t: int, l: int) -> dict[int, float] | None:
        """Token ``t``'s renormalised router weights at layer ``l``, where a lever needs them."""
        if not self.rules.needs_weights:
            return None
        return miss_weights(self.trace.experts[t, l][None], self.trace.weights[t, l][None])

    def _counters(self) -> dict:
        """What a replay counts, as one dict (cache stats per layer, decisions, streamed bytes), so the
        served replay can take the prefills' share back out."""
        return {**{k: v.copy() for k, v in self.cache.stats.__dict__.items()},
                "decisions": Counter(self.decisions), "streamed": self.streamed}

    def run(self) -> ReplayResult:
        tr = self.trace
        if not self.opt.served:
            pos = np.concatenate([np.arange(b - a) for a, b in zip(tr.offsets[:-1], tr.offsets[1:])])
            return self._result(self.decode(range(tr.num_tokens), pos), 0.0)
        if tr.decode is None:
            raise HaqmoeError("a served replay needs a trace with decode flags (haqmoe profile --generate)")
        token_ms, prefill_ms = [], []
        by_prefill: dict | None = None  # what the prompts' prefills added to the counters
        for r in range(tr.num_requests):
            a, b = int(tr.offsets[r]), int(tr.offsets[r + 1])
            prompt = a + np.flatnonzero(~tr.decode[a:b])
            gen = a + np.flatnonzero(tr.decode[a:b])
            if len(prompt):
                before = self._counters()
                w = tr.weights[prompt] if self.rules.needs_weights else None
                prefill_ms.append(self.prefill(tr.experts[prompt], at=int(prompt[-1]), weights=w))
                added = {k: v - before[k] for k, v in self._counters().items()}
                by_prefill = added if by_prefill is None else {k: by_prefill[k] + v for k, v in added.items()}
            token_ms.append(self.decode(gen, gen - a))
        if by_prefill is not None:
            self.decisions -= by_prefill.pop("decisions")
            self.streamed -= by_prefill.pop("streamed")
            for k, v in by_prefill.items():
                getattr(self.cache.stats, k)[:] -= v
        return self._result(np.concatenate(token_ms), float(np.mean(prefill_ms)) if prefill_ms else 0.0)

    def _result(self, token_ms: np.ndarray, prefill_ms: float) -> ReplayResult:
        p_all = self.all_res / np.maximum(self.steps, 1)
        return ReplayResult(token_ms, prefill_ms, self.cache.stats.as_dict(), p_all, dict(self.decisions),
                            self.streamed, self.cache.config.expert_bytes, self.cost.n_critical)


def spec_for_trace(trace: RoutingTrace, spec: ModelSpec) -> ModelSpec:
    """The cost shape of ``spec`` with the trace's layer / expert / top-k counts."""
    return replace(spec, num_layers=trace.num_layers, num_experts=trace.num_experts, top_k=trace.top_k)
