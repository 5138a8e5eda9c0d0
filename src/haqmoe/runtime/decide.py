"""One MoE layer's expert decisions, shared by the engine (hybrid.py) and the simulator (simulator.py).

docs/design.md, Cost predictor. Both sides hand this module the layer's routed experts with their
token counts, their ``ExpertCache`` (slots, eviction policy, in-flight copies, the copy engine's
queue) and the ``CostModel``; it returns each expert's decision and updates the cache, so the engine
and the simulator serve the same routing the same way. What stays on each side is execution and
time: the engine issues real copies and computes, the simulator adds up a timeline.

The rules, for a real GPU (each side follows them):

- **Resident** -> ``hit``: GPU.
- **In flight** (in the cache, its copy not landed) -> the cost model chooses ``wait`` (for the copy,
  then GPU) or ``cpu`` (the copy goes on and serves the next use). A landing copy is not free: the
  CPU may finish the call before it lands.
- **Miss** -> the cost model's decision behind the layer's queues (CPU work given so far, the copy
  engine's backlog):
  - ``transfer``: copied into a cache slot (evicting by policy) and run on the GPU. With no slot to
    free (every slot pinned, in use by this layer or still being filled) the copy needs another
    buffer: a free scratch slot (``stream``: copied, run, not cached), else the CPU (``cpu``). A real
    GPU has no room for a copy without a buffer to land in.
  - ``split`` (policy ``split``): the CPU computes the first k / 8 gate/up rows while the rest is
    copied into a scratch slot; with no scratch slot free the layer's remaining misses are decided as
    ``balanced`` (CPU or transfer, whichever finishes first).
  - ``cpu``.
- **Miss levers** (off by default; docs/design.md, Miss levers): a miss whose renormalised router
  weight (``miss_weights``: its largest over the tokens routed to it; a token's top expert is never
  eligible) is below ``skip_below`` -> ``skip``: not run, the token's other selected experts'
  weights renormalised to the sum they had; else below ``low_below`` -> ``low``: served from the expert's
  low-precision (int4) host copy (``CostModel.low_costs``): copied whole (about half the bytes, into a
  transient buffer: no cache or scratch slot) and run on the GPU (``k`` = 0), split as ``split`` splits
  (k = 1 .. 7), or on the CPU alone (k = 8), whichever finishes first behind the queues (``low_all``:
  every miss not skipped, top experts too); not cached, nor admitted in the background (a whole copy
  on the copy engine for an expert that mattered little delayed the layer's other misses).
- Scratch slots: a fixed number of buffers outside the cache (the engine's split slots), one per
  split or streamed call of the layer.

Experts are decided in routing order (first appearance, token by token, rank by rank): the order
the queues fill in. ``admit_misses`` is the background admission both sides run after the layer's
work is issued: CPU-served misses are copied into dynamic slots for their next use while the copy
engine has at most ``admit_backlog`` whole copies queued. ``layer_end`` is when the layer's expert
work ends as the cost model predicts it: the simulator's timeline, and (prefetch.py) the copy time a
prefetch may use on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..costs.curves import DECISION_POLICIES, SPLIT_STEPS, CostModel
from ..errors import HaqmoeError
from .cache import ExpertCache

@dataclass(frozen=True)
class Rules:
    """What a side's configuration adds to the cost model's decision."""

    policy: str = "predictor"  # DECISION_POLICIES
    scratch_slots: int = 0  # buffers outside the cache: split parts and streamed experts
    admit: bool = False  # copy CPU-served misses into the cache in the background
    admit_backlog: float = 1.0  # ... while at most this many whole copies are queued on the copy engine
    skip_below: float = 0.0  # skip a miss whose renormalised router weight is below this (0: never)
    low_below: float = 0.0  # ... serve it on the CPU from its low-precision copy (0: never)
    low_all: bool = False  # ... every miss not skipped, a token's top expert's too (with low_below > 0)

    @property
    def needs_weights(self) -> bool:
        """Whether a miss lever is on: the decisions then need the tokens' router weights (miss_weights)."""
        return self.skip_below > 0 or self.low_below > 0

    def __post_init__(self) -> None:
        if self.policy not in DECISION_POLICIES:
            raise HaqmoeError(f"unknown policy {self.policy!r} (choose from {', '.join(DECISION_POLICIES)})")


def scratch_slots(policy: str, top_k: int) -> int:
    """Scratch slots a side gives a policy: one per expert of a decode token with ``split`` (its
    misses split at once), none otherwise (the engine's store allocates them only for split)."""
    return top_k if policy == "split" else 0


