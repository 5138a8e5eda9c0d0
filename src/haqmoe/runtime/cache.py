"""The GPU expert cache: a fixed number of slots, one eviction policy, counters per layer
(docs/design.md, Expert cache, admission and prefetch; hit-rate definitions: Hit rates).

One object serves both the real engine and the simulator:

- the engine preallocates ``cache.num_slots`` expert buffers on the GPU; ``admit`` returns the
  slot index to copy into (on a side stream) and ``Entry.handle`` can hold the copy's CUDA event;
- the simulator stores the copy's completion time in ``Entry.ready_at`` instead.

Both book their copies on ``ExpertCache.copies``, one FIFO copy engine modelled in the cost
model's milliseconds on the caller's clock (simulated time, or the engine's wall clock): an entry's
``ready_at`` is when its copy lands, and an entry whose copy has not landed at ``time`` is "in
flight" for lookups and not evictable. The engine overrides the model with what it observes (a copy
whose CUDA event is done, or a synchronous copy, has landed).

Pools are per layer (``scope="layer"``, slots per layer may differ) or one global pool. Pinned
experts (a placement plan) occupy slots that are never evicted; the rest are dynamic. Slots a
pool does not have are never used: the cache is never over-committed. Keys being used by the
current layer (``begin_step(protect=...)``) and copies still in flight are not evictable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import HaqmoeError
from .policies import Key, Policy

SCOPES = ("layer", "global")
MAX_LOOKAHEAD = 3  # prefetch distances counted: layers l+1 .. l+3 guessed at layer l


@dataclass
class CacheConfig:
    """Shape of the cache. ``slots``: total (global) or per layer (list, or one int for all)."""

    num_layers: int
    num_experts: int
    slots: int | Sequence[int]
    scope: str = "layer"
    expert_bytes: int = 0  # bytes one copy moves (for the counters)
    pinned: Mapping[int, Sequence[int]] = field(default_factory=dict)  # layer -> pinned experts

    def pool_slots(self) -> list[int]:
        """Capacity of each pool (one per layer, or a single global pool)."""
        if self.scope not in SCOPES:
            raise HaqmoeError(f"cache scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "global":
            total = int(self.slots) if np.isscalar(self.slots) else int(sum(self.slots))
            return [total]
        if np.isscalar(self.slots):
            return [int(self.slots)] * self.num_layers
        slots = [int(s) for s in self.slots]
        if len(slots) != self.num_layers:
            raise HaqmoeError(f"{len(slots)} per-layer slot counts given for {self.num_layers} layers")
        return slots


class CopyQueue:
    """The host-to-device copy engine: FIFO, one copy after another, in milliseconds.

    Kept as the start of the current busy stretch and the copy time queued since, so that the
    backlog seen when the copies were queued is their exact sum on any clock (the engine's wall
    clock and the simulator's timeline then compare it with a copy's time alike)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.queued = 0.0

    @property
    def free_at(self) -> float:
        return self.start + self.queued

    def lands(self, at: float, ms: float) -> float:
        """When a copy of ``ms`` queued at ``at`` would land."""
        return max(self.free_at, at) + ms

    def book(self, at: float, ms: float) -> float:
        """Queue that copy; returns when it lands."""
        if at >= self.free_at:
            self.start, self.queued = at, 0.0
        self.queued += ms
        return self.free_at

    def backlog(self, at: float) -> float:
        """Milliseconds until the copy engine is free, seen at ``at``."""
        return max(0.0, self.queued - (at - self.start))

    def idle(self, at: float) -> None:
        """The caller knows no copy is running at ``at`` (the engine: no CUDA event pending)."""
        if self.free_at > at:
            self.start, self.queued = at, 0.0


@dataclass
class Entry:
    slot: int  # index into the preallocated slot buffers
    pinned: bool = False
    prefetched: int = 0  # admitted by a prefetch from this many layers ahead and not used since (0: not)
    ready_at: float = 0.0  # when the copy lands, on the caller's clock (0 = resident from the start)
    handle: Any = None  # engine: the CUDA event of a copy nothing has waited on yet


