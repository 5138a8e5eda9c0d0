"""Eviction policies for the GPU expert cache.

A policy only ranks keys; the cache (``runtime/cache.py``) owns slots, pinning, protection and
counters. That split keeps each policy a few lines and lets the real engine and the simulator
share one cache object. Keys are ``(layer, expert)``; ``now`` is a float clock in tokens
(``token + layer / num_layers``) so that recency and "next use" compare across layers when the
pool is global.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from ..errors import HaqmoeError
from ..registry import CACHE_POLICIES, ENGINE_CACHE_POLICIES, CachePolicy

Key = tuple[int, int]


class Policy(Protocol):
    """What the cache asks of a policy. ``pool`` separates per-layer pools from a global one."""

    name: str

    def on_insert(self, key: Key, pool: int, now: float) -> None: ...

    def on_hit(self, key: Key, pool: int, now: float) -> None: ...

    def on_remove(self, key: Key, pool: int) -> None: ...

    def victim(self, candidates: Sequence[Key], pool: int, now: float) -> Key: ...


class LRUPolicy:
    """Least recently used: the peer baseline (mixtral-offloading)."""

    name = "lru"

    def __init__(self) -> None:
        self._order: dict[int, OrderedDict[Key, None]] = {}

    def _od(self, pool: int) -> OrderedDict[Key, None]:
        return self._order.setdefault(pool, OrderedDict())

    def on_insert(self, key: Key, pool: int, now: float) -> None:
        self._od(pool)[key] = None

    def on_hit(self, key: Key, pool: int, now: float) -> None:
        self._od(pool).move_to_end(key)

    def on_remove(self, key: Key, pool: int) -> None:
        self._od(pool).pop(key, None)

    def victim(self, candidates: Sequence[Key], pool: int, now: float) -> Key:
        allowed = set(candidates)
        for key in self._od(pool):  # oldest first
            if key in allowed:
                return key
        raise HaqmoeError("LRU policy: no evictable expert in the pool (cache state is inconsistent)")


class LFUPolicy:
    """Least frequently used with exponential decay (half-life in tokens).

    Pure LFU never forgets a burst; decay lets the cache follow a drifting workload while still
    keeping the steadily popular experts that LRU throws out after one unlucky streak.
    The score is kept in the log domain (``log2(count) + t / half_life``) so it never overflows.
    Ties go to the least recently used key, then the lowest (layer, expert).
    """

    name = "lfu"

    def __init__(self, half_life: float = 32.0) -> None:
        if half_life <= 0:
            raise HaqmoeError(f"LFU half-life must be > 0 tokens, got {half_life}")
        self.half_life = half_life
        self._score: dict[Key, float] = {}  # log-domain decayed count
        self._last: dict[Key, float] = {}
        self._history: dict[Key, float] = {}  # score survives eviction (frequency memory)

    def _bump(self, key: Key, now: float) -> None:
        prev = self._score.get(key, self._history.get(key))
        count = 1.0 if prev is None else 2.0 ** (prev - now / self.half_life) + 1.0
        self._score[key] = math.log2(count) + now / self.half_life
        self._last[key] = now

    def on_insert(self, key: Key, pool: int, now: float) -> None:
        self._bump(key, now)

    def on_hit(self, key: Key, pool: int, now: float) -> None:
        self._bump(key, now)

    def on_remove(self, key: Key, pool: int) -> None:
        self._history[key] = self._score.pop(key)
        self._last.pop(key, None)

    def victim(self, candidates: Sequence[Key], pool: int, now: float) -> Key:
        return min(candidates, key=lambda k: (round(self._score[k], 9), self._last[k], k))


class BeladyPolicy:
    """Offline optimum (MIN): evict the key whose next use is furthest away. Needs the future,
    so it exists only in the simulator, as the bound every table shows beside online policies."""

    name = "belady"

    def __init__(self, future: dict[Key, np.ndarray]) -> None:
        # future[key] = sorted clock values at which key is requested
        self._future = {k: np.asarray(v, dtype=np.float64) for k, v in future.items()}

    @classmethod
    def from_experts(cls, experts: np.ndarray) -> "BeladyPolicy":
        """Build the oracle from a [T, L, k] expert array (clock = token + layer / L)."""
        T, L, _ = experts.shape
        future: dict[Key, list[float]] = {}
        for l in range(L):
            for t in range(T):
                for e in set(int(x) for x in experts[t, l] if x >= 0):
                    future.setdefault((l, e), []).append(t + l / L)
        return cls({k: np.array(v) for k, v in future.items()})

    def next_use(self, key: Key, now: float) -> float:
        times = self._future.get(key)
        if times is None:
            return math.inf
        i = bisect.bisect_right(times, now + 1e-9)
        return float(times[i]) if i < len(times) else math.inf

    def on_insert(self, key: Key, pool: int, now: float) -> None:
        pass

    def on_hit(self, key: Key, pool: int, now: float) -> None:
        pass

    def on_remove(self, key: Key, pool: int) -> None:
        pass

    def victim(self, candidates: Sequence[Key], pool: int, now: float) -> Key:
        return max(candidates, key=lambda k: (self.next_use(k, now), k))


class FrequencyOraclePolicy:
    """Evict the expert the CURRENT REQUEST uses least over its whole length (future included).

    A simulator-only bound for every frequency-based online policy (LFU, decay, prompt-seeded
    counts, plans): they can at best learn each request's true expert frequencies, and this policy
    is handed them. Where it closes only part of the LRU -> Belady gap, the rest is the order of
    the requests' tokens, which only knowledge of the next tokens (prefetch) can exploit.
    """

    name = "freq-oracle"

    def __init__(self, experts: np.ndarray, offsets: np.ndarray) -> None:
        T, L, _ = experts.shape
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._counts = np.zeros((len(self._offsets) - 1, L, int(experts.max()) + 1), dtype=np.int64)
        for r in range(len(self._offsets) - 1):
            block = experts[self._offsets[r]: self._offsets[r + 1]]
            for l in range(L):
                ids = block[:, l].ravel()
                np.add.at(self._counts[r, l], ids[ids >= 0], 1)
        self._last: dict[Key, float] = {}

    def _count(self, key: Key, request: int) -> int:
        l, e = key
        return int(self._counts[request, l, e]) if e < self._counts.shape[2] else 0

    def on_insert(self, key: Key, pool: int, now: float) -> None:
        self._last[key] = now

    def on_hit(self, key: Key, pool: int, now: float) -> None:
        self._last[key] = now

    def on_remove(self, key: Key, pool: int) -> None:
        self._last.pop(key, None)

    def victim(self, candidates: Sequence[Key], pool: int, now: float) -> Key:
        r = min(int(np.searchsorted(self._offsets, int(now), side="right")) - 1, len(self._counts) - 1)
        return min(candidates, key=lambda k: (self._count(k, r), self._last.get(k, -1.0), k))


ONLINE_POLICIES = tuple(n for n, p in CACHE_POLICIES.items() if not p.bound and not p.static)
BOUNDS = tuple(n for n, p in CACHE_POLICIES.items() if p.bound)  # need the replayed trace's future: simulator only
ALL_POLICIES = ONLINE_POLICIES + BOUNDS


def cache_policy(name: str, engine: bool = False) -> CachePolicy:
    """The registry entry of a cache-policy name (``engine``: one the engine runs)."""
    known = ENGINE_CACHE_POLICIES if engine else tuple(CACHE_POLICIES)
    if name not in known:
        raise HaqmoeError(f"unknown cache policy {name!r}{' for the engine' if engine else ''} "
                          f"(choose from {', '.join(known)})")
    return CACHE_POLICIES[name]


def make_policy(name: str, experts: np.ndarray | None = None, lfu_half_life: float = 32.0,
                offsets: np.ndarray | None = None) -> Policy:
    """The eviction rule behind a policy name (pinning and slot allocation are cache options).

    ``experts`` ([T, L, k] of the trace to be replayed) is required for the bounds only, and
    ``offsets`` (its request boundaries) for ``freq-oracle``.
    """
    p = cache_policy(name)
    if p.bound:
        if experts is None:
            raise HaqmoeError(f"{name} needs the future: it is available in the simulator only")
        if p.eviction == "belady":
            return BeladyPolicy.from_experts(experts)
        return FrequencyOraclePolicy(experts, np.array([0, len(experts)]) if offsets is None else offsets)
    return LFUPolicy(lfu_half_life) if p.eviction == "lfu" else LRUPolicy()


def policy_uses_pins(name: str) -> bool:
    return cache_policy(name).pinned


def policy_uses_alloc(name: str) -> bool:
    return cache_policy(name).alloc


# --------------------------------------------------------------- per-layer slot allocation
def lru_hit_curve(layer_experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Hits of an LRU pool of s slots, for s = 0..E, on one layer's [T, k] accesses (one pass,
    LRU stack distances; the k experts of a token are looked up before any is moved)."""
    stack: list[int] = []
    depth_hist = np.zeros(num_experts + 1, dtype=np.int64)  # index E = cold miss
    for row in layer_experts:
        chosen = [int(e) for e in row if e >= 0]
        for e in chosen:
            depth_hist[stack.index(e) if e in stack else num_experts] += 1
        for e in chosen:
            if e in stack:
                stack.remove(e)
            stack.insert(0, e)
    hits = np.zeros(num_experts + 1, dtype=np.int64)
    hits[1:] = np.cumsum(depth_hist[:num_experts])
    return hits


