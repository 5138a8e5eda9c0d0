"""The embedded SmolLM2: GGUF -> safetensors conversion round-trips, and the cached model is reused."""

from __future__ import annotations

import numpy as np
import torch

from haqmoe.models.embedded import DENSE, embedded_dir, smollm2_gguf


def test_gguf_to_safetensors_round_trip(smollm2):
    """Tensors of the converted checkpoint equal the GGUF file's own dequantized tensors
    (read with the gguf library, independent of transformers' loader)."""
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf()))
    tensors = {t.name: t for t in reader.tensors}
    sd = smollm2.model.state_dict()
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
        "blk.7.ffn_gate.weight": "model.layers.7.mlp.gate_proj.weight",
        "blk.3.attn_v.weight": "model.layers.3.self_attn.v_proj.weight",
        "blk.29.attn_norm.weight": "model.layers.29.input_layernorm.weight",
    }
    for gname, hname in pairs.items():
        t = tensors[gname]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(sd[hname].shape)
        np.testing.assert_allclose(sd[hname].numpy(), ref.astype(np.float32), rtol=0, atol=1e-6)
    assert (embedded_dir(DENSE) / "model.safetensors").is_file()  # cached, reused next time


def test_embedded_model_predicts_text(smollm2):
    """A real model, not noise: it continues a common phrase correctly."""
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = smollm2.model(ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode(nxt)