@dataclass
class Decision:
    """How one expert call of ``tokens`` tokens runs: ``kind`` hit | wait | transfer | stream | split |
    cpu | skip (not run) | low (CPU, low-precision copy). ``slot``: the cache slot (hit, wait, transfer) or the scratch slot's index (stream, split).
    The cost model's times: ``ready`` when its weights are on the GPU (the caller's clock);
    ``cpu_done`` when the layer's CPU queue has finished its CPU part (ms after the router's output);
    ``gpu_ms`` its GPU part."""

    expert: int
    tokens: int
    kind: str
    slot: int | None = None
    k: int = 0  # split point: k / SPLIT_STEPS of the gate/up rows on the CPU
    ready: float = 0.0
    cpu_done: float = 0.0
    gpu_ms: float = 0.0

    def key(self) -> tuple:
        """What the engine and the simulator must agree on (times are each side's own)."""
        return self.expert, self.tokens, self.kind, self.slot, self.k


@dataclass
class LayerRecord:
    """One layer of one forward as decided: for a decision log (tests compare the two sides).
    ``guesses``: what the prefetch was given (target layer, ranked experts), an input the replay needs."""

    step: float
    layer: int
    decisions: list[Decision]
    admitted: list[tuple[int, int]] = field(default_factory=list)  # background copies: (expert, slot)
    prefetched: list[tuple[int, int, int]] = field(default_factory=list)  # prefetch copies: (layer, expert, slot)
    guesses: list[tuple[int, list[int]]] = field(default_factory=list)

    def key(self) -> tuple:
        return (self.step, self.layer, tuple(d.key() for d in self.decisions), tuple(self.admitted),
                tuple(self.prefetched))


def routed_counts(top_k_index: np.ndarray) -> dict[int, int]:
    """Expert -> tokens routed to it, in order of first appearance ([tokens, k] ids; -1 = none). A plain
    loop: a decode token has k ids, where numpy's set routines cost more than the count."""
    counts: dict[int, int] = {}
    for e in np.asarray(top_k_index).reshape(-1).tolist():
        if e >= 0:
            counts[e] = counts.get(e, 0) + 1
    return counts


def miss_weights(top_k_index: np.ndarray, top_k_weights: np.ndarray) -> dict[int, float]:
    """Expert -> the largest renormalised router weight any of its tokens gives it ([tokens, k] ids and
    weights; -1 = none): w / sum of the token's selected weights, so whether the model renormalises
    top-k (Mixtral, Qwen2-MoE's norm_topk_prob) or not, a weight says the expert's share of the token's
    routed output. A token's largest-weight expert counts as inf: it is never skipped, so every token
    keeps at least one routed expert (and the renormalisation below never divides by zero)."""
    idx = np.asarray(top_k_index).reshape(-1, np.shape(top_k_index)[-1])
    w = np.asarray(top_k_weights, dtype=np.float64).reshape(idx.shape)
    w = np.where(idx >= 0, w, 0.0)
    share = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)
    share[np.arange(len(idx)), np.argmax(w, axis=1)] = np.inf
    out: dict[int, float] = {}
    for e, s in zip(idx.reshape(-1).tolist(), share.reshape(-1).tolist()):
        if e >= 0:
            out[e] = max(out.get(e, -np.inf), s)
    return out