def allocate_slots(experts: np.ndarray, num_experts: int, total_slots: int, min_slots: int,
                   curve: Callable[[np.ndarray, int], np.ndarray] = lru_hit_curve,
                   pinned: Sequence[int] | None = None) -> list[int]:
    """Per-layer slot counts that maximise hits on a profile trace, by greedy marginal gain.

    Layers differ (skewed early layers need few slots, flat late ones many), so equal slots per
    layer waste memory. ``pinned[l]`` slots are reserved on top of the floor for pinned experts.
    """
    L = experts.shape[1]
    floor = [max(min_slots, (pinned[l] if pinned else 0)) for l in range(L)]
    if sum(floor) > total_slots:
        raise HaqmoeError(f"{total_slots} cache slots cannot give every one of {L} layers its "
                          f"minimum of {min(floor)}+ slots")
    curves = [curve(experts[:, l], num_experts) for l in range(L)]
    slots = list(floor)
    left = total_slots - sum(floor)
    while left > 0:
        # best average gain over the next j slots of each layer: LRU curves are not concave (a
        # cyclic pattern over 3 experts gains nothing from slot 2 and everything from slot 3)
        best, best_l, best_j = -1.0, -1, 0
        for l in range(L):
            for j in range(1, min(left, num_experts - slots[l]) + 1):
                rate = (curves[l][slots[l] + j] - curves[l][slots[l]]) / j
                if rate > best:
                    best, best_l, best_j = rate, l, j
        if best_l < 0 or best <= 0:  # no gain left on the profile: spread the rest evenly
            for l in sorted(range(L), key=lambda i: slots[i]):
                if left > 0 and slots[l] < num_experts:
                    slots[l] += 1
                    left -= 1
            if all(s >= num_experts for s in slots):
                break
            continue
        slots[best_l] += best_j
        left -= best_j
    return slots


def equal_slots(total_slots: int, num_layers: int, num_experts: int) -> list[int]:
    """Split slots as evenly as possible (remainder to the first layers)."""
    base, extra = divmod(total_slots, num_layers)
    return [min(num_experts, base + (1 if l < extra else 0)) for l in range(num_layers)]


def iter_keys(layer: int, experts: Iterable[int]) -> list[Key]:
    return [(layer, int(e)) for e in experts]
