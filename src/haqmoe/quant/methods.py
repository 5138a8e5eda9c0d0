"""The quantization methods, as presets of one pipeline (so every table row runs the same code).

| method        | smoothing                                  | weights |
|---------------|--------------------------------------------|---------|
| rtn           | none                                       | RTN     |
| smoothquant   | fixed α (SmoothQuant closed form)          | RTN     |
| awq           | grid search, weight-only loss (eq. 2)      | RTN     |
| gptq          | none                                       | GPTQ    |
| smooth        | grid search, joint W8A8 loss (eq. 1)       | RTN     |
| haq           | grid search, joint W8A8 loss (eq. 1)       | GPTQ    |
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..devices import resolve_device
from ..errors import HaqmoeError
from ..models.adapters import ArchSpec
from ..registry import METHODS
from .config import QuantConfig
from .gptq import ORDERS, GPTQConfig
from .pipeline import PipelineConfig, QuantReport, check_finite, quantize_model
from .rtn import quantize_rtn
from .smooth import SmoothConfig



@dataclass(frozen=True)
class MethodOptions:
    alpha: float = 0.5  # smoothquant
    order: str = "natural"  # gptq / haq column order
    stat: str = "absmax"  # smooth / haq statistic: absmax, absmean or auto
    grid: int = 20
    damp: float = 0.01
    search_tokens: int = 1024
    min_expert_tokens: int = 32
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"  # where GPTQ runs (devices.resolve_device: auto is CUDA when present)


def pipeline_config(method: str, quant: QuantConfig, opts: MethodOptions = MethodOptions()) -> PipelineConfig:
    if method not in METHODS:
        raise HaqmoeError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")
    if opts.order not in ORDERS:
        raise HaqmoeError(f"unknown column order '{opts.order}' (choose from {', '.join(ORDERS)})")
    if not 0.0 <= opts.alpha <= 1.0:
        raise HaqmoeError(f"--alpha must be in [0, 1], got {opts.alpha}")
    smooth = {
        "smoothquant": SmoothConfig("fixed", alpha=opts.alpha),
        "awq": SmoothConfig("awq", grid=opts.grid, stat="absmean"),
        "smooth": SmoothConfig("adaptive", grid=opts.grid, stat=opts.stat),
        "haq": SmoothConfig("adaptive", grid=opts.grid, stat=opts.stat),
    }.get(method)
    gptq = GPTQConfig(order=opts.order, damp=opts.damp, device=str(resolve_device(opts.device))) \
        if method in ("gptq", "haq") else None
    return PipelineConfig(quant, smooth, gptq, opts.batch_size, opts.search_tokens, opts.min_expert_tokens,
                          opts.seed)


def needs_calibration(method: str, quant: QuantConfig) -> bool:
    return method != "rtn" or (quant.acts is not None and not quant.acts.dynamic)


def quantize_with(model: torch.nn.Module, adapter: ArchSpec, method: str, quant: QuantConfig,
                  calib: torch.Tensor | None, opts: MethodOptions = MethodOptions(),
                  progress: bool = True, checkpoint=None, loader=None) -> QuantReport:
    """Quantize ``model`` in place by ``method``; RTN with dynamic activations needs no calibration.

    ``checkpoint``: a ``reliability.resume.BlockCheckpoint`` (resumable runs; the streaming
    pipeline's shards). ``loader``: blocks loaded one at a time (``quant.stream``).
    """
    cfg = pipeline_config(method, quant, opts)
    if not needs_calibration(method, quant):
        start = time.perf_counter()
        if loader is None:
            check_finite(model)
        quantize_rtn(model, adapter, quant, progress, checkpoint, loader)
        return QuantReport(seconds=time.perf_counter() - start)
    if calib is None:
        raise HaqmoeError(f"method '{method}' needs calibration data")
    return quantize_model(model, adapter, calib, cfg, progress, checkpoint, loader)