def decide_layer(cache: ExpertCache, cost: CostModel, rules: Rules, layer: int, needed: Mapping[int, int],
                 now: float, at: float, weights: Mapping[int, float] | None = None) -> list[Decision]:
    """Decide every expert call of one layer (``needed``: expert -> tokens, in routing order).

    ``now``: the eviction policy's clock; ``at``: the router's output on the caller's clock (copies
    queue from there, a copy landing after it is in flight). Starts the cache's step (protecting
    the layer's experts), counts each lookup, admits transferred experts and books every copy on
    ``cache.copies``; the caller runs the calls and, where it knows better (a finished copy), says so
    in the cache entries. ``weights`` (``miss_weights``) is needed only by the miss levers."""
    if rules.needs_weights and weights is None:
        raise HaqmoeError("the miss levers need the router weights of the layer's tokens")
    cache.begin_step(now, at, [(layer, e) for e in needed])
    copies, transfer = cache.copies, cost.transfer_ms
    cpu_ms = 0.0
    scratch = 0  # scratch slots used so far
    out: list[Decision] = []
    for e, n in needed.items():
        seen = cache.lookup(layer, e)
        if seen in ("hit", "prefetch_hit"):
            out.append(Decision(e, n, "hit", cache.get(layer, e).slot, gpu_ms=cost.t_gpu(n)))
            continue
        queues = dict(cpu_queue_ms=cpu_ms, copy_wait_ms=copies.backlog(at))
        if seen == "inflight":
            entry = cache.get(layer, e)
            kind = cost.decide(False, n, rules.policy, inflight_ms=entry.ready_at - at, **queues)
            if kind == "wait":
                out.append(Decision(e, n, "wait", entry.slot, ready=entry.ready_at, gpu_ms=cost.t_gpu(n)))
                continue
        elif rules.skip_below > 0 and weights[e] < rules.skip_below:
            out.append(Decision(e, n, "skip"))
            continue
        elif rules.low_below > 0 and (rules.low_all or weights[e] < rules.low_below):
            k = cost.best_low(n, cpu_ms, copies.backlog(at))[0]
            cpu_part, copy_ms, gpu_part = cost.low_costs(n, k)
            cpu_ms += cpu_part
            ready = copies.book(at, copy_ms) if copy_ms > 0 else 0.0
            out.append(Decision(e, n, "low", k=k, ready=ready, cpu_done=cpu_ms if cpu_part > 0 else 0.0,
                                gpu_ms=gpu_part))
            continue
        else:
            policy = rules.policy if rules.policy != "split" or scratch < rules.scratch_slots else "balanced"
            kind = cost.decide(False, n, policy, **queues)
        if kind == "split":
            k = cost.best_split(n, **queues)[0]
            cpu_part, copy_ms, gpu_part = cost.split_costs(n, k)
            cpu_ms += cpu_part
            out.append(Decision(e, n, "split", scratch, k, copies.book(at, copy_ms), cpu_ms, gpu_part))
            scratch += 1
            continue
        if kind == "transfer":
            slot = cache.admit(layer, e, ready_at=copies.lands(at, transfer))
            if slot is not None:
                out.append(Decision(e, n, "transfer", slot, ready=copies.book(at, transfer), gpu_ms=cost.t_gpu(n)))
                continue
            if scratch < rules.scratch_slots:
                out.append(Decision(e, n, "stream", scratch, ready=copies.book(at, transfer), gpu_ms=cost.t_gpu(n)))
                scratch += 1
                continue
        cpu_ms += cost.t_cpu(n)
        out.append(Decision(e, n, "cpu", cpu_done=cpu_ms))
    return out


def layer_end(decisions: list[Decision], at: float, sync_ms: float = 0.0, overlap: float = 1.0) -> float:
    """When the layer's expert work ends (the caller's clock; ``at``: the router's output): the CPU queue
    and one GPU stream running side by side, each GPU call once its weights are on the GPU (a split's
    also once the CPU has its rows). ``sync_ms``: a host-device sync before CPU results are used;
    ``overlap``: the share of GPU work the host overlaps with the CPU tier (hardware profile terms the
    simulator adds; the cost model alone, as prefetch budgets it, has neither)."""
    cpu_ms = 0.0
    gpu: list[tuple[float, float]] = []  # (weights on the GPU, GPU ms)
    for d in decisions:
        if d.kind == "skip":  # not run
            continue
        if d.kind == "cpu" or (d.kind == "low" and d.k >= SPLIT_STEPS):
            cpu_ms = d.cpu_done
        elif d.kind == "split" or (d.kind == "low" and d.k > 0):  # needs the CPU's rows and the copied ones
            cpu_ms = d.cpu_done
            gpu.append((max(d.ready, at + sync_ms + d.cpu_done), d.gpu_ms))
        else:
            gpu.append((at if d.kind == "hit" else d.ready, d.gpu_ms))
    gpu_end = at
    for ready, dur in sorted(gpu):
        gpu_end = max(gpu_end, ready) + dur
    host_serial = (1.0 - overlap) * sum(dur for _, dur in gpu)
    sync = sync_ms if cpu_ms > 0 else 0.0
    return max(gpu_end, at + sync + cpu_ms + host_serial)


def admit_misses(cache: ExpertCache, cost: CostModel, rules: Rules, layer: int, decisions: list[Decision],
                 at: float) -> list[tuple[int, int]]:
    """Background admission: the layer's CPU-served misses, in order, copied into the cache for their
    next use while the copy engine's backlog is at most ``rules.admit_backlog`` copies and the pool has
    dynamic slots (a pinned plan stays). Returns (expert, slot) of each copy booked, each landing as
    its ``ready_at`` says; stops at the first expert that gets no slot (nor would the next)."""
    if not rules.admit:
        return []
    copies, transfer = cache.copies, cost.transfer_ms
    admitted = []
    for d in decisions:
        if d.kind != "cpu" or cache.contains(layer, d.expert):
            continue
        if copies.backlog(at) > rules.admit_backlog * transfer or cache.dynamic_slots(layer) <= 0:
            break
        slot = cache.admit(layer, d.expert, ready_at=copies.lands(at, transfer))
        if slot is None:
            break
        copies.book(at, transfer)
        admitted.append((d.expert, slot))
    return admitted
