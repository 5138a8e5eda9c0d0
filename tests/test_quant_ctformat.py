"""Peers' compressed-tensors checkpoints load into our QuantLinear and evaluate like our own."""

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.tiny import tiny_model
from haqmoe.quant.checkpoint import save_quantized
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.ctformat import load_compressed_tensors
from haqmoe.quant.methods import quantize_with
from haqmoe.quant.modules import QuantLinear


def _ct_checkpoint(tmp_path, family: str = "llama"):
    """Our RTN model (symmetric, as vLLM takes it) exported as a compressed-tensors checkpoint."""
    from haqmoe.serve.export import ExportConfig, export_compressed_tensors

    model = tiny_model(family)
    cfg = QuantConfig.w8a8("rtn", w_sym=True, a_sym=True)
    quantize_with(model, adapter_for(model), "rtn", cfg, None, progress=False)
    save_quantized(model, None, tmp_path / "ours", cfg)
    export_compressed_tensors(str(tmp_path / "ours"), tmp_path / "ct", ExportConfig(dtype="float32"))
    _single_file(tmp_path / "ct")
    return model, tmp_path / "ct"


def _single_file(ct) -> None:
    """Merge the export's shards (one per block) into one model.safetensors, the layout the tests edit
    (a peer's small checkpoint has one file too)."""
    from safetensors.torch import load_file, save_file

    shards = sorted(ct.glob("model-*.safetensors"))
    tensors = {k: v for f in shards for k, v in load_file(str(f)).items()}
    save_file(tensors, str(ct / "model.safetensors"), metadata={"format": "pt"})
    for f in shards:
        f.unlink()
    (ct / "model.safetensors.index.json").unlink()
    (ct / "manifest.json").unlink(missing_ok=True)


def _rename_tensors(ct, rename) -> None:
    """Rewrite the export's tensor names (``rename`` returns None to drop a tensor)."""
    from safetensors.torch import load_file, save_file

    f = ct / "model.safetensors"
    renamed = {rename(k): v for k, v in load_file(str(f)).items()}
    save_file({k: v for k, v in renamed.items() if k is not None}, str(f), metadata={"format": "pt"})


def _same_logits(a, b, rows: int = 2):
    ids = torch.randint(0, 128, (rows, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-4, atol=1e-4)


def test_compressed_tensors_checkpoint_matches_ours(tmp_path):
    model, ct = _ct_checkpoint(tmp_path)
    peer = load_compressed_tensors(ct).model
    assert sum(isinstance(m, QuantLinear) for m in peer.modules()) == 14
    _same_logits(peer, model)


@pytest.mark.parametrize("names", ["vllm", "llmcompressor"])
def test_moe_checkpoint_with_per_expert_linears_matches_ours(tmp_path, names: str):
    """Unfused per-expert Linears (vLLM's w1/w3/w2 as our export writes them, or llm-compressor's
    block_sparse_moe.experts.E.gate_proj/up_proj/down_proj) load into one QuantExperts per layer."""
    import re

    from haqmoe.quant.modules import QuantExperts

    model, ct = _ct_checkpoint(tmp_path, "mixtral")
    if names == "llmcompressor":
        kinds = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
        _rename_tensors(ct, lambda k: re.sub(r"\.experts\.(\d+)\.(w[123])\.", lambda m: f".experts.{m[1]}."
                                             f"{kinds[m[2]]}.", k))
    peer = load_compressed_tensors(ct).model
    assert sum(isinstance(m, QuantExperts) for m in peer.modules()) == 2
    _same_logits(peer, model)


def test_partly_quantized_or_foreign_moe_names_are_clear_errors(tmp_path):
    _, ct = _ct_checkpoint(tmp_path, "mixtral")
    _rename_tensors(ct, lambda k: k.replace("self_attn.q_proj", "self_attn.query"))
    with pytest.raises(HaqmoeError, match="does not have"):
        load_compressed_tensors(ct)
    _rename_tensors(ct, lambda k: None if k.endswith("experts.7.w2.weight_scale") else
                    k.replace("self_attn.query", "self_attn.q_proj"))
    with pytest.raises(HaqmoeError, match="not quantized"):
        load_compressed_tensors(ct)


def test_named_peer_row_and_load_model_use_our_reader(tmp_path):
    """``NAME=ct:DIR`` rows, the peer's recorded quantization time, and ``load_model`` (so ``haqmoe
    eval DIR``) going through our reader rather than transformers' own compressed-tensors path."""
    from haqmoe.sources import load_model
    from haqmoe.studies.compare import external_quant_seconds, parse_label
    from haqmoe.quant.methods import MethodOptions

    model, ct = _ct_checkpoint(tmp_path)
    (ct / "peer_meta.json").write_text('{"quant_seconds": 12.5}')
    spec = parse_label(f"llmcompressor=ct:{ct}", MethodOptions())
    assert (spec.label, spec.method, spec.path) == ("llmcompressor", "external", str(ct))
    assert external_quant_seconds(spec.path) == 12.5 and external_quant_seconds(str(tmp_path)) == 0.0
    lm = load_model(str(ct), progress=False)
    assert lm.quant["quant"]["method"] == "compressed-tensors"
    assert sum(isinstance(m, QuantLinear) for m in lm.model.modules()) == 14
    _same_logits(lm.model, model, rows=1)


def test_not_a_compressed_tensors_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "fp")
    with pytest.raises(HaqmoeError, match="not a compressed-tensors checkpoint"):
        load_compressed_tensors(tmp_path / "fp")


