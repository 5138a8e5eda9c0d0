"""A tiny random Mixtral (or dense Llama) with SmolLM2's real tokenizer and chat template, for fast server tests and
load tests: the whole HTTP/chat-template/tokenizer path is exercised while a token costs ~ms."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..models.tiny import randomize_

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def tiny_chat_moe(out: str | Path, seed: int = 0, context: int = 512) -> Path:
    """Write (once) a 2-layer, 8-expert Mixtral with SmolLM2's 49152-token vocabulary to ``out``."""
    return tiny_chat_model(out, "mixtral", seed, context)


def tiny_chat_model(out: str | Path, family: str, seed: int = 0, context: int = 512) -> Path:
    """Write (once) a 2-layer ``family`` model (``mixtral``: 8 experts, or ``llama``) with SmolLM2's
    49152-token vocabulary to ``out``."""
    from ..models.embedded import DENSE, ensure_embedded

    out = Path(out)
    if (out / "model.safetensors").is_file():
        return out
    src = ensure_embedded(DENSE, progress=False)
    dense_cfg = AutoConfig.from_pretrained(src)
    experts = dict(num_local_experts=8, num_experts_per_tok=2) if family == "mixtral" else {}
    cfg = AutoConfig.for_model(family, vocab_size=dense_cfg.vocab_size, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=context, **experts,
                               tie_word_embeddings=False, bos_token_id=dense_cfg.bos_token_id,
                               eos_token_id=dense_cfg.eos_token_id)
    torch.manual_seed(seed)
    model = randomize_(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval())
    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    model.save_pretrained(out)
    return out
