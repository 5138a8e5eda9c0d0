"""Next-layer expert guesses (prefetch): layer l+1's router applied to layer l's router input
(docs/design.md, Next-layer prefetch).

Layer l+1's router reads ``norm_{l+1}(x')``, x' being the residual stream one MoE and one attention
later; at layer l only ``norm_l(x)`` exists. For RMS norms ``norm_{l+1}(x) = norm_l(x)·γ_{l+1}/γ_l``,
so folding that per-channel ratio into a copy of router l+1's weight makes the guess read layer l's
input the way layer l+1's norm would; only the residual update in between stays unknown (on the
upcycled SmolLM2 MoE, layer 1's guesses found 0.59 of layer 2's experts without the ratio, 0.89 with
it). One weight copy per layer, computed once: the guess costs one small GEMV. Where the residual
update dominates (layer 0 there) ``GuessPlan`` below uses expert co-occurrence instead.
The profiler (traces) and the engine (real prefetch) use these functions, so the simulator replays
exactly the guesses the engine would make.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import HaqmoeError
from .trace import RoutingTrace


def _gamma(norm: nn.Module | None) -> torch.Tensor | None:
    w = getattr(norm, "weight", None)
    return None if w is None or getattr(norm, "bias", None) is not None else w.detach().float()


def guess_weight(next_router: nn.Module, norm_here: nn.Module | None, norm_next: nn.Module | None) -> torch.Tensor:
    """Router l+1's weight [E, H] re-based onto layer l's normalised hidden state (γ_{l+1}/γ_l folded)."""
    w = next_router.weight.detach().float()
    g_here, g_next = _gamma(norm_here), _gamma(norm_next)
    if g_here is None or g_next is None or g_here.shape != g_next.shape:
        return w.clone()  # LayerNorm (with bias) or no weights: no exact re-basing, plain router
    safe = g_here.abs() > 1e-6 * g_here.abs().max().clamp_min(1e-30)
    ratio = torch.where(safe, g_next / torch.where(safe, g_here, torch.ones_like(g_here)), torch.zeros_like(g_here))
    return w * ratio


def guess_scores(hidden: torch.Tensor, weight: torch.Tensor, next_router: nn.Module) -> torch.Tensor:
    """Per-token scores [T, E] whose order is layer l+1's routing order (sigmoid + bias routers too)."""
    scores = hidden.reshape(-1, weight.shape[1]).float() @ weight.to(hidden.device).t()  # no-op on one device
    logit_bias = getattr(next_router, "bias", None)  # gpt-oss: logits = x·Wᵀ + b
    if isinstance(logit_bias, torch.Tensor):
        scores = scores + logit_bias.detach().float().to(scores.device)
    bias = getattr(next_router, "e_score_correction_bias", None)
    return scores.sigmoid() + bias.float().to(scores.device) if bias is not None else scores


def guess_topk(hidden: torch.Tensor, weight: torch.Tensor, next_router: nn.Module, width: int) -> torch.Tensor:
    """The ``width`` likeliest experts of layer l+1 per token [T, width], best first."""
    return guess_scores(hidden, weight, next_router).topk(width, dim=-1).indices


def guess_for_batch(hidden: torch.Tensor, weight: torch.Tensor, next_router: nn.Module, width: int) -> list[int]:
    """The ``width`` experts of layer l+1 most used by a batch of tokens (probabilities summed; one
    token, the decode case, ranks its raw scores: the same order, a third of the time)."""
    scores = guess_scores(hidden, weight, next_router)
    if scores.shape[0] == 1:
        return scores[0].topk(width).indices.tolist()
    if getattr(next_router, "e_score_correction_bias", None) is None:
        scores = torch.softmax(scores, dim=-1)
    return scores.sum(dim=0).topk(width).indices.tolist()


