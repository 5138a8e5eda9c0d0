"""Every placement strategy on hand-made traces with known answers; budgets never exceeded."""

from __future__ import annotations

import numpy as np
import pytest

from haqmoe.errors import HaqmoeError
from haqmoe.costs.curves import CostCurve, CostModel
from haqmoe.costs.planning import PlanningCosts
from haqmoe.routing.placement import (STRATEGIES, Budget, Plan, TwoStage, build_plan, make_strategy)
from haqmoe.routing.stats import stats_from_trace
from haqmoe.routing.trace import RoutingTrace

# (expert at layer 0, expert at layer 1) x count; top-1 routing, 2 layers, 4 experts.
# layer 0 counts: e0=7, e2=6, e1=5, e3=0    layer 1 counts: e0=6, e3=5, e1=4, e2=3
# hottest 2-layer paths: (1,3)x5, (2,0)x4, (0,2)x3, then (0,0), (0,1), (2,1) x2
PATHS = {(1, 3): 5, (0, 0): 2, (0, 1): 2, (0, 2): 3, (2, 0): 4, (2, 1): 2}


def hand_trace() -> RoutingTrace:
    rows = [p for p, c in PATHS.items() for _ in range(c)]
    ex = np.array(rows, np.int16)[:, :, None]
    return RoutingTrace(ex, 4, np.array([0, len(rows)]))


@pytest.fixture
def stats():
    return stats_from_trace(hand_trace(), window=2)


def resident(plan: Plan) -> list[list[int]]:
    return plan.resident


def test_counts_and_paths(stats):
    np.testing.assert_array_equal(stats.counts, [[7, 5, 6, 0], [6, 4, 3, 5]])
    assert stats.paths[(0, (1,), (3,))] == 5 and len(stats.paths) == 6


def test_global_frequency(stats):
    assert resident(build_plan(make_strategy("global-frequency"), stats, Budget(1))) == [[0], []]
    assert resident(build_plan(make_strategy("global-frequency"), stats, Budget(3))) == [[0, 2], [0]]


def test_path_frequency(stats):
    assert resident(build_plan(make_strategy("path-frequency"), stats, Budget(3))) == [[1, 2], [3]]
    assert resident(build_plan(make_strategy("path-frequency"), stats, Budget(4))) == [[1, 2], [0, 3]]


def test_layer_frequency(stats):
    assert resident(build_plan(make_strategy("layer-frequency"), stats, Budget(4))) == [[0, 2], [0, 3]]


