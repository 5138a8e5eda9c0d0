"""Collaborative engine: same tokens as plain transformers whatever tier serves the experts."""

from __future__ import annotations

import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.base import LoadedModel
from haqmoe.models.tiny import tiny_model
from haqmoe.exec.compiled import compiler_available
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.rtn import quantize_rtn
from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig, SamplingConfig

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 8, 61, 7, 12, 30, 2, 77]])


def reference_tokens(model, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(PROMPT, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0, eos_token_id=None)
    return out[0, PROMPT.shape[1]:].tolist()


def make(family="mixtral", quant=False, **cfg):
    model = tiny_model(family, seed=3)
    if quant:
        quantize_rtn(model, adapter_for(model), QuantConfig.w8a8("rtn"), progress=False)
    ref = reference_tokens(model, 12)
    lm = LoadedModel(model, None, family, adapter_for(model))
    return CollaborativeEngine(lm, EngineConfig(**cfg)), ref


CASES = {
    "cpu-plain": dict(),
    "all-resident": dict(emulate_gpu=True, slots_per_layer=8, decision="always-transfer"),
    "none-resident": dict(emulate_gpu=True, slots_per_layer=2, decision="always-cpu"),
    "mixed": dict(emulate_gpu=True, slots_per_layer=3, decision="predictor", n_critical=1),
    "lru-evicting": dict(emulate_gpu=True, slots_per_layer=3, decision="predictor", n_critical=0),
    "balanced": dict(emulate_gpu=True, slots_per_layer=3, decision="balanced"),
    "split": dict(emulate_gpu=True, slots_per_layer=3, decision="split"),
    "admit": dict(emulate_gpu=True, slots_per_layer=3, decision="always-cpu", admit=True),
}


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "rtn"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers(case, quant):
    engine, ref = make(quant=quant, **CASES[case])
    gen = engine.generate(PROMPT, SamplingConfig(max_new_tokens=12))
    assert gen.tokens == ref
    s = engine.summary()
    if case == "all-resident":
        assert s["cpu_expert_calls"] == 0 and s["gpu_expert_calls"] > 0
    if case == "none-resident":
        assert s["gpu_expert_calls"] == 0 and s["cpu_expert_calls"] > 0 and s["bytes_moved"] == 0
    if case == "mixed":  # prefill (n > 1) transfers, decode (n = 1) computes misses on the CPU
        assert s["cpu_expert_calls"] > 0 and s["gpu_expert_calls"] > 0 and 0 < s["hit_rate"] < 1
    if case == "lru-evicting":  # every miss transfers unless all slots hold experts this call still uses
        assert s["gpu_expert_calls"] > 3 * s["cpu_expert_calls"] and s["evictions"] > 0 and 0 < s["hit_rate"] < 1
    if case == "split":  # one-token misses computed half on the CPU, half on the (emulated) GPU
        assert s["split_expert_calls"] > 0 and s["bytes_moved"] > 0
    if case == "admit":  # every miss runs on the CPU, then is copied in unless every slot is in use now
        assert 0 < s["background_copies"] <= s["cpu_expert_calls"] == s["misses"]
        assert s["gpu_expert_calls"] > 0 and s["bytes_moved"] > 0
    if engine.cache is not None:
        engine.cache.check_invariants()


@pytest.mark.skipif(not compiler_available(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_decode_gives_the_eager_tokens():
    """Compiled decode (static cache, inductor graphs between eager routers and hybrid experts) keeps the
    engine's decisions on the host and its tokens: two generations, the second reusing the graphs."""
    engine, ref = make(emulate_gpu=True, slots_per_layer=3, decision="split", compile=True)
    for _ in range(2):
        assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    s = engine.summary()
    assert s["split_expert_calls"] > 0 and s["cpu_expert_calls"] + s["gpu_expert_calls"] > 0
    engine.cache.check_invariants()


def test_decode_host_times_count_the_decode_tokens_cpu_work():
    """The per-token host breakdown covers decode forwards only: the cost model's estimate of the CPU
    tier equals its one-token time times the decode's CPU expert calls (prefill's counted apart), and
    the measured phases fit inside the hybrid forward's wall time."""
    engine, _ = make(emulate_gpu=True, slots_per_layer=3, decision="always-cpu")
    engine.generate(PROMPT, SamplingConfig(max_new_tokens=1))  # the prefill alone (static cache: same calls)
    prefill_calls = engine.summary()["cpu_expert_calls"]
    engine.reset_telemetry()
    tokens = 12
    engine.generate(PROMPT, SamplingConfig(max_new_tokens=tokens))
    s = engine.summary()
    decode_calls = s["cpu_expert_calls"] - prefill_calls
    assert decode_calls > 0
    steps = tokens - 1  # the first token comes from the prefill
    assert s["host_cpu_tier_est_ms"] * steps == pytest.approx(decode_calls * engine.cost.t_cpu(1))
    phases = ("route_wait", "decide", "to_host", "cpu_tier")
    assert all(s[f"host_{k}_ms"] >= 0 for k in phases) and s["host_cpu_tier_ms"] > 0
    assert sum(s[f"host_{k}_ms"] for k in phases) <= s["host_layer_ms"]
    resident, _ = make(emulate_gpu=True, slots_per_layer=8, decision="always-transfer")
    resident.generate(PROMPT, SamplingConfig(max_new_tokens=tokens))
    assert resident.summary()["host_cpu_tier_ms"] == resident.summary()["host_cpu_tier_est_ms"] == 0


def test_calibration_rotates_over_every_expert():
    """The start-up calibration's i-th call runs (and copies) the i-th (layer, expert) in turn, each the
    engine's own executor: brute force against the hybrid layers' CPU tier, the host copies and cpu_rows."""
    engine, _ = make(quant=True, emulate_gpu=True, slots_per_layer=3, decision="split")
    cpu_fn, copy_fn, rows_fn = engine._calibration_executors(torch.float32)
    pairs = [(l, e) for l, h in enumerate(engine.hybrids) for e in range(h.num_experts)]
    x = torch.randn(2, engine.model.config.hidden_size)
    rows = engine.store.split_rows(3)
    with torch.no_grad():
        outputs = []
        for i, (l, e) in enumerate(pairs + pairs[:1]):  # wraps around after every expert
            want = engine.hybrids[l].original(x, torch.full((2, 1), e), torch.ones(2, 1))
            outputs.append(cpu_fn(x, i))
            torch.testing.assert_close(outputs[-1], want, rtol=0, atol=0)
            torch.testing.assert_close(rows_fn(x, rows, i), engine.store.cpu_rows(l, e, x, rows), rtol=0, atol=0)
            copy_fn(i)
            for key, buf in engine.store.slots.items():
                assert torch.equal(buf[0], engine.store.host[l][e][key])
    assert not torch.equal(outputs[0], outputs[1])  # distinct experts: a fixed one would repeat


def test_warm_up_counts_from_zero_and_keeps_tokens():
    engine, ref = make(emulate_gpu=True, slots_per_layer=3, decision="split")
    engine.warm_up(PROMPT, SamplingConfig(max_new_tokens=12), tokens=3)
    s = engine.summary()
    assert s["cpu_expert_calls"] == s["gpu_expert_calls"] == s["split_expert_calls"] == s["misses"] == 0
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "olmoe", "deepseek_v2", "gpt_oss"])
def test_other_moe_families_exact(family):
    engine, ref = make(family, emulate_gpu=True, slots_per_layer=3, decision="predictor", n_critical=1)
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "rtn"])
@pytest.mark.parametrize("case", ["all-resident", "split", "admit"])
@pytest.mark.parametrize("family", ["deepseek_v2", "gpt_oss"])
def test_new_families_every_tier_exact(family, case, quant):
    """The GPU tier's slots (host copies in nn.Linear layout, gpt-oss's biases and clamped SwiGLU),
    split misses (the CPU's gate/up rows, biases sliced alike) and the CPU tier: transformers' tokens."""
    engine, ref = make(family, quant=quant, **CASES[case])
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    s = engine.summary()
    assert s["gpu_expert_calls"] > 0
    if case == "split" and not quant:  # (quantized, the cost model sends these misses to the CPU instead)
        assert s["split_expert_calls"] > 0


