"""Simulator latency on hand-computed tiny traces; prefetch replay rules."""

from __future__ import annotations

import numpy as np
import pytest

from haqmoe.errors import HaqmoeError
from haqmoe.routing.guess import guess_quality
from haqmoe.routing.trace import RoutingTrace
from haqmoe.runtime.cache import CacheConfig, ExpertCache
from haqmoe.runtime.policies import LRUPolicy
from haqmoe.costs.curves import CostCurve, CostModel
from haqmoe.runtime.prefetch import PrefetchConfig
from haqmoe.costs import HardwareProfile, ModelSpec
from haqmoe.runtime.simulator import CacheSpec, Replay, ReplayOptions, build_cache
from haqmoe.routing.synthetic import SyntheticConfig, synthetic_trace

# a machine whose attention, head and launches cost nothing: latency = expert work only
ZERO = HardwareProfile("zero", "test", 8, 1e9, 1e9, 1e9, 1.0, 1.0, 1.0, 1.0, gpu_kernel_ms=0.0, cpu_call_ms=0.0)
SPEC = ModelSpec("toy", 1, 3, 1, 1, 1, 0, 0, 0)
COST = CostModel(CostCurve(per_token_ms=2.0), CostCurve(per_token_ms=0.5), 3.0)  # n_critical = 2


def trace(rows, guesses=None) -> RoutingTrace:
    ex = np.array(rows, np.int16)
    if ex.ndim == 2:
        ex = ex[:, None, :]
    return RoutingTrace(ex, 3, np.array([0, len(ex)]), guesses=guesses)


def run(tr, slots, decision, **opt):
    cache = ExpertCache(CacheConfig(tr.num_layers, 3, slots, expert_bytes=10), LRUPolicy())
    return Replay(tr, cache, COST, ZERO, SPEC, options=ReplayOptions(decision, **opt)).run()


def test_always_transfer_by_hand():
    tr = trace([[0], [1], [0]])
    # 1 slot: every token misses -> copy 3 ms + GPU 0.5 ms
    assert run(tr, 1, "always-transfer").token_ms.tolist() == pytest.approx([3.5, 3.5, 3.5])
    # 2 slots: the third token hits
    res = run(tr, 2, "always-transfer")
    assert res.token_ms.tolist() == pytest.approx([3.5, 3.5, 0.5])
    assert res.summary()["hit_rate"] == pytest.approx(1 / 3) and res.summary()["bytes_moved_gb"] == 2e-8


def test_served_replay_prefills_each_prompt_and_counts_decode_tokens_by_hand():
    # request A: prompt 0,0,0 (n = 3 > n_critical: copied in, 3 + 3 x 0.5 = 4.5 ms), decode 0 (hit, 0.5) then 1
    # (CPU, 2); request B: prompt 2,2 (n = 2: CPU, 4 ms), decode 2 (CPU, 2). One slot, predictor.
    ex = np.array([0, 0, 0, 0, 1, 2, 2, 2], np.int16)[:, None, None]
    flags = np.array([0, 0, 0, 1, 1, 0, 0, 1], bool)
    tr = RoutingTrace(ex, 3, np.array([0, 5, 8]), decode=flags)
    res = run(tr, 1, "predictor", served=True)
    assert res.token_ms.tolist() == pytest.approx([0.5, 2.0, 2.0]) and res.prefill_ms == pytest.approx(4.25)
    s = res.summary()
    assert s["hit_rate"] == pytest.approx(1 / 3) and s["bytes_moved_gb"] == 0  # the prefill's copy not counted
    assert res.decisions == {"gpu": 1, "cpu": 2}
    assert len(run(tr, 1, "predictor").token_ms) == 8  # not served: every token decoded one by one
    with pytest.raises(HaqmoeError, match="decode flags"):
        run(RoutingTrace(ex, 3, np.array([0, 8])), 1, "predictor", served=True)


def test_predictor_and_overlap_by_hand():
    assert run(trace([[0], [1]]), 2, "predictor").token_ms.tolist() == pytest.approx([2.0, 2.0])
    # top-2 token with expert 0 pinned: GPU 0.5 ms overlaps CPU 2 ms -> 2 ms, not 2.5
    tr = RoutingTrace(np.array([[[0, 1]]], np.int16), 3, np.array([0, 1]))
    cache = ExpertCache(CacheConfig(1, 3, 2, pinned={0: [0]}), LRUPolicy())
    res = Replay(tr, cache, COST, ZERO, SPEC, options=ReplayOptions("predictor")).run()
    assert res.token_ms.tolist() == pytest.approx([2.0])
    assert res.decisions == {"gpu": 1, "cpu": 1}
    # the eager engine launches GPU kernels from the thread that then runs the CPU tier: no overlap
    from dataclasses import replace

    cache = ExpertCache(CacheConfig(1, 3, 2, pinned={0: [0]}), LRUPolicy())
    eager = replace(ZERO, cpu_gpu_overlap=0.0, layer_overhead_ms=1.0)
    res = Replay(tr, cache, COST, eager, SPEC, options=ReplayOptions("predictor")).run()
    assert res.token_ms.tolist() == pytest.approx([1.0 + 0.5 + 2.0])