def test_two_stage_algorithm2(stats):
    # Stage I (1 per layer): hottest path (1,3) -> e1 at layer 0, e3 at layer 1; Stage II: most frequent rest.
    p = build_plan(TwoStage(1, 1), stats, Budget(4))
    assert resident(p) == [[0, 1], [0, 3]]  # differs from layer-frequency at layer 0: Stage I matters
    # Stage I only (2 per layer): experts of the two hottest paths through each layer.
    assert resident(build_plan(TwoStage(2, 0), stats, Budget(4))) == [[1, 2], [0, 3]]
    # Fixed count per layer, whatever the skew.
    for b in (2, 4, 6, 8):
        p = build_plan(make_strategy("two-stage"), stats, Budget(b))
        assert [len(r) for r in p.resident] == [b // 2, b // 2]
    assert p.params["top_k_per_layer"] == 2 and p.params["supplement_k_per_layer"] == 2


def test_two_stage_bad_counts(stats):
    with pytest.raises(HaqmoeError, match="needs 6 slots"):
        build_plan(TwoStage(2, 1), stats, Budget(4))
    with pytest.raises(HaqmoeError, match="<= 4"):
        build_plan(TwoStage(3, 2), stats, Budget(8))


def toy_profile() -> PlanningCosts:
    # transfer 2 ms, CPU 1 ms per token, GPU free: residency saves min(n, 2) ms for an expert with n tokens
    return PlanningCosts("toy", CostModel(CostCurve(per_token_ms=1.0), CostCurve(), 2.0), 1e6, split=False)


def test_latency_strategy_prefers_saturating_savings():
    # 3 requests of 10 tokens, top-1, 2 layers x 2 experts.
    # layer 0: e0 takes requests 0 and 1 whole, e1 request 2 (shares 2/3, 1/3);
    # layer 1: e0 7 tokens and e1 3 tokens of every request (shares 0.7, 0.3).
    # Frequency keeps (1, 0) and (0, 0). Under the toy profile, residency saves min(n, 2) ms, so
    # (1, 0) and (1, 1) save 2 ms in every request, (0, 0) only in two of three: keep layer 1 whole.
    rc = np.zeros((3, 2, 2))
    rc[0, 0, 0] = rc[1, 0, 0] = rc[2, 0, 1] = 10
    rc[:, 1, 0], rc[:, 1, 1] = 7, 3
    stats = stats_from_trace(hand_trace())  # shape only; counts replaced below
    stats.num_experts, stats.counts, stats.tokens = 2, rc.sum(axis=0), 30
    lat = build_plan(make_strategy("latency", toy_profile(), rc, decode_tokens=0), stats, Budget(2))
    glob = build_plan(make_strategy("global-frequency"), stats, Budget(2))
    assert lat.resident == [[], [0, 1]] and glob.resident == [[0], [0]]
    from haqmoe.routing.evaluate import expected_latency_ms

    assert expected_latency_ms(lat, rc, toy_profile(), decode_tokens=0) == pytest.approx(2.0)
    assert expected_latency_ms(glob, rc, toy_profile(), decode_tokens=0) == pytest.approx(2 / 3 + 2)
    # with generated tokens (routed like the prompt), frequency matters again: each decode token
    # costs 1 ms per missed activation, so 32 tokens make layer 0's hot expert worth keeping
    dec = build_plan(make_strategy("latency", toy_profile(), rc, decode_tokens=32), stats, Budget(2))
    assert dec.resident == [[0], [0]]


def test_latency_decode_equals_global_frequency(stats):
    a = build_plan(make_strategy("latency", toy_profile()), stats, Budget(3))
    b = build_plan(make_strategy("global-frequency"), stats, Budget(3))
    assert a.resident == b.resident


def test_latency_balanced_fixed_count(stats):
    p = build_plan(make_strategy("latency-balanced", toy_profile()), stats, Budget(4))
    assert [len(r) for r in p.resident] == [2, 2]
    assert p.resident == [[0, 2], [0, 3]]  # decode savings ~ frequency


@pytest.mark.parametrize("name", STRATEGIES)
def test_budget_never_exceeded(name):
    rng = np.random.default_rng(3)
    for trial in range(5):
        L, E, T = 4, 6, 200
        ex = np.stack([np.stack([rng.choice(E, 2, replace=False, p=rng.dirichlet(np.ones(E)))
                                 for _ in range(L)]) for _ in range(T)]).astype(np.int16)
        tr = RoutingTrace(ex, E, np.array([0, T]))
        st = stats_from_trace(tr)
        from haqmoe.routing.evaluate import request_counts

        rc = request_counts(tr, 10)
        for b in range(0, L * E + 1, 5):
            if name == "two-stage" and b // L > E:
                continue
            p = build_plan(make_strategy(name, toy_profile(), rc), st, Budget(b))
            assert p.size <= b and p.mask().sum() == p.size
            assert all(len(set(r)) == len(r) for r in p.resident)
            if name in ("global-frequency", "latency", "latency-balanced", "layer-frequency", "two-stage"):
                assert p.size == b  # these fill the budget exactly


def test_budget_validation(stats):
    with pytest.raises(HaqmoeError, match="between 0 and 8"):
        Budget.of(stats, -1)
    with pytest.raises(HaqmoeError, match="between 0 and 8"):
        Budget.of(stats, 9)
    with pytest.raises(HaqmoeError, match=">= 0 bytes"):
        Budget.of(stats, gpu_bytes=-5.0, expert_bytes=1.0)
    with pytest.raises(HaqmoeError, match="either"):
        Budget.of(stats)
    assert Budget.of(stats, gpu_bytes=100.0, expert_bytes=1.0).experts == 8  # more memory than experts
    # int8 experts are half the bytes of fp16: twice the slots for the same memory
    assert Budget.of(stats, gpu_bytes=4.0, expert_bytes=1.0).experts == 2 * Budget.of(
        stats, gpu_bytes=4.0, expert_bytes=2.0).experts


def test_unknown_strategy(stats):
    with pytest.raises(HaqmoeError, match="unknown strategy"):
        make_strategy("magic")
