"""One decision loop: the engine's recorded routing, replayed through the simulator, gets the engine's
decisions, prefetch copies, hits and prefetch hits one for one; the rules decide.py and prefetch.py
settle (copy in flight, no scratch slot, no cache slot, the prefetch budget), against brute force."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from haqmoe.models.adapters import adapter_for
from haqmoe.models.base import LoadedModel
from haqmoe.models.tiny import tiny_model
from haqmoe.routing.placement import Plan
from haqmoe.routing.trace import RoutingTrace
from haqmoe.runtime.cache import CacheConfig, ExpertCache
from haqmoe.runtime.decide import Rules, admit_misses, decide_layer, miss_weights, routed_counts
from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig, SamplingConfig
from haqmoe.runtime.hybrid import HybridExperts
from haqmoe.runtime.policies import LRUPolicy
from haqmoe.runtime.prefetch import PrefetchConfig, prefetch_budget_ms, prefetch_guesses
from haqmoe.costs.curves import CostCurve, CostModel
from haqmoe.costs import HardwareProfile, ModelSpec
from haqmoe.runtime.simulator import Replay, ReplayOptions

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 61, 7, 12, 30, 2, 77]])
ZERO = HardwareProfile("zero", "test", 8, 1e9, 1e9, 1e9, 1.0, 1.0, 1.0, 1.0, gpu_kernel_ms=0.0, cpu_call_ms=0.0)
# The emulated GPU tier copies synchronously: every copy has landed by the next layer. The replay matches
# it with attention slower than any backlog of copies (and no copy left in flight at a router's output).
SLOW_ATTENTION_MS = 1e6

ENGINE_CASES = {
    "predictor": dict(decision="predictor"),
    "predictor-n1": dict(decision="predictor", n_critical=1),  # prefill misses transfer, decode misses on the CPU
    "always-transfer": dict(decision="always-transfer"),
    "always-cpu": dict(decision="always-cpu"),
    "balanced": dict(decision="balanced"),
    "split": dict(decision="split"),
    "split-2-slots": dict(decision="split", slots_per_layer=2),
    "pinned-plan": dict(decision="predictor", n_critical=1, cache_policy="pinned+lru"),  # one pinned slot a layer
    # miss lever: second-ranked misses with a renormalised weight below 0.45 are skipped, the rest decided as usual
    "skip-predictor": dict(decision="predictor", skip_below=0.45),
    "skip-split": dict(decision="split", skip_below=0.45),
    # ... or served on the CPU from the int4 copy (below 0.5: every second-ranked miss not skipped)
    "low-balanced": dict(decision="balanced", low_below=0.45),
    "skip-low-split": dict(decision="split", skip_below=0.3, low_below=0.5),
    "low-all-predictor": dict(decision="predictor", low_below=1.0, low_all=True),  # every miss from int4
    # prefetch: two guesses of the next layer, or of the next two / three layers (lookahead), within the
    # copy engine's idle time; on 4 layers so that lookahead 3 reaches a layer
    "prefetch-predictor": dict(decision="predictor", prefetch=2, layers=4),
    "prefetch-always-transfer": dict(decision="always-transfer", prefetch=2, layers=4),
    "lookahead2-balanced": dict(decision="balanced", prefetch=2, lookahead=2, layers=4),
    "lookahead3-split": dict(decision="split", prefetch=1, lookahead=3, layers=4),
    # a decode layer's budget here is ~14 copies: a tenth of it lets one or two prefetch copies start
    "lookahead2-tight-budget": dict(decision="balanced", prefetch=2, lookahead=2, prefetch_budget=0.1, layers=4),
}


def record_engine(family: str, admit: bool, layers: int | None = None,
                  **cfg) -> tuple[CollaborativeEngine, ExpertCache, list, list]:
    """Two greedy generations on the emulated GPU tier, recording each hybrid call's routing (in routing
    order, from the router's own top-k) and the engine's decisions; with the cache as it was before."""
    model = tiny_model(family, seed=3, layers=layers)
    cfg = {"emulate_gpu": True, "slots_per_layer": 3, "admit": admit, **cfg}
    engine = CollaborativeEngine(LoadedModel(model, None, family, adapter_for(model)), EngineConfig(**cfg))
    start = copy.deepcopy(engine.cache)
    routing: list[tuple[int, dict[int, int], dict[int, float]]] = []
    for h in engine.model.modules():
        if isinstance(h, HybridExperts):
            h.register_forward_pre_hook(lambda m, args: routing.append(
                (m.layer, routed_counts(args[1].numpy()), miss_weights(args[1].numpy(), args[2].float().numpy()))))
    engine.telemetry.decision_log = []
    for seed in (0, 1):
        engine.generate(PROMPT + seed, SamplingConfig(max_new_tokens=8))
    log = engine.telemetry.decision_log
    assert [(r.layer, [(d.expert, d.tokens) for d in r.decisions]) for r in log] == \
        [(layer, list(needed.items())) for layer, needed, _ in routing]
    return engine, start, routing, log


@pytest.mark.parametrize("admit", [False, True], ids=["no-admit", "admit"])
@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_simulator_replays_the_engines_decisions_one_for_one(case, admit, tmp_path):
    cfg = dict(ENGINE_CASES[case])
    if cfg.get("cache_policy") == "pinned+lru":
        cfg["plan"] = str(Plan(2, 8, [[0], [1]], "test").save(tmp_path / "plan.json"))
    engine, cache, routing, log = record_engine("mixtral", admit, **cfg)
    L, E, k = cache.config.num_layers, cache.config.num_experts, engine.top_k
    shape_only = RoutingTrace(np.zeros((1, L, k), np.int16), E, np.array([0, 1]))  # replayed layer by layer
    opt = ReplayOptions(engine.cfg.decision, async_admit=admit, scratch_slots=engine.store.cfg.split_slots,
                        skip_below=engine.cfg.skip_below, low_below=engine.cfg.low_below,
                        low_all=engine.cfg.low_all, prefetch=PrefetchConfig(budget_layers=engine.cfg.prefetch_budget))
    shape_only.weights = np.ones((1, L, k), np.float32)  # replayed layer by layer, with the recorded weights
    replay = Replay(shape_only, cache, engine.cost, ZERO, ModelSpec("tiny", L, E, k, 1, 1, 0, 0, 0), options=opt)
    replay.log = []
    clock = 0.0
    for (layer, needed, weights), rec in zip(routing, log):  # the engine's guesses, as the profiler records them
        clock = replay.layer(layer, needed, rec.step, clock, SLOW_ATTENTION_MS, guesses=rec.guesses, weights=weights)
    assert [r.key() for r in replay.log] == [r.key() for r in log]  # decisions, admissions, prefetch copies
    assert cache.stats.as_dict() == engine.cache.stats.as_dict()  # hits, prefetch hits, wasted, by distance
    rates = {k: v for k, v in engine.summary().items() if k in cache.stats.rates()}
    assert rates == cache.stats.rates()  # one meaning of hit_rate and of the prefetch counters
    kinds = {d.kind for r in log for d in r.decisions}
    counts = {kind: sum(d.kind == kind for r in log for d in r.decisions) for kind in kinds}
    s = engine.summary()
    assert s["cpu_expert_calls"] == counts.get("cpu", 0) and s["split_expert_calls"] == counts.get("split", 0)
    assert s["gpu_expert_calls"] == sum(counts.get(kind, 0) for kind in ("hit", "wait", "transfer", "stream"))
    assert s["background_copies"] == sum(len(r.admitted) for r in log)
    assert s["skipped_expert_calls"] == counts.get("skip", 0)
    assert s["low_expert_calls"] == counts.get("low", 0)
    assert ("skip" in kinds) == case.startswith("skip")  # each lever acts, and only when asked
    assert ("low" in kinds) == ("low" in case)
    if admit and case in ("predictor-n1", "always-cpu", "pinned-plan"):  # decode misses on the CPU, then copied in
        assert s["background_copies"] > 0 and "hit" in kinds
    if case.startswith("split"):  # a decode token's misses split; a prefill's beyond the scratch slots not
        assert {"split", "transfer", "cpu"} <= kinds
    prefetched = [p for r in log for p in r.prefetched]
    assert bool(prefetched) == ("prefetch" in cfg)  # prefetch acts, and only when asked
    if prefetched:  # copies for each distance asked (and none beyond), into the layer they were guessed for
        ahead = {layer - r.layer for r in log for layer, _, _ in r.prefetched}
        assert ahead == set(range(1, engine.cfg.lookahead + 1))
        assert s["prefetch_copies"] == len(prefetched) and s["prefetch_hits"] > 0
        by_distance = s["prefetch_by_distance"]
        assert sum(d["copies"] for d in by_distance.values()) == s["prefetch_copies"]
        assert sum(d["hits"] for d in by_distance.values()) == s["prefetch_hits"]
        assert s["hit_rate"] == pytest.approx(s["demand_hit_rate"] + s["prefetch_hit_rate"])


# ------------------------------------------------------------------------- the rules by hand
COST = CostModel(CostCurve(per_token_ms=2.0), CostCurve(per_token_ms=0.5), 3.0)  # n_critical = 2


def cache_of(slots: int, pinned: dict | None = None) -> ExpertCache:
    return ExpertCache(CacheConfig(1, 6, slots, pinned=pinned or {}), LRUPolicy())


def kinds(decisions) -> list[tuple]:
    return [(d.expert, d.kind, d.slot) for d in decisions]


def test_a_copy_in_flight_is_waited_for_only_when_that_finishes_first():
    for lands, want in ((1.0, "wait"), (5.0, "cpu")):  # wait 1 + GPU 0.5 < CPU 2 < wait 5 + GPU 0.5
        cache = cache_of(2)
        cache.begin_step(0, 0.0)
        slot = cache.admit(0, 4, ready_at=lands)
        out = decide_layer(cache, COST, Rules("predictor"), 0, {4: 1}, 1.0, 0.0)
        assert kinds(out) == [(4, want, slot if want == "wait" else None)]
        assert cache.stats.inflight[0] == 1 and cache.contains(0, 4)  # the copy goes on either way
    cache = cache_of(2)
    cache.begin_step(0, 0.0)
    cache.admit(0, 4, ready_at=5.0)
    assert decide_layer(cache, COST, Rules("always-transfer"), 0, {4: 1}, 1.0, 0.0)[0].kind == "wait"


def test_split_without_a_scratch_slot_decides_as_balanced():
    # three one-token misses, one scratch slot: the first splits (k = 7), the others go to whichever of
    # the CPU queue and the copy engine finishes first, behind what the split queued on both
    out = decide_layer(cache_of(3), COST, Rules("split", scratch_slots=1), 0, {0: 1, 1: 1, 2: 1}, 0.0, 0.0)
    assert [d.kind for d in out] == ["split", "cpu", "transfer"] and (out[0].slot, out[0].k) == (0, 7)
    assert out[1].cpu_done == pytest.approx(2 * 7 / 12 + 2)  # CPU 7/6 + 2 < copy 5/4 + 3 + GPU 1/2
    assert out[2].ready == pytest.approx(3 * 5 / 12 + 3)  # then CPU 19/6 + 2 > 19/4


def test_a_transfer_without_a_cache_slot_streams_through_scratch_or_runs_on_the_cpu():
    # two slots, both pinned: no slot to copy into; always-transfer streams while a scratch slot is free
    needed = {0: 4, 1: 4}
    out = decide_layer(cache_of(2, {0: [4, 5]}), COST, Rules("always-transfer", scratch_slots=1), 0, needed, 0, 0.0)
    assert kinds(out) == [(0, "stream", 0), (1, "cpu", None)]
    assert out[0].ready == pytest.approx(3.0) and out[1].cpu_done == pytest.approx(8.0)


def test_background_admission_stops_behind_a_copy_backlog():
    cache = cache_of(4)
    out = decide_layer(cache, COST, Rules("always-cpu", admit=True), 0, {0: 1, 1: 1, 2: 1}, 0.0, 0.0)
    # backlog 0, then 3 ms = one copy (still admitted), then 6 ms: stop
    assert admit_misses(cache, COST, Rules("always-cpu", admit=True), 0, out, 0.0) == [(0, 0), (1, 1)]
    assert cache.copies.backlog(0.0) == 6.0 and cache.get(0, 1).ready_at == 6.0


def test_routing_order_is_first_appearance():
    assert routed_counts(np.array([[3, 1], [1, 0], [-1, 3]])) == {3: 2, 1: 2, 0: 1}
    assert list(routed_counts(np.array([[3, 1], [1, 0]]))) == [3, 1, 0]


def test_prefetch_starts_copies_only_within_the_layers_copy_idle_time():
    # a layer of one one-token miss on the CPU (predictor: 2 ms): its expert time is 2 ms and no demand copy
    # is queued, so with budget B layers, prefetch copies (3 ms each, back to back) start at 0, 3, 6 ... < 2B
    guesses = [[1, 2, 3], [4, 5]]  # for layers 1 and 2, best first
    for budget_layers in (0.0, 0.5, 1.0, 1.5, 2.0, 3.5, 10.0):
        cache = ExpertCache(CacheConfig(3, 6, 3), LRUPolicy())
        out = decide_layer(cache, COST, Rules("predictor"), 0, {0: 1}, 0.0, 0.0)
        assert [d.kind for d in out] == ["cpu"]
        budget = prefetch_budget_ms(out, 0.0, budget_layers)
        assert budget == pytest.approx(2.0 * budget_layers)
        got = prefetch_guesses(cache, COST, 0, guesses, 0.0, budget)
        starts = [3.0 * i for i in range(5) if 3.0 * i < budget]  # brute force: every start before the budget
        want = [(layer, e) for layer, ranking in enumerate(guesses, start=1) for e in ranking][: len(starts)]
        assert [(layer, e) for layer, e, _ in got] == want
        assert [cache.get(layer, e).ready_at for layer, e, _ in got] == [s + 3.0 for s in starts]
        assert cache.stats.distance_copies.tolist() == [sum(l == 1 for l, _ in want), sum(l == 2 for l, _ in want), 0]


def test_demand_copies_come_first_and_a_prefetch_counts_its_distance_when_used_or_wasted():
    # always-transfer: two demand copies (0-3, 3-6 ms), each then on the GPU (0.5 ms): the layer ends at
    # 6.5 ms; a prefetch may start while the backlog is below 6.5 ms: one copy (6-9 ms), for layer 2 (layer
    # 1's guess is cached already and costs nothing)
    cache = ExpertCache(CacheConfig(3, 6, 2), LRUPolicy())
    cache.admit(1, 5)
    out = decide_layer(cache, COST, Rules("always-transfer"), 0, {0: 1, 1: 1}, 0.0, 0.0)
    assert [d.kind for d in out] == ["transfer", "transfer"]
    budget = prefetch_budget_ms(out, 0.0, 1.0)
    assert budget == pytest.approx(6.5)
    got = prefetch_guesses(cache, COST, 0, [[5], [3, 4]], 0.0, budget)
    assert [(layer, e) for layer, e, _ in got] == [(2, 3)] and cache.get(2, 3).ready_at == pytest.approx(9.0)
    # layer 2 at 10 ms: expert 3 is a prefetch hit from two layers ahead; then 4 and 0 evict nothing prefetched
    assert [d.kind for d in decide_layer(cache, COST, Rules("always-transfer"), 2, {3: 1}, 1.0, 10.0)] == ["hit"]
    assert cache.stats.prefetch_hits[2] == 1 and cache.stats.distance_hits.tolist() == [0, 1, 0]
    # a prefetch evicted unused is wasted, at its distance
    prefetch_guesses(cache, COST, 1, [[2]], 20.0, 100.0)
    decide_layer(cache, COST, Rules("always-transfer"), 2, {0: 1, 1: 1}, 2.0, 30.0)
    assert cache.stats.distance_wasted.tolist() == [1, 0, 0] and cache.stats.rates()["prefetch_wasted"] == 1
