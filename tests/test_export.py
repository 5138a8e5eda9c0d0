"""compressed-tensors export round trip: written by us, read back by the compressed-tensors library."""

from __future__ import annotations

import json

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.lazy import SafetensorsFolder
from haqmoe.models.tiny import tiny_model
from haqmoe.quant.checkpoint import save_quantized
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.rtn import quantize_rtn
from haqmoe.serve.export import ExportConfig, export_compressed_tensors, verify_export


class _Export:
    """The export's tensors, whichever shard holds them (one per block, then the rest)."""

    def __init__(self, out):
        self.folder = SafetensorsFolder.open(out)

    def keys(self):
        return set(self.folder.entries)

    def get_tensor(self, key):
        return self.folder.read(key)


def _quantized(tmp_path, family: str, w_sym: bool):
    m = tiny_model(family)
    cfg = QuantConfig.w8a8("rtn", w_sym=w_sym, a_sym=True)
    quantize_rtn(m, adapter_for(m), cfg, progress=False)
    return save_quantized(m, None, tmp_path / f"q-{family}", cfg), m


def test_mixtral_export_roundtrip_through_compressed_tensors(tmp_path):
    src, model = _quantized(tmp_path, "mixtral", w_sym=True)
    out = tmp_path / "ct"
    rep = export_compressed_tensors(str(src), out, ExportConfig(dtype="float32"))
    assert not rep.requantized and rep.quantized_linears == 2 * (4 + 8 * 3)

    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized"
    group = q["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert group["weights"]["symmetric"] is True and group["weights"]["type"] == "int"
    assert group["weights"]["strategy"] == "channel" and group["weights"]["num_bits"] == 8
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    assert {"lm_head", "model.layers.0.block_sparse_moe.gate"} <= set(q["ignore"])

    st = _Export(out)
    assert rep.shards == 3 and len({e.file for e in st.folder.entries.values()}) == 3  # blocks, then the rest
    keys = st.keys()
    w1 = st.get_tensor("model.layers.1.block_sparse_moe.experts.5.w1.weight")
    w2_scale = st.get_tensor("model.layers.1.block_sparse_moe.experts.5.w2.weight_scale")
    # vLLM's Mixtral loader names: per-expert w1 (gate) / w3 (up) / w2 (down), float router.
    experts = model.model.layers[1].mlp.experts
    assert w1.dtype == torch.int8 and torch.equal(w1, experts.gate[5].qweight)
    assert torch.equal(w2_scale, experts.down[5].w_scale.reshape(-1, 1))
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(k.endswith("zero_point") for k in keys)
    assert not any(".mlp." in k for k in keys)

    v = verify_export(out, str(src))
    assert v.tensors_compared == len([k for k in keys if not k.endswith("weight_scale")])
    assert v.quantized_compared == rep.quantized_linears and v.max_weight_diff == 0.0
    assert len(v.layers_run) == rep.quantized_linears
    assert v.max_weight_output_rel_diff < 1e-5
    assert v.max_output_rel_diff < 0.03  # library QDQ rounds with amax/127.5, we (and vLLM) with amax/127


def test_asymmetric_weights_refused_or_requantized(tmp_path):
    src, _ = _quantized(tmp_path, "qwen2_moe", w_sym=False)
    with pytest.raises(HaqmoeError, match="asymmetric"):
        export_compressed_tensors(str(src), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "ct"
    rep = export_compressed_tensors(str(src), out, ExportConfig(requantize=True))
    assert rep.requantized and 0 < rep.max_requant_error < 0.01
    st = _Export(out)
    assert st.get_tensor("model.layers.0.mlp.experts.3.gate_proj.weight").dtype == torch.int8
    assert st.get_tensor("model.layers.0.mlp.gate.weight").dtype == torch.bfloat16
    v = verify_export(out, str(src), layers=1)
    assert v.max_weight_diff < 0.01 and v.max_output_rel_diff < 0.05


def test_export_cli_rejects_float_checkpoint(tmp_path):
    from haqmoe.cli.main import main

    m = tiny_model("mixtral")
    m.save_pretrained(tmp_path / "float")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tmp_path / "float"), "--out", str(tmp_path / "ct")])
    assert exc.value.code == 2


def test_int8_vocab_is_exported_in_float(tmp_path):
    """An lm_head stored as int8 rows (tied embedding included) goes to vLLM dequantized, ignored."""
    from haqmoe.quant.modules import quantize_vocabulary

    m = tiny_model("llama")
    m.lm_head.weight = m.model.embed_tokens.weight
    m.config.tie_word_embeddings = True
    cfg = QuantConfig.w8a8("rtn", w_sym=True, a_sym=True)
    quantize_rtn(m, adapter_for(m), cfg, progress=False)
    vocab = quantize_vocabulary(m)
    src = save_quantized(m, None, tmp_path / "q", cfg)
    out = tmp_path / "ct"
    export_compressed_tensors(str(src), out, ExportConfig(dtype="float32"))
    st = _Export(out)
    assert "lm_head.weight" not in st.keys()  # tied: vLLM reads the embedding
    emb = st.get_tensor("model.embed_tokens.weight")
    assert torch.equal(emb, vocab.q.float() * vocab.scale)
    assert "lm_head" in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert verify_export(out, str(src)).max_weight_diff == 0.0


def test_deepseek_v2_export_roundtrip(tmp_path):
    """DeepSeek-V2: per-expert mlp.experts.E.gate_proj/up_proj/down_proj (vLLM's DeepSeek loader names),
    shared experts and the dense first block as plain linears, the router float."""
    src, model = _quantized(tmp_path, "deepseek_v2", w_sym=True)
    out = tmp_path / "ct"
    rep = export_compressed_tensors(str(src), out, ExportConfig(dtype="float32"))
    # per block 4 attention linears (q, kv_a, kv_b, o); block 0 a dense MLP, blocks 1-2 shared MLP + 8 experts
    assert rep.quantized_linears == 3 * 4 + 3 + 2 * (3 + 8 * 3)
    st = _Export(out)
    gate = st.get_tensor("model.layers.2.mlp.experts.5.gate_proj.weight")
    assert torch.equal(gate, model.model.layers[2].mlp.experts.gate[5].qweight)
    assert st.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    v = verify_export(out, str(src))
    assert v.max_weight_diff == 0.0 and v.max_weight_output_rel_diff < 1e-5


def test_gpt_oss_export_is_refused(tmp_path):
    """vLLM reads gpt-oss's experts fused (MXFP4 or bf16): no per-expert int8 layout to write them in."""
    src, _ = _quantized(tmp_path, "gpt_oss", w_sym=True)
    with pytest.raises(HaqmoeError, match="ClampedSwiGLU, biased.*export is not supported"):
        export_compressed_tensors(str(src), tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
