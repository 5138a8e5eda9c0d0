"""Miss levers (docs/design.md, Miss levers): skipping a low-weight missed expert.

Skipping is exact where experts are identical (the kept expert's weight takes the skipped one's share),
changes a model with distinct experts, and is never applied to a token's top expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haqmoe.models.adapters import adapter_for
from haqmoe.models.base import LoadedModel
from haqmoe.models.tiny import tiny_model
from haqmoe.runtime.decide import miss_weights
from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig, SamplingConfig

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 61, 7, 12, 30, 2, 77]])


def test_miss_weights_are_renormalised_shares_and_a_tokens_top_expert_is_never_eligible():
    idx = np.array([[3, 1], [1, 0], [2, -1]])
    w = np.array([[0.3, 0.1], [0.2, 0.2 + 1e-6], [0.5, 0.0]])  # not summing to 1: renormalised here
    got = miss_weights(idx, w)
    assert got[3] == np.inf and got[0] == np.inf and got[2] == np.inf
    assert got[1] == pytest.approx(0.5 - 1.25e-6)  # max(0.1 / 0.4, 0.2 / (0.4 + 1e-6))


def make_identical(model) -> None:
    """Every expert of every layer a copy of expert 0: which experts run cannot change the output."""
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for p in (ex.gate_up_proj, ex.down_proj):
                p.copy_(p[:1].expand_as(p))


def build(family: str, identical: bool = False):
    model = tiny_model(family, seed=3)
    if identical:
        make_identical(model)
    return model


def run(family: str, identical: bool = False, prompt=PROMPT, **cfg) -> tuple[list[int], torch.Tensor, dict]:
    """A fresh model (the engine swaps its experts module) on the emulated GPU tier with 2 slots a layer."""
    model = build(family, identical)
    cfg = {"emulate_gpu": True, "slots_per_layer": 2, "decision": "always-cpu", **cfg}
    engine = CollaborativeEngine(LoadedModel(model, None, family, adapter_for(model)), EngineConfig(**cfg))
    with torch.inference_mode():
        logits = engine.model(input_ids=prompt).logits[0]
    gen = engine.generate(prompt, SamplingConfig(max_new_tokens=12))
    return gen.tokens, logits, engine.summary()


@pytest.mark.parametrize("policy", ["always-cpu", "predictor", "split"])
def test_skipping_every_eligible_miss_is_exact_when_experts_are_identical(policy):
    exact_tokens, exact_logits, _ = run("mixtral", True, decision=policy)
    tokens, logits, s = run("mixtral", True, decision=policy, skip_below=1.0)
    assert s["skipped_expert_calls"] > 0
    assert tokens == exact_tokens
    torch.testing.assert_close(logits, exact_logits, atol=1e-5, rtol=1e-5)
    # without the renormalisation the skipped share is lost: the output changes
    _, dropped, _ = run("mixtral", True, decision=policy, skip_below=1.0, skip_renorm=False)
    assert (dropped - exact_logits).abs().max() > 1e-3


def test_skipping_changes_a_model_with_distinct_experts_and_threshold_zero_is_the_engine():
    exact_tokens, exact_logits, base = run("mixtral")
    tokens, logits, s = run("mixtral", skip_below=0.0)
    assert tokens == exact_tokens and torch.equal(logits, exact_logits) and s["skipped_expert_calls"] == 0
    _, skipped, s = run("mixtral", skip_below=1.0)
    assert s["skipped_expert_calls"] > 0 and (skipped - exact_logits).abs().max() > 1e-3
    # every skipped call was a miss that would otherwise have run on the CPU tier
    assert s["cpu_expert_calls"] + s["skipped_expert_calls"] == base["cpu_expert_calls"]


def test_qwen2_moe_shared_experts_still_run_when_every_routed_miss_but_the_top_is_skipped():
    exact_tokens, exact_logits, _ = run("qwen2_moe", True)
    tokens, logits, s = run("qwen2_moe", True, skip_below=1.0)
    assert s["skipped_expert_calls"] > 0 and tokens == exact_tokens
    torch.testing.assert_close(logits, exact_logits, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ the low-precision copy
def test_int4_copy_dequantizes_within_group_quantization_error():
    from haqmoe.models.adapters import FusedExperts
    from haqmoe.runtime.store import ExpertStore, StoreConfig
    from haqmoe.costs.shapes import int4_bytes, int8_bytes

    model = tiny_model("mixtral", seed=3)
    experts = [layer.mlp.experts for layer in model.model.layers]
    store = ExpertStore(experts, StoreConfig("cpu", 2))
    store.build_low()
    for layer, ex in enumerate(experts):
        for e in range(FusedExperts.count(ex)):
            w = FusedExperts.get(ex, e)
            for part, ref in (("gate", w.gate), ("up", w.up), ("down", w.down)):
                got = store.low_weight(layer, e, part)
                g = store.low_specs[part].group_size
                span = ref.detach().reshape(ref.shape[0], -1, g)
                span = (span.amax(-1).clamp(min=0) - span.amin(-1).clamp(max=0)) / 15  # one int4 step per group
                err = (got - ref.detach()).abs().reshape(ref.shape[0], -1, g).amax(-1)
                assert (err <= 0.5 * span + 1e-6).all()  # round to nearest: at most half a step
                assert err.max() > 0  # and it is not the float weight
    params = sum(store.low[0][0][f"{p}.q"].numel() for p in ("gate", "up", "down"))
    assert store.low_bytes == sum(int4_bytes(store.low[0][0][f"{p}.q"].numel(), store.low_specs[p].group_size)
                                  for p in ("gate", "up", "down"))
    assert 0.5 * params < store.low_bytes < int8_bytes(params, 1) * 0.6


def test_low_precision_misses_change_logits_a_little_and_skipped_ones_more():
    exact_tokens, exact_logits, base = run("mixtral")
    _, low, s = run("mixtral", low_below=1.0)
    assert s["low_expert_calls"] > 0 and s["skipped_expert_calls"] == 0
    assert s["cpu_expert_calls"] + s["low_expert_calls"] == base["cpu_expert_calls"]
    _, skipped, _ = run("mixtral", skip_below=1.0)
    d_low, d_skip = (low - exact_logits).abs().max(), (skipped - exact_logits).abs().max()
    assert 0 < d_low < 0.5 * d_skip
    # low_all: every miss, a token's top expert's too
    _, _, s = run("mixtral", low_below=1.0, low_all=True)
    assert s["low_expert_calls"] == base["cpu_expert_calls"] and s["cpu_expert_calls"] == 0
    # skip takes precedence over low where both thresholds admit a miss
    _, both, s = run("mixtral", skip_below=1.0, low_below=1.0)
    assert s["low_expert_calls"] == 0 and torch.equal(both, skipped)


def test_low_costs_scale_the_bytes_and_pick_the_earliest_finish():
    from haqmoe.costs.curves import SPLIT_STEPS, CostCurve, CostModel
    from haqmoe.costs.shapes import int4_bytes, int8_bytes, model_spec

    assert int4_bytes(256, 128) == 128 + 2 * 4  # two weights a byte + fp16 scale and zero per group
    spec = model_spec("mixtral-8x7b")
    assert 0.5 < spec.expert_bytes("int4") / spec.expert_bytes("w8a8") < 0.55
    cost = CostModel(CostCurve(floor_ms=2.0, per_token_ms=0.01), CostCurve(floor_ms=0.1), 3.0, low_ratio=0.5)
    assert cost.t_low(1) == pytest.approx(1.0)  # the memory floor halves
    assert cost.low_costs(1, SPLIT_STEPS) == (pytest.approx(1.0), 0.0, 0.0)
    assert cost.low_costs(1, 0) == (0.0, pytest.approx(1.5), pytest.approx(0.1))
    k, finish = cost.best_low(1)
    assert 0 < k < SPLIT_STEPS and finish < 1.0  # both channels at once beat either alone
    assert cost.best_low(1, copy_wait_ms=100.0)[0] == SPLIT_STEPS  # a copy backlog: the CPU alone
    assert cost.best_low(1, cpu_queue_ms=100.0)[0] == 0  # a busy CPU: copied whole
