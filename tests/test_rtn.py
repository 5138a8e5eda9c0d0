"""RTN W8A8 fake-quant: every decoder linear and expert replaced, outputs equal a reference computed
directly from the quantizer primitives, routers untouched, checkpoints round-trip exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from haqmoe.models.adapters import adapter_for
from haqmoe.models.tiny import tiny_model
from haqmoe.quant.checkpoint import load_quantized, save_quantized
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.modules import QuantExperts, QuantLinear
from haqmoe.quant.quantizer import QuantSpec, compute_qparams, dequantize, fake_quant, quantize
from haqmoe.quant.rtn import quantize_rtn

from .conftest import FAMILIES


def test_quant_linear_matches_primitives():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(7, 32)
    x[:, 3] *= 30
    w, a = QuantSpec(8, False, "channel"), QuantSpec(8, False, "token")
    q = QuantLinear.from_linear(lin, w, a)
    scale, zero = compute_qparams(lin.weight.detach(), w)
    ref_w = dequantize(quantize(lin.weight.detach(), scale, zero, w), scale, zero, w)
    ref = nn.functional.linear(fake_quant(x, a), ref_w, lin.bias)
    torch.testing.assert_close(q(x), ref)
    # and it is close to (but not equal to) the float layer
    assert 0 < (q(x) - lin(x)).abs().max() < 0.05 * lin(x).abs().max()


def _weight_rtn_reference(model, adapter, spec: QuantSpec):
    """Independent reference: the float model with every weight replaced by its RTN dequantization."""
    from haqmoe.models.adapters import FusedExperts, ExpertWeights, get_module

    def rt(w):
        scale, zero = compute_qparams(w, spec)
        return dequantize(quantize(w, scale, zero, spec), scale, zero, spec)

    with torch.no_grad():
        for block in adapter.blocks(model):
            for path in adapter.quantizable_linears(block):
                lin = get_module(block, path)
                lin.weight.copy_(rt(lin.weight))
            experts = adapter.experts(block)
            if experts is not None:
                for e in range(FusedExperts.count(experts)):
                    w = FusedExperts.get(experts, e)
                    FusedExperts.set(experts, e, ExpertWeights(rt(w.gate), rt(w.up), rt(w.down)))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_model_matches_reference(family, tmp_path):
    """Whole model, weight-only RTN: equals the float model with dequantized weights; W8A8 then
    changes outputs only slightly; routers untouched; save -> load bit-exact."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    ids = torch.randint(0, 128, (2, 16))
    w_spec = QuantSpec(8, False, "channel")
    ref_model = _weight_rtn_reference(tiny_model(family), adapter, w_spec)
    routers_before = [adapter.router(b).weight.clone() for b in adapter.blocks(model) if adapter.is_moe_block(b)]
    cfg = QuantConfig(method="rtn", weights=w_spec, acts=None)
    quantize_rtn(model, adapter, cfg, progress=False)
    for block in adapter.blocks(model):
        plain = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        routers = [r for g in adapter.groups(block) for r in g.routers]
        assert set(plain) <= set(routers)  # only routers stay float
        if adapter.is_moe_block(block):
            assert isinstance(adapter.experts(block), QuantExperts)
    routers_after = [adapter.router(b).weight for b in adapter.blocks(model) if adapter.is_moe_block(b)]
    assert all(torch.equal(a, b) for a, b in zip(routers_before, routers_after))
    with torch.no_grad():
        out, ref = model(ids).logits, ref_model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    save_quantized(model, None, tmp_path / "q", cfg)
    loaded = load_quantized(tmp_path / "q")
    assert loaded.quant["quant"]["method"] == "rtn"
    saved, back = model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[k], back[k]) for k in saved)  # bit-exact tensors
    with torch.no_grad():  # (attention kernel may differ: eager in the fixture, sdpa after load)
        torch.testing.assert_close(loaded.model(ids).logits, out, rtol=1e-5, atol=1e-5)


def test_quant_experts_with_activation_quant_matches_manual():
    model = tiny_model("mixtral")
    adapter = adapter_for(model)
    experts = adapter.experts(adapter.blocks(model)[0])
    w, a = QuantSpec(8, False, "channel"), QuantSpec(8, False, "token")
    q = QuantExperts.from_fused(experts, w, a)
    x = torch.randn(6, 64)
    idx = torch.tensor([[0, 1], [1, 2], [7, 0], [3, 3], [5, 6], [6, 5]])
    wts = torch.rand(6, 2)
    out = q(x, idx, wts)
    ref = torch.zeros_like(x)
    for t in range(6):
        for k in range(2):
            e = int(idx[t, k])
            h = q.glu(q.gate[e](x[t:t + 1]), q.up[e](x[t:t + 1]))
            h = nn.functional.linear(fake_quant(h, a), q.down[e].weight)
            ref[t] += wts[t, k] * h[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
