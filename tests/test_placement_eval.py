"""Hit rate against a brute-force count, plan files, wrong-model errors, Mixtral importers, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from haqmoe.errors import HaqmoeError
from haqmoe.paths import shared_data_dir
from haqmoe.costs.hardware import load_profile
from haqmoe.costs.planning import planning_costs, planning_costs_for
from haqmoe.costs.shapes import model_spec
from haqmoe.routing.evaluate import evaluate_trace, per_request_hit, request_counts
from haqmoe.routing.placement import Budget, Plan, build_plan, make_strategy
from haqmoe.routing.stats import path_coverage, stats_from_trace
from haqmoe.routing.trace import RoutingTrace
from haqmoe.routing.trace_io import save_trace


def skewed_trace(T=300, L=4, E=8, k=2, seed=0, requests=3, token_seed=None) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    probs = [rng.dirichlet(np.full(E, 0.5)) for _ in range(L)]
    if token_seed is not None:  # same routing distribution, other tokens
        rng = np.random.default_rng(token_seed)
    ex = np.array([[rng.choice(E, k, replace=False, p=probs[layer]) for layer in range(L)] for _ in range(T)],
                  np.int16)
    return RoutingTrace(ex, E, np.linspace(0, T, requests + 1).astype(np.int64), meta={"model": "toy"})


def test_hit_rate_equals_brute_force():
    tr = skewed_trace()
    plan = build_plan(make_strategy("two-stage"), stats_from_trace(skewed_trace(seed=1)), Budget(12))
    res = set((layer, e) for layer, ids in enumerate(plan.resident) for e in ids)
    per_layer = []
    for layer in range(tr.num_layers):
        hits = total = 0
        for t in range(tr.num_tokens):
            for e in tr.experts[t, layer]:
                total += 1
                hits += (layer, int(e)) in res
        per_layer.append(100.0 * hits / total)
    got = evaluate_trace(plan, tr)
    np.testing.assert_allclose(got.per_layer, per_layer)
    assert got.mean == pytest.approx(np.mean(per_layer)) and got.std == pytest.approx(np.std(per_layer))
    assert got.gap == pytest.approx(max(per_layer) - min(per_layer))


def test_per_request_hit_brute_force():
    tr = skewed_trace(T=100, requests=2)  # two requests of 50 tokens -> 5 chunks of 20 tokens... minus tails
    rc = request_counts(tr, 20)
    assert rc.shape[0] == 4  # 2 full chunks per request; the 10-token tails are dropped
    mask = np.zeros((4, 8), bool)
    mask[:, :3] = True
    chunk_hits = []
    for s in (0, 20, 50, 70):
        ex = tr.experts[s:s + 20]
        chunk_hits.append([np.isin(ex[:, layer], [0, 1, 2]).mean() for layer in range(4)])
    np.testing.assert_allclose(per_request_hit(mask, rc).per_layer, 100 * np.mean(chunk_hits, axis=0))


def test_plan_file_round_trip_and_identity(tmp_path):
    plan = build_plan(make_strategy("global-frequency"), stats_from_trace(skewed_trace()), Budget(10), 2.5e6)
    path = plan.save(tmp_path / "plan.json")
    d = json.loads(path.read_text())
    assert d["model"]["num_layers"] == 4 and d["model"]["num_experts"] == 8 and d["experts"] == 10
    assert d["layers"][0]["bytes"] == len(d["layers"][0]["experts"]) * 2.5e6
    assert 0 <= d["layers"][0]["expected_hit"] <= 1
    back = Plan.load(path, 4, 8)
    assert back.resident == plan.resident and back.expected_hit == pytest.approx(plan.expected_hit)
    with pytest.raises(HaqmoeError, match="4 MoE layers x 8 experts, not 32 x 8"):
        Plan.load(path, 32, 8)
    with pytest.raises(HaqmoeError, match="4 MoE layers x 8 experts"):
        evaluate_trace(back, skewed_trace(L=5))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(HaqmoeError, match="not a haqmoe placement plan"):
        Plan.load(tmp_path / "bad.json")


def test_whole_model_paths_do_not_generalise():
    build, held = skewed_trace(T=2000, L=6, seed=0), skewed_trace(T=500, L=6, seed=0, token_seed=7)
    w2 = path_coverage(stats_from_trace(build, 2), held)
    w6 = path_coverage(stats_from_trace(build, 6), held)
    assert w2 > 0.9 and w6 < 0.5


def test_cost_model_shape():
    """The planning objective is the simulator's cost model: a miss costs min(CPU, copy + GPU, split)."""
    hw, spec = load_profile("rtx5090d"), model_spec("mixtral-8x7b")
    prof = planning_costs(hw, spec)
    assert prof.expert_bytes == spec.expert_bytes("w8a8")
    assert prof.cost.transfer_ms == pytest.approx(1e3 * prof.expert_bytes / (hw.h2d_gb_s * 1e9))
    n = np.array([0.0, 1, 2, 100, 1000])
    assert prof.saving_ms(n)[0] == 0 and (prof.saving_ms(n) >= 0).all()
    cost = prof.cost
    for x in n[1:]:
        want = min(cost.t_cpu(x), cost.t_gpu(x, resident=False), cost.best_split(x)[1])
        assert prof.miss_ms(np.array(x)) == pytest.approx(want)
        assert prof.resident_ms(np.array(x)) == pytest.approx(cost.t_gpu(x))
    assert planning_costs_for("rtx5090d", "smollm2-moe", 30, 8, 2).expert_bytes == \
        model_spec("smollm2-moe").expert_bytes("w8a8")
    with pytest.raises(HaqmoeError, match="unknown hardware profile"):
        load_profile("nope")


