"""Execution modes of a quantized model: same outputs, less memory, auto picks by measurement."""

from __future__ import annotations

import copy

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.tiny import tiny_model
from haqmoe.quant.config import QuantConfig
from haqmoe.exec.int8 import DequantExperts, DequantLinear, Int8Experts, Int8Linear
from haqmoe.quant.modules import QuantExperts, QuantLinear
from haqmoe.exec.precision import AutoConfig, convert, normalize_mode, weight_bytes
from haqmoe.quant.rtn import quantize_rtn

FAST_AUTO = AutoConfig(tokens=(1, 16), reps=3, warmup=1)


def _quantized(family: str, cfg: QuantConfig | None = None):
    model = tiny_model(family)
    quantize_rtn(model, adapter_for(model), cfg or QuantConfig.w8a8("rtn"), progress=False)
    return model


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe", "deepseek_v2", "gpt_oss"])
@pytest.mark.parametrize("mode", ["dequant", "int8", "auto"])
def test_modes_match_fake_quant(family: str, mode: str):
    model = _quantized(family)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        conv = copy.deepcopy(model)
        report = convert(conv, mode, FAST_AUTO)
        out = conv(ids).logits
    assert not any(isinstance(m, (QuantLinear, QuantExperts)) for m in conv.modules())
    assert sum(report.counts.values()) > 0 and not report.fallbacks
    # an activation integer can flip at a rounding boundary after fp32-vs-int32 differences upstream,
    # so compare in norm: a real indexing or correction bug gives errors of order 1
    assert float((out - ref).norm() / ref.norm()) < 2e-3


def test_int8_mode_holds_less_memory_than_dequant():
    model = _quantized("mixtral")
    int8, deq = copy.deepcopy(model), copy.deepcopy(model)
    convert(int8, "int8")
    convert(deq, "dequant")
    assert any(isinstance(m, Int8Experts) for m in int8.modules())
    assert any(isinstance(m, DequantExperts) for m in deq.modules())
    quant_int8 = sum(b.numel() * b.element_size() for m in int8.modules() if isinstance(m, (Int8Linear, Int8Experts))
                     for b in m.buffers())
    quant_fp = sum(b.numel() * b.element_size() for m in deq.modules() if isinstance(m, (DequantLinear, DequantExperts))
                   for b in m.buffers())
    assert quant_int8 < 0.3 * quant_fp
    assert weight_bytes(int8) < weight_bytes(deq)


def test_per_group_weights_fall_back_to_dequant():
    model = _quantized("llama", QuantConfig.w8a8("rtn", group_size=32))
    report = convert(model, "int8")
    assert report.fallbacks and report.counts == {"dequant": len(report.fallbacks)}
    assert "kept a slower exact path" in report.summary()
    assert all(not isinstance(m, Int8Linear) for m in model.modules())


@pytest.mark.parametrize("acts", [dict(a_dynamic=False), dict(a_bits=6)], ids=["static", "a6"])
@pytest.mark.parametrize("mode", ["dequant", "int8", "auto"])
def test_experts_the_executors_cannot_take_stay_fake_quant(acts: dict, mode: str):
    """Static or sub-8-bit activations: the converted experts quantize per token in 8 bits, a different
    function, so such experts keep their fake-quant module (conversion used to raise for the whole model)."""
    model = _quantized("mixtral", QuantConfig.w8a8("rtn", **acts))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        report = convert(model, mode, FAST_AUTO)
        out = model(ids).logits
    experts = [n for n, m in model.named_modules() if isinstance(m, QuantExperts)]
    assert experts and set(experts) <= set(report.fallbacks) and report.counts["fake"] == len(experts)
    assert float((out - ref).norm() / ref.norm()) < 2e-3


def test_auto_records_its_measurements():
    model = _quantized("mixtral")
    report = convert(model, "auto", FAST_AUTO)
    assert {c.kind for c in report.choices} == {"linear", "experts"}
    for c in report.choices:
        assert c.mode in ("int8", "dequant") and set(c.int8_us) == set(c.dequant_us) == {1, 16}
        assert all(v > 0 for v in c.int8_us.values())


def test_mode_names():
    assert normalize_mode("real") == "int8" and normalize_mode("fake") == "fake"
    with pytest.raises(HaqmoeError):
        normalize_mode("int4")
    model = _quantized("llama")
    assert convert(model, "fake").counts == {"fake": 14}
    assert any(isinstance(m, QuantLinear) for m in model.modules())


