"""Next-layer expert guesses (prefetch): layer l+1's router applied to layer l's router input.

Layer l+1's router reads ``norm_{l+1}(x')``, x' being the residual stream one MoE and one attention
later; at layer l only ``norm_l(x)`` exists. For RMS norms ``norm_{l+1}(x) = norm_l(x)·γ_{l+1}/γ_l``,
so folding that per-channel ratio into a copy of router l+1's weight makes the guess read layer l's
input the way layer l+1's norm would; only the residual update in between stays unknown. Without
the ratio, one layer whose γ differs strongly from the next (layer 0 of SmolLM2) ranks the wrong
experts almost always. One weight copy per layer, computed once: the guess costs one small GEMV.
The profiler (traces) and the engine (real prefetch) use these functions, so the simulator replays
exactly the guesses the engine would make.
"""

from __future__ import annotations

import torch
from torch import nn


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
    bias = getattr(next_router, "e_score_correction_bias", None)
    return scores.sigmoid() + bias.float().to(scores.device) if bias is not None else scores


def guess_topk(hidden: torch.Tensor, weight: torch.Tensor, next_router: nn.Module, width: int) -> torch.Tensor:
    """The ``width`` likeliest experts of layer l+1 per token [T, width], best first."""
    return guess_scores(hidden, weight, next_router).topk(width, dim=-1).indices


def guess_for_batch(hidden: torch.Tensor, weight: torch.Tensor, next_router: nn.Module, width: int) -> list[int]:
    """The ``width`` experts of layer l+1 most used by a batch of tokens (probabilities summed)."""
    scores = guess_scores(hidden, weight, next_router)
    if getattr(next_router, "e_score_correction_bias", None) is None:
        scores = torch.softmax(scores, dim=-1)
    return scores.sum(dim=0).topk(width).indices.tolist()
