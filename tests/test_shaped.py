"""Shaped models (random int8 experts, trace-replayed routing) and the GPU tier's int8 GEMM path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.quant.config import QuantConfig
from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig, SamplingConfig
from haqmoe.runtime.shaped import MoEShape, restore_experts, shaped_mixtral
from haqmoe.runtime.store import ExpertStore, StoreConfig

SHAPE = MoEShape(hidden=64, ffn=96, experts=4, top_k=2, heads=4, kv_heads=2, vocab=100, layers=3)
PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 61, 7]])
NEW = 6


def routes(tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([rng.choice(SHAPE.experts, 2, replace=False) for _ in range(SHAPE.layers)])
                     for _ in range(tokens)])


def reference(lm, feed) -> list[int]:
    feed.pos = 0
    with torch.no_grad():
        out = lm.model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    return out[0, PROMPT.shape[1]:].tolist()


def test_router_replays_the_trace_and_engine_tiers_match_the_plain_model():
    r = routes(PROMPT.shape[1] + NEW)
    lm, feed, experts = shaped_mixtral(SHAPE, r, dtype=torch.float32)
    ref = reference(lm, feed)
    assert feed.pos == PROMPT.shape[1] + NEW - 1  # one row per token of every forward
    for decision, slots in (("always-cpu", 2), ("always-transfer", 2), ("always-transfer", 4)):
        restore_experts(lm, experts)
        feed.pos = 0
        engine = CollaborativeEngine(lm, EngineConfig(emulate_gpu=True, slots_per_layer=slots, decision=decision))
        assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=NEW)).tokens == ref
        tel = engine.telemetry
        used = r[: feed.pos]
        calls = [len(np.unique(used[: PROMPT.shape[1], l])) + sum(len(np.unique(t[l])) for t in used[PROMPT.shape[1]:])
                 for l in range(SHAPE.layers)]
        assert (tel.cpu_experts + tel.gpu_experts).tolist() == calls  # every routed expert ran, once per forward


def test_route_feed_guards():
    with pytest.raises(HaqmoeError, match="routes must be"):
        shaped_mixtral(SHAPE, np.zeros((4, 2, 2), dtype=np.int64))
    with pytest.raises(HaqmoeError, match="outside"):
        shaped_mixtral(SHAPE, np.full((4, 3, 2), 9))
    lm, feed, _ = shaped_mixtral(SHAPE, routes(3))
    with pytest.raises(HaqmoeError, match="exhausted"):
        lm.model(PROMPT)


@pytest.mark.parametrize("w_sym,a_sym", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("n", [1, 7, 17])
def test_gpu_tier_int8_gemm_matches_dequantized_slots(w_sym, a_sym, n):
    qcfg = QuantConfig.w8a8("rtn", w_sym=w_sym, a_sym=a_sym)
    _, _, experts = shaped_mixtral(SHAPE, routes(2), dtype=torch.float32, qcfg=qcfg)
    fake = ExpertStore(experts, StoreConfig("cpu", 2, int8_gemm=False))
    real = ExpertStore(experts, StoreConfig("cpu", 2, int8_gemm=True))
    assert real.int8_gemm and not fake.int8_gemm
    x = torch.randn(n, SHAPE.hidden) * 3
    x[:, 5] *= 20  # an outlier channel
    for store in (fake, real):
        store.load_slot(1, 2, 3)
    a, b = fake.gpu_forward(1, x), real.gpu_forward(1, x)
    step = (b - a).abs().max() / a.abs().max()
    assert step < 2e-2  # equal up to activation-rounding flips; a wrong zero point or scale is O(1)
    ref = experts[2].expert_forward(3, x)  # the CPU tier's own fake-quant expert
    assert torch.allclose(a, ref, atol=1e-5, rtol=1e-5)


def test_gpu_benchmark_script_dry_run(tmp_path, monkeypatch):
    """bench/gpu_mixtral.py end to end on the CPU (tiny shape, GPU tier emulated): every policy measured,
    predicted, and the all-resident row fits the simulator's host overhead exactly."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    from haqmoe.paths import shared_data_dir

    if shared_data_dir() is None or not (shared_data_dir() / "mixtral-routing").is_dir():
        pytest.skip("needs ../shared/data/mixtral-routing")
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_mixtral.py"
    spec = importlib.util.spec_from_file_location("gpu_mixtral", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_mixtral", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    mod.prepare(tmp_path / "in", requests=2, tokens=8, prefill=16)
    mod.run(tmp_path / "in", tmp_path / "out", layers=2, tokens=4, budget_frac=0.4, dry_run=True)
    rows = json.loads((tmp_path / "out" / "runtime_gpu.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == list(mod.GPU_POLICIES) and not any("error" in r for r in rows)
    assert rows[0]["prediction_error"] == pytest.approx(0.0, abs=1e-9)
    assert all(r["hit_rate"] == 1.0 for r in rows)
    graphs = [r for r in rows if mod.GPU_POLICIES[r["policy"]].graphs]  # eager rows: comparison only
    assert len(graphs) < len(rows) and all(r["predicted_decode_tok_s"] > 0 for r in graphs)