needs_data = pytest.mark.skipif(shared_data_dir() is None or not (shared_data_dir() / "mixtral-routing").is_dir(),
                                reason="shared Mixtral routing data not present")


@needs_data
def test_mixtral_importers():
    from haqmoe.routing import mixtral as mx

    pc = mx.load_frac_vecs(["abstract_algebra"])
    assert pc.counts.shape == (100, 32, 8)
    # every (prompt, layer) sums to 2 x prompt length: exact counts from fractions
    np.testing.assert_array_equal(pc.counts.sum(axis=2), 2 * pc.tokens[:, None] * np.ones((1, 32)))
    fid = mx.load_fiddler("original")
    assert len(fid) == 7 and fid["machine_learning"].sum(axis=1).std() == 0
    build, held = mx.split_subjects(mx.list_subjects())
    assert not set(build) & set(held) and len(build) + len(held) == 57
    st = mx.stats_from_prompts(pc, synthetic_tokens_per_prompt=4)
    assert st.synthetic_paths and st.tokens == pc.tokens.sum()
    rc = mx.synthetic_requests(pc, 25, seed=0)
    assert rc.shape == (100, 32, 8) and (rc.sum(axis=2) == 50).all()
    with pytest.raises(HaqmoeError, match="unknown MMLU subject"):
        mx.load_frac_vecs(["astrology"])


