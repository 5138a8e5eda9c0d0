"""Activation smoothing: move activation outliers into the weights with a per-channel scale ``s``
(docs/design.md, Adaptive smoothing).

For a group of linears reading one input X, ``W·X = (W·diag(s)) · (diag(s)^-1·X)``: the weights get
``s`` on their input columns, and ``1/s`` is folded into the op producing X (a norm's weight/bias, or
the output rows of a previous linear), so the FP model is unchanged and only quantization error moves.

Three ways to choose ``s`` (one code path, three objectives):

- ``fixed``    SmoothQuant: ``s_j = max|X_j|^α / max|W_j|^(1-α)``.
- ``adaptive`` HAQ (paper eq. 1): ``s = stat(X)^e``, ``e`` grid-searched on the JOINT W8A8 loss
               ``||Q_w(W·s) · Q_a(X/s) − W·X||²``; ``e = 0`` (no smoothing) is always a candidate.
- ``awq``      AWQ-style (eq. 2): same grid, weight-only loss ``||Q_w(W·s) · (X/s) − W·X||²``.

``s`` is normalised so that ``max(s)·min(s) = 1`` (keeps weights and activations in sane ranges).
Some inputs tie channels together (GQA: one v_proj row feeds several o_proj columns), so ``s`` lives
on a "free" index space and is expanded through ``tie`` to the full input width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .quantizer import QuantSpec, fake_quant

SmoothMode = Literal["fixed", "adaptive", "awq"]
Statistic = Literal["absmax", "absmean", "auto"]


@dataclass(frozen=True)
class SmoothConfig:
    mode: SmoothMode = "adaptive"
    alpha: float = 0.5  # fixed mode (SmoothQuant migration strength)
    grid: int = 20  # exponents searched in [0, 1]
    stat: Statistic = "absmax"  # per-channel activation magnitude; "auto" searches both
    eps: float = 1e-5
    # Keep s = 1 unless smoothing lowers the sampled loss by more than this fraction: smaller gains
    # are within the noise of a 1k-token sample and do not carry over to unseen text.
    min_gain: float = 0.01


@dataclass
class SmoothProblem:
    """What a smoothing search needs for one group: each weight with the input tokens it sees.

    ``terms``: (W [O, I], X [n, I]) pairs; a dense group has one (the concatenated layers), an MoE
    group one per expert (X = the sampled tokens routed to it). ``stats``: per-channel activation
    statistics over ALL calibration tokens (full width I). ``tie``: [I] -> free index, or None.
    """

    terms: list[tuple[torch.Tensor, torch.Tensor]]
    stats: dict[str, torch.Tensor]
    tie: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return next(iter(self.stats.values())).numel()

    def free_width(self) -> int:
        return self.width if self.tie is None else int(self.tie.max()) + 1

    def to_free(self, v: torch.Tensor) -> torch.Tensor:
        """Reduce a full-width non-negative statistic to free channels (max over tied channels)."""
        if self.tie is None:
            return v
        out = torch.zeros(self.free_width(), dtype=v.dtype)
        return out.scatter_reduce(0, self.tie, v, reduce="amax", include_self=True)

    def to_full(self, s_free: torch.Tensor) -> torch.Tensor:
        return s_free if self.tie is None else s_free[self.tie]


@dataclass
class SmoothResult:
    s_free: torch.Tensor
    exponent: float | None
    stat: str | None
    losses: list[float] = field(default_factory=list)
    loss_identity: float | None = None  # loss at s = 1 (e = 0), for reports


def normalise(s: torch.Tensor) -> torch.Tensor:
    """Scale ``s`` so that max·min = 1 (the identity stays the identity)."""
    return s / torch.sqrt(s.max() * s.min())


def power_scales(stat_free: torch.Tensor, exponent: float, eps: float = 1e-5) -> torch.Tensor:
    return normalise(stat_free.float().clamp_min(eps).pow(exponent))


def smoothquant_scales(problem: SmoothProblem, alpha: float, eps: float = 1e-5) -> torch.Tensor:
    """SmoothQuant's closed form on the free channels; weight max taken over every term."""
    wmax = torch.stack([w.abs().amax(dim=0) for w, _ in problem.terms]).amax(dim=0)
    xmax = problem.to_free(problem.stats["absmax"].float()).clamp_min(eps)
    wmax = problem.to_free(wmax.float()).clamp_min(eps)
    s = xmax.pow(alpha) / wmax.pow(1 - alpha)
    return s.clamp_min(eps)


