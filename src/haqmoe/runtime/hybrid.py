"""The hybrid experts module swapped into each MoE block (attention, router, shared experts untouched).

Per forward call (a prefill batch or one decode token) the layer's expert calls are decided by
decide.py, the simulator's own rules (docs/design.md, Cost predictor): resident -> GPU; a copy in
flight -> wait for it or the CPU; a miss -> the cost predictor's CPU, transfer (through the cache,
or streamed through a scratch slot when no cache slot can be freed) or, with ``split``, both at once:
the CPU computes the first gate/up rows from the host copy while the rest of the expert is copied
into a scratch slot, then the GPU finishes it. This module runs them: GPU work is issued first
(asynchronous on CUDA), CPU experts run meanwhile, results are combined with the router weights.
With ``admit``, experts served on the CPU are then copied into the cache for their next use while
the copy engine is nearly idle (decide.admit_misses). With prefetch, the experts guessed for the next
``lookahead`` layers are copied within the copy engine's idle time (prefetch.prefetch_guesses).

Copies are booked on the cache's copy queue in wall-clock milliseconds, the cost model's copy time
each: a modelled landing time for copies the host cannot see (an in-flight CUDA copy), replaced by
what it does see (a finished event, a synchronous copy on an emulated GPU: landed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..routing.guess import GuessPlan, guess_for_batch
from .cache import ExpertCache
from .decide import Decision, LayerRecord, Rules, admit_misses, decide_layer, miss_weights, routed_counts
from .prefetch import PrefetchConfig, prefetch_budget_ms, prefetch_guesses
from ..costs import CostModel
from ..costs.curves import SPLIT_STEPS
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
    skipped_experts: np.ndarray = field(init=False)  # misses not run (decision ``skip``, --skip-below)
    low_experts: np.ndarray = field(init=False)  # misses run on the CPU from the int4 copy (``low``)
    cpu_tokens: np.ndarray = field(init=False)
    gpu_tokens: np.ndarray = field(init=False)
    step: int = 0  # policy clock: one per model forward
    guess_ms: float = 0.0  # time spent scoring the guesses of the layers ahead (prefetch's compute cost)
    background_copies: int = 0  # CPU-served misses copied into the cache afterwards (admit)
    split_bytes: int = 0  # bytes copied into scratch slots (split parts, streamed experts): moved, not cached
    decode_host_ms: dict[str, float] = field(init=False)  # HOST_PHASES -> ms, summed over decode forwards
    decode_forwards: int = 0  # one-token hybrid forwards timed there (layers x decode tokens)
    decision_log: list[LayerRecord] | None = None  # set to [] to record every layer's decisions
    num_experts: int = 0  # > 0: also count per (layer, expert), for the server's heatmap
    expert_calls: np.ndarray = field(init=False)  # [layers, experts] calls of each expert
    expert_hits: np.ndarray = field(init=False)  # ... of those, found resident on the GPU tier (decision "hit")

    def __post_init__(self) -> None:
        for name in ("cpu_experts", "gpu_experts", "split_experts", "skipped_experts", "low_experts", "cpu_tokens", "gpu_tokens"):
            setattr(self, name, np.zeros(self.num_layers, dtype=np.int64))
        for name in ("expert_calls", "expert_hits"):
            setattr(self, name, np.zeros((self.num_layers, max(self.num_experts, 1)), dtype=np.int64))
        self.decode_host_ms = dict.fromkeys(HOST_PHASES, 0.0)

    def host_ms_per_token(self) -> dict[str, float]:
        """``host_<phase>_ms``: the phases' host time per decode token (all MoE layers together)."""
        tokens = max(self.decode_forwards / self.num_layers, 1.0)
        return {f"host_{k}_ms": v / tokens for k, v in self.decode_host_ms.items()}



_TIER = {"hit": "gpu", "wait": "gpu", "transfer": "gpu", "stream": "gpu", "split": "split", "cpu": "cpu", "skip": "skip", "low": "low"}


