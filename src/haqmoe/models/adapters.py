"""Declarative per-architecture descriptions of decoder blocks.

One loop (quantization, smoothing, tracing, the runtime) serves every architecture by reading
these descriptions instead of branching on ``model_type``. A decoder block is a list of
``LinearGroup``s (LLMC's "subsets"): linears that read ONE input, the op that produces that input
(``prev_op``: a norm, or a linear whose output rows feed the group, where smoothing folds 1/s),
and the module whose output the group feeds (``inspect``, for block-level losses).

MoE blocks in transformers 5.x keep all experts fused in one module with 3-D parameters
``gate_up_proj [E, 2I, H]`` (gate rows first, then up) and ``down_proj [E, H, I]``;
``FusedExperts`` reads and writes one expert's weights in that layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import HaqmoeError

EXPERTS = "@experts"  # marker in LinearGroup.layers: every routed expert's gate/up projections


@dataclass(frozen=True)
class LinearGroup:
    """Linears sharing one input. ``routers`` read it too but stay unquantized (scaled only).
    ``act``: the config attribute naming an activation between ``prev_op`` and the group; smoothing
    folds through it only when it is ReLU (relu(x/s) = relu(x)/s for s > 0)."""

    name: str
    prev_op: str
    layers: tuple[str, ...]
    inspect: str
    routers: tuple[str, ...] = ()
    act: str | None = None


@dataclass(frozen=True)
class MoESpec:
    """Where a sparse MoE block keeps its router, fused experts and shared experts."""

    block: str = "mlp"
    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    prev_op: str = "post_attention_layernorm"
    shared: str | None = None  # a dense MLP (gate/up/down) added to every token
    shared_gate: str | None = None  # Qwen2-MoE's sigmoid gate on the shared expert


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers: str  # path of the decoder-block ModuleList from the CausalLM root
    attention: tuple[LinearGroup, ...]
    dense_mlp: tuple[LinearGroup, ...]
    moe: MoESpec | None = None
    norm: str = "rms"  # "rms" or "layernorm" (layernorm has a bias that smoothing must fold too)
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ blocks
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_module(model, self.layers)

    def is_moe_block(self, block: nn.Module) -> bool:
        if self.moe is None:
            return False
        try:
            get_module(block, self.moe.experts)
        except AttributeError:
            return False
        return True

    def groups(self, block: nn.Module) -> list[LinearGroup]:
        """The linear groups of one block, in execution order; absent optional linears dropped."""
        groups = list(self.attention)
        groups += self.moe_groups() if self.is_moe_block(block) else list(self.dense_mlp)
        out = []
        for g in groups:
            layers = tuple(p for p in g.layers if p == EXPERTS or has_module(block, p))
            if layers and has_module(block, g.prev_op):
                out.append(replace(g, layers=layers, routers=tuple(r for r in g.routers if has_module(block, r))))
        return out

    def moe_groups(self) -> list[LinearGroup]:
        m = self.moe
        assert m is not None
        shared = (f"{m.shared}.gate_proj", f"{m.shared}.up_proj") if m.shared else ()
        routers = (m.router,) + ((m.shared_gate,) if m.shared_gate else ())
        groups = [LinearGroup("moe_in", m.prev_op, (EXPERTS,) + shared, m.block, routers)]
        if m.shared:
            groups.append(LinearGroup("shared_down", f"{m.shared}.up_proj", (f"{m.shared}.down_proj",),
                                      m.shared))
        return groups

    def quantizable_linears(self, block: nn.Module) -> list[str]:
        """Paths of the plain ``nn.Linear``s of a block that W8A8 replaces (experts excluded)."""
        return [p for g in self.groups(block) for p in g.layers if p != EXPERTS]

    def experts(self, block: nn.Module) -> nn.Module | None:
        return get_module(block, self.moe.experts) if self.is_moe_block(block) else None

    def router(self, block: nn.Module) -> nn.Module | None:
        return get_module(block, self.moe.router) if self.is_moe_block(block) else None

    def router_norm(self, block: nn.Module) -> nn.Module | None:
        """The norm whose output the router reads (prefetch guesses re-base across it)."""
        return get_module(block, self.moe.prev_op) if self.is_moe_block(block) else None


# ---------------------------------------------------------------------- helpers
def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        if mod is None:
            raise AttributeError(path)
    return mod


def has_module(root: nn.Module, path: str) -> bool:
    try:
        get_module(root, path)
    except (AttributeError, IndexError):
        return False
    return True


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, new)


@dataclass
class ExpertWeights:
    """One routed expert as three plain matrices in nn.Linear layout ([out, in])."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]


