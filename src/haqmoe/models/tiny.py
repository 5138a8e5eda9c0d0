"""Tiny random-weight configs of every supported architecture: fixtures for exactness tests.

Distinct random experts matter here: an upcycled model's experts are identical copies, which
hides bugs in expert indexing. Sizes are small enough that a forward pass takes milliseconds.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, tie_word_embeddings=False)
_ATTN = dict(num_key_value_heads=2, intermediate_size=96, rms_norm_eps=1e-6)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", **_COMMON, **_ATTN),
    "opt": dict(model_type="opt", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, ffn_dim=96, max_position_embeddings=256,
                word_embed_proj_dim=64, do_layer_norm_before=True, tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", **_COMMON, **_ATTN, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", **_COMMON, **_ATTN, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=48, shared_expert_intermediate_size=96, norm_topk_prob=False,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(model_type="qwen3_moe", **_COMMON, **_ATTN, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=48, norm_topk_prob=True, head_dim=16,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe": dict(model_type="olmoe", **_COMMON, **_ATTN, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(model_type="deepseek_v3", **_COMMON, **{**_ATTN, "num_key_value_heads": 4},  # MLA: k per head
                        n_routed_experts=8,
                        num_experts_per_tok=2, moe_intermediate_size=48, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        norm_topk_prob=True, routed_scaling_factor=1.0),
    # DeepSeek-V2-Lite's shape: no q_lora (q_proj), dense first block, two shared experts; three
    # layers so that two are MoE.
    "deepseek_v2": dict(model_type="deepseek_v2", **{**_COMMON, "num_hidden_layers": 3},
                        **{**_ATTN, "num_key_value_heads": 4}, n_routed_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=48, n_shared_experts=2, first_k_dense_replace=1,
                        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0),
    # gpt-oss: biased attention with sinks, alternating sliding/full attention (a window shorter than
    # the test prompts), biased router and experts; swiglu_limit low enough that the clamps bite.
    "gpt_oss": dict(model_type="gpt_oss", **_COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=48,
                    rms_norm_eps=1e-6, num_local_experts=8, num_experts_per_tok=2, sliding_window=8,
                    swiglu_limit=1.5,
                    rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                                         beta_slow=1.0, truncate=False, original_max_position_embeddings=64)),
}


def tiny_config(family: str, layers: int | None = None):
    kw = dict(TINY_CONFIGS[family])
    if layers is not None:  # before the config derives per-layer lists (layer_types) from it
        kw["num_hidden_layers"] = layers
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(family: str, seed: int = 0, layers: int | None = None) -> PreTrainedModel:
    """A tiny random model in eval mode, fp32, with distinct experts and non-trivial norms."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, layers)
    cfg._attn_implementation = "eager"
    return randomize_(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval())


@torch.no_grad()
def randomize_(model: PreTrainedModel) -> PreTrainedModel:
    """Random weights with distinct experts and norms away from 1 (so folding bugs show), in place."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, 0.08)
        elif name.endswith("weight"):
            p.uniform_(0.5, 1.5)
        else:
            p.normal_(0, 0.02)
    return model


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer whose ids fit the tiny vocabulary (128): tiny checkpoints that
    read text (calibration, eval) without any download."""
    chars = sorted(set(string.printable))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars[:120])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