@dataclass
class LayerStats:
    """Counters per layer. ``hits`` are demand hits (entry there before any prefetch for this use);
    ``prefetch_hits`` were brought by a prefetch; ``inflight`` were in the cache but not copied yet.
    The ``distance_*`` counters split the prefetch ones by how many layers ahead the copy was guessed
    (index d - 1, summed over layers): what lookahead gains or wastes at each distance."""

    hits: np.ndarray
    prefetch_hits: np.ndarray
    inflight: np.ndarray
    misses: np.ndarray
    evictions: np.ndarray
    copies: np.ndarray
    prefetch_copies: np.ndarray
    prefetch_wasted: np.ndarray  # prefetched entries evicted before any use
    bytes_moved: np.ndarray
    distance_copies: np.ndarray  # [MAX_LOOKAHEAD]
    distance_hits: np.ndarray
    distance_wasted: np.ndarray

    @classmethod
    def zeros(cls, num_layers: int) -> "LayerStats":
        return cls(*(np.zeros(num_layers, dtype=np.int64) for _ in range(9)),
                   *(np.zeros(MAX_LOOKAHEAD, dtype=np.int64) for _ in range(3)))

    @property
    def lookups(self) -> np.ndarray:
        return self.hits + self.prefetch_hits + self.inflight + self.misses

    def rates(self) -> dict:
        """The hit rates and prefetch counters every report prints (docs/design.md, Hit rates), so the engine
        and the simulator mean one thing by each: ``hit_rate`` = resident when needed (demand + prefetch
        hits; what decides latency, what the paper-style tables print), ``demand_hit_rate`` = demand hits
        only (the classic cache hit rate, equal to ``hit_rate`` without prefetch), ``prefetch_hit_rate`` =
        prefetch hits / lookups. A lookup whose copy is still in flight counts in none of them."""
        total = max(int(self.lookups.sum()), 1)
        return {
            "hit_rate": float((self.hits.sum() + self.prefetch_hits.sum()) / total),
            "demand_hit_rate": float(self.hits.sum() / total),
            "prefetch_hit_rate": float(self.prefetch_hits.sum() / total),
            "prefetch_copies": int(self.prefetch_copies.sum()),
            "prefetch_hits": int(self.prefetch_hits.sum()),
            "prefetch_wasted": int(self.prefetch_wasted.sum()),
            "prefetch_by_distance": {d + 1: {"copies": int(c), "hits": int(h), "wasted": int(w)}
                                     for d, (c, h, w) in enumerate(zip(self.distance_copies, self.distance_hits,
                                                                        self.distance_wasted)) if c},
        }

    def as_dict(self) -> dict[str, list[int]]:
        return {k: v.tolist() for k, v in self.__dict__.items()}


