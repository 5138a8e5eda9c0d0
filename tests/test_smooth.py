"""Smoothing: exact in FP when folded, and the joint grid search reacts to outliers."""

import pytest
import torch

from haqmoe.models.adapters import EXPERTS, FusedExperts, adapter_for, expert_glu, get_module
from haqmoe.models.tiny import TINY_CONFIGS, tiny_model
from haqmoe.quant.pipeline import apply_expert_down_smoothing, apply_group_smoothing
from haqmoe.quant.quantizer import QuantSpec
from haqmoe.quant.smooth import SmoothConfig, SmoothProblem, SmoothSkip, group_tie, search_scales


pytestmark = pytest.mark.usefixtures("one_thread")


W8 = QuantSpec(8, symmetric=False, granularity="channel")
A8 = QuantSpec(8, symmetric=False, granularity="token")


def _smooth_everything(model, gen):
    """Fold random scales into every group (and every expert's down) of every block."""
    adapter = adapter_for(model)
    folded = 0
    for block in adapter.blocks(model):
        for g in adapter.groups(block):
            first = next((p for p in g.layers if p != EXPERTS), None)
            width = (get_module(block, first).weight.shape[1] if first else
                     get_module(block, g.routers[0]).weight.shape[1])
            try:
                tie = group_tie(get_module(block, g.prev_op), width, model.config)
            except SmoothSkip:
                continue
            free = width if tie is None else int(tie.max()) + 1
            s = torch.rand(free, generator=gen) * 3 + 0.25
            try:
                apply_group_smoothing(block, g, adapter, s, s if tie is None else s[tie])
            except SmoothSkip:
                continue
            folded += 1
        experts = adapter.experts(block)
        if experts is not None and expert_glu(experts).linear_in_up:  # else refused: see below
            for e in range(FusedExperts.count(experts)):
                inter = FusedExperts.get(experts, e).gate.shape[0]
                apply_expert_down_smoothing(experts, e, torch.rand(inter, generator=gen) * 3 + 0.25)
    return folded


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_folded_smoothing_keeps_fp_outputs(family):
    model = tiny_model(family)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        folded = _smooth_everything(model, torch.Generator().manual_seed(0))
        out = model(ids).logits
    assert folded >= 4
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_gqa_tie_maps_o_columns_to_v_rows():
    model = tiny_model("llama")  # 4 heads, 2 kv heads, head_dim 16
    block = adapter_for(model).blocks(model)[0]
    tie = group_tie(get_module(block, "self_attn.v_proj"), 64, model.config)
    assert tie.tolist()[:16] == list(range(16)) and tie.tolist()[16:32] == list(range(16))
    assert tie.tolist()[32:48] == list(range(16, 32))


def _problem(outlier: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(512, 64, generator=g) * 2 - 1  # every channel spans the same range: no outliers
    if outlier:
        x[:, 5] *= 60.0
    w = torch.randn(96, 64, generator=g) * 0.05
    return SmoothProblem([(w, x)], {"absmax": x.abs().amax(0), "absmean": x.abs().mean(0)})


def test_grid_search_picks_zero_without_outliers():
    res = search_scales(_problem(False), SmoothConfig("adaptive"), W8, A8)
    assert res.exponent == 0.0
    assert torch.equal(res.s_free, torch.ones(64))


def test_grid_search_smooths_planted_outlier():
    res = search_scales(_problem(True), SmoothConfig("adaptive"), W8, A8)
    assert res.exponent > 0.0
    assert res.s_free[5] == res.s_free.max() and min(res.losses) < 0.5 * res.loss_identity


def test_awq_objective_ignores_activation_quantization():
    # With weights only in the loss, the outlier channel matters far less than in the joint loss.
    p = _problem(True)
    joint = search_scales(p, SmoothConfig("adaptive"), W8, A8)
    awq = search_scales(p, SmoothConfig("awq", stat="absmean"), W8, A8)
    assert awq.exponent < joint.exponent


def test_moe_routing_identical_after_smoothing():
    model = tiny_model("mixtral")
    adapter = adapter_for(model)
    picks = []

    def record(_m, _i, out):
        picks.append(out[2].clone())

    handles = [adapter.router(b).register_forward_hook(record) for b in adapter.blocks(model)]
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids)
        before = [p.sort(-1).values for p in picks]
        picks.clear()
        gen = torch.Generator().manual_seed(0)
        for block in adapter.blocks(model):
            g = next(g for g in adapter.groups(block) if EXPERTS in g.layers)
            s = torch.rand(64, generator=gen) * 10 + 0.1
            apply_group_smoothing(block, g, adapter, s, s)
        model(ids)
    for h in handles:
        h.remove()
    after = [p.sort(-1).values for p in picks]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_expert_down_smoothing_refused_where_not_linear_in_up():
    """gpt-oss's (clamp(up) + 1) · glu(gate): 1/s on the up rows would change the function, so the fold
    is refused and the model left as it was; moe_in smoothing (the experts' input columns, the biased
    router's) stays exact, as test_folded_smoothing_keeps_fp_outputs checks."""
    model = tiny_model("gpt_oss")
    experts = adapter_for(model).experts(model.model.layers[0])
    before = experts.gate_up_proj.clone()
    with pytest.raises(SmoothSkip, match="not linear in up"):
        apply_expert_down_smoothing(experts, 0, torch.full((48,), 2.0))
    assert torch.equal(experts.gate_up_proj, before)
