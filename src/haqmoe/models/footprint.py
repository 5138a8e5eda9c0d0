"""What a checkpoint holds and what each command will need, from its config and file headers only.

``haqmoe info`` on Mixtral-8x7B must answer in seconds with no weight read: the skeleton on
``meta`` has every shape, the safetensors headers say how the checkpoint stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..costs.shapes import int8_bytes
from .adapters import EXPERTS, ArchSpec, FusedExperts, get_module
from .lazy import tied_keys


@dataclass(frozen=True)
class Footprint:
    """Parameter counts and sizes in bytes of one model."""

    parameters: int
    expert_parameters: int  # routed experts (the collaborative runtime's offloadable part)
    fp32_bytes: int
    bf16_bytes: int
    w8a8_bytes: int  # haqmoe's W8A8 checkpoint: int8 linears + fp32 scale/zero per row, the rest fp32
    largest_block_fp32_bytes: int  # what streaming quantization holds at once, besides the rest
    rest_fp32_bytes: int  # embedding, final norm, lm_head


def _quantized_weights(block: nn.Module, adapter: ArchSpec) -> tuple[int, int]:
    """(int8 elements, output rows) of the linears W8A8 replaces in one block (experts included)."""
    elements = rows = 0
    for g in adapter.groups(block):
        for path in g.layers:
            if path == EXPERTS:
                ex = adapter.experts(block)
                n, hidden, inter = FusedExperts.dims(ex)  # output rows whatever the storage layout
                elements += ex.gate_up_proj.numel() + ex.down_proj.numel()
                rows += n * (2 * inter + hidden)
            else:
                w = get_module(block, path).weight
                elements += w.numel()
                rows += w.shape[0]
    return elements, rows


def footprint(model: nn.Module, adapter: ArchSpec) -> Footprint:
    """Sizes of ``model`` (a ``meta`` skeleton is enough), each shared tensor counted once."""
    tied = tied_keys(model)  # on a skeleton, tied parameters are still two tensors
    seen: set[int] = set()
    params = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen and name not in tied:
            seen.add(id(p))
            params += p.numel()
    blocks = adapter.blocks(model)
    block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
    experts = sum(adapter.experts(b).gate_up_proj.numel() + adapter.experts(b).down_proj.numel()
                  for b in blocks if adapter.is_moe_block(b))
    q_elems = q_rows = 0
    for b in blocks:
        e, r = _quantized_weights(b, adapter)
        q_elems, q_rows = q_elems + e, q_rows + r
    return Footprint(
        parameters=params, expert_parameters=experts, fp32_bytes=4 * params, bf16_bytes=2 * params,
        w8a8_bytes=int8_bytes(q_elems, q_rows) + 4 * (params - q_elems),
        largest_block_fp32_bytes=4 * max(block_params, default=0),
        rest_fp32_bytes=4 * (params - sum(block_params)))
