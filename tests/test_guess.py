"""Next-layer guesses: the re-based router reads layer l's normalised input as layer l+1's norm would."""

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

from haqmoe.routing.guess import guess_for_batch, guess_topk, guess_weight


def _norm(seed: int) -> MixtralRMSNorm:
    n = MixtralRMSNorm(16)
    with torch.no_grad():
        n.weight.copy_(torch.rand(16, generator=torch.Generator().manual_seed(seed)) * 4 + 0.05)
    return n


def test_rebased_router_equals_next_router_on_next_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 16, generator=g) * 3  # residual stream
    here, nxt = _norm(1), _norm(2)
    router = nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        w = guess_weight(router, here, nxt)
        torch.testing.assert_close(here(x) @ w.t(), router(nxt(x)), rtol=1e-5, atol=1e-5)
        assert torch.equal(guess_topk(here(x), w, router, 3), router(nxt(x)).topk(3).indices)
        plain = here(x) @ router.weight.t()  # without re-basing the ranking differs here
        assert not torch.equal(plain.topk(3).indices, router(nxt(x)).topk(3).indices)
        batch = guess_for_batch(here(x), w, router, 2)
        assert batch == torch.softmax(router(nxt(x)), -1).sum(0).topk(2).indices.tolist()
        for t in range(len(x)):  # one decode token: the engine guesses what the profiler records
            one = guess_for_batch(here(x[t:t + 1]), w, router, 3)
            assert one == guess_topk(here(x[t:t + 1]), w, router, 3)[0].tolist()
            assert one == torch.softmax(router(nxt(x[t:t + 1])), -1)[0].topk(3).indices.tolist()


def test_layernorm_with_bias_falls_back_to_the_plain_router():
    router = nn.Linear(16, 8, bias=False)
    w = guess_weight(router, nn.LayerNorm(16), nn.LayerNorm(16))
    assert torch.equal(w, router.weight.detach())


def _trace(T: int = 60, seed: int = 0):
    """Layer 0 -> 1: deterministic expert shift (co-occurrence knows it, the recorded router guesses
    are wrong); layer 1 -> 2: independent experts, router guesses right."""
    import numpy as np

    from haqmoe.routing.trace import RoutingTrace

    rng = np.random.default_rng(seed)
    e0 = np.stack([rng.choice(6, 2, replace=False) for _ in range(T)])
    e1 = (e0 + 1) % 6
    e2 = np.stack([rng.choice(6, 2, replace=False) for _ in range(T)])
    experts = np.stack([e0, e1, e2], axis=1).astype(np.int16)
    guesses = np.full((T, 3, 2), -1, np.int16)
    guesses[:, 0] = (e1 + 3) % 6  # wrong on purpose
    guesses[:, 1] = e2
    return RoutingTrace(experts, 6, np.array([0, T]), guesses=guesses)


def test_guess_plan_tables_and_per_layer_choice_against_brute_force():
    import numpy as np

    from haqmoe.routing.guess import GuessPlan

    tr = _trace()
    plan = GuessPlan.learn(tr)
    for l in range(2):  # co-occurrence counts by brute force
        ref = np.zeros((6, 6))
        for t in range(tr.num_tokens):
            for a in tr.experts[t, l]:
                for b in tr.experts[t, l + 1]:
                    ref[a, b] += 1
        np.testing.assert_array_equal(plan.tables[l], ref)
    assert plan.use_table.tolist() == [True, False]
    g = plan.apply(tr)
    np.testing.assert_array_equal(np.sort(g[:, 0], -1), np.sort(tr.experts[:, 1], -1))  # table: exact here
    np.testing.assert_array_equal(g[:, 1], tr.guesses[:, 1])  # router kept
    assert plan.guess(0, torch.tensor([[0, 2]]), 2) == sorted([1, 3], key=lambda e: -plan.tables[0][[0, 2]].sum(0)[e])
    assert plan.guess(1, torch.tensor([[0, 2]]), 2) is None


def test_lookahead_recall_and_synthetic_guesses_farther_ahead_against_brute_force():
    import numpy as np

    from haqmoe.routing.guess import guess_quality
    from haqmoe.routing.synthetic import synthesize_guesses

    tr = _trace()
    rng = np.random.default_rng(1)
    g2 = np.stack([rng.permutation(6)[:2] for _ in range(tr.num_tokens * 3)]).reshape(tr.num_tokens, 3, 2)
    q = guess_quality(tr, guesses=g2, distance=2)
    assert len(q["recall"]) == 1  # only layer 0 has a layer two ahead
    found = sum(int(e in g2[t, 0]) for t in range(tr.num_tokens) for e in tr.experts[t, 2])
    assert q["recall"][0] == found / tr.experts[:, 2].size and q["precision"][0] == found / g2[:, 0].size
    for d, acc in ((2, 1.0), (2, 0.0)):  # synthetic guesses d layers ahead land the true experts of l+d
        syn = synthesize_guesses(tr.experts, 6, acc, np.random.default_rng(0), distance=d)
        assert (syn[:, -d:] == -1).all()
        assert guess_quality(tr, guesses=syn, distance=d)["recall"][0] == acc


def test_the_engine_guesses_the_layers_ahead_as_the_profiler_records_them():
    """Lookahead: at layer l the engine's guesses for layer l+d are the profiler's distance-d guesses (one
    decode token: top-k of layer l+d's re-based router on layer l's normalised input)."""
    from haqmoe.models.adapters import adapter_for
    from haqmoe.models.base import LoadedModel
    from haqmoe.models.tiny import tiny_model
    from haqmoe.routing.profile import RouterRecorder
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig, SamplingConfig

    model = tiny_model("mixtral", seed=3, layers=4)
    engine = CollaborativeEngine(LoadedModel(model, None, "mixtral", adapter_for(model)),
                                 EngineConfig(emulate_gpu=True, slots_per_layer=3, prefetch=2, lookahead=3))
    recorders = [RouterRecorder(engine.model, engine.lm.adapter, guess_width=2, distance=d) for d in (1, 2, 3)]
    recorded = []
    for h in engine.hybrids:  # after the routers ran: take each forward's guesses once, at the last layer
        h.register_forward_hook(lambda m, args, out: recorded.append([r.take()[2] for r in recorders])
                                if m.layer == len(engine.hybrids) - 1 else None)
    engine.telemetry.decision_log = []
    engine.generate(torch.tensor([[5, 17, 99, 3]]), SamplingConfig(max_new_tokens=5))
    log = engine.telemetry.decision_log
    decode = [(i, fwd) for i, fwd in enumerate(recorded) if fwd[0].shape[0] == 1]
    assert len(decode) == 4
    for i, fwd in decode:
        for rec in log[4 * i: 4 * i + 4]:
            want = [fwd[d][0, rec.layer].tolist() for d in range(3) if rec.layer + d + 1 < 4]
            assert rec.guesses == want
