"""Resource guard: refuse a quantization that cannot fit in memory before any weight is loaded
(docs/design.md, Real size).

Computed from the model's shapes alone (the skeleton on ``meta`` has them), so it runs before
loading. Resident through the run: the model's weights (all of them in memory; streaming, only
those outside the decoder blocks, and of those the embedding and lm_head only until block 0's
inputs are captured), the calibration activations of
the current block (inputs and outputs: two copies, plus one while a block checkpoint is
serialized), the attention masks the model passes each block, and one block's working set (the
block's weights twice, fp64 Hessians of every linear input and the expert Hessians, one batch's
attention scores and FFN activations). Deliberately simple and a little pessimistic;
``HAQMOE_MEMORY_LIMIT`` (e.g. "8G") overrides what psutil reports as available.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from ..errors import HaqmoeError
from ..models.adapters import FusedExperts
from ..quant.pipeline import HESSIAN_BUDGET

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

    return int(psutil.virtual_memory().available)


@dataclass(frozen=True)
class QuantMemoryEstimate:
    model: int  # weights resident through the run
    activations: int  # calibration hidden states alive at once (all copies)
    masks: int  # attention masks kept per batch
    block: int  # one block's working set
    per_sample: int  # activations + masks per calibration window (for the suggestion)
    vocab: int = 0  # streaming: embedding and lm_head, resident only until block 0's inputs exist

    @property
    def total(self) -> int:
        return self.model + self.activations + self.masks + max(self.block, self.vocab)


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict(keep_vars=True).values())


def estimate_quant_memory(model: nn.Module, adapter, calib: torch.Tensor | None, batch_size: int,
                          streaming: bool = False, hessian_budget: int = HESSIAN_BUDGET) -> QuantMemoryEstimate:
    """Bytes the pipeline needs (``calib`` None: RTN, no calibration). Works on a ``meta`` skeleton."""
    cfg = model.config
    blocks = adapter.blocks(model)
    block = max(blocks, key=_nbytes)
    weights = _nbytes(block)
    resident = _nbytes(model) - (sum(_nbytes(b) for b in blocks) if streaming else 0)
    vocab = _vocab_bytes(model) if streaming else 0  # released during the block loop
    if calib is None:
        return QuantMemoryEstimate(resident - vocab, 0, 0, 2 * weights, 0, vocab)
    n, length = int(calib.shape[0]), int(calib.shape[1])
    hidden = int(cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    act_one = length * hidden * 4
    mask_one = length * length * 4
    hessians = sum(m.in_features ** 2 * 8 for m in block.modules() if isinstance(m, nn.Linear))
    widest = max([m.in_features for m in block.modules() if isinstance(m, nn.Linear)], default=0)
    experts = adapter.experts(block)
    if experts is not None:  # built a pass at a time (quant.pipeline.expert_batches): one batch alive
        e, hid, inter = FusedExperts.dims(experts)
        one = (hid ** 2 + inter ** 2) * 8
        hessians += one * min(e, max(1, hessian_budget // one))
        widest = max(widest, inter)
    hessians += widest ** 2 * 8  # GPTQ's one working matrix beside the widest Hessian
    scores = min(batch_size, n) * heads * length * length * 4 * 2
    inter_size = int(getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden)
    ffn = min(batch_size, n) * length * inter_size * 4 * 3
    return QuantMemoryEstimate(resident - vocab, 3 * n * act_one, n * mask_one,
                               2 * weights + hessians + scores + ffn, 3 * act_one + mask_one, vocab)


def _vocab_bytes(model: nn.Module) -> int:
    """The float embedding and lm_head (one tensor when tied), as ``quant.stream`` releases them."""
    seen: dict[int, int] = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if isinstance(module, (nn.Embedding, nn.Linear)):
            seen[id(module.weight)] = module.weight.numel() * module.weight.element_size()
    return sum(seen.values())


def _gb(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.1f} MiB"


def check_quant_memory(model: nn.Module, adapter, calib: torch.Tensor | None, batch_size: int,
                       available: int | None = None, streaming: bool = False) -> QuantMemoryEstimate:
    """Raise with a suggestion (fewer or shorter calibration windows) when the estimate does not fit."""
    est = estimate_quant_memory(model, adapter, calib, batch_size, streaming)
    avail = available_bytes() if available is None else available
    if est.total <= avail:
        return est
    parts = f"weights resident {_gb(est.model)}, one block's working set {_gb(est.block)}"
    if calib is None:
        raise HaqmoeError(f"quantization needs about {_gb(est.total)} ({parts}) but only {_gb(avail)} is "
                          "available: use a machine with more memory")
    n, length = int(calib.shape[0]), int(calib.shape[1])
    room = avail - max(est.block, est.vocab) - est.model
    fit = room // est.per_sample if room > 0 else 0
    hint = (f"use --calib-samples {int(fit)} (or shorter --calib-len)" if fit >= 1 else
            "even one calibration window does not fit: use a shorter --calib-len or a machine with more memory")
    raise HaqmoeError(f"quantization needs about {_gb(est.total)} ({parts}, {n} x {length} calibration "
                      f"activations {_gb(est.activations)}, masks {_gb(est.masks)}) but only {_gb(avail)} is "
                      f"available: {hint}")
