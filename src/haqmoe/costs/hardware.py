"""Hardware profiles and model shapes: what the simulator and the predictor need to know about a
machine they may not be running on.

A profile holds hardware numbers (memory bandwidths, int8/fp throughput, PCIe bandwidth), each
with its source or assumption in ``sources``. Expert costs for a given model are derived by a
roofline (``cost_model_for``): one token through an expert streams all its weights, so small n
is bandwidth-bound and large n is compute-bound. ``efficiency`` factors turn datasheet peaks
into achievable numbers; they are assumptions, stated as such. A profile can also be a JSON
file (same keys) or measured on the machine at hand (``runtime/calibrate.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import HaqmoeError
from .predictor import CostCurve, CostModel

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


@dataclass
class ModelSpec:
    """Shape of an MoE model, enough to cost it (SwiGLU experts: gate, up [ffn, hidden]; down)."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    ffn: int
    vocab: int
    attn_params_per_layer: int  # q, k, v, o (+ router, norms)
    kv_dim: int  # n_kv_heads * head_dim

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.ffn

    def expert_bytes(self, precision: str) -> int:
        """Weights + per-output-channel scales and zero points (fp32) for int8."""
        if precision == "w8a8":
            return self.expert_params + 2 * 4 * (2 * self.ffn + self.hidden)
        if precision == "fp16":
            return 2 * self.expert_params
        if precision == "fp32":
            return 4 * self.expert_params
        raise HaqmoeError(f"unknown precision {precision!r} (w8a8, fp16, fp32)")

    def nonexpert_bytes(self, precision: str) -> int:
        """Attention in the model precision; embeddings and lm_head kept in 16 bits."""
        per_param = {"w8a8": 1, "fp16": 2, "fp32": 4}[precision]
        embed_bytes = 4 if precision == "fp32" else 2
        return self.num_layers * self.attn_params_per_layer * per_param + 2 * self.vocab * self.hidden * embed_bytes

    def total_bytes(self, precision: str) -> int:
        return self.nonexpert_bytes(precision) + self.num_layers * self.num_experts * self.expert_bytes(precision)


MODELS: dict[str, ModelSpec] = {
    # Mixtral-8x7B (config.json of mistralai/Mixtral-8x7B-v0.1): 32 layers, 8 experts, top-2,
    # hidden 4096, ffn 14336, vocab 32000, 32 heads / 8 KV heads of 128.
    "mixtral-8x7b": ModelSpec("mixtral-8x7b", 32, 8, 2, 4096, 14336, 32000,
                              2 * 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 8 + 2 * 4096, 1024),
    # The embedded upcycled MoE (SmolLM2-135M, docs/design.md, Models and data): 30 layers, hidden 576, ffn 1536,
    # 9 heads / 3 KV heads of 64, 8 experts top-2.
    "smollm2-moe": ModelSpec("smollm2-moe", 30, 8, 2, 576, 1536, 49152,
                             2 * 576 * 576 + 2 * 576 * 192 + 576 * 8 + 2 * 576, 192),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise HaqmoeError(f"unknown model shape {name!r} (known: {', '.join(MODELS)})")
    return MODELS[name]


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


def cost_model_for(profile: HardwareProfile, spec: ModelSpec, precision: str = "w8a8",
                   cpu_precision: str = "w8a8") -> CostModel:
    """Roofline expert costs of ``spec`` on ``profile`` (GPU in ``precision``, CPU tier in
    ``cpu_precision``: int8 kept as int8 with an int8 GEMM, or dequantized fp32)."""
    flops_per_token = 2 * spec.expert_params
    gpu_bytes = spec.expert_bytes(precision)
    gpu_ops = (profile.gpu_int8_tops if precision == "w8a8" else profile.gpu_fp16_tflops) * 1e12
    gpu = CostCurve(overhead_ms=profile.gpu_kernel_ms,
                    floor_ms=1e3 * gpu_bytes / (profile.gpu_mem_bw_gb_s * GB * profile.gpu_bw_eff),
                    per_token_ms=1e3 * flops_per_token / (gpu_ops * profile.gpu_compute_eff))
    cpu_bytes = spec.expert_bytes(cpu_precision)
    cpu_ops = (profile.cpu_int8_tops if cpu_precision == "w8a8" else profile.cpu_fp32_tflops) * 1e12
    cpu = CostCurve(overhead_ms=profile.cpu_call_ms,
                    floor_ms=1e3 * cpu_bytes / (profile.cpu_mem_bw_gb_s * GB),
                    per_token_ms=1e3 * flops_per_token / cpu_ops)
    transfer = 1e3 * gpu_bytes / (profile.h2d_gb_s * GB) if profile.h2d_gb_s > 0 else float("inf")
    return CostModel(cpu, gpu, transfer)


def nonexpert_layer_ms(profile: HardwareProfile, spec: ModelSpec, precision: str, n_tokens: int,
                       context: int) -> float:
    """GPU time of one layer's attention block for n new tokens at a given context length."""
    per_param = 1 if precision == "w8a8" else 2
    ops = (profile.gpu_int8_tops if precision == "w8a8" else profile.gpu_fp16_tflops) * 1e12 * profile.gpu_compute_eff
    bw = profile.gpu_mem_bw_gb_s * GB * profile.gpu_bw_eff
    weights = spec.attn_params_per_layer * per_param / bw
    kv = 2 * context * spec.kv_dim * 2 / bw  # fp16 KV cache read
    linear = 2 * spec.attn_params_per_layer * n_tokens / ops
    attn = 4 * n_tokens * context * spec.hidden / (profile.gpu_fp16_tflops * 1e12 * profile.gpu_compute_eff)
    return 1e3 * (max(weights, linear) + kv + attn) + 8 * profile.gpu_kernel_ms / 2 + profile.layer_overhead_ms


def head_ms(profile: HardwareProfile, spec: ModelSpec, n_tokens: int) -> float:
    """Embedding lookup + final norm + lm_head (16-bit) for n tokens (only the last one at prefill)."""
    bw = profile.gpu_mem_bw_gb_s * GB * profile.gpu_bw_eff
    return 1e3 * 2 * spec.vocab * spec.hidden / bw + profile.gpu_kernel_ms


@dataclass
class MemoryPlan:
    nonexpert_gb: float
    slot_gb: float
    slots: int
    reserved_gb: float

    @property
    def total_gb(self) -> float:
        return self.nonexpert_gb + self.slots * self.slot_gb + self.reserved_gb


def memory_plan(profile: HardwareProfile, spec: ModelSpec, precision: str = "w8a8",
                budget_gb: float | None = None, slots: int | None = None) -> MemoryPlan:
    """How many expert slots fit beside the non-expert weights in the GPU budget."""
    budget = profile.gpu_mem_gb if budget_gb is None else budget_gb
    ne = spec.nonexpert_bytes(precision) / GB
    slot = spec.expert_bytes(precision) / GB
    free = budget - ne - profile.gpu_reserved_gb
    if free < 0:
        raise HaqmoeError(f"GPU budget {budget:.1f} GB is too small for the non-expert weights of {spec.name} "
                          f"({ne:.2f} GB) plus {profile.gpu_reserved_gb:.1f} GB reserved")
    max_slots = min(int(free // slot), spec.num_layers * spec.num_experts)
    if slots is None:
        slots = max_slots
    elif slots > max_slots:
        raise HaqmoeError(f"{slots} expert slots need {ne + slots * slot + profile.gpu_reserved_gb:.1f} GB, "
                          f"more than the {budget:.1f} GB budget")
    return MemoryPlan(ne, slot, int(slots), profile.gpu_reserved_gb)