# ------------------------------------------------------------- per-layer choice: router or transition
@dataclass
class GuessPlan:
    """Which guess each layer uses, learned on a profiling trace.

    The re-based router fails where the residual update between two layers dominates (layer 0 of the
    upcycled SmolLM2 MoE: recall 0.01), while the co-occurrence of experts in consecutive layers,
    counted on the profiling trace, still predicts well there (0.83). ``tables[l]`` [E, E] counts
    (expert at l, expert at l+1) pairs; the guess for l+1 sums the rows of the token's experts at l.
    A layer uses its table only where that beat the router's guesses on the profiling trace.
    """

    tables: np.ndarray  # [L-1, E, E] co-occurrence counts
    use_table: np.ndarray  # [L-1] bool

    @classmethod
    def learn(cls, trace: RoutingTrace, width: int | None = None) -> "GuessPlan":
        """Count transitions on ``trace`` and pick per layer (router guesses needed to compare)."""
        L, E = trace.num_layers, trace.num_experts
        tables = np.zeros((max(L - 1, 0), E, E))
        for l in range(L - 1):
            a, b = trace.experts[:, l].astype(np.int64), trace.experts[:, l + 1].astype(np.int64)
            ok = (a[:, :, None] >= 0) & (b[:, None, :] >= 0)
            pairs = (a[:, :, None] * E + b[:, None, :])[ok]
            tables[l] = np.bincount(pairs, minlength=E * E).reshape(E, E)
        plan = cls(tables, np.zeros(max(L - 1, 0), bool))
        if trace.guesses is not None:
            w = width or trace.top_k
            router = guess_quality(trace, w)["recall"]
            table = guess_quality(trace, w, plan.rankings(trace.experts, w))["recall"]
            plan.use_table = np.array(table) > np.array(router)
        return plan

    def rankings(self, experts: np.ndarray, width: int) -> np.ndarray:
        """Transition guesses [T, L, width] for every layer of a [T, L, k] expert array (row L-1: -1)."""
        T, L, _ = experts.shape
        out = np.full((T, L, width), -1, dtype=np.int16)
        for l in range(L - 1):
            ids = experts[:, l].astype(np.int64)
            scores = np.where((ids >= 0)[:, :, None], self.tables[l][np.maximum(ids, 0)], 0.0).sum(axis=1)
            out[:, l] = np.argsort(-scores, axis=1, kind="stable")[:, :width]
        return out

    def apply(self, trace: RoutingTrace) -> np.ndarray:
        """``trace``'s recorded router guesses with the table layers replaced: what the engine guesses."""
        if trace.guesses is None:
            raise HaqmoeError("the trace has no router guesses to combine with (profile it with guesses)")
        g = trace.guesses.copy()
        table = self.rankings(trace.experts, g.shape[2])
        for l in np.flatnonzero(self.use_table):
            g[:, l] = table[:, l]
        return g

    def guess(self, layer: int, experts_now: torch.Tensor, width: int) -> list[int] | None:
        """Engine side: the table guess for ``layer + 1`` from a batch's experts at ``layer``, or None
        where this layer keeps the router's guess."""
        if layer >= len(self.use_table) or not self.use_table[layer]:
            return None
        ids = experts_now.reshape(-1).cpu().numpy().astype(np.int64)
        scores = self.tables[layer][ids[ids >= 0]].sum(axis=0)
        return [int(e) for e in np.argsort(-scores, kind="stable")[:width]]


def guess_quality(trace: RoutingTrace, num_guesses: int | None = None,
                  guesses: np.ndarray | None = None, distance: int = 1) -> dict[str, list[float]]:
    """Per layer l (guessing layer l+d, d = ``distance``; guesses made that far ahead): recall = share of
    layer l+d's experts among the top ``num_guesses``; precision = share of those guesses that layer l+d
    then uses."""
    g = trace.guesses if guesses is None else guesses
    if g is None:
        raise HaqmoeError("this trace has no prefetch guesses to evaluate")
    G = num_guesses or trace.top_k
    recall, precision = [], []
    for l in range(trace.num_layers - distance):
        top = g[:, l, :G].astype(np.int64)
        true = trace.experts[:, l + distance].astype(np.int64)
        hits = (top[:, :, None] == true[:, None, :]).any(axis=2).sum()
        recall.append(float(hits / true.size))
        precision.append(float(hits / top.size))
    return {"recall": recall, "precision": precision}
