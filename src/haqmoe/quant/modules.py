"""Quantized drop-in modules: ``QuantLinear`` for nn.Linear and ``QuantExperts`` for fused experts.

They store what the checkpoint stores (int8 weights, scales, zero points; smoothing is already
folded into the weights and the preceding op) and execute W8A8 in fake-quant mode: the weight is
dequantized once, activations are quantize-dequantized per token (or per tensor, static).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import HaqmoeError
from ..models.adapters import ExpertLayout, FusedExperts, expert_glu, set_module
from .quantizer import QuantSpec, compute_qparams, dequantize, fake_quant, fake_quant_static, quantize


class _DequantizedPerCall:
    """Mixin for an int8-stored module whose float ``weight`` (what fake-quant and weight-only
    execution compute with) is dequantized on every use and never kept: a model's only host copy of
    a quantized weight is its int8 tensor (a kept fp32 copy would be 4x the checkpoint; for a real
    MoE that is what does not fit). Dequantizing costs one pass over the weight, small beside the
    GEMM it feeds; the speed paths (``--exec int8|dequant|auto``) convert the modules instead."""

    def _dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self._dequantized()


class QuantLinear(_DequantizedPerCall, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, w_spec: QuantSpec,
                 a_spec: QuantSpec | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_spec, self.a_spec = w_spec, a_spec
        groups = (in_features // w_spec.group_size,) if w_spec.granularity == "group" else ()
        pshape = (out_features, *groups, 1)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(pshape, dtype=torch.float32))
        self.register_buffer("w_zero", torch.zeros(pshape, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        if a_spec is not None and not a_spec.dynamic:
            self.register_buffer("a_scale", torch.ones(1, 1))
            self.register_buffer("a_zero", torch.zeros(1, 1))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, w_spec: QuantSpec,
                    a_spec: QuantSpec | None) -> "QuantLinear":
        """Round-to-nearest quantization of a float weight [out, in]."""
        m = cls(weight.shape[1], weight.shape[0], bias is not None, w_spec, a_spec, weight.dtype)
        scale, zero = compute_qparams(weight.detach(), w_spec)
        m.set_quantized(quantize(weight.detach(), scale, zero, w_spec), scale, zero, bias)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, w_spec: QuantSpec, a_spec: QuantSpec | None) -> "QuantLinear":
        return cls.from_weight(linear.weight, linear.bias, w_spec, a_spec)

    @torch.no_grad()
    def set_quantized(self, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      bias: torch.Tensor | None = None) -> None:
        self.qweight.copy_(qweight)
        self.w_scale.copy_(scale.reshape(self.w_scale.shape))
        self.w_zero.copy_(zero.reshape(self.w_zero.shape))
        if bias is not None:
            self.bias.copy_(bias)

    def weight_float(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.w_scale, self.w_zero, self.w_spec, dtype)

    def _dequantized(self) -> torch.Tensor:
        return self.weight_float(self.bias.dtype if self.bias is not None else torch.float32)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_spec is None:
            return x
        if self.a_spec.dynamic:
            return fake_quant(x, self.a_spec)
        return fake_quant_static(x, self.a_scale, self.a_zero, self.a_spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return nn.functional.linear(self.quant_input(x).to(w.dtype), w, self.bias)

    def extra_repr(self) -> str:
        a = "none" if self.a_spec is None else f"a{self.a_spec.bits}{'s' if self.a_spec.symmetric else 'a'}"
        return (f"in={self.in_features}, out={self.out_features}, "
                f"w{self.w_spec.bits}{'s' if self.w_spec.symmetric else 'a'}, {a}")


class QuantExperts(nn.Module):
    """Routed experts as per-expert ``QuantLinear``s, with transformers' fused-experts call signature.

    ``glu`` is the expert's gate/up -> down function (``models.adapters.GLU`` or gpt-oss's
    ``ClampedSwiGLU``); ``bias``: every projection has a float bias (gpt-oss)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, glu: nn.Module,
                 w_spec: QuantSpec, a_spec: QuantSpec | None, bias: bool = False):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, inter
        self.glu = glu

        def make(i: int, o: int) -> nn.ModuleList:
            return nn.ModuleList(QuantLinear(i, o, bias, w_spec, a_spec) for _ in range(num_experts))

        self.gate, self.up, self.down = make(hidden, inter), make(hidden, inter), make(inter, hidden)

    @property
    def has_bias(self) -> bool:
        return self.gate[0].bias is not None

    @classmethod
    def like(cls, experts: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec | None) -> "QuantExperts":
        """Empty quantized experts shaped like the fused ``experts`` (placeholders a checkpoint fills)."""
        n, hidden, inter = FusedExperts.dims(experts)
        return cls(n, hidden, inter, expert_glu(experts), w_spec, a_spec, ExpertLayout.of(experts).bias)

    @classmethod
    def from_fused(cls, experts: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec | None) -> "QuantExperts":
        m = cls.like(experts, w_spec, a_spec)
        for e in range(m.num_experts):
            w = FusedExperts.get(experts, e)
            for lin, weight, bias in ((m.gate[e], w.gate, w.gate_bias), (m.up[e], w.up, w.up_bias),
                                      (m.down[e], w.down, w.down_bias)):
                scale, zero = compute_qparams(weight.detach(), w_spec)
                lin.set_quantized(quantize(weight.detach(), scale, zero, w_spec), scale, zero, bias)
        return m

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.down[e](self.glu(self.gate[e](x), self.up[e](x)))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < self.num_experts:
                continue
            token_idx, k_pos = torch.where(top_k_index == e)
            y = self.expert_forward(e, hidden_states[token_idx])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, k_pos, None]).to(out.dtype))
        return out


