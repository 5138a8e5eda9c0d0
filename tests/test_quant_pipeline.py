"""The calibrated pipeline: every method on tiny models, exact checkpoints, clear errors."""

import warnings

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.tiny import tiny_model
from haqmoe.quant.checkpoint import load_quantized, save_quantized
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.methods import METHODS, MethodOptions, quantize_with
from haqmoe.quant.modules import QuantExperts, QuantLinear
from haqmoe.quant.quantizer import QuantSpec


pytestmark = pytest.mark.usefixtures("one_thread")


OPTS = MethodOptions(batch_size=4, search_tokens=256, grid=5, min_expert_tokens=8)
CALIB = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))


def _assert_same(loaded, model, ref):
    """Every tensor bit-identical; outputs equal up to the attention kernel (eager vs sdpa)."""
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def _quantized(family, method, cfg=None, opts=OPTS):
    model = tiny_model(family)
    cfg = cfg or QuantConfig.w8a8(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = quantize_with(model, adapter_for(model), method, cfg, CALIB, opts, progress=False)
    return model, cfg, report


@pytest.mark.parametrize("method", METHODS)
def test_save_load_exact_each_method(method, tmp_path):
    model, cfg, _ = _quantized("mixtral", method)
    assert any(isinstance(m, QuantExperts) for m in model.modules())
    with torch.no_grad():
        ref = model(IDS).logits
    save_quantized(model, None, tmp_path / "ck", cfg)
    _assert_same(load_quantized(tmp_path / "ck").model, model, ref)


def test_static_activations_and_groups_round_trip(tmp_path):
    cfg = QuantConfig.w8a8("haq", w_bits=6, a_dynamic=False, group_size=16)
    model, cfg, _ = _quantized("llama", "haq", cfg)
    lin = next(m for m in model.modules() if isinstance(m, QuantLinear))
    assert float(lin.a_scale) != 1.0  # calibrated, not the placeholder
    with torch.no_grad():
        ref = model(IDS).logits
    save_quantized(model, None, tmp_path / "ck", cfg)
    _assert_same(load_quantized(tmp_path / "ck").model, model, ref)


def test_pipeline_is_deterministic():
    a, _, ra = _quantized("qwen2_moe", "haq")
    b, _, rb = _quantized("qwen2_moe", "haq")
    with torch.no_grad():
        assert torch.equal(a(IDS).logits, b(IDS).logits)
    assert ra.groups == rb.groups


def test_haq_close_to_fp_on_llama():
    fp = tiny_model("llama")
    model, _, report = _quantized("llama", "haq")
    with torch.no_grad():
        ref, out = fp(IDS).logits, model(IDS).logits
    assert (out - ref).pow(2).mean() < 1e-2 * ref.pow(2).mean()
    assert report.groups and report.seconds > 0


def test_starved_expert_falls_back_to_rtn_with_warning():
    model = tiny_model("mixtral")
    opts = MethodOptions(batch_size=4, search_tokens=64, grid=3, min_expert_tokens=10_000)
    with pytest.warns(UserWarning, match="quantized by RTN"):
        report = quantize_with(model, adapter_for(model), "gptq", QuantConfig.w8a8("gptq"), CALIB, opts,
                               progress=False)
    assert report.fallbacks
    ex = next(m for m in model.modules() if isinstance(m, QuantExperts))
    assert all(bool(lin.qweight.abs().sum() > 0) for lin in ex.down)  # never zeros


def test_nan_weights_name_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(HaqmoeError, match=r"layers\.1\.mlp\.up_proj"):
        quantize_with(model, adapter_for(model), "haq", QuantConfig.w8a8("haq"), CALIB, OPTS, progress=False)


def test_unsupported_bit_width():
    with pytest.raises(HaqmoeError, match="bit width"):
        QuantSpec(12)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_smoothing_folds_through_relu_only(act):
    """OPT's fc1 -> act -> fc2: 1/s folded into fc1 commutes with ReLU, not with GELU (the float
    function would change), so fc2 is smoothed under ReLU and skipped otherwise."""
    model = tiny_model("opt")
    model.config.activation_function = act
    for block in adapter_for(model).blocks(model):
        from transformers.activations import ACT2FN

        block.activation_fn = ACT2FN[act]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = quantize_with(model, adapter_for(model), "smooth", QuantConfig.w8a8("smooth"), CALIB, OPTS,
                               progress=False)
    fc2 = [g for g in report.groups if g["group"] == "fc2"]
    assert fc2 and all(("skipped" in g) == (act != "relu") for g in fc2)


@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss"])
def test_new_families_haq_beats_rtn_and_round_trips(family, tmp_path):
    """DeepSeek-V2 (MLA, shared experts, dense first block) and gpt-oss (biased transposed experts,
    clamped SwiGLU, attention sinks): HAQ is finite, closer to FP than RTN, and saves/loads exactly.
    gpt-oss's expert down projections are not smoothed (the fold is not exact there): reported."""
    fresh = torch.randint(0, 128, (16, 48), generator=torch.Generator().manual_seed(7))  # IDS is too few tokens
    fp = tiny_model(family)
    with torch.no_grad():
        ref = fp(fresh).logits
    errors = {}
    for method in ("rtn", "haq"):
        model, cfg, report = _quantized(family, method)
        assert any(isinstance(m, QuantExperts) for m in model.modules())
        with torch.no_grad():
            out = model(fresh).logits
        assert torch.isfinite(out).all()
        errors[method] = float((out - ref).pow(2).mean())
    assert errors["haq"] < errors["rtn"], errors
    with torch.no_grad():
        out = model(IDS).logits
    down = [g for g in report.groups if g["group"] == "experts_down"]
    assert down and all(("skipped" in g) == (family == "gpt_oss") for g in down)
    assert any("exponent" in g for g in report.groups if g["group"] == "moe_in")
    save_quantized(model, None, tmp_path / "ck", cfg)
    _assert_same(load_quantized(tmp_path / "ck").model, model, out)


def test_each_block_calibrates_with_its_own_mask():
    """gpt-oss alternates sliding-window (here 8 tokens) and full attention: the pipeline's per-block
    inputs must reproduce the model's own hidden states block after block (block 0's mask on every
    block would not)."""
    from haqmoe.quant.pipeline import capture_block_inputs, run_block

    model = tiny_model("gpt_oss", layers=3)  # sliding, full, sliding
    adapter = adapter_for(model)
    inputs, block_kwargs = capture_block_inputs(model, adapter, CALIB[:4], 2)
    masks = [block_kwargs[i][0][1]["attention_mask"] for i in range(2)]
    assert masks[0] is not None and not torch.equal(masks[0], masks[1])
    with torch.no_grad():
        want = model(CALIB[:2], output_hidden_states=True).hidden_states
        hs = inputs[0][0]
        for i, block in enumerate(adapter.blocks(model)):
            torch.testing.assert_close(hs, want[i], rtol=1e-5, atol=1e-5)
            hs = run_block(block, [(hs, *block_kwargs[i][0])])[0]
