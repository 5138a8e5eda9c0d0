"""Declarative per-architecture descriptions of decoder blocks.

One loop (quantization, smoothing, tracing, the runtime) serves every architecture by reading
these descriptions instead of branching on ``model_type``. A decoder block is a list of
``LinearGroup``s (LLMC's "subsets"): linears that read ONE input, the op that produces that input
(``prev_op``: a norm, or a linear whose output rows feed the group, where smoothing folds 1/s),
and the module whose output the group feeds (``inspect``, for block-level losses).

MoE blocks in transformers 5.x keep all experts fused in one module with 3-D parameters, mostly
``gate_up_proj [E, 2I, H]`` (gate rows first, then up) and ``down_proj [E, H, I]``. gpt-oss stores
them transposed (``[E, H, 2I]``, ``[E, I, H]``: ``x @ W``), with gate and up interleaved and with
biases; transformers declares that on the module itself (``is_transposed``, ``is_concatenated``,
``has_bias``), so ``ExpertLayout.of`` reads it from there and ``FusedExperts`` reads and writes one
expert in nn.Linear layout whatever the storage. ``expert_glu`` names the function an expert applies
between its gate/up and down projections (``GLU`` or gpt-oss's ``ClampedSwiGLU``).
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


# ---------------------------------------------------------------------- routed experts
class GLU(nn.Module):
    """``act(gate) * up``: the expert function of every family but gpt-oss. Linear in ``up``, so a
    per-channel scale on the down projection's input folds exactly into the up rows."""

    linear_in_up = True

    def __init__(self, act_fn: nn.Module):
        super().__init__()
        self.act_fn = act_fn

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act_fn(gate) * up


class ClampedSwiGLU(nn.Module):
    """gpt-oss's expert function (transformers' ``GptOssExperts._apply_gate``): gate clamped above at
    ``limit``, up clamped to ±``limit``, ``(up + 1) · gate · sigmoid(alpha · gate)``. The ``+ 1`` and the
    clamp make it non-linear in ``up``: no scale folds through it into the down projection."""

    linear_in_up = False

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


def expert_glu(experts: nn.Module) -> nn.Module:
    """The gate/up -> down function of a fused experts module (or the one a quantized module holds).
    An expert function we do not know is refused: running it as ``act(gate) * up`` would silently
    compute another model."""
    if hasattr(experts, "glu"):  # QuantExperts and its converted forms
        return experts.glu
    if ExpertLayout.of(experts).interleaved and hasattr(experts, "alpha") and hasattr(experts, "limit"):
        return ClampedSwiGLU(experts.alpha, experts.limit)
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is not None and gate.__name__ != "_default_apply_gate":
        raise HaqmoeError(f"{type(experts).__name__}: unknown expert activation ({gate.__qualname__})")
    return GLU(experts.act_fn)


@dataclass(frozen=True)
class ExpertLayout:
    """How a fused experts module stores its weights, as transformers declares it on the module
    (``use_experts_implementation(is_transposed=, is_concatenated=, has_bias=)``)."""

    transposed: bool = False  # gate_up_proj [E, H, 2I], down_proj [E, I, H] (x @ W), not [out, in]
    interleaved: bool = False  # gate/up output channels alternate (g0, u0, g1, u1, ...), not [gate; up]
    bias: bool = False  # gate_up_proj_bias [E, 2I] (same channel order), down_proj_bias [E, H]

    @classmethod
    def of(cls, experts: nn.Module) -> "ExpertLayout":
        return cls(bool(getattr(experts, "is_transposed", False)), not getattr(experts, "is_concatenated", True),
                   bool(getattr(experts, "has_bias", False)))


@dataclass
class ExpertWeights:
    """One routed expert as three plain matrices in nn.Linear layout ([out, in]), and its biases
    (None: the expert has none, or, for ``FusedExperts.set``, leave them as they are)."""

    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]

    def intermediate(self, x: torch.Tensor, glu: nn.Module) -> torch.Tensor:
        """The down projection's input for tokens ``x`` [n, H] (in fp32)."""
        gate = x @ self.gate.float().T
        up = x @ self.up.float().T
        if self.gate_bias is not None:
            gate, up = gate + self.gate_bias.float(), up + self.up_bias.float()
        return glu(gate, up)