def test_per_tensor_weight_scales_read_as_equal_per_channel_scales(tmp_path):
    """A peer checkpoint with one weight scale per tensor (strategy "tensor") is the same function as
    per-channel scales that are all equal: both layouts, written from the same integers, give one model."""
    import json

    from safetensors.torch import load_file, save_file

    _, ct = _ct_checkpoint(tmp_path)
    tensors = load_file(str(ct / "model.safetensors"))
    for name in [k for k in tensors if k.endswith(".weight_scale")]:
        base = name.removesuffix("_scale")
        w = tensors[base].float() * tensors[name].float()  # symmetric: zero point 0
        s = w.abs().max() / 127
        tensors[base] = torch.round(w / s).clamp(-127, 127).to(torch.int8)
        tensors[name] = s.reshape(1)
    layouts = {}
    for layout in ("tensor", "channel"):
        out = tmp_path / layout
        out.mkdir()
        for f in ct.iterdir():
            if f.name != "model.safetensors":
                (out / f.name).write_bytes(f.read_bytes())
        cfg = json.loads((ct / "config.json").read_text())
        for group in cfg["quantization_config"]["config_groups"].values():
            group["weights"]["strategy"] = layout
        (out / "config.json").write_text(json.dumps(cfg))
        rows = {k: (v.expand(tensors[k.removesuffix("_scale")].shape[0], 1).contiguous()
                    if layout == "channel" and k.endswith(".weight_scale") else v) for k, v in tensors.items()}
        save_file(rows, str(out / "model.safetensors"), metadata={"format": "pt"})
        layouts[layout] = load_compressed_tensors(out).model
    _same_logits(layouts["tensor"], layouts["channel"])


def test_deepseek_v2_export_loads_back_as_ours(tmp_path):
    """Our DeepSeek-V2 export (per-expert gate_proj/up_proj/down_proj) read back: one QuantExperts per MoE
    layer, the same logits."""
    from haqmoe.quant.modules import QuantExperts

    model, ct = _ct_checkpoint(tmp_path, "deepseek_v2")
    peer = load_compressed_tensors(ct).model
    assert sum(isinstance(m, QuantExperts) for m in peer.modules()) == 2
    _same_logits(peer, model)
