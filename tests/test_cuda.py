"""CUDA paths (skipped without a GPU; run on a lent GPU machine, see bench/results/runtime_gpu.md):
the int8 GEMM on CUDA equals CPU fake quantization, and the engine with a real GPU tier (pinned host
copies, side-stream copies, int8 slots) gives plain transformers' greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from haqmoe.exec.int8 import ACT_CACHE, Int8Linear
from haqmoe.quant.modules import QuantLinear
from haqmoe.quant.quantizer import QuantSpec
from haqmoe.runtime.engine import SamplingConfig

from .test_engine import PROMPT, make
from .test_int8 import TOKENS, _inputs, _one_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("w_sym,a_sym", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize("m", TOKENS)
def test_cuda_int8_linear_matches_cpu_fake_quant(w_sym: bool, a_sym: bool, m: int):
    k, n = 96, 40  # neither a multiple of 16 rows nor aligned: exercises CUDA's padding
    g = torch.Generator().manual_seed(m)
    w, b = torch.randn(n, k, generator=g) * 0.1 + 0.02, torch.randn(n, generator=g)
    ql = QuantLinear.from_weight(w, b, QuantSpec(8, w_sym, "channel"), QuantSpec(8, a_sym, "token"))
    il = Int8Linear.from_quant_linear(ql).cuda()
    x = _inputs(m, k, outliers=True, seed=m + 1)
    ACT_CACHE.clear()
    y_fake, y_cuda = ql(x), il(x.cuda()).cpu()
    assert ((y_cuda - y_fake).abs() <= _one_step(ql, x)).all()


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "rtn"])
@pytest.mark.parametrize("slots,decision", [(8, "always-transfer"), (2, "always-cpu"), (3, "predictor"),
                                            (3, "balanced"), (3, "split")])
def test_cuda_engine_greedy_tokens_equal_transformers(quant, slots, decision):
    engine, ref = make(quant=quant, device="cuda", slots_per_layer=slots, decision=decision)
    assert engine.store.device.type == "cuda" and engine.store.quantized == quant  # int8 or dequant: auto
    gen = engine.generate(PROMPT, SamplingConfig(max_new_tokens=12))
    assert gen.tokens == ref
    s = engine.summary()
    if slots == 8:
        assert s["cpu_expert_calls"] == 0
    if decision == "always-cpu":  # no plan, nothing ever admitted: every expert ran on the CPU tier
        assert s["gpu_expert_calls"] == 0 and s["bytes_moved"] == 0
    engine.cache.check_invariants()


@pytest.mark.parametrize("decision", ["always-cpu", "split"])
def test_cuda_compiled_decode_keeps_tokens(decision):
    """Compiled decode on CUDA: inductor graphs replayed as CUDA graphs between eager routers and hybrid
    experts, two generations (the second replays the recorded graphs)."""
    engine, ref = make(quant=True, device="cuda", slots_per_layer=3, decision=decision, compile=True)
    for _ in range(2):
        assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    assert engine.summary()["cpu_expert_calls" if decision == "always-cpu" else "split_expert_calls"] > 0


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("int8_gemm", [True, False])
def test_cuda_engine_gpu_tier_precisions_keep_tokens(int8_gemm, graphs):
    engine, ref = make(quant=True, device="cuda", slots_per_layer=3, decision="predictor", n_critical=0,
                       cuda_graphs=graphs)
    engine.store.int8_gemm = int8_gemm  # override the start-up choice: both GPU-tier paths
    if graphs:
        engine.store.capture_decode_graphs(engine.model.config.hidden_size, torch.float32)
    assert bool(engine.store._graphs) == graphs
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    assert engine.summary()["gpu_expert_calls"] > 0


def test_cuda_graph_replay_equals_eager_expert():
    engine, _ = make(quant=True, device="cuda", slots_per_layer=3, decision="always-transfer")
    store = engine.store
    assert store._graphs, "graphs are on by default on CUDA"
    for slot, (layer, e) in enumerate([(0, 1), (1, 5), (0, 7)]):
        store.load_slot(slot, layer, e)
    torch.cuda.synchronize()
    with torch.inference_mode():  # as the engine runs (the graphs' buffers are inference tensors)
        for slot in range(3):
            x = torch.randn(1, engine.model.config.hidden_size, device="cuda")
            assert torch.equal(store.gpu_forward(slot, x).clone(), store._forward(slot, x))


def test_cuda_background_admission_keeps_tokens():
    engine, ref = make(quant=True, device="cuda", slots_per_layer=3, decision="always-cpu", admit=True)
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    s = engine.summary()
    assert s["background_copies"] > 0 and s["gpu_expert_calls"] > 0


def test_cuda_prefetch_waits_for_its_copies():
    """Prefetched slots are copied on a side stream: their first use must wait for the copy."""
    engine, ref = make(quant=True, device="cuda", slots_per_layer=4, decision="always-transfer", prefetch=2)
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    assert engine.summary()["prefetch_copies"] > 0


def test_cuda_shaped_model_int8_slots_match_dequantized():
    from haqmoe.runtime.shaped import MoEShape, shaped_mixtral
    from haqmoe.runtime.store import ExpertStore, StoreConfig

    shape = MoEShape(hidden=256, ffn=512, experts=4, heads=4, kv_heads=2, vocab=100, layers=2)
    _, _, experts = shaped_mixtral(shape, np.zeros((4, 2, 2), dtype=np.int64) + np.array([0, 1]))
    real = ExpertStore(experts, StoreConfig("cuda", 2))
    fake = ExpertStore(experts, StoreConfig("cuda", 2, int8_gemm=False))
    x = torch.randn(5, shape.hidden, device="cuda", dtype=torch.float16)
    for s in (real, fake):
        s.load_slot(0, 1, 2)
    torch.cuda.synchronize()
    a, b = fake.gpu_forward(0, x).float(), real.gpu_forward(0, x).float()
    assert ((a - b).abs().max() / a.abs().max()) < 2e-2


def test_cuda_fused_int8_groups_equal_unfused_after_moving():
    """Conversion on the CPU, then .cuda(): the groups' stacked weights move once and keep exact outputs."""
    import copy

    from haqmoe.models.adapters import adapter_for
    from haqmoe.models.tiny import tiny_model
    from haqmoe.exec import precision
    from haqmoe.quant.config import QuantConfig
    from haqmoe.quant.rtn import quantize_rtn

    model = tiny_model("llama", seed=2)
    quantize_rtn(model, adapter_for(model), QuantConfig.w8a8("rtn"), progress=False)
    separate = copy.deepcopy(model)
    assert precision.convert(model, "int8").counts["fused-groups"] > 0
    fuse, precision._fuse_siblings = precision._fuse_siblings, lambda *a: None
    try:
        precision.convert(separate, "int8")
    finally:
        precision._fuse_siblings = fuse
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        assert torch.equal(model.cuda()(ids).logits, separate.cuda()(ids).logits)


