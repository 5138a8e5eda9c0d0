"""Hessian-aware weight quantization (GPTQ, Frantar et al. 2022), our own implementation.

Columns of W [out, in] are quantized one at a time in a chosen order; each column's rounding error
is spread over the not-yet-quantized columns through the inverse Hessian ``H ∝ XᵀX`` (eq. 6; the pipeline
accumulates XᵀX, GPTQ's 2XᵀX differs by a factor the relative damping ignores), so
the layer OUTPUT error ||WX − ŴX|| is minimised rather than the weight error (docs/design.md, GPTQ). Work is done in
blocks of 128 columns with lazy batch updates (one GEMM per block for the columns to its right).

Column orders: ``natural``; ``act`` (GPTQ act-order, diag H descending); ``rank1`` (paper's
Ranking 1: max |x_j| descending); ``rank2`` (Ranking 2: Σ x_j² descending — note Σ x_j² IS
diag(XᵀX), so Ranking 2 is mathematically the act order; kept as its own name for the tables).

Quantization parameters (per output row, or per group) come from the weight before error
feedback ("static groups"), so any column order keeps one scale per row/group.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import HaqmoeError
from .quantizer import QuantSpec, compute_qparams

Order = Literal["natural", "act", "rank1", "rank2"]
ORDERS: tuple[str, ...] = ("natural", "act", "rank1", "rank2")


@dataclass(frozen=True)
class GPTQConfig:
    order: Order = "natural"
    damp: float = 0.01  # λ: H += λ·mean(diag H)·I
    block_size: int = 128
    max_retries: int = 6  # each retry multiplies λ by 10
    device: str = "cpu"  # where the factorization and the column loop run (the paper quantized on GPUs: Mixtral's
    # 14336-column down projections are ~90 % of a CPU run's time); CUDA results are not bit-identical to the CPU's


@dataclass
class GPTQResult:
    qweight: torch.Tensor  # int8 [out, in], original column order
    scale: torch.Tensor
    zero: torch.Tensor
    damp: float  # the λ that made H positive definite


def column_order(order: str, hdiag: torch.Tensor, absmax: torch.Tensor | None) -> torch.Tensor | None:
    """Permutation of input columns (None = natural)."""
    if order == "natural":
        return None
    if order in ("act", "rank2"):
        key = hdiag
    elif order == "rank1":
        if absmax is None:
            raise HaqmoeError("column order rank1 needs per-channel activation maxima")
        key = absmax.to(hdiag.dtype)
    else:
        raise HaqmoeError(f"unknown column order '{order}' (choose from {', '.join(ORDERS)})")
    return torch.argsort(key, descending=True, stable=True)


def inverse_hessian_factor(h: torch.Tensor, damp: float, max_retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λ·mean(diag H)·I)^-1, raising λ tenfold until H is PD.

    ``h`` (fp64, owned by the caller's GPTQ call) is damped in place and then OVERWRITTEN with the
    factor, which is returned: a trial factorization needs one matrix beside ``h`` (kept apart so
    that a failed trial can retry from ``h``), the inversion and the second factorization run in
    place (torch's ``out=`` keeps one working copy). So at most two matrices of h's size are alive,
    3.3 GB for Mixtral's 14336² down projection, where separate results needed three. If the
    inverse cannot be factored after H was (an ill-conditioning no damping worth using reaches:
    with λ = 0.01 the condition number is below 100·n), ``h`` is spent and the layer falls back
    to RTN with a warning, as when no damping helps."""
    mean_diag = float(h.diagonal().abs().mean()) or 1.0
    lam, added = damp, 0.0
    for attempt in range(max_retries + 1):
        h.diagonal().add_(lam * mean_diag - added)
        added = lam * mean_diag
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            h.copy_(chol)
            del chol
            torch.cholesky_inverse(h, out=h)
            torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
            if int(info) == 0 and torch.isfinite(h).all():
                if attempt:
                    warnings.warn(f"GPTQ: Hessian not positive definite, recovered with damping {lam:g}",
                                  stacklevel=3)
                return h, lam
            break
        lam = max(lam * 10, 1e-4)
    warnings.warn("GPTQ: Hessian unusable even with heavy damping; using the identity (RTN)", stacklevel=3)
    return torch.eye(h.shape[0], dtype=h.dtype, device=h.device), float("inf")


def _permute_symmetric(h: torch.Tensor, perm: torch.Tensor) -> None:
    """``h[perm][:, perm]`` written into ``h``, one temporary at a time (indexing both at once
    holds two)."""
    h.copy_(h.index_select(0, perm))
    h.copy_(h.index_select(1, perm))


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, cfg: GPTQConfig = GPTQConfig(),
                  absmax: torch.Tensor | None = None, consume: bool = False) -> GPTQResult:
    """Quantize ``weight`` [out, in] given ``hessian`` ∝ XᵀX [in, in] of its calibration inputs.
    ``consume``: the caller no longer needs ``hessian`` (fp64), which is then worked on in place
    instead of copied and left EMPTY (``set_()``: its storage is freed although the caller still
    holds the tensor) — an expert's Hessian is built for this one call."""
    dev = torch.device(cfg.device)
    w = weight.detach().to(dev, torch.float32, copy=True)
    consume = consume and hessian.dtype == torch.float64
    h = hessian.detach() if consume and hessian.device == dev else hessian.detach().to(dev, torch.float64, copy=True)
    if h.shape != (w.shape[1], w.shape[1]):
        raise HaqmoeError(f"Hessian shape {tuple(h.shape)} does not match weight {tuple(w.shape)}")
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # inputs that are always zero: any value is exact, zero keeps ranges tight
    scale, zero = compute_qparams(w, spec)
    perm = column_order(cfg.order, h.diagonal(), None if absmax is None else absmax.to(dev))
    if perm is not None:
        w = w[:, perm]
        _permute_symmetric(h, perm)
    u64, lam = inverse_hessian_factor(h, cfg.damp, cfg.max_retries)
    u = u64.to(torch.float32)
    del u64, h
    if consume:  # the caller's tensor is spent (it holds the factor, or was copied to the device):
        hessian.set_()  # its storage goes back before the column loop

    cols = w.shape[1]
    col_group = torch.arange(cols, device=dev) if perm is None else perm  # original index of each position
    if spec.granularity == "group":
        g = col_group // spec.group_size
        col_scale, col_zero = scale[:, :, 0][:, g], zero[:, :, 0][:, g]  # [out, in] per column
    else:
        col_scale, col_zero = scale.expand(-1, cols), zero.expand(-1, cols)
    q = torch.empty_like(w)
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            col, sc, zp = w1[:, i], col_scale[:, i1 + i], col_zero[:, i1 + i]
            qi = torch.clamp(torch.round(col / sc) + zp, spec.qmin, spec.qmax)
            q[:, i1 + i] = qi
            e = (col - (qi - zp) * sc) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return GPTQResult(q.to(torch.int8).cpu(), scale.cpu(), zero.cpu(), lam)