def test_prefill_batches_tokens_per_expert():
    tr = trace([[0], [0], [0], [1]])
    cache = ExpertCache(CacheConfig(1, 3, 2), LRUPolicy())
    rep = Replay(tr, cache, COST, ZERO, SPEC, options=ReplayOptions("predictor"))
    # expert 0: n=3 > n_critical=2 -> copy 3 + GPU 1.5 = 4.5; expert 1: n=1 -> CPU 2 (overlapped)
    assert rep.prefill(tr.experts) == pytest.approx(4.5)


def test_async_copy_waits_only_when_worth_it():
    # token 0 at layer 0 misses expert 0 on CPU (2 ms) and copies it in the background (3 ms).
    tr = trace([[0], [0]])
    res = run(tr, 2, "predictor", async_admit=True)
    # token 1 starts at 2 ms, copy done at 3 ms: wait 1 + GPU 0.5 = 1.5 < CPU 2
    assert res.token_ms.tolist() == pytest.approx([2.0, 1.5])


def test_background_admission_without_a_slot_leaves_the_copy_engine_free():
    # one slot, CPU misses 0, 1, 2 at 0, 2, 4 ms: 0's copy (0-3 ms) holds the slot when 1 is served, so
    # 1 gets no copy; 2's starts at 4 ms. The copy engine ends at 7 ms, not 9 (a copy for no slot).
    tr = trace([[0], [1], [2]])
    cache = ExpertCache(CacheConfig(1, 3, 1, expert_bytes=10), LRUPolicy())
    rep = Replay(tr, cache, COST, ZERO, SPEC, options=ReplayOptions("always-cpu", async_admit=True))
    res = rep.run()
    assert res.token_ms.tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert res.decisions["background_copy"] == 2 and rep.copies.free_at == pytest.approx(7.0)


def test_prefetch_rules():
    tr = trace([[[0], [1]], [[2], [2]]])  # 2 tokens, 2 layers
    opts = ReplayOptions("always-transfer", prefetch=PrefetchConfig(True, exact=True))
    cache = ExpertCache(CacheConfig(2, 3, 1), LRUPolicy())
    with pytest.raises(HaqmoeError, match="no prefetch guesses"):
        Replay(tr, cache, COST, ZERO, ModelSpec("toy", 2, 3, 1, 1, 1, 0, 0, 0), options=opts)
    g = np.full((2, 2, 3), -1, np.int16)
    g[0, 0] = [1, 0, 2]
    g[1, 0] = [0, 1, 2]  # wrong guess for token 1
    tr.guesses = g
    ideal = CostModel(CostCurve(per_token_ms=2.0), CostCurve(per_token_ms=0.5), 0.0)
    cache = ExpertCache(CacheConfig(2, 3, 1), LRUPolicy())
    res = Replay(tr, cache, ideal, ZERO, ModelSpec("toy", 2, 3, 1, 1, 1, 0, 0, 0), options=opts).run()
    s = res.summary()
    assert s["hit_rate"] == pytest.approx(0.25) and s["demand_hit_rate"] == 0.0  # resident when needed vs demand
    assert s["prefetch_hit_rate"] == pytest.approx(0.25) and s["prefetch_hits"] == 1
    assert s["prefetch_copies"] == 2 and s["prefetch_wasted"] == 1
    assert s["prefetch_by_distance"] == {1: {"copies": 2, "hits": 1, "wasted": 1}}


def test_guess_quality_and_synthetic_recall():
    tr = synthetic_trace(SyntheticConfig(num_layers=4, requests=2, tokens_per_request=200, guess_accuracy=0.7))
    q = guess_quality(tr)
    assert len(q["recall"]) == 3 and all(0.6 < r < 0.8 for r in q["recall"])
    with pytest.raises(HaqmoeError):
        guess_quality(synthetic_trace(SyntheticConfig(num_layers=2, requests=1, tokens_per_request=5)))