@pytest.mark.parametrize("tied", [True, False])
def test_int8_lm_head_matches_its_fake_quant_reference(tied: bool):
    """lm_head on the int8 GEMM with two-level activations is ~exact against its int8 weights (one
    level would not be); a tied embedding reads the same int8 rows, and the model gets smaller."""
    from haqmoe.quant.modules import Int8Embedding, quantize_vocab
    from haqmoe.quant.quantizer import fake_quant

    model = _quantized("llama")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    plain, conv = copy.deepcopy(model), copy.deepcopy(model)
    convert(plain, "int8")
    report = convert(conv, "int8", int8_lm_head=True)
    assert report.counts["int8-lm-head"] == 1 and isinstance(conv.lm_head, Int8Linear)
    assert isinstance(conv.model.embed_tokens, Int8Embedding) == tied
    q, s = quantize_vocab(model.lm_head.weight)
    assert (q.float() * s - model.lm_head.weight).abs().le(s / 2 + 1e-7).all()  # RTN: within half a step
    h = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * 3
    a_spec = next(m for m in model.modules() if isinstance(m, QuantLinear)).a_spec
    with torch.no_grad():
        exact = h @ (q.float() * s).T  # int8 weights, unquantized activations
        one_level = (fake_quant(h, a_spec) @ (q.float() * s).T - exact).abs().max()
        two_level = (conv.lm_head(h) - exact).abs().max()
        assert two_level < one_level / 50  # the residual level removes the activation error
        ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
        if tied:
            torch.testing.assert_close(conv.model.embed_tokens(ids), (q.float() * s)[ids])
        assert conv(ids).logits.shape == model(ids).logits.shape
    v, h_dim = model.lm_head.weight.shape  # fp32 [V, H] -> int8 [V, H] + scale and column sums [V]
    assert weight_bytes(plain) - weight_bytes(conv) == 4 * v * h_dim - (v * h_dim + 4 * v + 4 * v)


def test_int8_lm_head_of_a_weight_only_model_stays_weight_only():
    """No 8-bit activation recipe to run the vocabulary GEMM with: it falls back, reported, not a crash."""
    from haqmoe.quant.modules import QuantVocab, quantize_vocabulary

    model = _quantized("llama", QuantConfig(method="rtn", acts=None))
    quantize_vocabulary(model)
    ref = copy.deepcopy(model)
    report = convert(model, "int8")
    assert "lm_head" in report.fallbacks and isinstance(model.lm_head, QuantVocab)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def _tied(model):
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_int8_vocab_checkpoint_is_exact_and_smaller(tied: bool, tmp_path):
    """A checkpoint storing lm_head as int8 rows loads bit-exact (tied rows stay ONE tensor), is
    smaller by the fp32 vocabulary, and its int8 execution is the runtime --int8-lm-head path."""
    from haqmoe.quant.checkpoint import load_quantized, save_quantized
    from haqmoe.exec.int8 import ResidualInt8Linear
    from haqmoe.quant.modules import Int8Embedding, QuantVocab, quantize_vocabulary

    base = _quantized("llama")
    if tied:
        _tied(base)
    model = copy.deepcopy(base)
    vocab = quantize_vocabulary(model)
    assert isinstance(model.lm_head, QuantVocab)
    assert isinstance(model.model.embed_tokens, Int8Embedding) == tied
    cfg = QuantConfig.w8a8("rtn")
    save_quantized(base, None, tmp_path / "float", cfg)
    save_quantized(model, None, tmp_path / "int8", cfg)
    loaded = load_quantized(tmp_path / "int8").model
    loaded.set_attn_implementation("eager")  # as the tiny model: W8A8 outputs amplify kernel rounding
    if tied:
        assert loaded.model.embed_tokens.q is loaded.lm_head.q
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(3))
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fake = model(ids).logits
        assert torch.equal(loaded(ids).logits, fake)
        w = vocab.q.float() * vocab.scale  # fake-quant = float activations x the int8 rows
        torch.testing.assert_close(model.lm_head(h), h @ w.T)
        runtime = copy.deepcopy(base)
        convert(runtime, "int8", int8_lm_head=True)
        report = convert(loaded, "int8")
        assert report.counts["int8-lm-head"] == 1 and isinstance(loaded.lm_head, ResidualInt8Linear)
        assert torch.equal(loaded.lm_head(h), runtime.lm_head(h))  # same rows, same GEMM
        tokens = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(5))
        whole = loaded.lm_head(tokens)
        loaded.lm_head.ROWS = 3  # long inputs run in row chunks: the same integers, the same floats
        assert torch.equal(loaded.lm_head(tokens), whole)
        assert (loaded.lm_head(h) - h @ w.T).abs().max() < 1e-3 * (h @ w.T).abs().max()
        assert (loaded(ids).logits - fake).abs().max() < 0.05 * fake.abs().max()
    v, hd = vocab.q.shape
    size = {k: (tmp_path / k / "rest.safetensors").stat().st_size for k in ("float", "int8")}
    saved = 4 * v * hd - (v * hd + 4 * v)  # fp32 matrix -> int8 rows + per-row scales
    assert abs(size["float"] - size["int8"] - saved) < 4096  # safetensors header differences only