def test_cli_plan_and_eval(tmp_path):
    from typer.testing import CliRunner

    from haqmoe.cli.main import app

    build, held = tmp_path / "build", tmp_path / "held"
    save_trace(skewed_trace(seed=0), build)
    save_trace(skewed_trace(seed=0, T=120), held)
    runner = CliRunner()
    plans = []
    for strat in ("two-stage", "latency"):
        out = tmp_path / f"{strat}.json"
        r = runner.invoke(app, ["-q", "plan", str(build), "--out", str(out), "--strategy", strat, "--budget", "16",
                                "--profile", "rtx4090", "--request-len", "20", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["experts"] == 16
        plans.append(str(out))
    r = runner.invoke(app, ["-q", "placement-eval", *plans, "--on", str(held), "--request-len", "20",
                            "--profile", "rtx4090", "--out", str(tmp_path / "res.json"),
                            "--plot", str(tmp_path / "hit.png"), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)["rows"]
    assert {row["request_len"] for row in rows} == {"full", 20} and (tmp_path / "hit.png").stat().st_size > 0
    assert (tmp_path / "res.md").is_file()
    # budget beyond all experts, and a plan evaluated on another model's trace: clear errors
    r = runner.invoke(app, ["plan", str(build), "--out", str(tmp_path / "x.json"), "--budget", "33"])
    assert r.exit_code != 0 and "between 0 and 32" in str(r.exception)
    r = runner.invoke(app, ["plan", str(build), "--out", str(tmp_path / "x.json")])  # no budget: name the flags
    assert r.exit_code != 0 and "--budget N" in str(r.exception) and "--budget-gb GB" in str(r.exception)
    other = tmp_path / "other"
    save_trace(skewed_trace(L=5), other)
    r = runner.invoke(app, ["placement-eval", plans[0], "--on", str(other)])
    assert r.exit_code != 0 and "4 MoE layers x 8 experts" in str(r.exception)
    # requests shorter than the asked length (100 tokens each here): an error for plan, left out by eval
    r = runner.invoke(app, ["plan", str(build), "--out", str(tmp_path / "y.json"), "--budget", "16",
                            "--request-len", "101"])
    assert r.exit_code != 0 and "no request of 101 tokens" in str(r.exception)
    r = runner.invoke(app, ["-q", "placement-eval", plans[0], "--on", str(held), "--request-len", "20",
                            "--request-len", "500", "--json"])
    assert r.exit_code == 0 and "no request of [500] tokens" in r.stderr
    assert {row["request_len"] for row in json.loads(r.stdout)["rows"]} == {"full", 20}
    # evaluated on its own build data: flagged in-sample (held-out rows above are not)
    assert not any(row["in_sample"] for row in rows)
    r = runner.invoke(app, ["-q", "placement-eval", plans[0], "--on", str(build), "--request-len", "20"])
    assert r.exit_code == 0 and r.stdout.count("IN-SAMPLE") == 2
    r = runner.invoke(app, ["routing-stats", str(build), "--held-out", str(other)])
    assert r.exit_code != 0 and "5 MoE layers x 8 experts" in str(r.exception)


@needs_data
def test_two_stage_without_paths_and_in_sample_mixtral_sources():
    from haqmoe.routing.sources import load_source, shares_data

    stats = load_source("fiddler:original").stats(2)
    with pytest.raises(HaqmoeError, match="Stage I needs path statistics"):
        build_plan(make_strategy("two-stage"), stats, Budget(128))
    assert shares_data("mixtral:all", "mixtral:heldout") and shares_data("mixtral:build", "mixtral:build")
    assert not shares_data("mixtral:build", "mixtral:heldout")
    assert shares_data("fiddler:original", "mixtral:machine_learning+anatomy")


def test_one_routing_source_grammar(tmp_path):
    """One parser names routing data for statistics (plan) and for replay (simulate), and says which kinds give what."""
    from haqmoe.routing.sources import load_source, parse_source
    from haqmoe.studies.experiments import load_pair

    assert parse_source("mixtral:build").kind == "mixtral" and parse_source("fiddler:original").kind == "fiddler"
    assert parse_source("mixtral-stats").kind == "mixtral-stats" and parse_source("tiny:mixtral").arg == "mixtral"
    assert parse_source(str(tmp_path)).kind == "trace" and parse_source("synthetic").kind == "synthetic"
    with pytest.raises(HaqmoeError, match="gives no statistics"):
        load_source("mixtral-stats")
    with pytest.raises(HaqmoeError, match="gives no traces to replay"):
        load_pair("mixtral:build")
    with pytest.raises(HaqmoeError, match="not found"):
        load_source(str(tmp_path / "missing"))
