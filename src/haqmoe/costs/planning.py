"""The placement objective: what one request's experts cost, from the one cost model (docs/design.md,
Routing and placement).

For an expert that ``n > 0`` tokens of a request select, in one MoE layer:

- resident on the GPU: ``T_gpu(n)``;
- not resident: ``miss_ms(n)`` = min(T_cpu(n), T_e + T_gpu(n), best split), the fastest way to serve the miss
  with idle queues (``costs/curves.py``).

The curves are the ``CostModel`` of a model shape on a hardware profile (``costs/roofline.py``), the
same the simulator replays and the engine uses without a GPU, or any other ``CostModel`` (the engine's
calibration). A request is a prefill of its ``n`` tokens followed by ``decode_tokens`` generated
tokens (default 32) that, lacking decode traces, are assumed to route like the request's own tokens
(expert e at layer l selected with probability count / n per token; each decode activation costs the
n = 1 case). Layers run one after another and, conservatively, CPU and GPU work are summed. The point
of the non-linearity: the value of keeping an expert resident saturates at the cost of a miss, so a
request-level cost is NOT proportional to hit rate (the simulator replays traces in detail; this
stays a function).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .curves import CostModel
from .hardware import HardwareProfile, load_profile
from .roofline import cost_model_for
from .shapes import ModelSpec, model_spec, shape_for

DEFAULT_DECODE_TOKENS = 32


@dataclass
class PlanningCosts:
    """The expert costs a placement strategy optimises: a ``CostModel`` for one model shape, named."""

    name: str  # the hardware profile's (or whoever measured ``cost``)
    cost: CostModel
    expert_bytes: float  # one expert as stored on the GPU (byte budgets, plan sizes)
    split: bool = True  # a miss may be split between CPU and copy (the ``split`` policy)

    def resident_ms(self, n) -> np.ndarray:
        return self.cost.resident_ms(n)

    def miss_ms(self, n) -> np.ndarray:
        return self.cost.miss_ms(n, self.split)

    def saving_ms(self, n) -> np.ndarray:
        """What residency saves for an expert selected by ``n`` tokens of one request."""
        return self.miss_ms(n) - self.resident_ms(n)

    def as_dict(self) -> dict:
        one = np.array(1.0)
        return {"name": self.name, "expert_bytes": self.expert_bytes, "transfer_ms": self.cost.transfer_ms,
                "cpu_ms_1": float(self.cost.cpu.at(one)), "gpu_ms_1": float(self.cost.gpu.at(one)),
                "miss_ms_1": float(self.miss_ms(one)), "n_critical": self.cost.n_critical, "split": self.split}


def planning_costs(profile: HardwareProfile, spec: ModelSpec, precision: str = "w8a8") -> PlanningCosts:
    """Plan for ``spec`` on ``profile``: experts stored and run on the GPU in ``precision``, the CPU tier in int8."""
    return PlanningCosts(profile.name, cost_model_for(profile, spec, precision), float(spec.expert_bytes(precision)))


def planning_costs_for(profile: str, model: str, num_layers: int, num_experts: int, top_k: int,
                       precision: str = "w8a8") -> PlanningCosts:
    """``--profile`` (a hardware profile name or .json file) for routing data of ``model`` with its counts."""
    spec = model_spec(shape_for(model)).with_routing(num_layers, num_experts, top_k)
    return planning_costs(load_profile(profile), spec, precision)


def request_costs(rc: np.ndarray, costs: PlanningCosts, top_k: int,
                  decode_tokens: int = DEFAULT_DECODE_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(cost if resident, cost if not) per request, layer and expert [C, L, E], in ms."""
    rc = np.asarray(rc, np.float64)
    n = np.maximum(rc[:, 0, :].sum(axis=-1) / max(top_k, 1), 1.0)[:, None, None]
    per_decode_token = rc / n  # expected activations of each expert per generated token
    one = np.array(1.0)
    hit = costs.resident_ms(rc) + decode_tokens * per_decode_token * costs.resident_ms(one)
    miss = costs.miss_ms(rc) + decode_tokens * per_decode_token * costs.miss_ms(one)
    return hit, miss


def request_latency_ms(resident: np.ndarray, rc: np.ndarray, costs: PlanningCosts, top_k: int,
                       decode_tokens: int = DEFAULT_DECODE_TOKENS) -> np.ndarray:
    """[C] expert time of each request (prefill + decode), from its per-layer counts [C, L, E]."""
    hit, miss = request_costs(rc, costs, top_k, decode_tokens)
    return np.where(resident[None], hit, miss).sum(axis=(1, 2))