def test_plan_for_another_model_is_an_error():
    tr = synthetic_trace(SyntheticConfig(num_layers=4, num_experts=6, requests=1, tokens_per_request=20))
    with pytest.raises(HaqmoeError, match="another model"):
        build_cache(CacheSpec("pinned+lru", 16), 8, 6, 2, 1, plan_trace=tr)
    with pytest.raises(HaqmoeError, match="another model"):
        build_cache(CacheSpec("static", 16, plan={0: [9]}), 4, 6, 2, 1)


def test_cache_eval_columns_are_labelled(capsys):
    from haqmoe.cli.main import main

    main(["-q", "cache-eval", "mixtral-stats", "--policies", "lru", "--fracs", "0.5", "--prefetch", "off"])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("cache 0.5") and " moved " in row and " GB  decode " in row and row.endswith(" tok/s"), row


def test_cli_bad_input_is_one_clean_line(capsys):
    from haqmoe.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["-q", "cache-eval", "mixtral-stats", "--exact", "--prefetch", "on", "--policies", "lru",
              "--fracs", "0.5"])
    assert exc.value.code == 2 and "no prefetch guesses" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["-q", "simulate", "--budget-gb", "1"])
    assert exc.value.code == 2 and "too small for the non-expert" in capsys.readouterr().err


def test_measured_h200_profile_drives_the_simulator(capsys, tmp_path):
    """The profile measured on a lent H200 (bench/results) loads as a --profile; measuring one here
    without CUDA is a clean error that writes nothing."""
    from pathlib import Path

    import torch

    from haqmoe.cli.main import main
    from haqmoe.costs.hardware import load_profile

    path = Path(__file__).resolve().parents[1] / "bench" / "results" / "runtime_gpu_profile_h200.json"
    prof = load_profile(str(path))
    assert 40 < prof.h2d_gb_s < 70 and prof.gpu_mem_gb > 100
    main(["-q", "simulate", "--profile", str(path), "--policies", "always-transfer", "--json"])
    assert '"decode_tok_s"' in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            main(["-q", "measure-profile", "-o", str(tmp_path / "p.json")])
        assert exc.value.code == 2 and "needs CUDA" in capsys.readouterr().err
        assert not (tmp_path / "p.json").exists()


def test_tiny_model_trace_pair_records_real_routing_and_guesses():
    """tiny:FAMILY traces are the model's own routing of folded WikiText-2 ids, split by request,
    with next-layer guesses recorded for exact prefetch replay."""

    from haqmoe.data.text import load_text, tokenize
    from haqmoe.models.adapters import adapter_for
    from haqmoe.sources import load_model
    from haqmoe.models.tiny import tiny_model
    from haqmoe.routing.profile import trace_windows
    from haqmoe.studies.experiments import tiny_pair

    pair = tiny_pair("mixtral", requests=2, tokens_per_request=12, layers=3)
    assert (pair.plan.num_tokens, pair.eval.num_tokens, pair.eval.num_layers) == (12, 12, 3)
    assert pair.eval.guesses is not None and pair.eval.guesses.shape[:2] == (12, 3)
    tok = load_model("smollm2-135m", progress=False).tokenizer
    ids = tokenize(tok, load_text("wikitext2:valid")).reshape(-1)[:24] % 128
    model = tiny_model("mixtral", layers=3)
    ref = trace_windows(model, adapter_for(model), ids.view(2, 12), 0)
    np.testing.assert_array_equal(pair.plan.experts, ref.experts[:12])
    np.testing.assert_array_equal(pair.eval.experts, ref.experts[12:])
    assert len(np.unique(ref.experts)) > 2  # real routing spreads over the experts