class ExpertCache:
    """Slots + policy + counters. Not thread-safe: one engine thread drives it."""

    def __init__(self, config: CacheConfig, policy: Policy, top_k: int | None = None) -> None:
        self.config = config
        self.policy = policy
        L = config.num_layers
        self.capacity = config.pool_slots()
        if any(c < 0 for c in self.capacity):
            raise HaqmoeError("cache slot counts must be >= 0")
        self.num_slots = int(sum(self.capacity))
        self.stats = LayerStats.zeros(L)
        self._entries: dict[Key, Entry] = {}
        self._pool_keys: list[set[Key]] = [set() for _ in self.capacity]
        first = np.concatenate([[0], np.cumsum(self.capacity)]).astype(int)
        self._free: list[list[int]] = [list(range(first[p + 1] - 1, first[p] - 1, -1))
                                       for p in range(len(self.capacity))]
        self._protect: set[Key] = set()
        self.now = 0.0  # policy clock (tokens)
        self.time = 0.0  # wall/simulated time for in-flight checks
        self.copies = CopyQueue()
        if top_k is not None:
            self.check_fits(top_k)
        for layer, experts in config.pinned.items():
            for e in experts:
                self._pin(int(layer), int(e))

    # ------------------------------------------------------------------ structure
    def pool_of(self, layer: int) -> int:
        return 0 if self.config.scope == "global" else layer

    def check_fits(self, top_k: int) -> None:
        """A pool smaller than one token's experts cannot serve a token from the GPU."""
        small = [i for i, c in enumerate(self.capacity) if c < top_k]
        if small:
            where = "the global pool" if self.config.scope == "global" else f"layer {small[0]}"
            raise HaqmoeError(f"cache too small: {where} has {self.capacity[small[0]]} slots but one token "
                              f"needs {top_k} experts per layer")

    def _pin(self, layer: int, expert: int) -> None:
        pool = self.pool_of(layer)
        if not self._free[pool]:
            raise HaqmoeError(f"plan pins more experts than the cache has slots (layer {layer}, pool {pool})")
        key = (layer, expert)
        if key in self._entries:
            return
        self._entries[key] = Entry(self._free[pool].pop(), pinned=True)
        self._pool_keys[pool].add(key)

    def dynamic_slots(self, layer: int) -> int:
        pool = self.pool_of(layer)
        return self.capacity[pool] - sum(1 for k in self._pool_keys[pool] if self._entries[k].pinned)

    # ------------------------------------------------------------------- queries
    def get(self, layer: int, expert: int) -> Entry | None:
        return self._entries.get((layer, expert))

    def contains(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._entries

    def is_resident(self, layer: int, expert: int) -> bool:
        e = self._entries.get((layer, expert))
        return e is not None and e.ready_at <= self.time

    def resident(self, layer: int) -> list[int]:
        return sorted(e for (l, e) in self._entries if l == layer)

    def occupancy(self) -> list[int]:
        return [len(k) for k in self._pool_keys]

    # ----------------------------------------------------------------- mutations
    def begin_step(self, now: float, time: float | None = None, protect: Iterable[Key] = ()) -> None:
        """Start a (token, layer) step: set the policy clock and protect the keys in use."""
        self.now = float(now)
        if time is not None:
            self.time = float(time)
        self._protect = set(protect)

    def lookup(self, layer: int, expert: int) -> str:
        """Count one use of (layer, expert): 'hit', 'prefetch_hit', 'inflight' (its copy lands after
        ``time``) or 'miss'."""
        key = (layer, expert)
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses[layer] += 1
            return "miss"
        if not entry.pinned:
            self.policy.on_hit(key, self.pool_of(layer), self.now)
        if entry.ready_at > self.time:
            self.stats.inflight[layer] += 1
            entry.prefetched = 0
            return "inflight"
        if entry.prefetched:
            self.stats.prefetch_hits[layer] += 1
            self.stats.distance_hits[entry.prefetched - 1] += 1
            entry.prefetched = 0
            return "prefetch_hit"
        self.stats.hits[layer] += 1
        return "hit"

    def _evictable(self, pool: int) -> list[Key]:
        return [k for k in self._pool_keys[pool]
                if not self._entries[k].pinned and k not in self._protect and self._entries[k].ready_at <= self.time]

    def admit(self, layer: int, expert: int, ready_at: float = 0.0, prefetch: int = 0,
              handle: Any = None) -> int | None:
        """Give (layer, expert) a slot, evicting by policy if the pool is full. ``prefetch``: the copy is a
        prefetch guessed this many layers ahead (1 .. MAX_LOOKAHEAD; 0: a demand or background copy).

        Returns the slot index to copy into, or None when no slot can be freed (every slot pinned,
        protected or still being filled): the caller then serves the expert without caching it.
        """
        key = (layer, expert)
        if key in self._entries:
            return self._entries[key].slot
        pool = self.pool_of(layer)
        if not self._free[pool]:
            candidates = self._evictable(pool)
            if not candidates:
                return None
            self.evict(*self.policy.victim(candidates, pool, self.now))
        slot = self._free[pool].pop()
        self._entries[key] = Entry(slot, prefetched=prefetch, ready_at=ready_at, handle=handle)
        self._pool_keys[pool].add(key)
        self.policy.on_insert(key, pool, self.now)
        self.stats.copies[layer] += 1
        self.stats.bytes_moved[layer] += self.config.expert_bytes
        if prefetch:
            self.stats.prefetch_copies[layer] += 1
            self.stats.distance_copies[prefetch - 1] += 1
        return slot

    def evict(self, layer: int, expert: int) -> None:
        key = (layer, expert)
        entry = self._entries.get(key)
        if entry is None or entry.pinned:
            raise HaqmoeError(f"cannot evict expert {expert} of layer {layer}: not cached or pinned")
        pool = self.pool_of(layer)
        del self._entries[key]
        self._pool_keys[pool].discard(key)
        self._free[pool].append(entry.slot)
        self.policy.on_remove(key, pool)
        self.stats.evictions[layer] += 1
        if entry.prefetched:
            self.stats.prefetch_wasted[layer] += 1
            self.stats.distance_wasted[entry.prefetched - 1] += 1

    def access(self, layer: int, expert: int) -> str:
        """Demand access: count it, and on a miss bring the expert in (evicting if needed)."""
        outcome = self.lookup(layer, expert)
        if outcome == "miss":
            self.admit(layer, expert, ready_at=self.time)
        return outcome

    def check_invariants(self) -> None:
        """Slots never over-committed and never shared (used by tests and debug runs)."""
        slots = [e.slot for e in self._entries.values()]
        if len(slots) != len(set(slots)):
            raise AssertionError("two cached experts share one slot")
        for pool, keys in enumerate(self._pool_keys):
            if len(keys) + len(self._free[pool]) != self.capacity[pool] or len(keys) > self.capacity[pool]:
                raise AssertionError(f"pool {pool} over-committed: {len(keys)} keys, capacity {self.capacity[pool]}")
