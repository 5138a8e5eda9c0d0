"""The hybrid experts module swapped into each MoE block (attention, router, shared experts untouched).

Per forward call (a prefill batch or one decode token) and per selected expert with n tokens:
resident in the GPU cache -> GPU; otherwise the cost predictor decides: n > n_critical ->
transfer through the cache and run on the GPU, else run on the CPU; the ``split`` policy may also
serve a miss on both (predictor.py): the CPU computes the first gate/up rows from the host copy
while the rest of the expert is copied into a scratch slot, then the GPU finishes it. GPU work is
issued first (asynchronous on CUDA), CPU experts run meanwhile, results are combined with the router
weights.
With ``admit`` (the simulator's background admission), an expert served on the CPU is also copied
into the cache for its next use when the copy engine is idle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..routing.guess import GuessPlan, guess_for_batch
from .cache import ExpertCache
from .predictor import CostModel
from .store import ExpertStore

# Host wall time of one-token (decode) hybrid forwards, by phase (Telemetry.decode_host_ms): where a real
# GPU's decode goes beyond the cost model's expert times, e.g. the host waiting for the router's result.
HOST_PHASES = {
    "route_wait": "reading the routed experts off the device (waits for attention and router)",
    "decide": "the per-expert decisions (cache lookups, cost model, copies issued)",
    "to_host": "the CPU tier's inputs copied off the device",
    "cpu_tier": "CPU expert work (whole experts and split rows), measured in place",
    "cpu_tier_est": "the same work as the calibrated cost model predicts it",
    "layer": "the whole hybrid forward",
}


@dataclass
class Telemetry:
    """Counters the engine reports beside the cache's own per-layer stats."""

    num_layers: int
    cpu_experts: np.ndarray = field(init=False)  # expert calls run on the CPU tier, per layer
    gpu_experts: np.ndarray = field(init=False)
    split_experts: np.ndarray = field(init=False)  # misses served by both (decision ``split``)
    cpu_tokens: np.ndarray = field(init=False)
    gpu_tokens: np.ndarray = field(init=False)
    step: int = 0  # policy clock: one per model forward
    guess_ms: float = 0.0  # time spent scoring next-layer guesses (prefetch's compute cost)
    prefetch_copies: int = 0
    background_copies: int = 0  # CPU-served misses copied into the cache afterwards (admit)
    split_bytes: int = 0  # bytes the GPU parts of split misses copied (not cached)
    decode_host_ms: dict[str, float] = field(init=False)  # HOST_PHASES -> ms, summed over decode forwards
    decode_forwards: int = 0  # one-token hybrid forwards timed there (layers x decode tokens)

    def __post_init__(self) -> None:
        for name in ("cpu_experts", "gpu_experts", "split_experts", "cpu_tokens", "gpu_tokens"):
            setattr(self, name, np.zeros(self.num_layers, dtype=np.int64))
        self.decode_host_ms = dict.fromkeys(HOST_PHASES, 0.0)

    def host_ms_per_token(self) -> dict[str, float]:
        """``host_<phase>_ms``: the phases' host time per decode token (all MoE layers together)."""
        tokens = max(self.decode_forwards / self.num_layers, 1.0)
        return {f"host_{k}_ms": v / tokens for k, v in self.decode_host_ms.items()}



@dataclass
class _Call:
    """One expert call's placement: tier gpu | cpu | split, its slot and copy event, the split point,
    and what it adds to this layer's CPU and copy queues (the cost model's estimate)."""

    tier: str
    slot: int | None = None
    event: object = None
    rows: int = 0
    cpu_ms: float = 0.0
    copy_ms: float = 0.0


