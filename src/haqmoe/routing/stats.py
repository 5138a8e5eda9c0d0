"""Routing statistics: per-layer expert frequency, co-activation, activation paths, skew, entropy.

Path granularity. A token's *activation path* is the sequence of top-k expert sets it visits.
Over a whole model (Mixtral: 32 layers, C(8,2) = 28 sets per layer, 28^32 possible paths) almost
every token's path is unique, so whole-model path counts are all ~1 and say nothing about held-out
text. We therefore count paths over **windows of ``w`` consecutive MoE layers** (a path key is
``(start_layer, set_start, ..., set_start+w-1)``), every start layer, stride 1:

- ``w = 1``: the per-layer top-k set (co-activation of the k experts of a token);
- ``w = 2`` (**default**): consecutive-layer transitions, 28^2 = 784 keys per layer pair for
  Mixtral, which a few thousand tokens sample well, while still capturing layer-to-layer
  dependence that per-layer frequency cannot;
- ``w = L``: whole-model paths, for showing that they do not generalise (``path_coverage``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import HaqmoeError
from .trace import RoutingTrace

DEFAULT_WINDOW = 2


@dataclass
class RoutingStats:
    """What placement strategies read. ``counts`` is exact; ``paths`` may come from synthetic tokens."""

    num_layers: int
    num_experts: int
    top_k: int
    counts: np.ndarray  # [L, E] float64: number of (token, layer) selections of each expert
    tokens: int  # tokens counted (every layer sees every token)
    window: int = DEFAULT_WINDOW
    paths: dict = field(default_factory=dict)  # {(start, set_0, ..., set_w-1): count}; sets are sorted tuples
    pairs: np.ndarray | None = None  # [L, E, E] co-activation counts (symmetric, zero diagonal)
    source: str = ""
    synthetic_paths: bool = False  # paths sampled from per-prompt fractions, not observed per token

    @property
    def frequency(self) -> np.ndarray:
        """[L, E] share of a layer's selections that go to each expert (rows sum to 1)."""
        tot = self.counts.sum(axis=1, keepdims=True)
        return np.divide(self.counts, tot, out=np.zeros_like(self.counts), where=tot > 0)

    def layer_paths(self, layer: int) -> list[tuple[tuple[int, ...], float]]:
        """(experts at ``layer``, count) of every path key whose window covers ``layer``, hottest first."""
        out = [(key[1 + layer - key[0]], c) for key, c in self.paths.items()
               if key[0] <= layer < key[0] + len(key) - 1]
        return sorted(out, key=lambda kc: (-kc[1], kc[0]))


def layer_counts(trace: RoutingTrace) -> np.ndarray:
    """[L, E] selection counts of a trace."""
    L, E = trace.num_layers, trace.num_experts
    flat = (np.arange(L)[None, :, None] * E + trace.experts.astype(np.int64)).ravel()
    return np.bincount(flat, minlength=L * E).reshape(L, E).astype(np.float64)


def pair_counts(trace: RoutingTrace) -> np.ndarray:
    """[L, E, E] how often two experts are selected together for one token at one layer."""
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    out = np.zeros((L, E, E), np.float64)
    ex = trace.experts.astype(np.int64)
    for a in range(k):
        for b in range(k):
            if a != b:
                flat = (np.arange(L)[None, :] * E * E + ex[:, :, a] * E + ex[:, :, b]).ravel()
                out += np.bincount(flat, minlength=L * E * E).reshape(L, E, E)
    return out


def path_counts(trace: RoutingTrace, window: int = DEFAULT_WINDOW) -> dict:
    """Counts of activation paths over windows of ``window`` consecutive MoE layers (see module doc)."""
    L = trace.num_layers
    if not 1 <= window <= L:
        raise HaqmoeError(f"path window must be between 1 and {L} layers, got {window}")
    ex = np.sort(trace.experts, axis=2)
    out: dict = {}
    if ex.shape[0] == 0:
        return out
    for s in range(L - window + 1):
        rows, cnt = np.unique(ex[:, s:s + window, :].reshape(ex.shape[0], -1), axis=0, return_counts=True)
        k = trace.top_k
        for row, c in zip(rows.tolist(), cnt.tolist()):
            out[(s,) + tuple(tuple(row[i * k:(i + 1) * k]) for i in range(window))] = float(c)
    return out


def stats_from_trace(trace: RoutingTrace, window: int = DEFAULT_WINDOW, source: str = "",
                     with_pairs: bool = True) -> RoutingStats:
    return RoutingStats(trace.num_layers, trace.num_experts, trace.top_k, layer_counts(trace), trace.num_tokens,
                        window, path_counts(trace, window), pair_counts(trace) if with_pairs else None,
                        source or str(trace.meta.get("model", "")))


def entropy_bits(stats: RoutingStats) -> np.ndarray:
    """[L] entropy of each layer's expert distribution (log2 E = perfectly balanced)."""
    p = stats.frequency
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)


def load_skew(stats: RoutingStats) -> np.ndarray:
    """[L] max expert share / mean share (1 = balanced, E = one expert takes everything)."""
    return stats.frequency.max(axis=1) * stats.num_experts


def path_coverage(build: RoutingStats, trace: RoutingTrace) -> float:
    """Share of held-out path occurrences whose key was seen in ``build`` (same window)."""
    held = path_counts(trace, build.window)
    total = sum(held.values())
    return sum(c for k, c in held.items() if k in build.paths) / total if total else 0.0


def summary(stats: RoutingStats) -> dict:
    """Scalars for CLI/JSON output."""
    ent, skew = entropy_bits(stats), load_skew(stats)
    return {"layers": stats.num_layers, "experts": stats.num_experts, "top_k": stats.top_k, "tokens": stats.tokens,
            "path_window": stats.window, "distinct_paths": len(stats.paths),
            "entropy_bits_mean": float(ent.mean()), "entropy_bits_max": float(np.log2(stats.num_experts)),
            "load_skew_mean": float(skew.mean()), "load_skew_max": float(skew.max())}