# ------------------------------------------------------------------ vocabulary (embedding + lm_head)
VOCAB_SPEC = QuantSpec(8, symmetric=True, granularity="channel")


def quantize_vocab(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a [V, H] vocabulary matrix: (q int8 [V, H], scale float32 [V, 1]).

    One row is one output channel of lm_head AND one token's embedding, so a single int8 copy with
    per-row scales serves both ends of a tied model.
    """
    scale, zero = compute_qparams(weight.detach().float(), VOCAB_SPEC)
    return quantize(weight.detach().float(), scale, zero, VOCAB_SPEC), scale


class _Int8Rows(nn.Module):
    """int8 rows ``q`` [V, H] with per-row scales [V, 1]: the storage of a quantized vocabulary."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def weight_float(self) -> torch.Tensor:
        return self.q.float() * self.scale


class Int8Embedding(_Int8Rows):
    """Token embedding read from an int8 vocabulary: rows dequantized on lookup (a few per step)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, padding_idx: int | None = None):
        super().__init__(q, scale)
        self.num_embeddings, self.embedding_dim = q.shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].to(torch.float32).mul_(self.scale[ids])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


class QuantVocab(_DequantizedPerCall, _Int8Rows):
    """lm_head stored as int8 rows (``haqmoe quantize --int8-lm-head``), shared with a tied embedding.

    Weight-only in fake-quant and dequant modes (the fp32 weight is rebuilt on each use); the
    int8 execution modes run it on the int8 GEMM with two-level activations (``int8.int8_head``),
    which is exact to ~1/250 of one activation step, so both modes compute the same function.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__(q, scale)
        self.out_features, self.in_features = q.shape

    @classmethod
    def empty(cls, vocab: int, hidden: int) -> "QuantVocab":
        return cls(torch.zeros(vocab, hidden, dtype=torch.int8), torch.ones(vocab, 1))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "QuantVocab":
        return cls(*quantize_vocab(weight))

    def embedding(self, padding_idx: int | None = None) -> Int8Embedding:
        """The input embedding of a tied model: the same int8 rows, not a copy."""
        return Int8Embedding(self.q, self.scale, padding_idx)

    def _dequantized(self) -> torch.Tensor:
        return self.weight_float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.float(), self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 rows (weight-only)"


def vocab_names(model: nn.Module) -> dict[str, str | None] | None:
    """Module names of a quantized vocabulary (``{"head": ..., "embedding": name | None}``), or None."""
    names = {id(m): n for n, m in model.named_modules()}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, QuantVocab):
        return None
    tied = isinstance(emb, Int8Embedding) and emb.q is head.q
    return {"head": names[id(head)], "embedding": names[id(emb)] if tied else None}


def quantize_vocabulary(model: nn.Module) -> QuantVocab:
    """Replace lm_head by its int8 rows (and a tied input embedding by a view of the same rows).

    Untied input embeddings stay float: they are read a few rows per token and never in a GEMM.
    """
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if isinstance(head, QuantVocab):
        return head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise HaqmoeError("an int8 lm_head needs a bias-free nn.Linear lm_head "
                          f"(this model has {type(head).__name__})")
    tied = isinstance(emb, nn.Embedding) and emb.weight.data_ptr() == head.weight.data_ptr()
    vocab = QuantVocab.from_weight(head.weight).to(head.weight.device)
    model.set_output_embeddings(vocab)
    if tied:
        model.set_input_embeddings(vocab.embedding(emb.padding_idx))
    return vocab


def tie_vocabulary(model: nn.Module, names: dict[str, str | None], vocab: int, hidden: int) -> None:
    """Rebuild a checkpoint's vocabulary modules (empty, tied as saved) before its tensors load."""
    head = QuantVocab.empty(vocab, hidden)
    set_module(model, names["head"], head)
    if names.get("embedding"):
        set_module(model, names["embedding"], head.embedding(model.get_input_embeddings().padding_idx))
