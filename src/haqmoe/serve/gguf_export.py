"""Export a haqmoe quantized checkpoint to GGUF (llama.cpp's format), Q8_0 weights.

What is written, and why:

* Quantized weights (every decoder linear and routed expert, an int8 lm_head / embedding) go out as
  Q8_0: blocks of 32 input columns, one fp16 scale per block, symmetric int8. Our weights are int8
  per output channel with a zero point (asymmetric), which Q8_0 cannot hold as is, so each is
  **re-quantized from its dequantized float** ``(q - z) * s``; the rounding this adds is measured per
  tensor against that float (``GgufReport.max_rel_error``: max |Q8_0 - ours| / max |ours| of a tensor,
  ``rms_rel_error``: ‖Q8_0 - ours‖ / ‖ours‖ over all of them). A row length that is not a multiple of
  32 cannot be Q8_0 and stays F32 (listed in ``f32_fallback``).
* Everything we keep in float (norms, embeddings, routers, a float lm_head) stays F32.
* Activations: llama.cpp's CPU kernels quantize them to Q8_0 blocks on the fly; nothing is stored.
* Architectures (the names llama.cpp's loader reads, taken from the ``gguf`` package's tensor map):
  - Llama (SmolLM2): ``llama``; Q and K rows permuted from Hugging Face's half-split RoPE layout to
    the interleaved one llama.cpp's ``llama`` graph rotates.
  - Mixtral (the upcycled SmolLM2-MoE): ``llama`` with ``ffn_{gate,up,down}_exps`` stacked
    [experts, out, in] and the router as ``ffn_gate_inp`` (softmax, top-k renormalised, as Mixtral).
  - Qwen2-MoE (the MoEfied SmolLM2): llama.cpp's ``qwen2moe`` graph never renormalises the top-k
    weights and computes the shared expert's sigmoid gate as silu(x)/x, which is 0/0 = NaN for the
    all-zero gate the MoEfied model carries (its shared experts are always on at sigmoid(0) = 1/2).
    Such a model (``norm_topk_prob`` true, shared gate identically zero) is written as
    ``ernie4_5-moe``: the same attention (interleaved RoPE, so Q/K permuted), softmax routing with
    renormalised top-k, and an ungated shared expert, whose down projection carries the constant
    1/2 (exact in float). A Qwen2-MoE with ``norm_topk_prob`` false and a live shared gate is written
    as ``qwen2moe``; the other combinations have no llama.cpp graph and are refused.
* Tokenizer: a byte-level BPE tokenizer goes in as llama.cpp's ``gpt2`` model (tokens, token types,
  merges, special ids, chat template); the pre-tokenizer name is copied from the embedded SmolLM2
  GGUF when the vocabulary is that one (llama.cpp picks its split regex by that name). A checkpoint
  without a tokenizer gets llama.cpp's ``none`` vocabulary (token ids only).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import HaqmoeError
from ..quant.modules import Int8Embedding, QuantExperts, QuantLinear, QuantVocab

Q8_BLOCK = 32


@dataclass
class GgufReport:
    out: str
    arch: str = ""
    q8_0_tensors: int = 0
    f32_tensors: int = 0
    f32_fallback: list[str] = field(default_factory=list)  # quantized in ours, rows not a multiple of 32
    max_rel_error: float = 0.0  # max over Q8_0 tensors of max|Q8_0 - ours| / max|ours|
    rms_rel_error: float = 0.0  # ||Q8_0 - ours|| / ||ours|| over every Q8_0 tensor together
    tokenizer: str = ""
    bytes: int = 0


def _gguf():
    import gguf

    return gguf


def gguf_arch(lm) -> str:
    """The llama.cpp architecture this checkpoint is written as (see the module doc), or a clear refusal."""
    cfg = lm.model.config
    kind = cfg.model_type
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise HaqmoeError(f"GGUF export writes plain RoPE only; this model uses '{rope.get('rope_type')}' scaling")
    if kind in ("llama", "mistral") and not getattr(cfg, "attention_bias", False):
        return "llama"
    if kind == "mixtral":
        return "llama"
    if kind == "qwen2_moe":
        if getattr(cfg, "decoder_sparse_step", 1) != 1 or getattr(cfg, "mlp_only_layers", []):
            raise HaqmoeError("GGUF export needs every Qwen2-MoE block sparse (decoder_sparse_step 1, no mlp_only_layers)")
        zero_gate = all(not torch.any(_shared_gate(b) != 0) for b in lm.adapter.blocks(lm.model))
        if cfg.norm_topk_prob and zero_gate:
            return "ernie4_5-moe"
        if not cfg.norm_topk_prob and not zero_gate:
            return "qwen2moe"
        raise HaqmoeError("this Qwen2-MoE (top-k renormalised with a live shared-expert gate, or not renormalised "
                          "with an all-zero gate) has no matching llama.cpp graph")
    raise HaqmoeError(f"GGUF export supports llama, mixtral and qwen2_moe models, not '{kind}'")


def _shared_gate(block) -> torch.Tensor:
    gate = block.mlp.shared_expert_gate
    return gate.weight_float() if isinstance(gate, QuantLinear) else gate.weight.detach()


def _permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's half-split RoPE rows -> the interleaved pairs llama.cpp's NORM RoPE rotates."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Tensors:
    """Collects named GGUF tensors (Q8_0 or F32) and the requantization error, then writes them."""

    def __init__(self, writer, report: GgufReport):
        self.w, self.report = writer, report
        self.err2 = self.ref2 = 0.0

    def f32(self, name: str, t: torch.Tensor) -> None:
        self.w.add_tensor(name, t.detach().float().contiguous().numpy())
        self.report.f32_tensors += 1

    def q8_0(self, name: str, t: torch.Tensor) -> None:
        gguf = _gguf()
        t = t.detach().float().contiguous()
        if t.shape[-1] % Q8_BLOCK:
            self.report.f32_fallback.append(name)
            return self.f32(name, t)
        a = t.numpy()
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        back = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape)
        diff = back - a
        self.report.max_rel_error = max(self.report.max_rel_error,
                                        float(np.abs(diff).max() / max(float(np.abs(a).max()), 1e-12)))
        self.err2 += float(np.square(diff, dtype=np.float64).sum())
        self.ref2 += float(np.square(a, dtype=np.float64).sum())
        self.w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        self.report.q8_0_tensors += 1


def _float_weight(mod) -> torch.Tensor:
    return mod.weight_float() if hasattr(mod, "weight_float") else mod.weight.detach()


def _is_quantized(mod) -> bool:
    return isinstance(mod, (QuantLinear, QuantVocab, Int8Embedding))


def _collect(lm, arch: str, out: _Tensors) -> None:
    gguf = _gguf()
    model, cfg = lm.model, lm.model.config
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    n_layers = cfg.num_hidden_layers
    tmap = gguf.get_tensor_name_map(arch_enum, n_layers)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    permute = arch in ("llama", "ernie4_5-moe")  # NORM (interleaved) RoPE graphs
    routers = {f"{lm.adapter.layers}.{i}.{lm.adapter.moe.router}" for i in range(n_layers)} if lm.adapter.moe else set()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    done: set[str] = set()

    def gguf_name(hf: str, suffix: str) -> str:
        name = tmap.get_name(hf)
        if name is None:
            raise HaqmoeError(f"{hf}: no {arch} GGUF tensor for this module")
        return f"{name}.{suffix}"

    for name, mod in model.named_modules():
        if any(name.startswith(d + ".") for d in done):
            continue
        if isinstance(mod, QuantExperts):
            bid = int(re.search(r"\.(\d+)\.", name + ".").group(1))
            for kind, lins in (("FFN_GATE_EXP", mod.gate), ("FFN_UP_EXP", mod.up), ("FFN_DOWN_EXP", mod.down)):
                stacked = torch.stack([lin.weight_float() for lin in lins])
                out.q8_0(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]].format(bid=bid) + ".weight", stacked)
            done.add(name)
        elif name.endswith("shared_expert_gate"):
            if arch == "qwen2moe":  # [1, hidden] -> llama.cpp's {n_embd} vector
                out.f32(gguf_name(name, "weight"), _float_weight(mod).reshape(-1))
            done.add(name)  # ernie4_5-moe: the zero gate is the constant 1/2 folded into down_proj below
        elif isinstance(mod, (QuantLinear, QuantVocab, Int8Embedding, torch.nn.Linear, torch.nn.Embedding)):
            if name == "lm_head" and tied:
                done.add(name)
                continue
            w = _float_weight(mod).float()
            if permute and name.endswith("self_attn.q_proj"):
                w = _permute_rope(w, heads)
            elif permute and name.endswith("self_attn.k_proj"):
                w = _permute_rope(w, kv_heads)
            if arch == "ernie4_5-moe" and name.endswith("shared_expert.down_proj"):
                w = w * 0.5  # sigmoid(0): the shared expert's constant gate
            if _is_quantized(mod) and name not in routers:
                out.q8_0(gguf_name(name, "weight"), w)
            else:
                out.f32(gguf_name(name, "weight"), w)
            bias = getattr(mod, "bias", None)
            if bias is not None:
                b = bias.detach().float()
                if permute and name.endswith(("self_attn.q_proj", "self_attn.k_proj")):
                    b = _permute_rope(b, heads if name.endswith("q_proj") else kv_heads)
                out.f32(gguf_name(name, "bias"), b)
            done.add(name)
    for key, t in model.state_dict().items():  # norms and whatever the module walk did not write
        module, _, leaf = key.rpartition(".")
        if module in done or any(module.startswith(d + ".") for d in done):
            continue
        if not t.is_floating_point():
            raise HaqmoeError(f"{key}: no GGUF tensor written for it")
        out.f32(gguf_name(module, leaf), t)  # float in ours: norms, routers kept as parameters


def _write_hparams(w, lm, arch: str) -> None:
    gguf = _gguf()
    cfg = lm.model.config
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    w.add_name(lm.name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if cfg.model_type == "mixtral":
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    elif cfg.model_type == "qwen2_moe":
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        if arch == "ernie4_5-moe":
            w.add_interleave_moe_layer_step(1)
            w.add_leading_dense_block_count(0)


def _embedded_pre(tokens: list[str]) -> str | None:
    """The pre-tokenizer name of the embedded SmolLM2 GGUF, when ``tokens`` are its vocabulary."""
    try:
        from gguf import GGUFReader

        from ..models.embedded import smollm2_gguf

        fields = GGUFReader(str(smollm2_gguf())).fields
    except Exception:  # no embedded model installed: no name to copy
        return None
    theirs = fields.get("tokenizer.ggml.tokens")
    if theirs is None or len(theirs.data) != len(tokens) or theirs.contents() != tokens:
        return None
    pre = fields.get("tokenizer.ggml.pre")
    return pre.contents() if pre is not None else None


def _write_tokenizer(w, lm, source: Path) -> str:
    gguf = _gguf()
    n_vocab = lm.model.config.vocab_size
    tok = lm.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE":
        w.add_tokenizer_model("none")  # token ids only
        return "none"
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in tok.get_vocab().items():
        if i < n_vocab:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tok.added_tokens_decoder.items():
        if i < n_vocab:
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    pre = _embedded_pre(tokens)
    if pre:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(source, load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)
    if tok.chat_template and not (source / "tokenizer_config.json").is_file():
        w.add_chat_template(tok.chat_template)
    return "gpt2" + (f" ({pre})" if pre else "")


def export_gguf(source: str, out: str | Path, overwrite: bool = False) -> GgufReport:
    """Write ``source`` (a haqmoe quantized checkpoint) as one Q8_0 GGUF file ``out``."""
    from ..sources import load_model

    gguf = _gguf()
    src = Path(source)
    if not (src / "haqmoe_quant.json").is_file():
        raise HaqmoeError(f"{source} is not a haqmoe quantized checkpoint directory (run haqmoe quantize first)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise HaqmoeError(f"{out} exists (pass --overwrite to replace it)")
    lm = load_model(source, progress=False)
    arch = gguf_arch(lm)
    report = GgufReport(str(out), arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _write_hparams(writer, lm, arch)
        report.tokenizer = _write_tokenizer(writer, lm, src)
        tensors = _Tensors(writer, report)
        with torch.no_grad():
            _collect(lm, arch, tensors)
        if report.q8_0_tensors == 0:
            raise HaqmoeError(f"{source} has no quantized weights to write as Q8_0")
        report.rms_rel_error = (tensors.err2 / tensors.ref2) ** 0.5 if tensors.ref2 else 0.0
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    report.bytes = out.stat().st_size
    return report


def llama_cpp_logits(path: str | Path, ids: list[int], threads: int = 1) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for ``ids`` in one pass (llama-cpp-python)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=max(64, len(ids)), logits_all=True, verbose=False, n_threads=threads,
                          n_threads_batch=threads)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def verify_gguf(out: str | Path, source: str, ids: list[int] | None = None) -> dict | None:
    """Run the GGUF in llama.cpp and our checkpoint on the same tokens; None without llama-cpp-python.

    The two differ by more than the Q8_0 weight rounding: llama.cpp also quantizes activations, in
    blocks of 32 (we quantize them per token), so expect a few percent in the logits, not zero."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from ..sources import load_model

    lm = load_model(source, progress=False)
    vocab = lm.model.config.vocab_size
    ids = ids or [(37 * i + 11) % vocab for i in range(16)]
    theirs = torch.from_numpy(llama_cpp_logits(out, ids))
    with torch.no_grad():
        ours = lm.model(torch.tensor([ids])).logits[0].float()
    return {"llama_cpp": llama_cpp.__version__, "tokens": len(ids),
            "rel_logits_diff": float((theirs - ours).norm() / ours.norm()),
            "argmax_agree": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())}
