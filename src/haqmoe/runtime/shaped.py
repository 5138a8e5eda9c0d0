"""A real MoE's shape with random int8 experts and routing replayed from a trace.

The runtime's speed depends on shapes, bytes and routing, not on weight values. A model with
Mixtral-8x7B's dimensions (hidden 4096, ffn 14336, 8 experts top-2, 32/8 heads) but only as many
layers as the machine at hand holds, random W8A8 experts (built directly in int8: no float copy of
the experts ever exists) and each layer's router replaced by a ``TraceRouter`` that replays a
routing trace (real Mixtral statistics), lets the real engine run the offloading workload and be
compared with the simulator replaying the same trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from ..errors import HaqmoeError
from ..models.adapters import adapter_for, expert_glu
from ..models.base import LoadedModel
from ..quant.config import QuantConfig
from ..quant.modules import QuantExperts


@dataclass
class MoEShape:
    hidden: int = 4096
    ffn: int = 14336
    experts: int = 8
    top_k: int = 2
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    layers: int = 8


@dataclass
class RouteFeed:
    """The routing to replay, [tokens, layers, k]; every layer's router reads rows from ``pos``,
    the last layer advances it (one model forward consumes as many rows as it has tokens)."""

    routes: np.ndarray
    pos: int = 0


class TraceRouter(nn.Module):
    """Mixtral's router signature ``(logits, top-k weights, top-k ids)`` with ids from a ``RouteFeed``.

    ``weight`` is a random router matrix that only the engine's next-layer guesses read."""

    def __init__(self, layer: int, feed: RouteFeed, shape: MoEShape, last: bool):
        super().__init__()
        self.layer, self.feed, self.last, self.shape = layer, feed, last, shape
        self.weight = nn.Parameter(torch.randn(shape.experts, shape.hidden) * 0.02, requires_grad=False)

    @torch.compiler.disable  # reads and advances a host-side feed: stays eager in a compiled decode step
    def forward(self, hidden_states: torch.Tensor):
        h = hidden_states.reshape(-1, self.shape.hidden)
        n, f = h.shape[0], self.feed
        if f.pos + n > len(f.routes):
            raise HaqmoeError(f"route feed exhausted: {len(f.routes)} rows, asked for {f.pos + n}")
        ids = torch.as_tensor(f.routes[f.pos: f.pos + n, self.layer].astype(np.int64), device=h.device)
        if self.last:
            f.pos += n
        weights = torch.full(ids.shape, 1.0 / ids.shape[1], dtype=torch.float32, device=h.device)
        logits = torch.zeros(n, self.shape.experts, dtype=h.dtype, device=h.device).scatter_(1, ids, 1.0)
        return logits, weights, ids


def random_int8_experts(shape: MoEShape, qcfg: QuantConfig, glu: nn.Module, seed: int) -> QuantExperts:
    """W8A8 experts with random integers (slices of one random pool, so building is a memcpy), per-channel
    scales that keep activations O(1), and small non-zero zero points when weights are asymmetric."""
    g = torch.Generator().manual_seed(seed)
    qe = QuantExperts(shape.experts, shape.hidden, shape.ffn, glu, qcfg.weights, qcfg.acts)
    size = shape.hidden * shape.ffn
    pool = torch.randint(-127, 128, (size + 4096,), dtype=torch.int8, generator=g)
    for part in (qe.gate, qe.up, qe.down):
        for lin in part:
            off = int(torch.randint(0, 4096, (1,), generator=g))
            lin.qweight.copy_(pool[off: off + size].view_as(lin.qweight))
            fan_in = lin.in_features
            lin.w_scale.copy_((1.0 + torch.rand(lin.w_scale.shape, generator=g)) / (73.0 * fan_in ** 0.5))
            if not qcfg.weights.symmetric:
                lin.w_zero.copy_(torch.randint(-2, 3, lin.w_zero.shape, generator=g).float())
    return qe


def shaped_mixtral(shape: MoEShape, routes: np.ndarray, dtype: torch.dtype = torch.float16,
                   device: str = "cpu", seed: int = 0, qcfg: QuantConfig | None = None
                   ) -> tuple[LoadedModel, RouteFeed, list[QuantExperts]]:
    """(model, its route feed, the experts modules) — the experts list lets a caller restore the
    model's experts after an engine swapped them, to build the next engine on the same weights."""
    if routes.ndim != 3 or routes.shape[1] < shape.layers or routes.shape[2] != shape.top_k:
        raise HaqmoeError(f"routes must be [tokens, >= {shape.layers} layers, {shape.top_k}], got {routes.shape}")
    if routes.max() >= shape.experts or routes.min() < 0:
        raise HaqmoeError(f"routes name experts outside 0..{shape.experts - 1}")
    qcfg = qcfg or QuantConfig.w8a8("rtn")
    cfg = MixtralConfig(hidden_size=shape.hidden, intermediate_size=1, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                        num_local_experts=shape.experts, num_experts_per_tok=shape.top_k,
                        vocab_size=shape.vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    with torch.device(device):
        model = MixtralForCausalLM(cfg).to(dtype).eval()  # experts of width 1: replaced below
    model.config.intermediate_size = shape.ffn
    feed = RouteFeed(np.ascontiguousarray(routes[:, : shape.layers]))
    experts = []
    for layer, block in enumerate(model.model.layers):
        qe = random_int8_experts(shape, qcfg, expert_glu(block.mlp.experts), seed * 1000 + layer)
        block.mlp.experts = qe
        block.mlp.gate = TraceRouter(layer, feed, shape, last=layer == shape.layers - 1).to(device)
        experts.append(qe)
    return LoadedModel(model, None, "mixtral-shape", adapter_for(model)), feed, experts


def restore_experts(lm: LoadedModel, experts: list[QuantExperts]) -> None:
    """Put the original experts modules back (undoing an engine's HybridExperts swap)."""
    for block, qe in zip(lm.model.model.layers, experts):
        block.mlp.experts = qe