@torch.no_grad()
def smoothing_loss(problem: SmoothProblem, s_full: torch.Tensor, w_spec: QuantSpec,
                   a_spec: QuantSpec | None, refs: list[torch.Tensor]) -> float:
    """Sum over terms of ||Q_w(W·s) · Q_a(X/s) − W·X||² (``a_spec`` None: weight-only, AWQ)."""
    total = 0.0
    for (w, x), ref in zip(problem.terms, refs):
        if x.shape[0] == 0:
            continue
        xs = x / s_full
        if a_spec is not None:
            xs = fake_quant(xs, a_spec)
        y = xs @ fake_quant(w * s_full, w_spec).T
        total += float((y - ref).pow(2).sum())
    return total


@torch.no_grad()
def search_scales(problem: SmoothProblem, cfg: SmoothConfig, w_spec: QuantSpec,
                  a_spec: QuantSpec | None) -> SmoothResult:
    """Pick ``s`` for one group by the configured objective."""
    if cfg.mode == "fixed":
        return SmoothResult(smoothquant_scales(problem, cfg.alpha, cfg.eps), cfg.alpha, "absmax")
    loss_acts = a_spec if cfg.mode == "adaptive" else None
    # Dynamic per-token quantization in the loss whatever the deployment (static ranges are set later).
    if loss_acts is not None and not loss_acts.dynamic:
        loss_acts = QuantSpec(loss_acts.bits, loss_acts.symmetric, "token")
    refs = [x @ w.T for w, x in problem.terms]
    stats = ("absmax", "absmean") if cfg.stat == "auto" else (cfg.stat,)
    exps = torch.linspace(0, 1, cfg.grid).tolist() if cfg.grid > 1 else [0.0]
    ones = torch.ones(problem.free_width())
    base = smoothing_loss(problem, problem.to_full(ones), w_spec, loss_acts, refs)
    best = SmoothResult(ones, 0.0, None, [base], base)
    best_loss = base
    for name in stats:
        stat_free = problem.to_free(problem.stats[name].float())
        for e in exps[1:]:
            s = power_scales(stat_free, e, cfg.eps)
            loss = smoothing_loss(problem, problem.to_full(s), w_spec, loss_acts, refs)
            best.losses.append(loss)
            if loss < best_loss:
                best_loss = loss
                best.s_free, best.exponent, best.stat = s, e, name
    if best_loss > (1 - cfg.min_gain) * base:
        best.s_free, best.exponent, best.stat = ones, 0.0, None
    return best


# ------------------------------------------------------------------------ folding
class SmoothSkip(Exception):
    """This group's input cannot carry a smoothing vector (e.g. MLA's kv_b -> o reshuffle)."""


def group_tie(prev: torch.nn.Module, in_features: int, config) -> torch.Tensor | None:
    """Channel ties between a previous linear's output rows and the group's input columns.

    Equal widths: no ties. GQA v_proj -> o_proj: o column (head h, dim d) reads v row
    (h // rep, d), so those columns must share one scale. Anything else cannot be folded.
    """
    if not isinstance(prev, torch.nn.Linear) or prev.out_features == in_features:
        return None
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not (heads and kv and hd) or prev.out_features != kv * hd or in_features != heads * hd:
        raise SmoothSkip(f"{prev.out_features} -> {in_features}")
    rep = heads // kv
    h = torch.arange(heads).repeat_interleave(hd)
    d = torch.arange(hd).repeat(heads)
    return (h // rep) * hd + d


@torch.no_grad()
def fold_prev(prev: torch.nn.Module, s_free: torch.Tensor) -> None:
    """Divide the producer of the group's input by ``s``: a norm's weight (and bias), or linear rows."""
    s = s_free.to(prev.weight.dtype)
    if isinstance(prev, torch.nn.Linear):
        prev.weight.div_(s[:, None])
    else:
        if prev.weight.shape != s.shape:
            raise SmoothSkip(f"norm weight {tuple(prev.weight.shape)} vs scales {tuple(s.shape)}")
        prev.weight.div_(s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)


@torch.no_grad()
def scale_columns(weight: torch.Tensor, s_full: torch.Tensor) -> None:
    """Multiply the input columns (last dim) of a 2-D weight or of fused 3-D expert weights."""
    weight.mul_(s_full.to(weight.dtype))