class HybridExperts(nn.Module):
    def __init__(self, layer: int, original: nn.Module, store: ExpertStore, cache: ExpertCache | None,
                 cost: CostModel | None, policy: str, telemetry: Telemetry,
                 next_router: nn.Module | None = None, prefetch: int = 0,
                 guess_w: torch.Tensor | None = None, guess_plan: GuessPlan | None = None, admit: bool = False):
        super().__init__()
        # Next-layer prefetch: layer l+1's router, re-based onto this layer's normalised input
        # (routing/guess.py), guesses its experts; copies start while we compute.
        self._next_router = [next_router]  # a list: not a submodule (the router belongs to layer l+1)
        self._guess_w = guess_w
        self._guess_plan = guess_plan  # per-layer transition tables where they beat the router
        self.layer = layer
        self.original = original  # the CPU tier (kept on the CPU when the model moves to a GPU)
        self.store, self.cache, self.cost, self.policy = store, cache, cost, policy
        self.telemetry = telemetry
        self.admit = admit and cache is not None
        self.num_experts = original.num_experts
        self.prefetch = 0
        self.set_prefetch(prefetch)

    def set_prefetch(self, width: int) -> None:
        """Experts of layer l+1 to prefetch per call (0: off; no next layer or no cache: always off)."""
        able = self._next_router[0] is not None and self._guess_w is not None and self.cache is not None
        self.prefetch = width if able else 0

    def _decide(self, e: int, n: int, cpu_queue_ms: float = 0.0, copy_wait_ms: float = 0.0,
                split_slot: int | None = None) -> _Call:
        """How one expert call of n tokens runs. The queues (what this layer already gave the CPU and
        the copy engine) feed ``balanced`` and ``split``; ``split_slot``: a free scratch slot, if any.
        A copy's event is returned, not waited on: the caller first moves the CPU jobs' inputs off the
        GPU, which must not queue behind the copy."""
        cache = self.cache
        entry = cache.get(self.layer, e)
        landing = entry is not None and entry.handle is not None and not entry.handle.query()
        if cache.lookup(self.layer, e, landing) != "miss":  # a copy may still be landing: hand its event on once
            event, entry.handle = entry.handle, None
            return _Call("gpu", entry.slot, event=event)
        if self.cost is None:
            return _Call("cpu")
        queues = dict(cpu_queue_ms=cpu_queue_ms, copy_wait_ms=copy_wait_ms)
        policy = self.policy if self.policy != "split" or split_slot is not None else "balanced"
        decision = self.cost.decide(False, n, policy, **queues)
        if decision == "split":
            k = self.cost.best_split(n, **queues)[0]
            cpu, copy, _ = self.cost.split_costs(n, k)
            rows = self.store.split_rows(k)
            return _Call("split", split_slot, event=self.store.load_slot(split_slot, self.layer, e, rows), rows=rows,
                         cpu_ms=cpu, copy_ms=copy)
        if decision == "transfer":
            slot = cache.admit(self.layer, e)
            if slot is not None:
                return _Call("gpu", slot, event=self.store.load_slot(slot, self.layer, e),
                             copy_ms=self.cost.transfer_ms)
        return _Call("cpu", cpu_ms=self.cost.t_cpu(n))

    def _prefetch_next(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> None:
        """Copy layer l+1's likeliest experts into the cache; a wrong guess costs a copy and a slot."""
        t = time.perf_counter()
        plan = self._guess_plan
        guesses = plan.guess(self.layer, top_k_index, self.prefetch) if plan is not None else None
        if guesses is None:
            guesses = guess_for_batch(hidden_states, self._guess_w, self._next_router[0], self.prefetch)
        self.telemetry.guess_ms += 1e3 * (time.perf_counter() - t)
        nxt = self.layer + 1
        for e in guesses:
            if self.cache.contains(nxt, e):
                continue
            slot = self.cache.admit(nxt, e, prefetch=True)
            if slot is not None:
                self.cache.get(nxt, e).handle = self.store.load_slot(slot, nxt, e)  # waited on at first use
                self.telemetry.prefetch_copies += 1

    @torch.compiler.disable  # data-dependent host decisions: stays eager inside a compiled decode step
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.cache is None:  # every expert on the CPU tier: the plain module, counted
            tel = self.telemetry
            tel.cpu_experts[self.layer] += int(torch.unique(top_k_index).numel())
            tel.cpu_tokens[self.layer] += int(top_k_index.numel())
            return self.original(hidden_states, top_k_index, top_k_weights)
        tel = self.telemetry
        clock = [time.perf_counter()]
        used = torch.unique(top_k_index).tolist()
        clock.append(time.perf_counter())
        self.cache.begin_step(tel.step, protect=[(self.layer, e) for e in used])
        out = torch.zeros_like(hidden_states)
        jobs: dict[str, list] = {"gpu": [], "cpu": [], "split": []}
        cpu_ms = copy_ms = 0.0  # this layer's queues, as the cost model sees them
        splits = self.store.cfg.split_slots
        for e in used:
            token_idx, k_pos = torch.where(top_k_index == e)
            free = self.store.split_slot(len(jobs["split"])) if len(jobs["split"]) < splits else None
            call = self._decide(e, len(token_idx), cpu_ms, copy_ms, free)
            cpu_ms, copy_ms = cpu_ms + call.cpu_ms, copy_ms + call.copy_ms
            jobs[call.tier].append((e, token_idx, top_k_weights[token_idx, k_pos, None], call))
        clock.append(time.perf_counter())
        # The CPU tier's inputs leave the GPU before any GPU job waits on a copy (same stream: a
        # device-to-host copy queued after the wait would hold the CPU tier until the copy lands).
        cpu_inputs = {e: hidden_states[token_idx].cpu() for e, token_idx, _, _ in jobs["cpu"] + jobs["split"]}
        clock.append(time.perf_counter())
        cpu_tier = 0.0
        for e, token_idx, w, call in jobs["gpu"]:  # asynchronous on CUDA
            self._wait(call)
            y = self.store.gpu_forward(call.slot, hidden_states[token_idx].to(self.store.device))
            out.index_add_(0, token_idx, (y.to(out.device) * w).to(out.dtype))
            tel.gpu_experts[self.layer] += 1
            tel.gpu_tokens[self.layer] += len(token_idx)
        if self.prefetch:
            self._prefetch_next(hidden_states, top_k_index)
        for e, token_idx, w, call in jobs["split"]:  # CPU rows while the copy runs, then the GPU's part
            t = time.perf_counter()
            h_cpu = self.store.cpu_rows(self.layer, e, cpu_inputs[e], call.rows)
            cpu_tier += time.perf_counter() - t
            self._wait(call)
            y = self.store.split_forward(call.slot, hidden_states[token_idx].to(self.store.device), h_cpu, call.rows)
            out.index_add_(0, token_idx, (y.to(out.device) * w).to(out.dtype))
            tel.split_experts[self.layer] += 1
            tel.split_bytes += self.store.copied_bytes(call.rows)
        for e, token_idx, w, _ in jobs["cpu"]:  # overlaps the GPU work above
            x = cpu_inputs[e]
            t = time.perf_counter()
            y = self.original(x, torch.full((len(x), 1), e), torch.ones(len(x), 1, dtype=x.dtype))
            cpu_tier += time.perf_counter() - t
            out.index_add_(0, token_idx, (y.to(out.device) * w).to(out.dtype))
            tel.cpu_experts[self.layer] += 1
            tel.cpu_tokens[self.layer] += len(token_idx)
        if self.admit:
            self._admit_in_background([e for e, *_ in jobs["cpu"]])
        if hidden_states.shape[0] == 1:
            self._add_host_times(clock, cpu_tier, cpu_ms)
        return out

    def _add_host_times(self, clock: list[float], cpu_tier_s: float, cpu_est_ms: float) -> None:
        host = self.telemetry.decode_host_ms
        host["route_wait"] += 1e3 * (clock[1] - clock[0])
        host["decide"] += 1e3 * (clock[2] - clock[1])
        host["to_host"] += 1e3 * (clock[3] - clock[2])
        host["cpu_tier"] += 1e3 * cpu_tier_s
        host["cpu_tier_est"] += cpu_est_ms
        host["layer"] += 1e3 * (time.perf_counter() - clock[0])
        self.telemetry.decode_forwards += 1

    @staticmethod
    def _wait(call: _Call) -> None:
        if call.event is not None:
            torch.cuda.current_stream().wait_event(call.event)

    def _admit_in_background(self, experts: list[int]) -> None:
        """Copy CPU-served misses in for their next use, one copy in flight at most (the simulator's
        backlog of one transfer) and only into dynamic slots (a pinned plan stays)."""
        for e in experts:
            if self.store.copies_in_flight() > 0 or self.cache.dynamic_slots(self.layer) <= 0:
                return
            slot = self.cache.admit(self.layer, e)
            if slot is None:
                return
            self.cache.get(self.layer, e).handle = self.store.load_slot(slot, self.layer, e)  # waited at first use
            self.telemetry.background_copies += 1
