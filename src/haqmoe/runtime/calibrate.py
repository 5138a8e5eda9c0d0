"""Calibrate the cost predictor on the machine at hand (DESIGN §3), cached per machine and shape.

Times one SwiGLU expert of the given shape for a few token counts on the CPU (and, when CUDA is
present, on the GPU plus a pinned host-to-device copy of the expert). The measured table keeps
the real, non-linear shape of T(n); the engine builds its ``CostModel`` from it at start-up.
Results are cached as JSON under ``cache_dir()/calibration`` keyed by machine, torch threads,
expert shape and dtype, because a calibration costs seconds the user should pay once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from typing import Sequence

from ..errors import HaqmoeError
from ..io import atomic_write_text
from ..paths import cache_dir
from .predictor import CostCurve, CostModel

DEFAULT_NS = (1, 2, 4, 8, 16, 32, 64, 128)


def machine_key(hidden: int, ffn: int, dtype: str) -> str:
    import torch

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nocuda"
    raw = f"{platform.node()}|{platform.processor()}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}|{cuda}"
    return f"{hashlib.sha1(raw.encode()).hexdigest()[:12]}-{hidden}x{ffn}-{dtype}"


def _expert(hidden: int, ffn: int, dtype, device: str):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    w = [torch.randn(ffn, hidden, generator=g) * 0.02, torch.randn(ffn, hidden, generator=g) * 0.02,
         torch.randn(hidden, ffn, generator=g) * 0.02]
    return [x.to(device=device, dtype=dtype) for x in w]


def _swiglu(x, w):
    import torch.nn.functional as F

    return F.linear(F.silu(F.linear(x, w[0])) * F.linear(x, w[1]), w[2])


def _time_ms(fn, repeats: int, sync=None) -> float:
    fn()  # warm-up
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_cpu_expert(hidden: int, ffn: int, ns: Sequence[int] = DEFAULT_NS, repeats: int = 5) -> CostCurve:
    """Measured T_cpu(n) of one fp32 SwiGLU expert (the dequantized CPU tier)."""
    import torch

    w = _expert(hidden, ffn, torch.float32, "cpu")
    pts = []
    with torch.inference_mode():
        for n in ns:
            x = torch.randn(n, hidden)
            pts.append((float(n), _time_ms(lambda: _swiglu(x, w), repeats)))
    return CostCurve.fit([p[0] for p in pts], [p[1] for p in pts])


def time_cuda_expert(hidden: int, ffn: int, ns: Sequence[int] = DEFAULT_NS,
                     repeats: int = 10) -> tuple[CostCurve, float]:
    """Measured T_gpu(n) (fp16) and T_e (pinned copy of the fp16 expert), CUDA only."""
    import torch

    if not torch.cuda.is_available():
        raise HaqmoeError("CUDA calibration asked for, but no CUDA device is available")
    w = _expert(hidden, ffn, torch.float16, "cuda")
    host = [t.cpu().pin_memory() for t in w]
    dev = [torch.empty_like(t) for t in w]
    sync = torch.cuda.synchronize
    pts = []
    with torch.inference_mode():
        for n in ns:
            x = torch.randn(n, hidden, device="cuda", dtype=torch.float16)
            pts.append((float(n), _time_ms(lambda: _swiglu(x, w), repeats, sync)))

    def copy():
        for d, h in zip(dev, host):
            d.copy_(h, non_blocking=True)

    t_e = _time_ms(copy, repeats, sync)
    return CostCurve.fit([p[0] for p in pts], [p[1] for p in pts]), t_e


def calibrate(hidden: int, ffn: int, ns: Sequence[int] = DEFAULT_NS, refresh: bool = False) -> CostModel:
    """The cost model of this machine for one expert shape (cached; ``refresh`` re-measures).

    Without CUDA the GPU side is unknown: the returned model has an infinite transfer cost, so
    every non-resident expert stays on the CPU (the "no GPU" mode of DESIGN §3).
    """
    import torch

    dtype = "fp32cpu-fp16gpu"
    path = cache_dir() / "calibration" / f"{machine_key(hidden, ffn, dtype)}.json"
    if path.is_file() and not refresh:
        try:
            return CostModel.from_dict(json.loads(path.read_text())["cost_model"])
        except (KeyError, ValueError):
            pass  # corrupt or old cache: measure again
    cpu = time_cpu_expert(hidden, ffn, ns)
    if torch.cuda.is_available():
        gpu, t_e = time_cuda_expert(hidden, ffn, ns)
    else:
        gpu, t_e = CostCurve(), float("inf")
    model = CostModel(cpu, gpu, t_e)
    payload = {"hidden": hidden, "ffn": ffn, "dtype": dtype, "cuda": torch.cuda.is_available(),
               "cost_model": model.as_dict() | {"transfer_ms": t_e if t_e != float("inf") else 1e30}}
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return model