class FusedExperts:
    """Reads/writes single experts of transformers' fused 3-D expert parameters (``ExpertLayout``)."""

    @staticmethod
    def count(experts: nn.Module) -> int:
        return int(experts.num_experts)

    @staticmethod
    def dims(experts: nn.Module) -> tuple[int, int, int]:
        """(experts, hidden, intermediate), from the parameters' shapes (works on ``meta``)."""
        n, a, b = experts.down_proj.shape
        return (n, b, a) if ExpertLayout.of(experts).transposed else (n, a, b)

    @staticmethod
    def _split(t: torch.Tensor, layout: ExpertLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up parts of a gate/up tensor whose output channels are on dim 0 (views)."""
        return (t[0::2], t[1::2]) if layout.interleaved else t.chunk(2, dim=0)

    @staticmethod
    def get(experts: nn.Module, e: int) -> ExpertWeights:
        """Expert ``e`` in nn.Linear layout (views of the fused parameters: no copy)."""
        lay = ExpertLayout.of(experts)
        gate_up, down = experts.gate_up_proj[e], experts.down_proj[e]
        if lay.transposed:
            gate_up, down = gate_up.T, down.T
        gate, up = FusedExperts._split(gate_up, lay)
        w = ExpertWeights(gate, up, down)
        if lay.bias:
            w.gate_bias, w.up_bias = FusedExperts._split(experts.gate_up_proj_bias[e], lay)
            w.down_bias = experts.down_proj_bias[e]
        return w

    @staticmethod
    @torch.no_grad()
    def set(experts: nn.Module, e: int, w: ExpertWeights) -> None:
        """Write expert ``e`` (through the views ``get`` returns; a None bias is left unchanged)."""
        dst = FusedExperts.get(experts, e)
        for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
            src = getattr(w, name)
            if src is not None:
                getattr(dst, name).copy_(src)

    @staticmethod
    def gate_up(experts: nn.Module, e: int) -> torch.Tensor:
        """Expert ``e``'s gate and up rows stacked [2I, H] (nn.Linear layout; a copy where not contiguous)."""
        w = FusedExperts.get(experts, e)
        return torch.cat([w.gate, w.up])

    @staticmethod
    @torch.no_grad()
    def scale_inputs(experts: nn.Module, s: torch.Tensor) -> None:
        """Multiply every expert's gate/up input columns (the hidden dim) by ``s`` [H]."""
        w = experts.gate_up_proj
        s = s.to(w.dtype)
        w.mul_(s[:, None] if ExpertLayout.of(experts).transposed else s)


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
    # DeepSeek-V2 has V3's block layout: MLA (V2-Lite: q_proj, no q_lora; absent linears drop out),
    # dense first blocks (first_k_dense_replace), routed experts plus one shared MLP (n_shared_experts
    # wide); only the router differs (softmax, greedy / group-limited top-k), which is not described here.
    ArchSpec("deepseek_v2", ("deepseek_v2",), "model.layers", _MLA_ATTN, _LLAMA_MLP,
             MoESpec(shared="mlp.shared_experts")),
    ArchSpec("deepseek_v3", ("deepseek_v3",), "model.layers", _MLA_ATTN, _LLAMA_MLP,
             MoESpec(shared="mlp.shared_experts")),
    # gpt-oss: biased q/k/v/o (attention sinks are a per-head parameter, not a linear: they stay
    # float), every block MoE with a biased router; the experts' layout and clamped SwiGLU are read
    # from the module (ExpertLayout, expert_glu).
    ArchSpec("gpt_oss", ("gpt_oss",), "model.layers", _LLAMA_ATTN, (), MoESpec(router="mlp.router")),
)


def adapter_for(model_or_type: nn.Module | str) -> ArchSpec:
    model_type = model_or_type if isinstance(model_or_type, str) else model_or_type.config.model_type
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(t for s in ARCHITECTURES for t in s.model_types)
    raise HaqmoeError(f"unsupported architecture '{model_type}' (supported: {supported})")