def test_cuda_split_graph_equals_eager_split_and_whole_expert():
    engine, _ = make(quant=True, device="cuda", slots_per_layer=3, decision="split")
    store = engine.store
    assert store._split_graphs and len(engine.cost.split_ms) == 7  # recorded and calibrated at start-up
    slot, whole = store.split_slot(0), 0
    hidden = engine.model.config.hidden_size
    with torch.inference_mode():
        for k, (layer, e) in [(1, (0, 3)), (4, (1, 6)), (7, (0, 2))]:
            rows = store.split_rows(k)
            store.load_slot(whole, layer, e)
            store.load_slot(slot, layer, e, rows_from=rows)
            torch.cuda.synchronize()
            x = torch.randn(1, hidden, device="cuda")
            h_cpu = store.cpu_rows(layer, e, x.cpu(), rows)
            y_graph = store.split_forward(slot, x, h_cpu, rows).clone()
            assert torch.equal(y_graph, store._split_tail(slot, x, h_cpu.cuda(), rows))
            y_whole = store._forward(whole, x)  # CPU and CUDA float rescales may flip one activation step of down
            assert (y_graph - y_whole).abs().max() <= 0.02 * y_whole.abs().max()


def test_cuda_engine_pins_the_one_host_copy_of_int8_experts():
    """With --exec real on a GPU the CPU tier's int8 experts are the store's host copy: views of
    the same storages, page-locked in place (each storage registered once), same tokens as fake."""
    fake, ref = make(quant=True, device="cuda", slots_per_layer=3, decision="split")
    real, _ = make(quant=True, device="cuda", slots_per_layer=3, decision="split", exec_mode="real")
    cpu = {b.untyped_storage().data_ptr() for h in real.hybrids for b in h.original.buffers()}
    for experts in real.store.host:
        for tensors in experts:
            for key in ("gate.q", "up.q", "down.q"):
                assert tensors[key].untyped_storage().data_ptr() in cpu and tensors[key].is_pinned()
    assert real.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
