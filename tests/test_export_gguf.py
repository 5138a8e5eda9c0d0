"""GGUF export: Q8_0 files written from our checkpoints, read back by gguf, llama.cpp and transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.moefy import MoefyConfig, moefy
from haqmoe.models.tiny import TINY_CONFIGS, randomize_, tiny_model
from haqmoe.quant.checkpoint import save_quantized
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.modules import QuantLinear
from haqmoe.quant.rtn import quantize_rtn
from haqmoe.serve import gguf_export
from haqmoe.serve.gguf_export import export_gguf, llama_cpp_logits, verify_gguf
from haqmoe.sources import load_model

IDS = [3, 17, 42, 5, 99, 12, 7, 64, 1, 88, 23, 50]


def _moefied_tiny():
    """A MoEfied tiny Llama (Qwen2-MoE, renormalised top-2 of 4, 4 shared slices behind an all-zero
    gate), 32 neurons per expert so every weight fits Q8_0 blocks."""
    torch.manual_seed(0)
    kw = {k: v for k, v in TINY_CONFIGS["llama"].items() if k != "model_type"} | {"intermediate_size": 256}
    dense = randomize_(AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw), dtype=torch.float32))
    moe, _ = moefy(dense.eval(), torch.randint(0, 128, (4, 64)),
                   MoefyConfig(experts=4, top_k=2, shared=4, calib_samples=4, calib_len=64), progress=False)
    return moe


def _quantized(tmp_path, family: str):
    m = _moefied_tiny() if family == "moefied" else tiny_model(family)
    cfg = QuantConfig.w8a8("rtn")
    quantize_rtn(m, adapter_for(m), cfg, progress=False)
    return save_quantized(m, None, tmp_path / f"q-{family}", cfg)


def _weight_only_logits(src, ids) -> torch.Tensor:
    """Our checkpoint's logits with its int8 weights dequantized and activations left in float: what
    a Q8_0 file of the same weights should reproduce up to Q8_0's own rounding."""
    lm = load_model(str(src), progress=False)
    for m in lm.model.modules():
        if isinstance(m, QuantLinear):
            m.a_spec = None
    with torch.no_grad():
        return lm.model(torch.tensor([ids])).logits[0]


def _rel(a, b) -> float:
    return float((torch.as_tensor(a) - b).norm() / b.norm())


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("mixtral", "llama"), ("moefied", "ernie4_5-moe")])
def test_gguf_tensors_and_q8_0_error(tmp_path, family, arch):
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    src = _quantized(tmp_path, family)
    rep = export_gguf(str(src), tmp_path / "m.gguf")
    assert rep.arch == arch and rep.tokenizer == "none" and not rep.f32_fallback
    assert 0 < rep.rms_rel_error < 0.01 and rep.max_rel_error < 0.01  # Q8_0 re-rounding of our int8 weights
    r = GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["general.architecture"].contents() == arch
    t = {x.name: x for x in r.tensors}
    assert t["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    lm = load_model(str(src), progress=False)
    down = t["blk.1.ffn_down.weight" if family == "llama" else "blk.1.ffn_down_exps.weight"]
    assert down.tensor_type == GGMLQuantizationType.Q8_0
    got = torch.from_numpy(dequantize(down.data, down.tensor_type)).reshape(*reversed(down.shape.tolist()))
    if family == "llama":
        ours = lm.model.model.layers[1].mlp.down_proj.weight_float()
    else:  # experts stacked [experts, out, in]
        experts = lm.model.model.layers[1].mlp.experts
        ours = torch.stack([lin.weight_float() for lin in experts.down])
        assert t["blk.1.ffn_gate_inp.weight"].tensor_type == GGMLQuantizationType.F32  # router stays float
    assert got.shape == ours.shape
    assert float((got - ours).abs().max()) <= float(ours.abs().max()) / 127  # within one Q8_0 step
    if family == "moefied":  # ungated shared expert carrying sigmoid(0) = 1/2
        assert "blk.0.ffn_gate_inp_shexp.weight" not in t
        sh = t["blk.0.ffn_down_shexp.weight"]
        sh_w = torch.from_numpy(dequantize(sh.data, sh.tensor_type)).reshape(*reversed(sh.shape.tolist()))
        ours_sh = lm.model.model.layers[0].mlp.shared_expert.down_proj.weight_float() * 0.5
        assert float((sh_w - ours_sh).abs().max()) <= float(ours_sh.abs().max()) / 127


@pytest.mark.parametrize("family", ["llama", "mixtral", "moefied"])
def test_gguf_runs_in_llama_cpp_like_ours(tmp_path, family):
    pytest.importorskip("llama_cpp")
    src = _quantized(tmp_path, family)
    export_gguf(str(src), tmp_path / "m.gguf")
    theirs = torch.from_numpy(llama_cpp_logits(tmp_path / "m.gguf", IDS))
    ours = _weight_only_logits(src, IDS)
    assert _rel(theirs, ours) < 0.03  # Q8_0 weights + llama.cpp's Q8_0 activation blocks, nothing else
    assert float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()) >= 0.75  # random logits: near ties
    v = verify_gguf(tmp_path / "m.gguf", str(src), IDS)  # against our W8A8 forward (activations int8 per token)
    assert v["rel_logits_diff"] < 0.06 and v["argmax_agree"] >= 0.75


