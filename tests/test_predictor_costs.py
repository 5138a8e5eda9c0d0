"""Cost predictor decisions around n_critical, roofline curves, profiles, calibration cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from haqmoe.costs import PROFILES, cost_model_for, load_profile, memory_plan, model_spec
from haqmoe.costs.curves import CostCurve, CostModel
from haqmoe.errors import HaqmoeError


def linear_model(**kw) -> CostModel:
    # T_cpu(n) = n ms; T_gpu(n) = 5 + 0.1 n  =>  equal at n = 5.55..., so n_critical = 5
    return CostModel(CostCurve(per_token_ms=1.0), CostCurve(per_token_ms=0.1), 5.0, **kw)


def test_n_critical_and_decisions():
    m = linear_model()
    assert m.n_critical == 5
    assert m.decide(False, 5) == "cpu"
    assert m.decide(False, 6) == "transfer"
    assert m.decide(True, 1) == "gpu" and m.decide(True, 100) == "gpu"
    assert m.decide(False, 1, "always-transfer") == "transfer"
    assert m.decide(False, 100, "always-cpu") == "cpu"
    with pytest.raises(HaqmoeError, match="unknown policy"):
        m.decide(False, 1, "fiddler")


def test_inflight_waits_only_when_it_pays():
    m = linear_model()
    # 3 tokens: CPU 3 ms; waiting 2 ms then GPU 0.3 ms is faster
    assert m.decide(False, 3, inflight_ms=2.0) == "wait"
    assert m.decide(False, 3, inflight_ms=2.8) == "cpu"
    assert m.decide(False, 3, "always-transfer", inflight_ms=50.0) == "wait"


def test_override_and_never():
    assert linear_model(n_critical_override=10).decide(False, 8) == "cpu"
    never = CostModel(CostCurve(per_token_ms=0.0, overhead_ms=0.1), CostCurve(), 5.0)
    assert math.isinf(never.n_critical) and never.decide(False, 10_000) == "cpu"
    always = CostModel(CostCurve(overhead_ms=10.0), CostCurve(), 1.0)
    assert always.n_critical == 0 and always.decide(False, 1) == "transfer"


def test_roofline_and_table_curves():
    c = CostCurve(overhead_ms=0.5, floor_ms=3.0, per_token_ms=0.25)
    assert c(1) == pytest.approx(3.5) and c(12) == pytest.approx(3.5) and c(20) == pytest.approx(5.5)
    t = CostCurve.fit([1, 2, 4], [1.0, 1.0, 2.0])
    assert t(3) == pytest.approx(1.5) and t(8) == pytest.approx(4.0)  # extrapolates the last slope
    assert CostCurve.from_dict(t.as_dict())(3) == pytest.approx(1.5)


def test_mixtral_on_5090d_is_sensible():
    cm = cost_model_for(load_profile("rtx5090d"), model_spec("mixtral-8x7b"))
    assert 3.0 < cm.transfer_ms < 4.0  # 176 MB over ~52 GB/s
    assert cm.t_cpu(1) < cm.t_gpu(1, resident=False)  # decode: CPU beats shipping the expert
    assert cm.t_cpu(128) > cm.t_gpu(128, resident=False)  # prefill: shipping wins
    assert 8 <= cm.n_critical <= 40


def test_profiles_and_memory():
    for p in PROFILES.values():
        assert p.sources, p.name
    spec = model_spec("mixtral-8x7b")
    plan = memory_plan(load_profile("rtx5090d"), spec)
    assert 150 <= plan.slots <= 170 and plan.total_gb <= 32.0
    assert spec.total_bytes("w8a8") < 0.51 * spec.total_bytes("fp16")
    with pytest.raises(HaqmoeError, match="too small for the non-expert"):
        memory_plan(load_profile("rtx5090d"), spec, budget_gb=2.0)
    with pytest.raises(HaqmoeError, match="unknown hardware profile"):
        load_profile("gtx480")


def test_profile_json_roundtrip(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(PROFILES["rtx4090"].to_json())
    assert load_profile(str(p)) == PROFILES["rtx4090"]
    p.write_text(json.dumps({"name": "x"}))
    with pytest.raises(HaqmoeError, match="bad hardware profile"):
        load_profile(str(p))


def test_tier_calibration_measures_the_given_executors_and_is_cached(tmp_path, monkeypatch):
    from haqmoe.runtime import calibrate

    monkeypatch.setenv("HAQMOE_CACHE", str(tmp_path))
    w = torch.randn(64, 32)
    slow_cpu = lambda x, i: [x @ w.t() for _ in range(50)][-1]  # noqa: E731 - 50x the GPU tier's work
    calls = []

    def measure():
        calls.append(1)
        return calibrate.calibrate_tiers(slow_cpu, lambda x: x @ w.t(), lambda i: w.clone(), 32, torch.float32,
                                         "cpu", ns=(1, 4, 16), repeats=3)

    key = calibrate.machine_key("tiny:mixtral", 32, 64, "test")
    m = calibrate.cached_cost_model(key, measure)
    assert [p[0] for p in m.cpu.points] == [1.0, 4.0, 16.0] and m.transfer_ms > 0
    assert m.t_cpu(16) > m.t_gpu(16)  # it timed what it was given
    m2 = calibrate.cached_cost_model(key, measure)
    assert calls == [1] and m2.t_cpu(4) == pytest.approx(m.t_cpu(4))
    assert len(list((tmp_path / "calibration").glob("*tiny-mixtral*.json"))) == 1


def test_tier_calibration_times_cold_weights():
    """The engine's CPU tier meets each expert's weights cold (the next call is another expert): a
    calibration that ran one expert again and again timed it from the cache. Fake executors here are
    slow (2 ms) unless called for the same expert as the call before; every timed call must be cold."""
    import time

    from haqmoe.runtime import calibrate

    last: list[int] = []

    def expert(i: int) -> None:
        if not last or last[-1] != i:
            time.sleep(0.002)
        last.append(i)

    m = calibrate.calibrate_tiers(lambda x, i: expert(i), lambda x: x, lambda i: expert(i), 8, torch.float32,
                                  "cpu", ns=(1, 4), repeats=3)
    assert m.t_cpu(1) >= 1.8 and m.t_cpu(4) >= 1.8 and m.transfer_ms >= 1.8
    split = calibrate.calibrate_split(lambda x, rows, i: expert(i), lambda x, h, rows: x, lambda k: k, 8,
                                      torch.float32, "cpu", repeats=3)
    assert min(cpu_ms for cpu_ms, _ in split) >= 1.8


def test_balanced_sends_a_miss_to_the_channel_that_finishes_first():
    m = linear_model()  # T_cpu(1) = 1, transfer 5 + T_gpu(1) = 5.1
    assert m.decide(False, 1, "balanced") == "cpu"  # idle queues: same as the predictor
    assert m.decide(False, 1, "balanced", cpu_queue_ms=4.5) == "transfer"  # 5.1 < 4.5 + 1
    assert m.decide(False, 1, "balanced", cpu_queue_ms=4.5, copy_wait_ms=1.0) == "cpu"  # 6.1 > 5.5
    assert m.decide(False, 1, "balanced", inflight_ms=2.0, cpu_queue_ms=2.0) == "wait"  # 2.1 < 3
    assert m.decide(False, 1, "predictor", cpu_queue_ms=100.0) == "cpu"  # the paper's rule ignores queues


def test_split_picks_the_row_share_that_finishes_first():
    from haqmoe.costs.curves import SPLIT_STEPS, copied_share

    m = linear_model()  # T_cpu(1) = 1, transfer 5, T_gpu(1) = 0.1
    for n, cq, cw in [(1, 0.0, 0.0), (4, 1.0, 0.0), (1, 0.0, 3.0), (30, 0.0, 0.0)]:
        brute = {k: max(cq + m.t_cpu(n) * (1 - copied_share(k)), cw + 5.0 * copied_share(k)) + m.t_gpu(n) * copied_share(k)
                 for k in range(1, SPLIT_STEPS)}
        k, finish = m.best_split(n, cq, cw)
        assert finish == pytest.approx(min(brute.values())) and brute[k] == pytest.approx(finish)
    assert copied_share(0) == 1.0 and copied_share(SPLIT_STEPS) == pytest.approx(1 / 3)  # down is always copied
    # CPU 1 ms beats any split (down alone copies in 5/3 ms); behind a 4 ms CPU queue, split beats both
    # (k = 1: max(4 + 1/12, 5 * 11/12) + 0.1 * 11/12 = 4.675 < CPU 5 < transfer 5.1)
    assert m.decide(False, 1, "split") == "cpu"
    assert m.decide(False, 1, "split", cpu_queue_ms=4.0) == "split"
    assert m.decide(False, 1, "balanced", cpu_queue_ms=4.0) == "cpu"


def test_measured_split_parts_replace_the_row_share_scaling():
    """A CPU tier whose per-call cost a share of the rows does not shrink (2.35 of 2.5 ms here) gains nothing
    from splitting: measured parts must keep the engine from splitting there, where the share scaling splits."""
    from haqmoe.costs.curves import SPLIT_STEPS, copied_share

    cpu = CostCurve(points=[(1.0, 2.5), (2.0, 3.0), (4.0, 4.0)])
    gpu = CostCurve(points=[(1.0, 0.25), (2.0, 0.9)])
    scaled = CostModel(cpu, gpu, 3.3)
    assert scaled.decide(False, 1, "split") == "split"  # 2.5 x share: the analytic split looks best
    measured = CostModel(cpu, gpu, 3.3, split_ms=[(2.35, 0.3)] * (SPLIT_STEPS - 1))
    assert measured.decide(False, 1, "split") == "cpu"  # 2.35 + 0.3 > CPU alone 2.5
    cpu_ms, copy_ms, gpu_ms = measured.split_costs(2, 3)  # n = 2 scales as the whole expert does
    assert (cpu_ms, gpu_ms) == (pytest.approx(2.35 * 3.0 / 2.5), pytest.approx(0.3 * 0.9 / 0.25))
    assert copy_ms == pytest.approx(3.3 * copied_share(3))
    back = CostModel.from_dict(measured.as_dict())
    assert back.split_ms == measured.split_ms and back.decide(False, 1, "split") == "cpu"
    assert CostModel.from_dict(scaled.as_dict()).split_ms is None
    with pytest.raises(HaqmoeError, match="split_ms"):
        CostModel.from_dict({**measured.as_dict(), "split_ms": [[1.0, 1.0]]})


def test_array_costs_match_the_scalar_ones():
    """The placement objective's array forms are the predictor's scalar curves: measured tables (interpolated,
    extrapolated with the last slope) and rooflines, the split's finish and the miss cost min(CPU, copy + GPU,
    split)."""
    measured = CostModel(CostCurve.fit([1, 4, 16], [2.0, 3.0, 9.0]), CostCurve.fit([1, 16], [0.1, 0.4]), 3.0)
    roof = cost_model_for(load_profile("rtx4090"), model_spec("mixtral-8x7b"))
    for m in (measured, roof, linear_model()):
        n = np.array([0.0, 1, 2, 3, 7, 16, 40, 500])
        np.testing.assert_allclose(m.cpu.at(n), [m.t_cpu(x) for x in n])
        np.testing.assert_allclose(m.resident_ms(n), [m.t_gpu(x) for x in n])
        split = [m.best_split(x)[1] if x > 0 else 0.0 for x in n]
        np.testing.assert_allclose(m.split_finish_ms(n), split)
        want = [min(m.t_cpu(x), m.t_gpu(x, resident=False), s) if x > 0 else 0.0 for x, s in zip(n, split)]
        np.testing.assert_allclose(m.miss_ms(n), want)
        assert (m.miss_ms(n, split=False) >= m.miss_ms(n)).all()
