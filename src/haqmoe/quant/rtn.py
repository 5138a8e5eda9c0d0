"""Round-to-nearest W8A8: the naive baseline every other method is compared against."""

from __future__ import annotations

from torch import nn
from tqdm import tqdm

from ..models.adapters import ArchSpec, get_module, set_module
from .config import QuantConfig
from .modules import QuantExperts, QuantLinear
from .pipeline import QuantReport


def quantize_block_rtn(block: nn.Module, adapter: ArchSpec, cfg: QuantConfig) -> None:
    """Replace every decoder linear (and the routed experts) of one block by RTN-quantized modules."""
    for path in adapter.quantizable_linears(block):
        lin = get_module(block, path)
        if isinstance(lin, nn.Linear):
            set_module(block, path, QuantLinear.from_linear(lin, cfg.weights, cfg.acts))
    experts = adapter.experts(block)
    if experts is not None and not isinstance(experts, QuantExperts):
        set_module(block, adapter.moe.experts, QuantExperts.from_fused(experts, cfg.weights, cfg.acts))
    if cfg.quantize_routers and adapter.router(block) is not None:
        router = adapter.router(block)
        q = QuantLinear.from_weight(router.weight, None, cfg.weights, None)
        router.weight.data.copy_(q.weight_float(router.weight.dtype))


def quantize_rtn(model: nn.Module, adapter: ArchSpec, cfg: QuantConfig, progress: bool = True,
                 checkpoint=None, loader=None) -> nn.Module:
    """RTN every block; ``checkpoint``/``loader`` as in ``pipeline.quantize_model`` (streaming, resume)."""
    blocks = adapter.blocks(model)
    if loader is not None:
        loader.inputs_captured()  # RTN reads no calibration inputs
    first = 0
    if checkpoint is not None:
        first, _ = checkpoint.restore(blocks, None, None, QuantReport(), load_blocks=loader is None)
    for i in tqdm(range(len(blocks)), desc="rtn", unit="block", disable=not progress, leave=False):
        if i < first:
            continue
        if loader is not None:
            loader.load(i, blocks[i])
        quantize_block_rtn(blocks[i], adapter, cfg)
        if checkpoint is not None:
            checkpoint.save(i, blocks[i], None, None, QuantReport())
        if loader is not None:
            loader.release(i, blocks[i])
    return model
