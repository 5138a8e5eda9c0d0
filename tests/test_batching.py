"""Continuous batching (runtime/batching.py): every request in a batch gets the tokens it gets alone.

fp32 on the CPU, a tiny random Mixtral with SmolLM2's tokenizer through the emulated GPU tier (so the
expert cache decides the batch's experts together). Requests of different prompt lengths, token
budgets, stop strings and sampling settings join and leave a running batch; each one's tokens are
compared with ``CollaborativeEngine.generate`` run alone.
"""

from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from haqmoe.runtime.engine import SamplingConfig

PROMPTS = ["Story number 1:", "The capital of France is a city that", "Hi", "Once upon a time there was a",
           "List three fruits:", "def fib(n):", "Q: What is 2 + 2?\nA:", "The weather today"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig
    from haqmoe.serve.fixtures import tiny_chat_moe
    from haqmoe.sources import load_model

    ckpt = tiny_chat_moe(tmp_path_factory.mktemp("batch") / "tiny-chat-moe")
    return CollaborativeEngine(load_model(str(ckpt), progress=False),
                               EngineConfig(emulate_gpu=True, slots_per_layer=4))


class Collector:
    """A request's events, as the scheduler thread emits them."""

    def __init__(self, stop_after: int | None = None):
        self.events: queue.Queue = queue.Queue()
        self.deltas: list[str] = []
        self.gen = None
        self.error = None
        self.stop_after = stop_after
        self.cancel = threading.Event()

    def emit(self, kind, payload):
        self.events.put((kind, payload))
        if kind == "token":
            self.deltas.append(payload[0])
            if self.stop_after is not None and len(payload[1].tokens) >= self.stop_after:
                self.cancel.set()  # a client that hangs up after this many tokens

    def wait(self, timeout: float = 60.0):
        deadline = time.time() + timeout
        while True:
            kind, payload = self.events.get(timeout=max(0.01, deadline - time.time()))
            if kind == "done":
                self.gen = payload
                return self
            if kind == "error":
                self.error = payload
                return self


def _run_batched(engine, jobs, max_batch: int, stagger: dict[int, int] | None = None):
    """Submit ``jobs`` ([(prompt, SamplingConfig, stop_after)]) to a scheduler; job i waits until job
    ``stagger[i]`` has its first token (so it joins a running batch). Returns the collectors."""
    from haqmoe.runtime.batching import BatchRequest, BatchScheduler

    sched = BatchScheduler(engine, max_batch)
    cols = [Collector(stop) for _, _, stop in jobs]
    try:
        for i, (prompt, s, _) in enumerate(jobs):
            if stagger and i in stagger:
                first = cols[stagger[i]]
                deadline = time.time() + 30
                while not first.deltas and first.gen is None and time.time() < deadline:
                    time.sleep(0.001)
            c = cols[i]
            sched.submit(BatchRequest(engine.encode(prompt), s, c.emit, c.cancel.is_set))
        for c in cols:
            c.wait()
    finally:
        sched.close()
    return cols, sched.stats


def test_greedy_batch_equals_each_request_alone(engine):
    jobs = [(p, SamplingConfig(max_new_tokens=6 + 3 * (i % 4)), None) for i, p in enumerate(PROMPTS)]
    alone = [engine.generate(p, s) for p, s, _ in jobs]
    cols, stats = _run_batched(engine, jobs, max_batch=4, stagger={2: 0, 5: 1, 7: 3})
    for c, ref in zip(cols, alone):
        assert c.error is None, c.error
        assert c.gen.tokens == ref.tokens and c.gen.text == ref.text and "".join(c.deltas) == ref.text
        assert c.gen.finish_reason == ref.finish_reason
    assert stats.max_seen == 4 and stats.steps < sum(len(r.tokens) for r in alone)  # really batched
    assert stats.retired == len(jobs)


def test_sampled_requests_keep_their_own_seed_and_settings(engine):
    settings = [dict(temperature=0.8, top_p=0.95, seed=1), dict(temperature=1.2, top_p=0.5, seed=2),
                dict(temperature=0.0), dict(temperature=0.7, top_p=1.0, seed=3), dict(temperature=0.8, seed=1)]
    jobs = [(PROMPTS[i], SamplingConfig(max_new_tokens=10, **kw), None) for i, kw in enumerate(settings)]
    alone = [engine.generate(p, s).tokens for p, s, _ in jobs]
    cols, _ = _run_batched(engine, jobs, max_batch=8)
    assert [c.gen.tokens for c in cols] == alone


def test_stop_strings_cancellation_and_budgets_leave_the_batch(engine):
    ref = engine.generate(PROMPTS[0], SamplingConfig(max_new_tokens=12))
    stop = ref.text.strip()[4:7]
    assert stop, ref.text
    jobs = [(PROMPTS[0], SamplingConfig(max_new_tokens=12, stop=(stop,)), None),  # ends at its stop string
            (PROMPTS[1], SamplingConfig(max_new_tokens=20), 3),  # its client leaves after 3 tokens
            (PROMPTS[2], SamplingConfig(max_new_tokens=1), None),  # done at prefill: never joins
            (PROMPTS[3], SamplingConfig(max_new_tokens=16), None)]
    alone = [engine.generate(p, s) for p, s, _ in jobs]
    cols, _ = _run_batched(engine, jobs, max_batch=4)
    assert cols[0].gen.finish_reason == "stop" and stop not in cols[0].gen.text
    assert cols[0].gen.text == alone[0].text
    assert 3 <= len(cols[1].gen.tokens) <= 4 and cols[1].gen.tokens == alone[1].tokens[:len(cols[1].gen.tokens)]
    assert cols[2].gen.tokens == alone[2].tokens and len(cols[2].gen.tokens) == 1
    assert cols[3].gen.tokens == alone[3].tokens  # the rest of the batch is untouched by who left


def test_requests_cancelled_while_waiting_never_start(engine):
    from haqmoe.runtime.batching import BatchRequest, BatchScheduler

    sched = BatchScheduler(engine, 2)
    try:
        long = [Collector() for _ in range(2)]
        for c in long:
            sched.submit(BatchRequest(engine.encode("Hello"), SamplingConfig(max_new_tokens=30), c.emit))
        gone = Collector()
        gone.cancel.set()
        sched.submit(BatchRequest(engine.encode("Hi"), SamplingConfig(max_new_tokens=30), gone.emit,
                                  gone.cancel.is_set))
        assert gone.wait().gen is None and gone.deltas == []
        assert all(c.wait().gen is not None for c in long)
    finally:
        sched.close()


def test_a_failing_request_does_not_stop_the_others(engine):
    ok = Collector()
    bad = Collector()
    from haqmoe.runtime.batching import BatchRequest, BatchScheduler

    sched = BatchScheduler(engine, 4)
    try:
        too_long = torch.ones(1, 600, dtype=torch.long)  # over the 512-token context
        sched.submit(BatchRequest(too_long, SamplingConfig(max_new_tokens=4), bad.emit))
        sched.submit(BatchRequest(engine.encode(PROMPTS[0]), SamplingConfig(max_new_tokens=5), ok.emit))
        assert "context" in str(bad.wait().error)
        assert ok.wait().gen.tokens == engine.generate(PROMPTS[0], SamplingConfig(max_new_tokens=5)).tokens
    finally:
        sched.close()


def test_batched_expert_decisions_count_the_batch_tokens(engine):
    """One decode step of B requests is one forward per layer: the predictor sees how many of the
    batch's tokens each expert serves (n_inputs), not B separate one-token calls."""
    log = []
    engine.telemetry.decision_log = log
    try:
        jobs = [(p, SamplingConfig(max_new_tokens=4), None) for p in PROMPTS[:4]]
        _run_batched(engine, jobs, max_batch=4)
    finally:
        engine.telemetry.decision_log = None
    top_k = engine.top_k
    per_step = {}
    for rec in log:
        per_step.setdefault(rec.step, []).append(sum(d.tokens for d in rec.decisions))
    routed = {step: set(v) for step, v in per_step.items()}
    assert {top_k * 4} <= set().union(*routed.values())  # a full batch step: 4 tokens x top-k per layer


def test_max_batch_checks(engine):
    from haqmoe.errors import HaqmoeError
    from haqmoe.runtime.batching import check_batchable

    with pytest.raises(HaqmoeError, match="at least 1"):
        check_batchable(engine, 0)
    check_batchable(engine, 8)


def _submit_together(sched, jobs):
    """Submit every job before the scheduler's next turn (it waits on the lock held here), so they are
    all waiting when it looks."""
    from haqmoe.runtime.batching import BatchRequest

    cols = [Collector(stop) for _, _, stop in jobs]
    with sched._cv:
        for (ids, s, _), c in zip(jobs, cols):
            sched.submit(BatchRequest(ids, s, c.emit, c.cancel.is_set))
    for c in cols:
        c.wait()
    return cols


def test_requests_waiting_together_share_one_packed_prefill(engine):
    from haqmoe.runtime.batching import BatchScheduler

    jobs = [(engine.encode(p), SamplingConfig(max_new_tokens=1 + 3 * (i % 4)), None) for i, p in enumerate(PROMPTS)]
    alone = [engine.generate(ids, s) for ids, s, _ in jobs]
    sched = BatchScheduler(engine, 8)
    try:
        cols = _submit_together(sched, jobs)
    finally:
        sched.close()
    for c, ref in zip(cols, alone):
        assert c.error is None, c.error
        assert c.gen.tokens == ref.tokens and c.gen.text == ref.text
    assert sched.stats.prefills == 1 and sched.stats.admitted == len(jobs)  # one forward for all eight prompts


def test_prefill_token_budget_spreads_prompts_over_turns(engine):
    from haqmoe.runtime.batching import BatchScheduler, take_for_prefill

    assert take_for_prefill([5, 5, 5], room=8, budget=10) == 2
    assert take_for_prefill([50, 5], room=8, budget=10) == 1  # the first one always, however long
    assert take_for_prefill([5, 5, 5], room=1, budget=100) == 1
    assert take_for_prefill([], room=4, budget=100) == 0
    jobs = [(engine.encode(p), SamplingConfig(max_new_tokens=5), None) for p in PROMPTS[:4]]
    alone = [engine.generate(ids, s).tokens for ids, s, _ in jobs]
    sched = BatchScheduler(engine, 4, prefill_tokens=1)
    try:
        cols = _submit_together(sched, jobs)
    finally:
        sched.close()
    assert [c.gen.tokens for c in cols] == alone
    assert sched.stats.prefills == 4  # one prompt per turn, decode steps in between


def test_packed_prefill_gives_each_prompt_its_own_logits_and_cache(engine):
    """The packed forward against each prompt's own: last-position logits, and the keys and values the
    batch rows get (left-padded, masked), layer by layer."""
    from haqmoe.runtime.batching import BatchScheduler

    prompts = [engine.encode(p) for p in PROMPTS[:3]]
    sched = BatchScheduler(engine, 4)
    sched.close()
    with torch.inference_mode():
        logits, cache, _ = sched._prefill(prompts)
        lengths = [int(p.shape[1]) for p in prompts]
        mask = sched._as_rows(cache, lengths, [0, 2])
        solo = [engine.model(input_ids=p, use_cache=True) for p in prompts]
    for i, out in enumerate(solo):
        torch.testing.assert_close(logits[i], out.logits[0, -1], rtol=1e-4, atol=1e-4)
    width = max(lengths[0], lengths[2])
    assert mask.tolist() == [[0] * (width - n) + [1] * n for n in (lengths[0], lengths[2])]
    for row, i in enumerate((0, 2)):
        for mine, ref in zip(cache.layers, solo[i].past_key_values.layers):
            torch.testing.assert_close(mine.keys[row, :, width - lengths[i]:], ref.keys[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine.values[row, :, width - lengths[i]:], ref.values[0], rtol=1e-4, atol=1e-4)


def test_prompts_sharing_a_prefix_reuse_its_keys_and_values(engine):
    """With reuse_prefix, chat prompts share the template's system prompt: after the first prefill its keys
    and values are taken from the remembered prompt, not computed again; in fp32 every answer stays the
    one it gets alone (its logits within 1e-4)."""
    from haqmoe.runtime.batching import BatchScheduler

    chats = [engine.encode([{"role": "user", "content": p}]) for p in PROMPTS]
    jobs = [(ids, SamplingConfig(max_new_tokens=4 + i % 3), None) for i, ids in enumerate(chats)]
    alone = [engine.generate(ids, s).tokens for ids, s, _ in jobs]
    sched = BatchScheduler(engine, 4, reuse_prefix=True)
    try:
        first = _submit_together(sched, jobs[:1])  # remembered: the shared prefix of the rest
        rest = _submit_together(sched, jobs[1:])  # four at once, then the others as room frees up
    finally:
        sched.close()
    assert [c.gen.tokens for c in first + rest] == alone
    shared = next(i for i in range(chats[0].shape[1]) if chats[0][0, i] != chats[1][0, i])
    assert sched.stats.reused_tokens >= shared * (len(jobs) - 1)
    with torch.inference_mode():  # the logits and batch rows of a prefill over the prefix, against each alone
        logits, cache, prefix = sched._prefill(chats[2:5])
        mask = sched._as_rows(cache, [int(c.shape[1]) for c in chats[2:5]], [0, 1, 2], prefix)
        solo = [engine.model(input_ids=c, use_cache=True) for c in chats[2:5]]
    assert prefix >= shared
    width = int(mask.shape[1])
    for row, (c, out) in enumerate(zip(chats[2:5], solo)):
        n = int(c.shape[1])
        torch.testing.assert_close(logits[row], out.logits[0, -1], rtol=1e-4, atol=1e-4)
        assert mask[row].tolist() == [0] * (width - n) + [1] * n
        for mine, ref in zip(cache.layers, out.past_key_values.layers):
            torch.testing.assert_close(mine.keys[row, :, width - n:], ref.keys[0], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def w8a8_engine(tmp_path_factory):
    """The tiny chat MoE quantized W8A8 (RTN, per-token dynamic activations, int8 LM head) on real int8
    products, both tiers: a model whose per-token activation scales turn any last-bit difference into a
    different rounding of the whole token."""
    from haqmoe.quant.config import QuantConfig
    from haqmoe.quant.modules import quantize_vocabulary
    from haqmoe.quant.rtn import quantize_rtn
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig
    from haqmoe.serve.fixtures import tiny_chat_moe
    from haqmoe.sources import load_model

    lm = load_model(str(tiny_chat_moe(tmp_path_factory.mktemp("batch8") / "tiny-chat-moe")), progress=False)
    quantize_rtn(lm.model, lm.adapter, QuantConfig.w8a8("rtn"), progress=False)
    quantize_vocabulary(lm.model)  # a float LM head's product depends on the row count in its last bits
    return CollaborativeEngine(lm, EngineConfig(emulate_gpu=True, slots_per_layer=4, exec_mode="real"))


def test_w8a8_batch_attention_is_each_request_alone_bit_for_bit(w8a8_engine):
    """A packed prefill of prompts of different lengths, then one decode step of their left-padded rows:
    the first layer's attention output (its input is per token, so the same bits as alone) equals each
    prompt's own run exactly; one SDPA call over the packed or padded keys gives other last bits. The
    prefill's logits are exact too (nothing but per-token int8 products and attention before them); a
    decode step's logits only up to the float router's last bits."""
    from haqmoe.runtime.batching import ROW_ATTENTION, BatchScheduler

    engine = w8a8_engine
    seen: list[torch.Tensor] = []
    hook = engine.model.model.layers[0].self_attn.register_forward_hook(lambda m, i, o: seen.append(o[0]))
    prompts = [engine.encode(p) for p in (PROMPTS[1], PROMPTS[2], PROMPTS[6])]
    lengths = [int(p.shape[1]) for p in prompts]
    sched = BatchScheduler(engine, 4)
    try:
        assert engine.model.config._attn_implementation == ROW_ATTENTION
        with torch.inference_mode():
            logits, cache, _ = sched._prefill(prompts)
            packed = seen.pop()[0]
            mask = sched._as_rows(cache, lengths, [0, 1, 2])
            solo = [engine.model(input_ids=p, use_cache=True) for p in prompts]
            starts = [0] + torch.tensor(lengths).cumsum(0).tolist()
            for i, out in enumerate(solo):
                assert torch.equal(logits[i], out.logits[0, -1]), i
                assert torch.equal(packed[starts[i]:starts[i + 1]], seen[i][0]), i
            seen.clear()
            nxt = logits.argmax(-1, keepdim=True)
            step = engine.model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1),
                                position_ids=torch.tensor(lengths).unsqueeze(1), past_key_values=cache, use_cache=True)
            batched = seen.pop()
            for i, out in enumerate(solo):
                alone = engine.model(input_ids=nxt[i:i + 1], past_key_values=out.past_key_values, use_cache=True)
                assert torch.equal(batched[i], seen.pop()[0]), i
                torch.testing.assert_close(step.logits[i, -1], alone.logits[0, -1], rtol=1e-4, atol=1e-4)
    finally:
        hook.remove()
        sched.close()
    assert engine.model.config._attn_implementation == "sdpa"  # given back


def test_w8a8_concurrent_answers_are_the_solo_answers(w8a8_engine):
    """Chat requests joining a running batch at different times get, token for token, their solo answers."""
    engine = w8a8_engine
    jobs = [([{"role": "user", "content": p}], SamplingConfig(max_new_tokens=5 + 2 * (i % 3)), None)
            for i, p in enumerate(PROMPTS)]
    alone = [engine.generate(p, s).tokens for p, s, _ in jobs]
    cols, stats = _run_batched(engine, jobs, max_batch=4, stagger={2: 0, 5: 1, 7: 3})
    assert [c.gen.tokens for c in cols] == alone
    assert stats.max_seen > 1
