"""Uniform integer quantizer primitives shared by weights and activations.

Integers live in the signed range of ``bits`` for both schemes, so one int8 tensor type serves
storage and int8 GEMM: symmetric uses [-(2^(b-1)-1), 2^(b-1)-1] with zero point 0 (what vLLM's
int8 kernels expect); asymmetric uses [-2^(b-1), 2^(b-1)-1] with an integer zero point ``z``.
``x ≈ (q - z) * scale``. Asymmetric ranges always include 0, so exact zeros stay exact.

Granularity is a reduction over the LAST dimension: "channel" for a weight [out, in] (one scale
per output row) and "token" for activations [..., hidden] (one scale per token) are the same
computation; "group" splits the last dimension into groups; "tensor" is one scale overall.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ..errors import HaqmoeError

Granularity = Literal["tensor", "channel", "token", "group"]


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = "channel"
    group_size: int | None = None
    dynamic: bool = True  # activations: per-token scales computed at run time; else static calibrated

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise HaqmoeError(f"unsupported bit width {self.bits} (supported: 2-8; W8A8 is the default)")
        if self.granularity == "group" and not self.group_size:
            raise HaqmoeError("group granularity needs a group size")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def as_dict(self) -> dict:
        return asdict(self)


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` so the reduction dimension is last: [..., groups, group] (or one row for tensor)."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        if x.shape[-1] % spec.group_size:
            raise HaqmoeError(f"last dimension {x.shape[-1]} is not a multiple of group size {spec.group_size}")
        return x.reshape(*x.shape[:-1], x.shape[-1] // spec.group_size, spec.group_size)
    return x


def compute_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point (as float) for each reduction row of ``x`` (keepdim shape)."""
    g = _grouped(x.float(), spec)
    if spec.symmetric:
        scale = g.abs().amax(dim=-1, keepdim=True) / spec.qmax
        zero = torch.zeros_like(scale)
    else:
        lo = g.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = g.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        zero = torch.round(spec.qmin - lo / scale.clamp_min(1e-12))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: any scale is exact
    return scale, zero.clamp(spec.qmin, spec.qmax)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integers (int8 tensor) of ``x`` with the given parameters; same shape as ``x``."""
    g = _grouped(x.float(), spec)
    q = torch.clamp(torch.round(g / scale) + zero, spec.qmin, spec.qmax)
    return q.reshape(x.shape).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = _grouped(q.to(torch.float32), spec)
    return ((g - zero) * scale).reshape(q.shape).to(dtype)


def _fake_quant_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fast path of ``fake_quant`` for per-row (token/channel) fp32 inputs: one reduction pass and
    in-place elementwise ops (activation fake-quant runs on every linear input at evaluation)."""
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    if spec.symmetric:
        scale = torch.maximum(hi, -lo).div_(spec.qmax)
    else:
        lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)
        scale = (hi - lo).div_(spec.qmax - spec.qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.symmetric:
        q = (x / scale).round_().clamp_(spec.qmin, spec.qmax)
        return q.mul_(scale)
    zero = torch.round(spec.qmin - lo / scale.clamp_min(1e-12)).clamp_(spec.qmin, spec.qmax)
    q = (x / scale).round_().add_(zero).clamp_(spec.qmin, spec.qmax)
    return q.sub_(zero).mul_(scale)


def fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize with parameters computed from ``x`` itself (dynamic)."""
    if spec.granularity in ("token", "channel") and x.dtype == torch.float32 and x.numel():
        return _fake_quant_rows(x, spec)
    scale, zero = compute_qparams(x, spec)
    g = _grouped(x.float(), spec)
    out = (torch.clamp(torch.round(g / scale) + zero, spec.qmin, spec.qmax) - zero) * scale
    return out.reshape(x.shape).to(x.dtype)


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize with fixed (calibrated per-tensor) parameters."""
    q = torch.clamp(torch.round(x.float() / scale) + zero, spec.qmin, spec.qmax)
    return ((q - zero) * scale).to(x.dtype)