def test_sampling_is_seeded():
    engine, _ = make()
    a = engine.generate(PROMPT, SamplingConfig(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7)).tokens
    b = engine.generate(PROMPT, SamplingConfig(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=7)).tokens
    c = engine.generate(PROMPT, SamplingConfig(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=8)).tokens
    assert a == b and a != c


def test_bad_engine_configs_are_clear():
    with pytest.raises(HaqmoeError, match="at least one slot"):
        make(emulate_gpu=True, slots_per_layer=0)
    with pytest.raises(HaqmoeError, match="cache too small"):
        make(emulate_gpu=True, slots_per_layer=1)
    with pytest.raises(HaqmoeError, match="unknown policy"):
        make(decision="sometimes")
    model = tiny_model("llama")
    with pytest.raises(HaqmoeError, match="no MoE layers"):
        CollaborativeEngine(LoadedModel(model, None, "llama", adapter_for(model)))
    with pytest.raises(HaqmoeError, match="leave out --device cuda"):
        make(emulate_gpu=True, device="cuda")
    with pytest.raises(HaqmoeError, match="unknown device"):
        make(device="tpu")
    with pytest.raises(HaqmoeError, match="unknown cache policy"):
        make(emulate_gpu=True, cache_policy="lru+alloc")  # per-layer allocation: simulator only
    with pytest.raises(HaqmoeError, match="pass --plan"):
        make(emulate_gpu=True, cache_policy="pinned+lru")
    with pytest.raises(HaqmoeError, match="only 8 experts"):
        make(emulate_gpu=True, prefetch=9)
    engine, _ = make()
    context = engine.model.config.max_position_embeddings
    with pytest.raises(HaqmoeError, match="exceeds the model's context"):
        engine.generate(PROMPT, SamplingConfig(max_new_tokens=context - PROMPT.shape[1] + 1))
    for bad in (dict(top_p=0.0), dict(temperature=-1.0), dict(max_new_tokens=0)):
        with pytest.raises(HaqmoeError, match="0 < top_p"):
            SamplingConfig(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_asked_without_cuda_is_clear():
    with pytest.raises(HaqmoeError, match="sees no CUDA device"):
        make(device="cuda")


def _plan_file(tmp_path, layers: int, experts: int, resident: list[list[int]]):
    from haqmoe.routing.placement import Plan

    return str(Plan(layers, experts, resident, "test").save(tmp_path / f"plan{layers}.json"))


def test_plans_are_checked_with_or_without_a_gpu_tier(tmp_path):
    other = _plan_file(tmp_path, 32, 8, [[0]] * 32)  # a plan made for another model (32 layers)
    for tier in (dict(), dict(emulate_gpu=True)):
        with pytest.raises(HaqmoeError, match="layers"):
            make(plan=other, **tier)
    one = _plan_file(tmp_path, 2, 8, [[0], [1]])  # fewer resident experts than top-k: slots default to top-k
    engine, ref = make(emulate_gpu=True, plan=one, cache_policy="pinned+lfu", decision="always-cpu")
    assert engine.cache.config.slots == 2 and engine.cache.get(1, 1).pinned
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref


def test_profile_costs_use_the_bytes_the_store_copies():
    """Without a GPU the predictor's copy time comes from the profile: for the experts this store holds
    (fp32 here, int8 once quantized), not always int8's."""
    from haqmoe.costs.hardware import GB, load_profile

    h2d = load_profile("rtx5090d").h2d_gb_s * GB
    for quant in (False, True):
        engine, _ = make(quant=quant, emulate_gpu=True, slots_per_layer=3)
        # the roofline counts weights, scales and zero points; the store also holds int8's column sums
        # (10 % of an expert this small, under 0.1 % of Mixtral's): 4x apart from the other precision
        assert engine.cost.transfer_ms == pytest.approx(1e3 * engine.store.expert_bytes / h2d, rel=0.02 + 0.1 * quant)


def test_prefetch_never_changes_tokens_and_hits():
    plain, ref = make(emulate_gpu=True, slots_per_layer=4, decision="predictor", n_critical=0)
    pre, _ = make(emulate_gpu=True, slots_per_layer=4, decision="predictor", n_critical=0, prefetch=2)
    a = plain.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens
    b = pre.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens
    assert a == b == ref
    s = pre.summary()
    assert s["prefetch_copies"] > 0 and s["prefetch_hits"] > 0 and s["guess_ms"] > 0
    assert plain.summary()["prefetch_copies"] == 0
    pre.cache.check_invariants()
    plain.set_prefetch(2)  # switched on between generations: same tokens again, and it prefetches
    assert plain.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    assert plain.summary()["prefetch_copies"] > 0


def test_lookahead_never_changes_tokens_and_prefetches_each_distance():
    """Lookahead only moves copies: the tokens are the plain model's at every distance, and copies for
    layers 1, 2 and 3 ahead are counted apart."""
    model = tiny_model("mixtral", seed=3, layers=4)
    ref = reference_tokens(model, 12)
    engine = CollaborativeEngine(LoadedModel(model, None, "mixtral", adapter_for(model)),
                                 EngineConfig(emulate_gpu=True, slots_per_layer=3, decision="predictor", n_critical=0,
                                              prefetch=2, lookahead=3))
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    s = engine.summary()
    assert set(s["prefetch_by_distance"]) == {1, 2, 3}
    assert sum(d["copies"] for d in s["prefetch_by_distance"].values()) == s["prefetch_copies"] > 0
    engine.cache.check_invariants()
    with pytest.raises(HaqmoeError, match="lookahead"):
        CollaborativeEngine(LoadedModel(tiny_model("mixtral"), None, "mixtral", adapter_for(model)),
                            EngineConfig(emulate_gpu=True, prefetch=2, lookahead=4))


def test_real_int8_engine_runs_int8_modules_for_in_memory_quantized_models():
    """exec_mode real must convert a model quantized in memory (no checkpoint config) too, and give
    the fake-quant engine's greedy tokens on this tiny model."""
    from haqmoe.exec.int8 import Int8Experts, Int8Linear
    from haqmoe.quant.modules import QuantExperts, QuantLinear

    fake, ref = make(quant=True)
    real, _ = make(quant=True, exec_mode="real")
    kinds = {type(m) for m in real.model.modules()}
    assert Int8Linear in kinds and Int8Experts in kinds and not kinds & {QuantLinear, QuantExperts}
    assert real.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref


def test_emulated_gpu_tier_computes_as_the_int8_cpu_tier():
    """Beside a real-int8 CPU tier, emulated GPU slots run the same int8 GEMM: the logits are
    bit-identical whichever tier served each expert, so which experts happened to be resident (one
    request's history, in a server) cannot change another request's greedy answer. Slots computing in
    fake-quant arithmetic differed in the last bits and flipped greedy tokens on the MoEfied model."""
    def logits(case: str) -> list[torch.Tensor]:
        engine, _ = make(quant=True, exec_mode="real", **CASES[case])
        with torch.no_grad():  # twice: the second forward meets the first one's residency
            return [engine.model(PROMPT).logits, engine.model(PROMPT).logits, engine.model(PROMPT[:, :1]).logits]

    ref = logits("cpu-plain")
    for case in CASES:
        if case != "cpu-plain":
            assert all(torch.equal(a, b) for a, b in zip(logits(case), ref)), case


@pytest.mark.parametrize("case", ["cpu-plain", "mixed"])
def test_int8_lm_head_model_in_the_engine(case):
    """A model whose lm_head is stored as int8 rows runs it on the int8 GEMM in the real-int8 engine,
    with the greedy tokens of plain transformers on the same converted model."""
    import copy

    from haqmoe.exec.int8 import ResidualInt8Linear
    from haqmoe.quant.modules import quantize_vocabulary
    from haqmoe.exec.precision import convert

    model = tiny_model("mixtral", seed=3)
    quantize_rtn(model, adapter_for(model), QuantConfig.w8a8("rtn"), progress=False)
    quantize_vocabulary(model)
    plain = copy.deepcopy(model)
    convert(plain, "int8")
    ref = reference_tokens(plain, 12)
    engine = CollaborativeEngine(LoadedModel(model, None, "mixtral", adapter_for(model)),
                                 EngineConfig(exec_mode="real", **CASES[case]))
    assert isinstance(engine.model.lm_head, ResidualInt8Linear)
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref


def test_prefetch_with_learned_guesses_keeps_tokens(tmp_path):
    """--guess-trace: per-layer transition tables learned from a profiled trace of the same model."""
    from haqmoe.routing.profile import trace_windows
    from haqmoe.routing.trace_io import save_trace

    model = tiny_model("mixtral", seed=3)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    path = save_trace(trace_windows(model, adapter_for(model), ids, guess_width=2), tmp_path / "trace")
    engine, ref = make(emulate_gpu=True, slots_per_layer=4, decision="predictor", n_critical=0, prefetch=2,
                       guess_trace=str(path))
    assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    assert engine.summary()["prefetch_copies"] > 0
    with pytest.raises(HaqmoeError, match="experts"):  # a trace of another model is refused
        other = tiny_model("mixtral", seed=3, layers=3)
        bad = save_trace(trace_windows(other, adapter_for(other), ids, guess_width=2), tmp_path / "bad")
        make(emulate_gpu=True, slots_per_layer=4, prefetch=2, guess_trace=str(bad))


@pytest.mark.parametrize("quant", [False, True], ids=["fp32", "rtn"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_split_expert_equals_the_whole_expert(family, quant):
    """CPU rows [0, r) + copied rows [r, I) and down: the same expert output, and only that much copied.
    gpt-oss: the biases travel with their rows; the slot (and the int8 GEMM's) equal the module's expert."""
    from haqmoe.runtime.store import ExpertStore, StoreConfig

    model = tiny_model(family, seed=3)
    adapter = adapter_for(model)
    if quant:
        quantize_rtn(model, adapter, QuantConfig.w8a8("rtn"), progress=False)
    experts = [adapter.experts(b) for b in adapter.blocks(model)]
    store = ExpertStore(experts, StoreConfig("cpu", num_slots=1, split_slots=1))
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    store.load_slot(0, 1, 5)
    ref = store.gpu_forward(0, x)
    with torch.no_grad():
        own = experts[1](x, torch.full((3, 1), 5), torch.ones(3, 1))
    torch.testing.assert_close(ref, own, rtol=1e-5, atol=1e-5)
    if quant:  # the int8 GEMM's slots: equal up to activation-rounding flips
        real = ExpertStore(experts, StoreConfig("cpu", num_slots=1, int8_gemm=True))
        real.load_slot(0, 1, 5)
        assert real.int8_gemm and float((real.gpu_forward(0, x) - ref).abs().max() / ref.abs().max()) < 2e-2
    split = store.split_slot(0)
    for rows in (8, store.intermediate // 2, store.intermediate - 8):
        for buf in store.slots.values():
            buf[split].fill_(7)  # what a split does not copy must not be read
        store.load_slot(split, 1, 5, rows_from=rows)
        y = store.split_forward(split, x, store.cpu_rows(1, 5, x, rows), rows)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        full = sum(t.numel() * t.element_size() for t in store.host[1][5].values())
        assert store.copied_bytes(0) == full > store.copied_bytes(rows) > full / 3


def test_streamed_text_is_never_taken_back_and_stops_at_the_earliest_stop():
    from haqmoe.runtime.engine import TextStream

    def stream(steps, stops=()):
        ts, out = TextStream(stops), ""
        for i, decoded in enumerate(steps):
            delta, stopped = ts.push(decoded, final=i == len(steps) - 1)
            out += delta
            if stopped:
                break
        return out, ts.text

    # a character split across tokens (U+FFFD) is held until complete; the last token shows what there is
    assert stream(["ab", "ab\ufffd", "abé", "abé\ufffd\ufffd"]) == ("abé\ufffd\ufffd",) * 2
    ts = TextStream()
    assert [ts.push(d)[0] for d in ("Hi", "Hi \ufffd", "Hi 😀")] == ["Hi", " ", "😀"]
    # a stop string across tokens: what could start it is held, so the stream equals the answer
    assert stream([" Temp", " Templ", " Templ v", " Templ vx"], ("l v",)) == (" Temp", " Temp")
    assert stream([" Temp", " Templ", " Templa"], ("l v",)) == (" Templa", " Templa")  # released
    assert stream(["one. two", "one. two\nthree"], ("\n", ".")) == ("one", "one")  # the earliest stop
    assert stream(["a", "ab"], ("", "zz")) == ("ab", "ab")


def test_checkpoint_keeps_generation_config_and_engine_stops_at_its_eos(tmp_path):
    """A chat model's end-of-turn token lives in generation_config.json (a list of EOS ids): the quantized
    checkpoint keeps it, and the engine stops there as transformers' generate does."""
    from haqmoe.sources import load_model
    from haqmoe.quant.checkpoint import save_quantized
    from haqmoe.serve.fixtures import tiny_chat_moe

    lm = load_model(str(tiny_chat_moe(tmp_path / "m")), progress=False)
    cfg = QuantConfig.w8a8("rtn")
    quantize_rtn(lm.model, lm.adapter, cfg, progress=False)

    def engine(name: str) -> CollaborativeEngine:
        return CollaborativeEngine(load_model(str(save_quantized(lm.model, lm.tokenizer, tmp_path / name, cfg)),
                                              progress=False), EngineConfig())

    free = engine("q0").generate("Hello", SamplingConfig(max_new_tokens=6)).tokens
    assert len(free) == 6
    lm.model.generation_config.eos_token_id = [lm.tokenizer.eos_token_id, free[2]]  # "end of turn" = 3rd token
    lm.model.generation_config.top_k = 7  # without do_sample: transformers' own save_pretrained refuses it
    stopping = engine("q1")
    assert stopping.model.generation_config.top_k == 7
    gen = stopping.generate("Hello", SamplingConfig(max_new_tokens=6))
    stop_at = free.index(free[2]) + 1  # the first time that token comes
    assert gen.tokens == free[:stop_at] and gen.finish_reason == "stop"


def test_gpu_memory_budget_sizes_the_slots():
    """--gpu-memory: slots = what the budget holds after the non-expert weights, KV cache and reserve;
    a budget that holds no slot, or --slots beyond it, is refused with the setting that fits."""
    from haqmoe.runtime.engine import GPU_RESERVE, gpu_slots
    from haqmoe.runtime.store import expert_transfer_bytes

    probe, _ = make(quant=True, emulate_gpu=True, slots_per_layer=2)
    experts = [h.original for h in probe.hybrids]
    resident, one = probe._resident_gpu_bytes(experts), expert_transfer_bytes(experts[0])
    assert resident > GPU_RESERVE and one == probe.store.expert_bytes
    layers = len(probe.hybrids)
    for want in (2, 3, 8):
        engine, ref = make(quant=True, emulate_gpu=True, gpu_memory=resident + want * one * layers + one)
        assert engine.cache.config.slots == want
        assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    assert gpu_slots(resident + 100 * one * layers, resident, one, layers, 8, 2) == 8  # at most every expert
    with pytest.raises(HaqmoeError, match=r"--gpu-memory \d"):  # one token's 2 experts per layer do not fit
        make(quant=True, emulate_gpu=True, gpu_memory=resident + one * layers)
    with pytest.raises(HaqmoeError, match="at most --slots 2"):
        make(quant=True, emulate_gpu=True, gpu_memory=resident + 2 * one * layers, slots_per_layer=4)


@pytest.mark.parametrize("mode", ["real", "dequant"])
def test_one_host_copy_of_the_experts_beside_a_gpu_tier(mode):
    """With a GPU tier and ``--exec real`` (or dequant, which then dequantizes only the rest of the
    model) the CPU tier runs int8 experts and the store's host tensors are VIEWS of them: every
    int8 expert weight exists once in host memory. Same values as the fake-quant store, same tokens."""
    from haqmoe.exec.int8 import Int8Experts
    from haqmoe.runtime.store import _host_tensors

    fake, ref = make(quant=True, emulate_gpu=True, slots_per_layer=3, decision="split")
    real, _ = make(quant=True, emulate_gpu=True, slots_per_layer=3, decision="split", exec_mode=mode)
    tiers = [h.original for h in real.hybrids]
    assert all(isinstance(t, Int8Experts) for t in tiers)
    cpu_storages = {b.untyped_storage().data_ptr() for t in tiers for b in t.buffers()}
    for layer, experts in enumerate(real.store.host):
        for e, tensors in enumerate(experts):
            for key in ("gate.q", "up.q", "down.q"):
                assert tensors[key].untyped_storage().data_ptr() in cpu_storages, (layer, e, key)
            want = _host_tensors(fake.hybrids[layer].original, e, True)
            assert tensors.keys() == want.keys()
            for key, t in tensors.items():
                assert torch.equal(t, want[key]), (layer, e, key)
    assert real.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    assert real.summary()["split_expert_calls"] > 0


def test_default_admission_fills_the_cache_at_decode():
    """Without a plan or prefetch the predictor serves one-token misses on the CPU, so the slots
    stayed empty (hit rate 0) unless misses are admitted in the background — now the default for
    the engine's own policies, never for the peer policies."""
    opts = dict(emulate_gpu=True, slots_per_layer=3, n_critical=4)  # decode misses go to the CPU
    default, ref = make(**opts)
    off, _ = make(**opts, admit=False)
    peer, _ = make(**opts, decision="always-cpu")
    for engine in (default, off, peer):
        assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    on, without = default.summary(), off.summary()
    assert on["background_copies"] > 0 and on["hit_rate"] > without["hit_rate"]
    assert without["background_copies"] == 0 and peer.summary()["background_copies"] == 0


def test_cpu_only_engine_counts_the_experts_it_ran():
    """No GPU tier: the counters still say what ran — the same CPU expert calls as a GPU tier that
    never serves an expert."""
    cpu, ref = make()
    tier, _ = make(emulate_gpu=True, slots_per_layer=2, decision="always-cpu")
    for engine in (cpu, tier):
        assert engine.generate(PROMPT, SamplingConfig(max_new_tokens=12)).tokens == ref
    a, b = cpu.summary(), tier.summary()
    assert not a["gpu_tier"] and a["cpu_expert_calls"] == b["cpu_expert_calls"] > 0
    assert (cpu.telemetry.cpu_tokens == tier.telemetry.cpu_tokens).all()
