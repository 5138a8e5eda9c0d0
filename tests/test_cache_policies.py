"""Cache policies against brute-force references on hand-made sequences; slot invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from haqmoe.errors import HaqmoeError
from haqmoe.runtime.cache import CacheConfig, ExpertCache
from haqmoe.runtime.policies import (BeladyPolicy, FrequencyOraclePolicy, LFUPolicy, LRUPolicy, allocate_slots,
                                     lru_hit_curve, make_policy)
from haqmoe.runtime.simulator import CacheSpec, build_cache
from haqmoe.routing.synthetic import SyntheticConfig, synthetic_trace

SEQS = [
    [[0], [1], [2], [0], [1], [3], [0], [2], [1], [0]],
    [[0, 1], [2, 0], [1, 3], [0, 1], [2, 3], [3, 0], [1, 2], [0, 3]],
    [[4, 1], [1, 4], [0, 2], [4, 3], [2, 1], [0, 4], [3, 2], [1, 0], [4, 2]],
]


def replay(seq, slots, policy, num_experts=5):
    """Demand replay of one layer; returns the per-access outcomes."""
    cache = ExpertCache(CacheConfig(1, num_experts, slots, expert_bytes=10), policy)
    outcomes = []
    for t, experts in enumerate(seq):
        cache.begin_step(t, 0.0, [(0, e) for e in experts])
        for e in experts:
            outcomes.append(cache.access(0, e) == "hit")
            cache.check_invariants()
    return outcomes, cache


def ref_lru(seq, slots):
    stack, out = [], []
    for experts in seq:
        out += [e in stack for e in experts]
        for e in experts:
            if e in stack:
                stack.remove(e)
            stack.append(e)  # most recent last
        while len(stack) > slots:  # evict oldest not requested in this step
            victim = next(x for x in stack if x not in experts)
            stack.remove(victim)
    return out


def ref_lfu(seq, slots, half_life):
    resident, history, out = [], {}, []
    for t, experts in enumerate(seq):
        for e in experts:
            out.append(e in resident)
            history.setdefault(e, []).append(t)
            if e not in resident:
                if len(resident) >= slots:
                    score = {x: sum(0.5 ** ((t - s) / half_life) for s in history[x]) for x in resident
                             if x not in experts}
                    last = {x: history[x][-1] for x in score}
                    victim = min(score, key=lambda x: (round(score[x], 9), last[x], x))
                    resident.remove(victim)
                resident.append(e)
    return out


def optimal_misses(seq, slots):
    """Exhaustive search over every eviction choice (demand paging, the step's keys protected)."""
    flat = [(t, e) for t, experts in enumerate(seq) for e in experts]

    def go(i, resident):
        if i == len(flat):
            return 0
        t, e = flat[i]
        if e in resident:
            return go(i + 1, resident)
        if len(resident) < slots:
            return 1 + go(i + 1, resident | {e})
        best = math.inf
        for v in resident:
            if v not in seq[t]:
                best = min(best, go(i + 1, (resident - {v}) | {e}))
        return 1 + best

    return go(0, frozenset())


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("slots", [2, 3])
def test_lru_matches_reference(seq, slots):
    got, _ = replay(seq, slots, LRUPolicy())
    assert got == ref_lru(seq, slots)


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("half_life", [1.0, 4.0])
def test_lfu_matches_reference(seq, half_life):
    got, _ = replay(seq, 2 if len(seq[0]) == 1 else 3, LFUPolicy(half_life))
    assert got == ref_lfu(seq, 2 if len(seq[0]) == 1 else 3, half_life)


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("slots", [2, 3])
def test_belady_is_optimal(seq, slots):
    experts = np.full((len(seq), 1, max(len(s) for s in seq)), -1, np.int16)
    for t, s in enumerate(seq):
        experts[t, 0, : len(s)] = s
    got, _ = replay(seq, slots, BeladyPolicy.from_experts(experts))
    assert sum(not h for h in got) == optimal_misses(seq, slots)
    lru, _ = replay(seq, slots, LRUPolicy())
    assert sum(got) >= sum(lru)


def ref_freq_oracle(seq, slots, offsets):
    """Evict the resident expert its request uses least in total; ties: least recent, lowest id."""
    resident, last, out = [], {}, []
    for t, experts in enumerate(seq):
        r = max(i for i in range(len(offsets) - 1) if offsets[i] <= t)
        count = {x: sum(x in s for s in seq[offsets[r]: offsets[r + 1]]) for x in range(5)}
        for e in experts:
            out.append(e in resident)
            if e not in resident:
                if len(resident) >= slots:
                    victim = min((x for x in resident if x not in experts), key=lambda x: (count[x], last[x], x))
                    resident.remove(victim)
                resident.append(e)
            last[e] = t
    return out


@pytest.mark.parametrize("seq", SEQS)
def test_freq_oracle_matches_reference(seq):
    experts = np.full((len(seq), 1, max(len(s) for s in seq)), -1, np.int16)
    for t, s in enumerate(seq):
        experts[t, 0, : len(s)] = s
    offsets = np.array([0, len(seq) // 2, len(seq)])
    slots = 2 if len(seq[0]) == 1 else 3
    got, _ = replay(seq, slots, FrequencyOraclePolicy(experts, offsets))
    assert got == ref_freq_oracle(seq, slots, list(offsets))
    assert sum(got) <= len(got) - optimal_misses(seq, slots)  # never beats Belady


def test_belady_random_small_cases():
    rng = np.random.default_rng(3)
    for _ in range(20):
        seq = [[int(x)] for x in rng.integers(0, 4, 9)]
        experts = np.array(seq, np.int16)[:, None, :]
        got, _ = replay(seq, 2, BeladyPolicy.from_experts(experts), num_experts=4)
        assert sum(not h for h in got) == optimal_misses(seq, 2)


@pytest.mark.parametrize("policy", ["lru", "lfu", "pinned+lru", "lru+alloc", "pinned+lfu+alloc", "freq-oracle", "belady",
                                    "static"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_slots_never_exceeded(policy, scope):
    tr = synthetic_trace(SyntheticConfig(num_layers=4, num_experts=6, top_k=2, requests=2, tokens_per_request=40))
    cache = build_cache(CacheSpec(policy, 10, scope), 4, 6, 2, 100, tr, tr.experts)
    rng = np.random.default_rng(0)
    for t in range(tr.num_tokens):
        for l in range(4):
            cache.begin_step(t + l / 4, float(t), [(l, int(e)) for e in tr.experts[t, l]])
            for e in tr.experts[t, l]:
                cache.access(l, int(e))
            nxt = (l + 1) % 4
            cache.admit(nxt, int(rng.integers(0, 6)), ready_at=t + 0.5, prefetch=True)  # a prefetch in flight
            cache.check_invariants()
            assert all(o <= c for o, c in zip(cache.occupancy(), cache.capacity))
    assert cache.num_slots == 10


def test_pinned_never_evicted_and_counters():
    cache = ExpertCache(CacheConfig(1, 6, 3, expert_bytes=7, pinned={0: [5]}), LRUPolicy())
    for t, e in enumerate([0, 1, 2, 3, 4, 0, 1]):
        cache.begin_step(t, 0.0, [(0, e)])
        cache.access(0, e)
    assert cache.contains(0, 5)
    s = cache.stats
    assert s.misses[0] == 7 and s.hits[0] == 0 and s.evictions[0] == 5 and s.bytes_moved[0] == 49


def test_prefetch_counters():
    cache = ExpertCache(CacheConfig(1, 4, 2), LRUPolicy())
    cache.begin_step(0, 0.0)
    cache.admit(0, 1, ready_at=1.0, prefetch=True)
    assert cache.lookup(0, 1) == "inflight"
    cache.admit(0, 2, ready_at=0.0, prefetch=True)
    assert cache.lookup(0, 2) == "prefetch_hit"
    assert cache.lookup(0, 2) == "hit"
    cache.admit(0, 3, ready_at=2.0, prefetch=True)  # the engine's copy, modelled to land at 2
    assert cache.lookup(0, 3) == "inflight"
    cache.get(0, 3).ready_at = 0.0  # the engine saw its event complete: landed
    assert cache.lookup(0, 3) == "hit"
    assert cache.stats.inflight[0] == 2 and cache.stats.prefetch_hits[0] == 1 and cache.stats.hits[0] == 2


def test_cache_too_small_is_an_error():
    with pytest.raises(HaqmoeError, match="too small"):
        ExpertCache(CacheConfig(2, 8, 1), LRUPolicy(), top_k=2)
    with pytest.raises(HaqmoeError, match="at least one slot"):
        build_cache(CacheSpec("lru", 0), 2, 8, 2, 1)
    with pytest.raises(HaqmoeError, match="too small"):
        build_cache(CacheSpec("lru", 2), 2, 8, 2, 1)  # 1 slot per layer, top-2
    with pytest.raises(HaqmoeError, match="simulator only"):
        make_policy("belady")
    with pytest.raises(HaqmoeError, match="unknown cache policy"):
        build_cache(CacheSpec("fifo", 8), 2, 8, 2, 1)


def test_lru_hit_curve_matches_replay():
    tr = synthetic_trace(SyntheticConfig(num_layers=1, num_experts=6, top_k=1, requests=1, tokens_per_request=60))
    curve = lru_hit_curve(tr.experts[:, 0], 6)
    for s in range(1, 7):
        got, _ = replay([[int(e)] for e in tr.experts[:, 0, 0]], s, LRUPolicy(), 6)
        assert curve[s] == sum(got)


def test_allocation_follows_marginal_gain():
    T = 30
    experts = np.zeros((T, 2, 1), np.int16)
    experts[:, 1, 0] = np.arange(T) % 3  # layer 1 cycles over 3 experts, layer 0 always expert 0
    assert allocate_slots(experts, 4, 4, 1) == [1, 3]
    with pytest.raises(HaqmoeError):
        allocate_slots(experts, 4, 1, 1)


def test_policy_registry_is_the_one_parser():
    """Cache-policy names mean what the registry says (no substring parsing), the engine's names included."""
    from haqmoe.registry import CACHE_POLICIES
    from haqmoe.runtime.policies import LFUPolicy, policy_uses_alloc, policy_uses_pins

    for name, p in CACHE_POLICIES.items():
        assert policy_uses_pins(name) == p.pinned and policy_uses_alloc(name) == p.alloc
        if not p.bound:
            assert isinstance(make_policy(name), LFUPolicy) == (p.eviction == "lfu")
    with pytest.raises(HaqmoeError, match="unknown cache policy"):
        make_policy("lru+lfu")  # a substring parser took this for LFU
