"""Resource guard: refuse a quantization that cannot fit in memory before hours are spent on it.

The pipeline keeps the whole model resident, plus the calibration activations of the current
block (inputs and outputs: two copies, plus one while a block checkpoint is serialized), the
attention masks the model passes each block, and one block's working set (fp64 Hessians of every
linear input and the expert Hessians, a copy of the block's weights, one batch's attention scores).
The estimate is deliberately simple and a little pessimistic; ``HAQMOE_MEMORY_LIMIT`` (e.g. "8G")
overrides what psutil reports as available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import HaqmoeError

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _UNITS[unit])
    except ValueError as exc:
        raise HaqmoeError(f"cannot parse a memory size from '{text}' (e.g. 512M, 8G)") from exc


def available_bytes() -> int:
    env = os.environ.get("HAQMOE_MEMORY_LIMIT")
    if env:
        return parse_bytes(env)
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class QuantMemoryEstimate:
    activations: int  # calibration hidden states alive at once (all copies)
    masks: int  # attention masks kept per batch
    block: int  # one block's working set
    per_sample: int  # activations + masks per calibration window (for the suggestion)

    @property
    def total(self) -> int:
        return self.activations + self.masks + self.block


def estimate_quant_memory(model: nn.Module, adapter, calib: torch.Tensor, batch_size: int) -> QuantMemoryEstimate:
    """Extra bytes the pipeline needs on top of the already-loaded model."""
    n, length = int(calib.shape[0]), int(calib.shape[1])
    cfg = model.config
    hidden = int(cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    act_one = length * hidden * 4
    mask_one = length * length * 4
    block = max(adapter.blocks(model), key=lambda b: sum(p.numel() for p in b.parameters()))
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    hessians = sum(m.in_features ** 2 * 8 for m in block.modules() if isinstance(m, nn.Linear))
    experts = adapter.experts(block)
    if experts is not None:
        e, (inter, hid) = int(experts.num_experts), experts.gate_up_proj[0].chunk(2, dim=0)[0].shape
        hessians += e * (hid ** 2 + inter ** 2) * 8
    scores = min(batch_size, n) * heads * length * length * 4 * 2
    inter_size = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
    ffn = min(batch_size, n) * length * inter_size * 4 * 3
    return QuantMemoryEstimate(3 * n * act_one, n * mask_one, 2 * weights + hessians + scores + ffn,
                               3 * act_one + mask_one)


def _gb(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def check_quant_memory(model: nn.Module, adapter, calib: torch.Tensor, batch_size: int,
                       available: int | None = None) -> QuantMemoryEstimate:
    """Raise with a suggestion (fewer or shorter calibration windows) when the estimate does not fit."""
    est = estimate_quant_memory(model, adapter, calib, batch_size)
    avail = available_bytes() if available is None else available
    if est.total <= avail:
        return est
    n, length = int(calib.shape[0]), int(calib.shape[1])
    room = avail - est.block
    fit = room // est.per_sample if room > 0 else 0
    hint = (f"use --calib-samples {int(fit)} (or shorter --calib-len)" if fit >= 1 else
            "even one calibration window does not fit: use a shorter --calib-len or a machine with more memory")
    raise HaqmoeError(f"quantization needs about {_gb(est.total)} beyond the loaded model ({n} x {length} "
                      f"calibration activations {_gb(est.activations)}, masks {_gb(est.masks)}, one block "
                      f"{_gb(est.block)}) but only {_gb(avail)} is available: {hint}")
