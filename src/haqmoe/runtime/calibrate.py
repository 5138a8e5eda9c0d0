"""Calibrate the cost predictor on the machine at hand (docs/design.md, Cost predictor), cached per machine and model.

``calibrate_tiers`` times the engine's own executors — one expert on the CPU tier and on the GPU
tier for a few token counts, and one expert's host-to-device copy — so the measured table keeps
the real, non-linear shape of T(n) in the precision each tier really runs (int8 GEMM, dequant-once,
fp16). ``cached_cost_model`` stores the result as JSON under ``cache_dir()/calibration`` keyed by
machine, torch threads, model and tier precision, because a calibration costs seconds the user
should pay once. ``measure_profile`` turns micro-benchmarks into a ``HardwareProfile`` for the
simulator.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

from ..costs.curves import SPLIT_STEPS, CostCurve, CostModel
from ..costs.hardware import HardwareProfile
from ..errors import HaqmoeError
from ..io import atomic_write_text
from ..paths import cache_dir

DEFAULT_NS = (1, 2, 4, 8, 16, 32, 64, 128)
CALIBRATION = 2  # of how tiers are timed (2: CPU experts and copies rotate over cold weights); in the cache key


def machine_key(model: str, hidden: int, ffn: int, dtype: str) -> str:
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "nocuda"
    raw = f"{platform.node()}|{platform.processor()}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}" \
          f"|{cuda}|{CALIBRATION}"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model)
    return f"{hashlib.sha1(raw.encode()).hexdigest()[:12]}-{safe}-{hidden}x{ffn}-{dtype}"


def time_ms(fn, repeats: int, sync=None) -> float:
    """Median wall time (ms) of ``fn()`` over ``repeats`` runs after one warm-up; ``sync`` waits for a device."""
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


def cached_cost_model(key: str, measure: Callable[[], CostModel], refresh: bool = False) -> CostModel:
    """``measure()`` once per key (a machine + model + precision), then read back from the cache."""
    path = cache_dir() / "calibration" / f"{key}.json"
    if path.is_file() and not refresh:
        try:
            return CostModel.from_dict(json.loads(path.read_text())["cost_model"])
        except (KeyError, ValueError, HaqmoeError):
            pass  # corrupt or old cache: measure again
    model = measure()
    d = model.as_dict()
    d["transfer_ms"] = min(d["transfer_ms"], 1e30)  # JSON has no infinity
    atomic_write_text(path, json.dumps({"key": key, "cost_model": d}, indent=2) + "\n")
    return model


def calibrate_tiers(cpu_fn, gpu_fn, copy_fn, hidden: int, gpu_dtype, gpu_device: str = "cuda",
                    ns: Sequence[int] = DEFAULT_NS, repeats: int = 5) -> CostModel:
    """The cost model of the engine's own tiers: ``cpu_fn(x, i)`` / ``gpu_fn(x)`` run one expert on n
    tokens exactly as the engine would (int8 GEMM, dequant-once, ...) and ``copy_fn(i)`` moves one
    expert into a slot. Measuring the real executors, not an fp32 stand-in, keeps n_critical right
    when the CPU tier runs int8 (4x fewer bytes per token than fp32).

    ``i`` counts the host-side calls: the caller runs the i-th expert of a rotation over many, because
    the engine's CPU tier meets each expert's weights cold. Timing one expert again and again measured
    it from the last-level cache: on an H200 host 5.4 ms per decode token where the engine spent 12.2."""
    sync = torch.cuda.synchronize if torch.device(gpu_device).type == "cuda" else None
    turn = itertools.count()
    cpu, gpu = [], []
    with torch.inference_mode():
        for n in ns:
            x = torch.randn(n, hidden)
            xg = x.to(gpu_device, gpu_dtype)
            cpu.append((float(n), time_ms(lambda: cpu_fn(x, next(turn)), repeats)))
            gpu.append((float(n), time_ms(lambda: gpu_fn(xg), repeats, sync)))
    t_e = time_ms(lambda: copy_fn(next(turn)), repeats, sync)
    return CostModel(CostCurve.fit(*zip(*cpu)), CostCurve.fit(*zip(*gpu)), t_e)


def calibrate_split(cpu_rows_fn, gpu_part_fn, rows_of: Callable[[int], int], hidden: int, gpu_dtype,
                    gpu_device: str = "cuda", repeats: int = 5) -> list[tuple[float, float]]:
    """One-token (CPU ms, GPU ms) of each split k = 1 .. SPLIT_STEPS - 1: ``cpu_rows_fn(x, rows, i)`` the
    CPU's gate/up rows of the i-th expert of a rotation (cold weights, as ``calibrate_tiers``),
    ``gpu_part_fn(x, h_cpu, rows)`` the GPU's remaining rows + down, as the engine runs them
    (CostModel.split_ms)."""
    sync = torch.cuda.synchronize if torch.device(gpu_device).type == "cuda" else None
    x = torch.randn(1, hidden, dtype=gpu_dtype)  # the CPU tier's input is in the model dtype already
    xg = x.to(gpu_device)
    turn = itertools.count()
    out = []
    with torch.inference_mode():
        for k in range(1, SPLIT_STEPS):
            rows = rows_of(k)
            h = cpu_rows_fn(x, rows, next(turn))
            out.append((time_ms(lambda: cpu_rows_fn(x, rows, next(turn)), repeats),
                        time_ms(lambda: gpu_part_fn(xg, h, rows), repeats, sync)))
    return out


def measure_profile(name: str = "measured", cpu_threads: int | None = None) -> HardwareProfile:
    """A ``HardwareProfile`` of the machine at hand from micro-benchmarks (CUDA needed for the GPU side).

    Bandwidths and throughputs are achieved numbers, so the efficiency factors are 1 for bandwidth;
    ``gpu_kernel_ms`` is the measured time of one tiny kernel launch + sync.
    """
    if not torch.cuda.is_available():
        raise HaqmoeError("measuring a GPU profile needs CUDA")
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    sync = torch.cuda.synchronize
    gb = 1e9
    with torch.inference_mode():
        big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GB
        dst = torch.empty_like(big)
        gpu_bw = 2 * big.numel() / gb / (time_ms(lambda: dst.copy_(big), 5, sync) / 1e3)
        host = torch.empty(1 << 28, dtype=torch.uint8).pin_memory()  # 256 MB
        dev = torch.empty(host.shape, dtype=torch.uint8, device="cuda")
        h2d = host.numel() / gb / (time_ms(lambda: dev.copy_(host, non_blocking=True), 5, sync) / 1e3)
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
        fp16 = 2 * 8192 ** 3 / 1e12 / (time_ms(lambda: a @ a, 5, sync) / 1e3)
        ai = torch.randint(-127, 127, (8192, 8192), device="cuda", dtype=torch.int8)
        try:
            i8 = 2 * 8192 ** 3 / 1e12 / (time_ms(lambda: torch._int_mm(ai, ai.t()), 5, sync) / 1e3)
        except RuntimeError:  # no int8 tensor-core GEMM for this layout/GPU: count it as fp16
            i8 = fp16
        small = torch.zeros(1, device="cuda")
        kernel = time_ms(lambda: small.add_(1), 50, sync)
        src = torch.empty(1 << 28, dtype=torch.uint8)  # 256 MB streaming copy on the host
        cdst = torch.empty_like(src)
        cpu_bw = 2 * src.numel() / gb / (time_ms(lambda: cdst.copy_(src), 5) / 1e3)
        c = torch.randn(2048, 2048)
        fp32 = 2 * 2048 ** 3 / 1e12 / (time_ms(lambda: c @ c, 3) / 1e3)
        ci = torch.randint(-127, 127, (2048, 2048), dtype=torch.int8)
        ci8 = 2 * 2048 ** 3 / 1e12 / (time_ms(lambda: torch._int_mm(ci, ci.t()), 3) / 1e3)
    props = torch.cuda.get_device_properties(0)
    how = "measured on this machine by runtime/calibrate.measure_profile"
    return HardwareProfile(
        name, f"{props.name}, measured ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)",
        gpu_mem_gb=props.total_memory / gb, gpu_mem_bw_gb_s=gpu_bw, gpu_int8_tops=i8, gpu_fp16_tflops=fp16,
        h2d_gb_s=h2d, cpu_mem_bw_gb_s=cpu_bw, cpu_int8_tops=ci8, cpu_fp32_tflops=fp32,
        gpu_bw_eff=1.0, gpu_compute_eff=1.0, gpu_kernel_ms=kernel, cpu_call_ms=0.02,
        sources={k: how for k in ("gpu_mem_bw_gb_s", "gpu_int8_tops", "gpu_fp16_tflops", "h2d_gb_s",
                                  "cpu_mem_bw_gb_s", "cpu_int8_tops", "cpu_fp32_tflops", "gpu_kernel_ms")})
