"""Model shapes: what the cost model needs to know about an MoE model, and what its experts weigh.

``int8_bytes`` is the one int8 byte formula (haqmoe's W8A8 storage: int8 weights + one fp32 scale and
one fp32 zero point per output row); ``ModelSpec.expert_bytes`` and the checkpoint footprint
(``models/footprint.py``) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import HaqmoeError

PRECISIONS = ("w8a8", "fp16", "fp32")


def int8_bytes(params: int, rows: int) -> int:
    """Bytes of ``params`` int8 weights in ``rows`` output rows: the weights + fp32 scale and zero point per row."""
    return int(params) + 2 * 4 * int(rows)


LOW_BITS, LOW_GROUP = 4, 128  # the miss lever's low-precision host copy: int4, groups of 128 input columns


def int4_bytes(params: int, group: int = LOW_GROUP) -> int:
    """Bytes of ``params`` int4 weights (two per byte) with an fp16 scale and an fp16 zero point per group of
    ``group`` consecutive input columns: the low-precision copy of the miss levers (docs/design.md, Miss
    levers). About 0.53x ``int8_bytes`` at group 128."""
    return (int(params) + 1) // 2 + 2 * 2 * -(-int(params) // int(group))


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

    @property
    def expert_rows(self) -> int:
        """Output rows of one expert's linears: gate and up (ffn each), down (hidden)."""
        return 2 * self.ffn + self.hidden

    def expert_bytes(self, precision: str) -> int:
        """One expert's weights as stored in ``precision`` (w8a8: with its per-row scales and zero points)."""
        if precision == "w8a8":
            return int8_bytes(self.expert_params, self.expert_rows)
        if precision == "fp16":
            return 2 * self.expert_params
        if precision == "fp32":
            return 4 * self.expert_params
        if precision == "int4":  # the miss levers' low-precision host copy, not a model precision
            return int4_bytes(self.expert_params)
        raise HaqmoeError(f"unknown precision {precision!r} ({', '.join(PRECISIONS)})")

    def nonexpert_bytes(self, precision: str) -> int:
        """Attention in the model precision; embeddings and lm_head kept in 16 bits."""
        per_param = {"w8a8": 1, "fp16": 2, "fp32": 4}[precision]
        embed_bytes = 4 if precision == "fp32" else 2
        return self.num_layers * self.attn_params_per_layer * per_param + 2 * self.vocab * self.hidden * embed_bytes

    def total_bytes(self, precision: str) -> int:
        return self.nonexpert_bytes(precision) + self.num_layers * self.num_experts * self.expert_bytes(precision)

    def with_routing(self, num_layers: int, num_experts: int, top_k: int) -> "ModelSpec":
        """This shape with routing data's layer / expert / top-k counts (a trace or statistics of it)."""
        return replace(self, num_layers=int(num_layers), num_experts=int(num_experts), top_k=int(top_k or self.top_k))


MODELS: dict[str, ModelSpec] = {
    # Mixtral-8x7B (config.json of mistralai/Mixtral-8x7B-v0.1): 32 layers, 8 experts, top-2,
    # hidden 4096, ffn 14336, vocab 32000, 32 heads / 8 KV heads of 128.
    "mixtral-8x7b": ModelSpec("mixtral-8x7b", 32, 8, 2, 4096, 14336, 32000,
                              2 * 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 8 + 2 * 4096, 1024),
    # The embedded upcycled MoE (SmolLM2-135M, docs/design.md, Models and data): 30 layers, hidden 576, ffn 1536,
    # 9 heads / 3 KV heads of 64, 8 experts top-2.
    "smollm2-moe": ModelSpec("smollm2-moe", 30, 8, 2, 576, 1536, 49152,
                             2 * 576 * 576 + 2 * 576 * 192 + 576 * 8 + 2 * 576, 192),
    # The embedded MoEfied MoE (models/moefy.py): SmolLM2's 1536 FFN neurons carved into 4 routed
    # experts (top-2) and 4 shared ones of 192 each; the shared slices always run, so they are counted
    # with the attention as non-expert weights.
    "smollm2-moefied": ModelSpec("smollm2-moefied", 30, 4, 2, 576, 192, 49152,
                                 2 * 576 * 576 + 2 * 576 * 192 + 576 * 4 + 2 * 576 + 3 * 576 * 4 * 192, 192),
}


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise HaqmoeError(f"unknown model shape {name!r} (known: {', '.join(MODELS)})")
    return MODELS[name]


def shape_for(model: str) -> str:
    """The shape that costs routing data of ``model`` (its recorded name): Mixtral's for Mixtral
    data, the embedded MoE's otherwise (the models profiled on this machine are SmolLM2 MoEs)."""
    if model in MODELS:
        return model
    return "mixtral-8x7b" if "mixtral" in model.lower() else "smollm2-moe"