class HybridExperts(nn.Module):
    def __init__(self, layer: int, original: nn.Module, store: ExpertStore, cache: ExpertCache | None,
                 cost: CostModel | None, policy: str, telemetry: Telemetry,
                 ahead_routers: Sequence[nn.Module] = (), prefetch: int = 0,
                 ahead_weights: Sequence[torch.Tensor] = (), guess_plan: GuessPlan | None = None, admit: bool = False,
                 skip_below: float = 0.0, skip_renorm: bool = True, low_below: float = 0.0, low_all: bool = False,
                 budget_layers: float = PrefetchConfig.budget_layers):
        super().__init__()
        # Prefetch: the routers of layers l+1 .. l+D, re-based onto this layer's normalised input
        # (routing/guess.py), guess their experts; copies start while we compute.
        self._ahead_routers = list(ahead_routers)  # a plain list: not submodules (they belong to later layers)
        self._ahead_weights = list(ahead_weights)
        self._guess_plan = guess_plan  # per-layer transition tables where they beat the router (next layer)
        self.budget_layers = budget_layers
        self.layer = layer
        self.original = original  # the CPU tier (kept on the CPU when the model moves to a GPU)
        self.store, self.cache, self.cost = store, cache, cost
        self.telemetry = telemetry
        self.rules = Rules(policy, store.cfg.split_slots, admit, skip_below=skip_below, low_below=low_below,
                           low_all=low_all) \
            if cache is not None else None
        self.skip_renorm = skip_renorm  # a skipped expert's weight goes to the token's kept experts (else dropped)
        self.num_experts = original.num_experts
        self.prefetch = 0
        self.set_prefetch(prefetch)

    def set_prefetch(self, width: int) -> None:
        """Experts of each layer ahead to prefetch per call (0: off; no layer ahead or no cache: always off)."""
        able = bool(self._ahead_routers) and self.cache is not None
        self.prefetch = width if able else 0

    def _settle(self, now_ms: float) -> None:
        """What the host sees overrides the copy model: a copy whose event is done (or that had no
        event: synchronous) has landed; one still running lands no earlier than now. With nothing in
        flight the copy engine is idle."""
        for e in self.cache.resident(self.layer):
            entry = self.cache.get(self.layer, e)
            if entry.handle is None or entry.handle.query():
                entry.handle, entry.ready_at = None, 0.0
            else:
                entry.ready_at = max(entry.ready_at, now_ms + 1e-3)
        if self.store.copies_in_flight() == 0:
            self.cache.copies.idle(now_ms)

    def _load(self, layer: int, e: int, slot: int):
        """Copy expert ``e`` of ``layer`` into its cache slot; returns the copy's event (None: a
        synchronous copy, landed already)."""
        event = self.store.load_slot(slot, layer, e)
        if event is None:
            self.cache.get(layer, e).ready_at = 0.0
        return event

    def _guesses(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> list[list[int]]:
        """The likeliest experts of each layer ahead, nearest first (the next layer's from the transition
        table where that layer uses one)."""
        t = time.perf_counter()
        plan = self._guess_plan
        first = plan.guess(self.layer, top_k_index, self.prefetch) if plan is not None else None
        out = [first if d == 0 and first is not None else guess_for_batch(hidden_states, w, router, self.prefetch)
               for d, (router, w) in enumerate(zip(self._ahead_routers, self._ahead_weights))]
        self.telemetry.guess_ms += 1e3 * (time.perf_counter() - t)
        return out

    def _prefetch(self, guesses: list[list[int]], decisions: list[Decision], now_ms: float) -> list[tuple[int, int, int]]:
        """Copy guessed experts of the layers ahead into the cache within the copy engine's idle time (the
        simulator's rule, prefetch.py); a wrong guess costs a copy and a slot."""
        budget = prefetch_budget_ms(decisions, now_ms, self.budget_layers)
        copied = prefetch_guesses(self.cache, self.cost, self.layer, guesses, now_ms, budget)
        for layer, e, slot in copied:
            self.cache.get(layer, e).handle = self._load(layer, e, slot)  # waited on at first use
        return copied

    @torch.compiler.disable  # data-dependent host decisions: stays eager inside a compiled decode step
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.cache is None:  # every expert on the CPU tier: the plain module, counted
            tel = self.telemetry
            used = top_k_index.reshape(-1).cpu().numpy()  # one host read, one count for both counters
            called = np.bincount(used[used >= 0], minlength=self.num_experts) > 0
            tel.cpu_experts[self.layer] += int(called.sum())
            tel.cpu_tokens[self.layer] += used.size
            if tel.num_experts:
                tel.expert_calls[self.layer] += called[:tel.num_experts]
            return self.original(hidden_states, top_k_index, top_k_weights)
        tel = self.telemetry
        clock = [time.perf_counter()]
        idx_host = top_k_index.cpu().numpy()
        needed = routed_counts(idx_host)
        weights = miss_weights(idx_host, top_k_weights.float().cpu().numpy()) if self.rules.needs_weights else None
        clock.append(time.perf_counter())
        now_ms = 1e3 * clock[-1]
        self._settle(now_ms)
        decisions = decide_layer(self.cache, self.cost, self.rules, self.layer, needed, tel.step, now_ms, weights)
        if tel.num_experts:
            for d in decisions:
                tel.expert_calls[self.layer, d.expert] += 1
                tel.expert_hits[self.layer, d.expert] += d.kind == "hit"
        top_k_weights = self._without_skipped(decisions, top_k_index, top_k_weights)
        jobs: dict[str, list] = {"gpu": [], "cpu": [], "split": [], "skip": [], "low": []}
        for d in decisions:
            token_idx, k_pos = torch.where(top_k_index == d.expert)
            jobs[_TIER[d.kind]].append((d, token_idx, top_k_weights[token_idx, k_pos, None], self._issue(d)))
        clock.append(time.perf_counter())
        # The CPU tier's inputs leave the GPU before any GPU job waits on a copy (same stream: a
        # device-to-host copy queued after the wait would hold the CPU tier until the copy lands).
        cpu_inputs = {d.expert: hidden_states[token_idx].cpu() for d, token_idx, _, _ in
                      jobs["cpu"] + jobs["split"] + [j for j in jobs["low"] if j[0].k >= SPLIT_STEPS]}
        clock.append(time.perf_counter())
        out = torch.zeros_like(hidden_states)
        cpu_tier = 0.0
        for d, token_idx, w, (slot, event) in jobs["gpu"]:  # asynchronous on CUDA
            self._wait(d, event)
            y = self.store.gpu_forward(slot, hidden_states[token_idx].to(self.store.device))
            out.index_add_(0, token_idx, (y.to(out.device) * w).to(out.dtype))
            tel.gpu_experts[self.layer] += 1
            tel.gpu_tokens[self.layer] += len(token_idx)
            if d.kind == "stream":
                tel.split_bytes += self.store.expert_bytes
        guesses = self._guesses(hidden_states, top_k_index) if self.prefetch else []
        prefetched = self._prefetch(guesses, decisions, now_ms) if guesses else []
        for d, token_idx, w, (slot, event) in jobs["split"]:  # CPU rows while the copy runs, then the GPU's part
            rows = self.store.split_rows(d.k)
            t = time.perf_counter()
            h_cpu = self.store.cpu_rows(self.layer, d.expert, cpu_inputs[d.expert], rows)
            cpu_tier += time.perf_counter() - t
            self._wait(d, event)
            y = self.store.split_forward(slot, hidden_states[token_idx].to(self.store.device), h_cpu, rows)
            out.index_add_(0, token_idx, (y.to(out.device) * w).to(out.dtype))
            tel.split_experts[self.layer] += 1
            tel.split_bytes += self.store.copied_bytes(rows)
        tel.skipped_experts[self.layer] += len(jobs["skip"])
        for d, token_idx, w, _ in jobs["low"]:  # from the low-precision copy: on the CPU (k 8), else copied
            # (whole, k 0; a split, k 1..7, runs here as the whole copy: same function, the split's timing is
            # the simulator's)
            t = time.perf_counter()
            if d.k < SPLIT_STEPS:
                y = self.store.low_forward(self.layer, d.expert, hidden_states[token_idx], self.store.device)
                tel.split_bytes += self.store.low_bytes
            else:
                y = self.store.low_forward(self.layer, d.expert, cpu_inputs[d.expert])
                cpu_tier += time.perf_counter() - t
            out.index_add_(0, token_idx, (y.to(out.device) * w).to(out.dtype))
            tel.low_experts[self.layer] += 1
            tel.cpu_tokens[self.layer] += len(token_idx)
        for d, token_idx, w, _ in jobs["cpu"]:  # overlaps the GPU work above
            x = cpu_inputs[d.expert]
            t = time.perf_counter()
            y = self.original(x, torch.full((len(x), 1), d.expert), torch.ones(len(x), 1, dtype=x.dtype))
            cpu_tier += time.perf_counter() - t
            out.index_add_(0, token_idx, (y.to(out.device) * w).to(out.dtype))
            tel.cpu_experts[self.layer] += 1
            tel.cpu_tokens[self.layer] += len(token_idx)
        admitted = admit_misses(self.cache, self.cost, self.rules, self.layer, decisions, now_ms)
        for e, slot in admitted:  # waited on at first use
            self.cache.get(self.layer, e).handle = self._load(self.layer, e, slot)
        tel.background_copies += len(admitted)
        if tel.decision_log is not None:
            tel.decision_log.append(LayerRecord(tel.step, self.layer, decisions, admitted, prefetched, guesses))
        if hidden_states.shape[0] == 1:
            cpu_ms = max((d.cpu_done for d in decisions), default=0.0)
            self._add_host_times(clock, cpu_tier, cpu_ms)
        return out

    def _without_skipped(self, decisions: list[Decision], top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
        """The router weights with the skipped experts' taken out: each token's kept weights rescaled to
        the sum its selected ones had (``skip_renorm``; Mixtral's and Qwen2-MoE's top-k renormalisation,
        and the MoEfied model's, which sums its experts with weights 1/k each and down projections x k,
        docs/design.md, MoEfication), or the skipped ones dropped. A token's top expert is never skipped
        (decide.miss_weights), so its kept sum is > 0."""
        skipped = [d.expert for d in decisions if d.kind == "skip"]
        if not skipped:
            return top_k_weights
        gone = torch.isin(top_k_index, torch.tensor(skipped, device=top_k_index.device))
        kept = top_k_weights.masked_fill(gone, 0)
        if not self.skip_renorm:
            return kept
        return kept * (top_k_weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True))

    def _issue(self, d: Decision) -> tuple[int | None, object]:
        """Start what a decision copies: (the slot its GPU part runs on, the event to wait for)."""
        if d.kind == "hit":
            return d.slot, None
        if d.kind == "wait":  # the copy's event, handed to this call once
            entry = self.cache.get(self.layer, d.expert)
            event, entry.handle = entry.handle, None
            return d.slot, event
        if d.kind == "transfer":
            return d.slot, self._load(self.layer, d.expert, d.slot)
        if d.kind in ("stream", "split"):
            slot = self.store.split_slot(d.slot)
            rows = self.store.split_rows(d.k) if d.kind == "split" else 0
            return slot, self.store.load_slot(slot, self.layer, d.expert, rows)
        return None, None

    def _add_host_times(self, clock: list[float], cpu_tier_s: float, cpu_est_ms: float) -> None:
        host = self.telemetry.decode_host_ms
        host["route_wait"] += 1e3 * (clock[1] - clock[0])
        host["decide"] += 1e3 * (clock[2] - clock[1])
        host["to_host"] += 1e3 * (clock[3] - clock[2])
        host["cpu_tier"] += 1e3 * cpu_tier_s
        host["cpu_tier_est"] += cpu_est_ms
        host["layer"] += 1e3 * (time.perf_counter() - clock[0])
        self.telemetry.decode_forwards += 1

    def _wait(self, d: Decision, event) -> None:
        """The compute stream waits for a copy; every later use of a cached expert finds it landed."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        if d.kind in ("wait", "transfer"):
            self.cache.get(self.layer, d.expert).ready_at = 0.0
