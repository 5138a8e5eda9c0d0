"""Hit rates and expected latency of a placement on held-out routing.

Hit rate (docs/design.md, Routing and placement) = share of (token, layer, selected expert) activations served by a resident
expert. A static plan's hit rate depends only on per-layer selection counts, so it is exact from
count matrices alone (that is why the Mixtral per-prompt fractions suffice to evaluate plans).
Per-request numbers cut requests into non-overlapping chunks of ``request_len`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..costs.planning import DEFAULT_DECODE_TOKENS, PlanningCosts, request_latency_ms
from .placement import Plan
from .stats import layer_counts
from .trace import RoutingTrace
from .trace_io import check_model


@dataclass
class HitSummary:
    per_layer: np.ndarray  # [L] hit rate in percent
    mean: float
    std: float  # population std across layers
    gap: float  # max - min across layers

    @classmethod
    def of(cls, per_layer: np.ndarray) -> "HitSummary":
        p = 100.0 * np.asarray(per_layer, np.float64)
        return cls(p, float(p.mean()), float(p.std()), float(p.max() - p.min()))


def layer_hit(mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[L] hit rate (0..1) of a resident mask [L, E] on counts [L, E] (or summed [..., L, E])."""
    c = counts.reshape(-1, *mask.shape).sum(axis=0)
    tot = c.sum(axis=1)
    return np.divide((c * mask).sum(axis=1), tot, out=np.zeros_like(tot), where=tot > 0)


def request_counts(trace: RoutingTrace, request_len: int) -> np.ndarray:
    """[C, L, E] counts of every non-overlapping chunk of ``request_len`` tokens of every request."""
    L, E = trace.num_layers, trace.num_experts
    chunks = []
    for r in range(trace.num_requests):
        a, b = int(trace.offsets[r]), int(trace.offsets[r + 1])
        for s in range(a, b - request_len + 1, request_len):
            chunks.append(trace.experts[s:s + request_len])
    if not chunks:
        return np.zeros((0, L, E))
    ex = np.stack(chunks).astype(np.int64)  # [C, n, L, k]
    C = ex.shape[0]
    flat = (np.arange(C)[:, None, None, None] * L * E + np.arange(L)[None, None, :, None] * E + ex).ravel()
    return np.bincount(flat, minlength=C * L * E).reshape(C, L, E).astype(np.float64)


def per_request_hit(mask: np.ndarray, rc: np.ndarray) -> HitSummary:
    """Per layer: mean over requests of each request's hit rate; then across-layer summary."""
    tot = rc.sum(axis=2)
    hit = np.divide((rc * mask[None]).sum(axis=2), tot, out=np.zeros_like(tot), where=tot > 0)
    return HitSummary.of(hit.mean(axis=0))


def evaluate_counts(plan: Plan, counts: np.ndarray) -> HitSummary:
    check_model(plan.num_layers, plan.num_experts, counts.shape[-2], counts.shape[-1], f"plan '{plan.strategy}'")
    return HitSummary.of(layer_hit(plan.mask(), counts))


def evaluate_trace(plan: Plan, trace: RoutingTrace) -> HitSummary:
    check_model(plan.num_layers, plan.num_experts, trace.num_layers, trace.num_experts, f"plan '{plan.strategy}'")
    return HitSummary.of(layer_hit(plan.mask(), layer_counts(trace)))


def expected_latency_ms(plan: Plan, rc: np.ndarray, profile: PlanningCosts,
                        decode_tokens: int = DEFAULT_DECODE_TOKENS) -> float:
    """Mean expert time (ms) of the sample requests ``rc`` [C, L, E] (prefill + decode) under ``profile``."""
    if rc.shape[0] == 0:
        return float("nan")
    return float(request_latency_ms(plan.mask(), rc, profile, plan.top_k or 1, decode_tokens).mean())