class FusedExperts:
    """Reads/writes single experts of transformers' fused 3-D expert parameters."""

    @staticmethod
    def count(experts: nn.Module) -> int:
        return int(experts.num_experts)

    @staticmethod
    def get(experts: nn.Module, e: int) -> ExpertWeights:
        gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
        return ExpertWeights(gate, up, experts.down_proj[e])

    @staticmethod
    @torch.no_grad()
    def set(experts: nn.Module, e: int, w: ExpertWeights) -> None:
        inter = w.gate.shape[0]
        experts.gate_up_proj[e, :inter].copy_(w.gate)
        experts.gate_up_proj[e, inter:].copy_(w.up)
        experts.down_proj[e].copy_(w.down)


# ------------------------------------------------------------------ architectures
_LLAMA_ATTN = (
    LinearGroup("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "self_attn"),
    LinearGroup("o", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
)
_LLAMA_MLP = (
    LinearGroup("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    LinearGroup("down", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)
# DeepSeek's multi-head latent attention: low-rank q and kv paths, each with its own norm.
_MLA_ATTN = (
    LinearGroup("q_kv_a", "input_layernorm",
                ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn"),
    LinearGroup("q_b", "self_attn.q_a_layernorm", ("self_attn.q_b_proj",), "self_attn"),
    LinearGroup("kv_b", "self_attn.kv_a_layernorm", ("self_attn.kv_b_proj",), "self_attn"),
    LinearGroup("o", "self_attn.kv_b_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec("llama", ("llama", "mistral", "qwen2", "qwen3"), "model.layers", _LLAMA_ATTN, _LLAMA_MLP),
    ArchSpec(
        "opt", ("opt",), "model.decoder.layers",
        (
            LinearGroup("qkv", "self_attn_layer_norm",
                        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
            LinearGroup("o", "self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),
        ),
        (
            LinearGroup("fc1", "final_layer_norm", ("fc1",), "fc1"),
            LinearGroup("fc2", "fc1", ("fc2",), "fc2", act="activation_function"),
        ),
        norm="layernorm",
    ),
    ArchSpec("mixtral", ("mixtral",), "model.layers", _LLAMA_ATTN, _LLAMA_MLP, MoESpec()),
    ArchSpec("qwen2_moe", ("qwen2_moe",), "model.layers", _LLAMA_ATTN, _LLAMA_MLP,
             MoESpec(shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate")),
    ArchSpec("qwen3_moe", ("qwen3_moe",), "model.layers", _LLAMA_ATTN, _LLAMA_MLP, MoESpec()),
    ArchSpec("olmoe", ("olmoe",), "model.layers", _LLAMA_ATTN, _LLAMA_MLP, MoESpec()),
    ArchSpec("deepseek_v3", ("deepseek_v3",), "model.layers", _MLA_ATTN, _LLAMA_MLP,
             MoESpec(shared="mlp.shared_experts")),
)


def adapter_for(model_or_type: nn.Module | str) -> ArchSpec:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(t for s in ARCHITECTURES for t in s.model_types)
    raise HaqmoeError(f"unsupported architecture '{model_type}' (supported: {supported})")
