"""Hardware profiles: what the cost model needs to know about a machine it may not be running on.

A profile holds hardware numbers (memory bandwidths, int8/fp throughput, PCIe bandwidth), each
with its source or assumption in ``sources``; ``costs/roofline.py`` turns a profile and a model
shape into expert costs. ``efficiency`` factors turn datasheet peaks into achievable numbers; they
are assumptions, stated as such. A profile is a built-in name (``PROFILES``), a JSON file with the
same keys, or measured on the machine at hand (``runtime/calibrate.measure_profile``): what
``--profile`` means on every command that takes it (``load_profile``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import HaqmoeError

GB = 1e9


@dataclass
class HardwareProfile:
    name: str
    description: str
    gpu_mem_gb: float  # 0 = no GPU
    gpu_mem_bw_gb_s: float
    gpu_int8_tops: float  # dense tensor-core peak
    gpu_fp16_tflops: float  # dense tensor-core peak
    h2d_gb_s: float  # effective pinned host->device copy bandwidth
    cpu_mem_bw_gb_s: float  # effective streaming bandwidth of host DRAM
    cpu_int8_tops: float  # effective int8 GEMM throughput (VNNI/AMX), all cores
    cpu_fp32_tflops: float  # effective fp32 GEMM throughput, all cores
    gpu_bw_eff: float = 0.8  # achieved fraction of peak memory bandwidth in GEMV kernels
    gpu_compute_eff: float = 0.5  # achieved fraction of tensor-core peak in small GEMMs
    gpu_kernel_ms: float = 0.01  # launch + sync per expert call (3 GEMMs + activation)
    cpu_call_ms: float = 0.02  # per CPU expert call: thread-pool wake-up, activation copy over PCIe
    gpu_reserved_gb: float = 2.0  # CUDA context, activations, KV cache, allocator slack
    layer_overhead_ms: float = 0.0  # host-side framework time per layer beyond its kernels (eager
    # PyTorch dispatch); 0 for datasheet profiles, fitted from an all-resident run of the real engine
    cpu_gpu_overlap: float = 1.0  # share of a layer's GPU expert time that CPU experts can overlap: 1 for
    # a runtime whose GPU work is launched ahead (graphs, a launch thread); 0 for the eager engine, whose
    # GPU kernels are launched by the same host thread that then runs the CPU tier
    host_sync_ms: float = 0.0  # extra time of a layer that runs expert work on the host (CPU or split): the
    # host reads the router's output off the GPU, so the GPU work it had queued ahead no longer hides behind
    # host time; 0 for datasheet profiles, fitted from an always-cpu run of the real engine
    sources: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareProfile":
        try:
            return cls(**d)
        except TypeError as exc:
            raise HaqmoeError(f"bad hardware profile: {exc}") from None


_DESKTOP_HOST = {
    "cpu_mem_bw_gb_s": 65.0, "cpu_int8_tops": 2.0, "cpu_fp32_tflops": 1.0,
}
_DESKTOP_SOURCES = {
    "cpu_mem_bw_gb_s": "assumption: desktop host, dual-channel DDR5-5600 = 89.6 GB/s peak, ~72% achieved in "
                       "streaming reads (STREAM-like)",
    "cpu_int8_tops": "assumption: 8 performance cores with AVX-VNNI, ~2 TOPS achieved in oneDNN int8 GEMM",
    "cpu_fp32_tflops": "assumption: same cores, AVX2 FMA fp32 GEMM ~1 TFLOPS achieved",
    "efficiency": "assumption: GEMV kernels reach ~80% of DRAM peak, small int8 GEMMs ~50% of tensor peak",
}

PROFILES: dict[str, HardwareProfile] = {
    "rtx5090d": HardwareProfile(
        "rtx5090d", "NVIDIA GeForce RTX 5090D 32 GB (the paper's GPU), PCIe 5.0 x16, desktop DDR5 host",
        gpu_mem_gb=32.0, gpu_mem_bw_gb_s=1792.0, gpu_int8_tops=594.0, gpu_fp16_tflops=148.0, h2d_gb_s=52.0,
        **_DESKTOP_HOST,
        sources={
            "gpu_mem_gb": "NVIDIA RTX 5090D product page: 32 GB GDDR7",
            "gpu_mem_bw_gb_s": "512-bit GDDR7 at 28 Gbps = 1792 GB/s (same memory system as RTX 5090)",
            "gpu_int8_tops": "approximation: RTX 5090 dense INT8 ~838 TOPS (Blackwell GeForce whitepaper) scaled "
                             "by the 5090D/5090 AI-TOPS ratio 2375/3352",
            "gpu_fp16_tflops": "approximation: RTX 5090 dense FP16 tensor ~209 TFLOPS scaled by 2375/3352",
            "h2d_gb_s": "PCIe 5.0 x16 = 63 GB/s per direction; ~83% achieved by pinned cudaMemcpyAsync (assumption)",
            **_DESKTOP_SOURCES,
        }),
    "rtx4090": HardwareProfile(
        "rtx4090", "NVIDIA GeForce RTX 4090 24 GB, PCIe 4.0 x16, desktop DDR5 host",
        gpu_mem_gb=24.0, gpu_mem_bw_gb_s=1008.0, gpu_int8_tops=660.6, gpu_fp16_tflops=165.2, h2d_gb_s=25.0,
        **_DESKTOP_HOST,
        sources={
            "gpu_mem_gb": "NVIDIA Ada Lovelace whitepaper: 24 GB GDDR6X",
            "gpu_mem_bw_gb_s": "Ada whitepaper: 1008 GB/s",
            "gpu_int8_tops": "Ada whitepaper: 660.6 dense INT8 tensor TOPS",
            "gpu_fp16_tflops": "Ada whitepaper: 165.2 dense FP16 tensor TFLOPS (FP16 accumulate)",
            "h2d_gb_s": "PCIe 4.0 x16 = 31.5 GB/s per direction; ~80% achieved pinned (assumption)",
            **_DESKTOP_SOURCES,
        }),
    "a100-40gb": HardwareProfile(
        "a100-40gb", "NVIDIA A100 40 GB PCIe, PCIe 4.0 x16, server host (8-channel DDR4-3200)",
        gpu_mem_gb=40.0, gpu_mem_bw_gb_s=1555.0, gpu_int8_tops=624.0, gpu_fp16_tflops=312.0, h2d_gb_s=25.0,
        cpu_mem_bw_gb_s=150.0, cpu_int8_tops=6.0, cpu_fp32_tflops=3.0,
        sources={
            "gpu_mem_gb": "NVIDIA A100 datasheet: 40 GB HBM2",
            "gpu_mem_bw_gb_s": "A100 40GB PCIe datasheet: 1555 GB/s",
            "gpu_int8_tops": "A100 datasheet: 624 dense INT8 TOPS",
            "gpu_fp16_tflops": "A100 datasheet: 312 dense FP16 tensor TFLOPS",
            "h2d_gb_s": "PCIe 4.0 x16, ~80% of 31.5 GB/s achieved pinned (assumption)",
            "cpu_mem_bw_gb_s": "assumption: one socket, 8-channel DDR4-3200 = 204.8 GB/s peak, ~73% achieved",
            "cpu_int8_tops": "assumption: 32-core server CPU with AVX-512 VNNI, ~6 TOPS achieved",
            "cpu_fp32_tflops": "assumption: same CPU, ~3 TFLOPS fp32 achieved",
        }),
    "h100-pcie": HardwareProfile(
        "h100-pcie", "NVIDIA H100 80 GB PCIe, PCIe 5.0 x16, server host (8-channel DDR5-4800)",
        gpu_mem_gb=80.0, gpu_mem_bw_gb_s=2039.0, gpu_int8_tops=1513.0, gpu_fp16_tflops=756.0, h2d_gb_s=52.0,
        cpu_mem_bw_gb_s=220.0, cpu_int8_tops=10.0, cpu_fp32_tflops=4.0,
        sources={
            "gpu_mem_gb": "NVIDIA H100 datasheet: 80 GB HBM2e (PCIe card)",
            "gpu_mem_bw_gb_s": "H100 PCIe datasheet: 2.0 TB/s",
            "gpu_int8_tops": "H100 PCIe datasheet: 3026 INT8 TOPS with sparsity = 1513 dense",
            "gpu_fp16_tflops": "H100 PCIe datasheet: 1513 FP16 TFLOPS with sparsity = 756 dense",
            "h2d_gb_s": "PCIe 5.0 x16, ~83% of 63 GB/s achieved pinned (assumption)",
            "cpu_mem_bw_gb_s": "assumption: one socket, 8-channel DDR5-4800 = 307 GB/s peak, ~72% achieved",
            "cpu_int8_tops": "assumption: 48-core server CPU with AMX/VNNI, ~10 TOPS achieved in int8 GEMM",
            "cpu_fp32_tflops": "assumption: same CPU, ~4 TFLOPS fp32 achieved",
        }),
}


def load_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name, or a JSON file with the same keys."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    p = Path(name_or_path)
    if p.suffix == ".json" and p.is_file():
        try:
            return HardwareProfile.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as exc:
            raise HaqmoeError(f"{p}: not valid JSON ({exc.msg})") from None
    raise HaqmoeError(f"unknown hardware profile {name_or_path!r} (built in: {', '.join(PROFILES)}, or a .json file)")


DEFAULT_PROFILE = "rtx5090d"  # the paper's GPU: the default of every command that takes --profile
PROFILE_HELP = (f"Hardware profile: {', '.join(PROFILES)} (built in, costs/hardware.py), or a .json file "
                "(haqmoe measure-profile).")