def test_gguf_rope_layout_is_what_llama_cpp_reads(tmp_path, monkeypatch):
    """The Q/K permutation is what makes the logits agree: without it they are far apart."""
    pytest.importorskip("llama_cpp")
    src = _quantized(tmp_path, "llama")
    monkeypatch.setattr(gguf_export, "_permute_rope", lambda w, heads: w)
    export_gguf(str(src), tmp_path / "unpermuted.gguf")
    theirs = torch.from_numpy(llama_cpp_logits(tmp_path / "unpermuted.gguf", IDS))
    assert _rel(theirs, _weight_only_logits(src, IDS)) > 0.1


def test_gguf_refusals(tmp_path):
    src = _quantized(tmp_path, "llama")
    export_gguf(str(src), tmp_path / "m.gguf")
    with pytest.raises(HaqmoeError, match="exists"):
        export_gguf(str(src), tmp_path / "m.gguf")
    with pytest.raises(HaqmoeError, match="not a haqmoe quantized"):
        export_gguf(str(tmp_path), tmp_path / "x.gguf")
    m = tiny_model("qwen3_moe")
    cfg = QuantConfig.w8a8("rtn")
    quantize_rtn(m, adapter_for(m), cfg, progress=False)
    with pytest.raises(HaqmoeError, match="qwen3_moe"):
        export_gguf(str(save_quantized(m, None, tmp_path / "q3", cfg)), tmp_path / "q3.gguf")
    assert not (tmp_path / "q3.gguf").exists() and not (tmp_path / "q3.gguf.partial").exists()


@pytest.mark.slow
def test_smollm2_gguf_greedy_and_transformers_reader(tmp_path):
    """The embedded SmolLM2, RTN W8A8: llama.cpp's greedy tokens equal ours (int8 weights dequantized,
    float activations), its tokenizer is the same, and transformers' GGUF reader loads the file back."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lm = load_model("smollm2-135m", progress=False)
    cfg = QuantConfig.w8a8("rtn")
    quantize_rtn(lm.model, lm.adapter, cfg, progress=False)
    src = save_quantized(lm.model, lm.tokenizer, tmp_path / "q", cfg)
    rep = export_gguf(str(src), tmp_path / "smollm2.gguf")
    assert rep.arch == "llama" and rep.tokenizer == "gpt2 (smollm)" and rep.q8_0_tensors == 30 * 7
    text = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest"
    ids = lm.tokenizer(text)["input_ids"]
    llm = llama_cpp.Llama(str(tmp_path / "smollm2.gguf"), n_ctx=128, verbose=False, n_threads=2)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    theirs = []
    for t in llm.generate(ids, top_k=1, temp=0.0):
        theirs.append(t)
        if len(theirs) == 12:
            break
    llm.close()
    ours = _weight_only_logits(src, ids)
    lm = load_model(str(src), progress=False)
    for m in lm.model.modules():
        if isinstance(m, QuantLinear):
            m.a_spec = None
    with torch.no_grad():
        greedy = lm.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert theirs == greedy
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="smollm2.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        back = hf(torch.tensor([ids])).logits[0]
    assert _rel(back, ours) < 0.06  # the Q8_0 re-rounding alone (rms 0.5 % per weight, 30 layers)
    assert np.array_equal(back.argmax(-1).numpy()[-4:], ours.argmax(-1).numpy()[-4:])


def test_cli_export_gguf(tmp_path, capsys):
    import json

    from haqmoe.cli.main import main

    src = _quantized(tmp_path, "mixtral")
    with pytest.raises(SystemExit) as exc:
        main(["--quiet", "export", str(src), "--format", "gguf", "--out", str(tmp_path / "out"), "--json",
              "--no-verify"])
        raise SystemExit(0)
    assert exc.value.code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["arch"] == "llama" and payload["q8_0_tensors"] > 0
    assert (tmp_path / "out" / "q-mixtral.Q8_0.gguf").is_file()  # a directory --out gets MODEL.Q8_0.gguf
    with pytest.raises(SystemExit) as exc:  # an existing file needs --overwrite
        main(["--quiet", "export", str(src), "--format", "gguf", "--out", payload["out"], "--no-verify"])
    assert exc.value.code != 0