def test_generation_trace_replays_as_served(tmp_path):
    """A `profile --generate` trace: prompts prefilled, hit rates over the generated tokens only (checked
    against counting a static plan's hits on them)."""
    import torch

    from haqmoe.models.adapters import adapter_for
    from haqmoe.models.tiny import tiny_model
    from haqmoe.routing.profile import trace_windows
    from haqmoe.routing.trace_io import save_trace
    from haqmoe.studies.experiments import IDEAL, guess_rows, load_pair, replay_once
    from haqmoe.costs.shapes import model_spec
    from haqmoe.runtime.simulator import frequency_plan, spec_for_trace

    model = tiny_model("mixtral", layers=3)
    prompts = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(5))
    path = save_trace(trace_windows(model, adapter_for(model), prompts, guess_width=2, new_tokens=6), tmp_path / "g")
    pair = load_pair(str(path))
    assert pair.kind.startswith("real generations") and pair.eval.num_requests == 2
    spec = spec_for_trace(pair.eval, model_spec("smollm2-moe"))
    hit = replay_once(pair, "static", 9, "always-transfer", False, IDEAL, ZERO, spec)["hit_rate"]
    plan = frequency_plan(pair.plan, [3, 3, 3])
    gen = pair.eval.experts[pair.eval.decode]
    want = np.mean([e in plan[l] for t in gen for l in range(3) for e in t[l]])
    assert hit == pytest.approx(want) and 0 < want < 1
    ev = pair.eval  # guess recall, as the replay, over the generated tokens: brute force beside guess_rows
    rows = guess_rows(pair)
    for l in range(2):
        found = [e in ev.guesses[t, l, :2] for t in np.flatnonzero(ev.decode) for e in ev.experts[t, l + 1]]
        assert rows[l]["recall"] == pytest.approx(np.mean(found))


def test_balanced_splits_a_layers_misses_between_cpu_and_pcie_by_hand():
    # one token, two missed experts: predictor runs both on the CPU (2 + 2 = 4 ms); balanced sends the
    # second through a copy (3 + 0.5 = 3.5 ms, in parallel with the first one's 2 ms CPU)
    tr = RoutingTrace(np.array([[[0, 1]]], np.int16), 3, np.array([0, 1]))
    assert run(tr, 2, "predictor").token_ms.tolist() == pytest.approx([4.0])
    res = run(tr, 2, "balanced")
    assert res.token_ms.tolist() == pytest.approx([3.5]) and res.decisions == {"cpu": 1, "transfer": 1}


def test_split_serves_one_miss_on_cpu_and_pcie_at_once_by_hand():
    # one one-token miss: CPU 2 ms, copy + GPU 3.5 ms; a split at 7/8 of the gate/up rows leaves the copy
    # engine 5/12 of the expert: max(CPU 2 * 7/12, copy 3 * 5/12) + GPU 0.5 * 5/12 = 35/24 ms
    tr = trace([[0]])
    res = run(tr, 1, "split")
    assert res.token_ms.tolist() == pytest.approx([35 / 24]) and res.decisions == {"split": 1}
    assert res.summary()["bytes_moved_gb"] == pytest.approx(4e-9)  # int(10 bytes * 5/12), not cached
    assert run(tr, 1, "balanced").token_ms.tolist() == pytest.approx([2.0])


def test_host_sync_costs_only_layers_with_host_expert_work_by_hand():
    from dataclasses import replace

    synced = replace(ZERO, host_sync_ms=0.7)
    tr = trace([[0], [1], [0]])

    def token_ms(decision: str, profile=synced) -> list[float]:
        cache = ExpertCache(CacheConfig(1, 3, 2, pinned={0: [0]}), LRUPolicy())
        return Replay(tr, cache, COST, profile, SPEC, options=ReplayOptions(decision)).run().token_ms.tolist()

    # expert 0 resident: 0.5 ms, no sync; expert 1 on the CPU: 0.7 + 2 ms; always-transfer never syncs
    assert token_ms("predictor") == pytest.approx([0.5, 2.7, 0.5])
    assert token_ms("always-transfer") == token_ms("always-transfer", ZERO)
    # a split's GPU part waits for the synced CPU rows: max(0.7 + 2 * 7/12, 3 * 5/12) + 0.5 * 5/12 (k = 7)
    assert token_ms("split")[1] == pytest.approx(0.7 + 7 / 6 + 5 / 24)


@pytest.mark.parametrize("per_request", [False, True])
def test_static_oracle_hit_equals_brute_force(per_request):
    """The best static placement, found by enumerating every set of slots (per request or one for all)."""
    from itertools import combinations

    from haqmoe.studies.experiments import static_oracle_hit

    tr = synthetic_trace(SyntheticConfig(num_layers=2, num_experts=4, top_k=2, requests=3, tokens_per_request=20,
                                         seed=5))
    slots = 3
    cells = [(l, e) for l in range(2) for e in range(4)]

    def best(part: RoutingTrace) -> int:
        calls = [(l, int(e)) for t in range(part.experts.shape[0]) for l in range(2) for e in part.experts[t, l]]
        return max(sum(c in set(chosen) for c in calls) for chosen in combinations(cells, slots))

    parts = [tr.request(r) for r in range(tr.num_requests)] if per_request else [tr]
    expected = sum(best(p) for p in parts) / tr.experts.size
    assert static_oracle_hit(tr, slots, per_request) == pytest.approx(expected)
