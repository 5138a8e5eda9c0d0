"""A small expert-cost model for planning: what one MoE layer's experts cost for a request.

It follows the cost predictor of docs/design.md. For an expert that ``n > 0`` tokens of a request select:

- resident on the GPU:      gpu_fixed_ms + n * gpu_ms_per_token
- not resident:             min(n * cpu_ms_per_token,                        (run on CPU)
                                transfer_ms + gpu_fixed_ms + n * gpu_ms_per_token)  (ship, run on GPU)

with ``transfer_ms = expert_bytes / pcie``. A request is a prefill of its ``n`` tokens followed by
``decode_tokens`` generated tokens (default 32) that, lacking decode traces, are assumed to route like
the request's own tokens (expert e at layer l selected with probability count / n per token; each
decode activation costs the n = 1 case). Layers run one after another and, conservatively,
CPU and GPU work are summed. The point of the non-linearity: the value of keeping an expert
resident saturates at the transfer cost, so a request-level cost is NOT proportional to hit rate
(the runtime's simulator, written elsewhere, replays traces in detail; this stays a function).

The numbers are assumptions of a paper-like edge box, not measurements of this machine:
PCIe 4.0 x16 at 24 GB/s effective; a desktop CPU streaming int8 expert weights at ~60 GB/s
(so one token on the CPU costs about one read of the expert); a GPU reading them at ~900 GB/s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import HaqmoeError

MIXTRAL_EXPERT_PARAMS = 3 * 4096 * 14336  # w1, w3, w2 of one Mixtral-8x7B expert
SMOLLM2_MOE_EXPERT_PARAMS = 3 * 576 * 1536  # gate, up, down of one upcycled SmolLM2-135M expert


@dataclass(frozen=True)
class PlanningCosts:
    """Closed-form expert costs a placement strategy optimises (not runtime/profiles.HardwareProfile,
    the per-GPU profile the simulator and the engine's predictor use)."""

    name: str
    expert_bytes: float  # bytes of one expert as stored on the GPU (int8 weights + scales)
    pcie_gbps: float = 24.0
    cpu_gbps: float = 60.0  # CPU weight streaming: one token's expert call reads the whole expert
    gpu_gbps: float = 900.0
    gpu_ms_per_token: float = 0.002

    @property
    def transfer_ms(self) -> float:
        return self.expert_bytes / (self.pcie_gbps * 1e6)

    @property
    def cpu_ms_per_token(self) -> float:
        return self.expert_bytes / (self.cpu_gbps * 1e6)

    @property
    def gpu_fixed_ms(self) -> float:
        return self.expert_bytes / (self.gpu_gbps * 1e6)

    def as_dict(self) -> dict:
        return {**asdict(self), "transfer_ms": self.transfer_ms, "cpu_ms_per_token": self.cpu_ms_per_token,
                "gpu_fixed_ms": self.gpu_fixed_ms}

    def resident_ms(self, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n, np.float64)
        return np.where(n > 0, self.gpu_fixed_ms + n * self.gpu_ms_per_token, 0.0)

    def miss_ms(self, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n, np.float64)
        gpu = self.transfer_ms + self.gpu_fixed_ms + n * self.gpu_ms_per_token
        return np.where(n > 0, np.minimum(n * self.cpu_ms_per_token, gpu), 0.0)

    def saving_ms(self, n: np.ndarray) -> np.ndarray:
        """What residency saves for an expert selected by ``n`` tokens of one request."""
        return self.miss_ms(n) - self.resident_ms(n)


def int8_expert_bytes(params: int, rows: int) -> float:
    """int8 weights + one fp32 scale and zero point per output row."""
    return float(params + 8 * rows)


PROFILES = {
    "mixtral-int8-pcie4": PlanningCosts("mixtral-int8-pcie4",
                                          int8_expert_bytes(MIXTRAL_EXPERT_PARAMS, 2 * 14336 + 4096)),
    "smollm2moe-int8-pcie4": PlanningCosts("smollm2moe-int8-pcie4",
                                             int8_expert_bytes(SMOLLM2_MOE_EXPERT_PARAMS, 2 * 1536 + 576)),
}


def profile_for(name: str, model: str = "") -> PlanningCosts:
    """``auto``: the profile of the routing data's model (Mixtral's for anything else, as before)."""
    if name == "auto":
        name = "smollm2moe-int8-pcie4" if "smollm2" in model.lower() else "mixtral-int8-pcie4"
    return get_profile(name)


def get_profile(name: str) -> PlanningCosts:
    if name not in PROFILES:
        raise HaqmoeError(f"unknown hardware profile '{name}' (known: {', '.join(PROFILES)})")
    return PROFILES[name]


DEFAULT_DECODE_TOKENS = 32


def request_costs(rc: np.ndarray, profile: PlanningCosts, top_k: int,
                  decode_tokens: int = DEFAULT_DECODE_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(cost if resident, cost if not) per request, layer and expert [C, L, E], in ms."""
    rc = np.asarray(rc, np.float64)
    n = np.maximum(rc[:, 0, :].sum(axis=-1) / max(top_k, 1), 1.0)[:, None, None]
    per_decode_token = rc / n  # expected activations of each expert per generated token
    hit = profile.resident_ms(rc) + decode_tokens * per_decode_token * profile.resident_ms(np.array(1.0))
    miss = profile.miss_ms(rc) + decode_tokens * per_decode_token * profile.miss_ms(np.array(1.0))
    return hit, miss


def request_latency_ms(resident: np.ndarray, rc: np.ndarray, profile: PlanningCosts, top_k: int,
                       decode_tokens: int = DEFAULT_DECODE_TOKENS) -> np.ndarray:
    """[C] expert time of each request (prefill + decode), from its per-layer counts [C, L, E]."""
    hit, miss = request_costs(rc, profile, top_k, decode_tokens)
    return np.where(resident[None], hit, miss).sum(axis=(1, 2))
