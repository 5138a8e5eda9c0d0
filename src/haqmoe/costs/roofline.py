"""Roofline costs of a model shape on a hardware profile: expert cost curves, attention and head times,
GPU memory (docs/design.md, Cost predictor and Simulator).

One token through an expert streams all its weights, so small n is bandwidth-bound and large n
is compute-bound: ``cost_model_for`` gives the ``CostModel`` the simulator replays, the engine uses
without a GPU to measure, and placement plans with (``costs/planning.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HaqmoeError
from .curves import CostCurve, CostModel
from .hardware import GB, HardwareProfile
from .shapes import ModelSpec


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
    return CostModel(cpu, gpu, transfer, low_ratio=spec.expert_bytes("int4") / cpu_bytes)


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
