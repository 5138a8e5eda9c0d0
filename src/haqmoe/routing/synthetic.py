"""Synthetic routing traces with the structure caches live on.

Real MoE routing has three properties that decide cache hit rates: per-layer skew (some experts
are hot), per-request drift (a prompt about law prefers other experts than one about code), and
temporal locality (consecutive tokens often reuse an expert). The generator controls each one,
so policies can be developed before real traces exist, and decode-like traces can be built from
the real Mixtral-8x7B per-prompt frequencies (which have no per-token order).

Prefetch guesses are synthesised with a given top-k recall per layer: the fraction of layer
l+1's experts that appear among the top-k guesses made at layer l.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import HaqmoeError
from .trace import RoutingTrace


@dataclass
class SyntheticConfig:
    num_layers: int = 32
    num_experts: int = 8
    top_k: int = 2
    requests: int = 8
    tokens_per_request: int = 256
    skew: float = 0.8  # Zipf exponent of each layer's global expert popularity
    drift: float = 0.5  # weight of the request-specific preference (0 = all requests alike)
    drift_concentration: float = 1.0  # Dirichlet concentration of the request preference
    locality: float = 0.35  # P(a token keeps the previous token's expert in a top-k slot)
    guess_accuracy: float | Sequence[float] | None = None  # None: no guesses in the trace
    seed: int = 0


def _layer_popularity(cfg: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    ranks = np.arange(1, cfg.num_experts + 1, dtype=np.float64)
    base = ranks ** -cfg.skew
    base /= base.sum()
    return np.stack([rng.permutation(base) for _ in range(cfg.num_layers)])  # [L, E]


def request_fractions(cfg: SyntheticConfig, rng: np.random.Generator | None = None) -> np.ndarray:
    """Per-request per-layer expert distributions [R, L, E] (global popularity + drift)."""
    rng = rng or np.random.default_rng(cfg.seed)
    pop = _layer_popularity(cfg, rng)
    pref = rng.dirichlet(np.full(cfg.num_experts, cfg.drift_concentration), size=(cfg.requests, cfg.num_layers))
    return (1 - cfg.drift) * pop[None] + cfg.drift * pref


def sample_tokens(probs: np.ndarray, num_tokens: int, top_k: int, locality: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Top-k expert ids [T, L, k] for one request with per-layer distribution ``probs`` [L, E].

    Each slot keeps the previous token's expert with probability ``locality``; otherwise it
    draws (without replacement within the token) from the layer's distribution.
    """
    L, E = probs.shape
    if top_k > E:
        raise HaqmoeError(f"top_k {top_k} exceeds the {E} experts per layer")
    out = np.empty((num_tokens, L, top_k), dtype=np.int16)
    keep = rng.random((num_tokens, L, top_k)) < locality
    u = rng.random((num_tokens, L, top_k))
    cdfs = np.cumsum(probs, axis=1)
    for t in range(num_tokens):
        for l in range(L):
            chosen: list[int] = []
            for j in range(top_k):
                if t > 0 and keep[t, l, j] and int(out[t - 1, l, j]) not in chosen:
                    chosen.append(int(out[t - 1, l, j]))
                    continue
                if not chosen:
                    e = int(np.searchsorted(cdfs[l], u[t, l, j] * cdfs[l, -1], side="right"))
                else:
                    p = probs[l].copy()
                    p[chosen] = 0.0
                    c = np.cumsum(p)
                    e = int(np.searchsorted(c, u[t, l, j] * c[-1], side="right"))
                chosen.append(min(e, E - 1))
            out[t, l] = chosen
    return out


def synthesize_guesses(experts: np.ndarray, num_experts: int, accuracy: float | Sequence[float],
                       rng: np.random.Generator, probs: np.ndarray | None = None, distance: int = 1) -> np.ndarray:
    """Guess rankings [T, L, E] of the layer ``distance`` ahead with the given top-k recall per layer.

    Row l ranks layer l+d's experts (d = ``distance``; 1: the next layer, what prefetch guesses; more:
    lookahead); each true expert of layer l+d lands in the top k with probability ``accuracy[l]``; the
    other top-k places and the tail are filled by popularity (``probs`` [L, E], uniform if None). Rows
    L-d .. L-1 are -1 (no layer that far ahead).
    """
    T, L, k = experts.shape
    acc = np.broadcast_to(np.asarray(accuracy, dtype=np.float64), (L,))
    if np.any((acc < 0) | (acc > 1)):
        raise HaqmoeError("guess accuracy must lie in [0, 1]")
    pop = np.full((L, num_experts), 1.0 / num_experts) if probs is None else probs
    out = np.full((T, L, num_experts), -1, dtype=np.int16)
    for t in range(T):
        for l in range(L - distance):
            true = [int(e) for e in experts[t, l + distance]]
            hit = [e for e in true if rng.random() < acc[l]]
            noise = np.log(pop[l + distance] + 1e-12) + rng.gumbel(size=num_experts)  # popularity-weighted draw
            order = [int(e) for e in np.argsort(-noise) if int(e) not in true]
            top = hit + order[: k - len(hit)]
            rng.shuffle(top)
            rest = order[k - len(hit):] + [e for e in true if e not in hit]
            out[t, l] = top + rest
    return out


def _finish(parts: list[np.ndarray], num_experts: int, cfg_meta: dict,
            guess_accuracy, rng: np.random.Generator, probs: np.ndarray | None) -> RoutingTrace:
    lengths = [p.shape[0] for p in parts]
    experts = np.concatenate(parts)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    guesses = None
    if guess_accuracy is not None:
        guesses = synthesize_guesses(experts, num_experts, guess_accuracy, rng, probs)
    return RoutingTrace(experts, num_experts, offsets, decode=np.ones(len(experts), dtype=bool),
                        guesses=guesses, meta=cfg_meta)


def synthetic_trace(cfg: SyntheticConfig) -> RoutingTrace:
    """A trace from the Zipf + drift + locality generator (all tokens flagged decode)."""
    rng = np.random.default_rng(cfg.seed)
    fracs = request_fractions(cfg, rng)
    parts = [sample_tokens(fracs[r], cfg.tokens_per_request, cfg.top_k, cfg.locality, rng)
             for r in range(cfg.requests)]
    meta = {"model": "synthetic", "source": "synthetic", "generator": cfg.__dict__ | {"guess_accuracy": None}}
    return _finish(parts, cfg.num_experts, meta, cfg.guess_accuracy, rng, fracs.mean(axis=0))


def trace_from_fractions(fractions: np.ndarray, tokens_per_request: int, top_k: int = 2,
                         locality: float = 0.35, guess_accuracy: float | Sequence[float] | None = None,
                         seed: int = 0, model: str = "mixtral-8x7b") -> RoutingTrace:
    """Decode-like trace from per-request per-layer expert fractions [R, L, E] (e.g. the real
    Mixtral-8x7B MMLU statistics): each request samples tokens from its own measured
    distribution, with temporal locality added (the statistics carry no token order)."""
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 3:
        raise HaqmoeError(f"fractions must be [requests, layers, experts], got shape {fr.shape}")
    rng = np.random.default_rng(seed)
    fr = fr / fr.sum(axis=2, keepdims=True)
    parts = [sample_tokens(fr[r], tokens_per_request, top_k, locality, rng) for r in range(fr.shape[0])]
    meta = {"model": model, "source": "synthetic-from-statistics", "locality": locality,
            "tokens_per_request": tokens_per_request}
    return _finish(parts, fr.shape[2], meta, guess_accuracy, rng, fr.mean(axis=0))
