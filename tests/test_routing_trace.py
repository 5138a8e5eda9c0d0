"""Trace recording and the on-disk format: round trip, resume, damage and wrong-model detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.tiny import tiny_model
from haqmoe.routing.profile import trace_windows
from haqmoe.routing.trace import RoutingTrace, concat_traces
from haqmoe.routing.trace_io import TraceWriter, header_of, load_trace, save_trace


def random_trace(requests=(5, 3, 7), L=3, E=6, k=2, seed=0, guesses=True) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    T = sum(requests)
    ex = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(L)]) for _ in range(T)]).astype(np.int16)
    g = rng.integers(0, E, (T, L, 2)).astype(np.int16) if guesses else None
    return RoutingTrace(ex, E, np.concatenate([[0], np.cumsum(requests)]).astype(np.int64),
                        rng.random((T, L, k)).astype(np.float32), rng.random(T) < 0.5, g, {"model": "hand"})


def test_round_trip(tmp_path):
    tr = random_trace()
    back = load_trace(save_trace(tr, tmp_path / "t"))
    assert back.num_requests == 3 and back.num_tokens == tr.num_tokens
    np.testing.assert_array_equal(back.offsets, tr.offsets)
    for name in ("experts", "weights", "decode", "guesses"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tr, name))
    assert back.meta["model"] == "hand" and back.num_experts == 6


def test_concat_keeps_every_request():
    a, b = random_trace(requests=(5, 3)), random_trace(requests=(7,), seed=1)
    both = concat_traces([a, b])
    assert both.offsets.tolist() == [0, 5, 8, 15]
    np.testing.assert_array_equal(both.request(2).experts, b.experts)
    want = np.concatenate([a.request(1).experts, b.experts])
    np.testing.assert_array_equal(both.select_requests([1, 2]).experts, want)


def test_streaming_writer_resumes(tmp_path):
    tr = random_trace(requests=(2, 2, 2, 2))
    w = TraceWriter(tmp_path / "t", header_of(tr))
    w.append_trace(tr.select_requests([0, 1]))  # "crash" after one chunk: header not complete
    with pytest.raises(HaqmoeError, match="incomplete"):
        load_trace(tmp_path / "t")
    with pytest.raises(HaqmoeError, match="exists"):
        TraceWriter(tmp_path / "t", header_of(tr))
    w2 = TraceWriter(tmp_path / "t", header_of(tr), resume=True)
    assert w2.done_requests == 2 and w2.tokens == 4
    w2.append_trace(tr.select_requests([2, 3]))
    back = load_trace(w2.finish())
    np.testing.assert_array_equal(back.experts, tr.experts)
    np.testing.assert_array_equal(back.offsets, tr.offsets)


def test_resume_with_other_settings_refused(tmp_path, monkeypatch):
    tr = random_trace()
    TraceWriter(tmp_path / "t", header_of(tr)).append_trace(tr)
    other = header_of(random_trace(E=8))
    with pytest.raises(HaqmoeError, match="cannot resume.*--overwrite instead of --resume"):
        TraceWriter(tmp_path / "t", other, resume=True)
    same_shape = header_of(tr)
    same_shape.meta["model"] = "another-model"  # same shape and settings, another model's routing
    with pytest.raises(HaqmoeError, match="cannot resume"):
        TraceWriter(tmp_path / "t", same_shape, resume=True)
    (tmp_path / "m").mkdir()  # a local model, named once by its relative path, once by its absolute one
    a, b = random_trace(), random_trace()
    a.meta.update(model="m")
    b.meta.update(model=str(tmp_path / "m"))
    monkeypatch.chdir(tmp_path)
    TraceWriter(tmp_path / "r", header_of(a)).append_trace(a)
    assert TraceWriter(tmp_path / "r", header_of(b), resume=True).done_requests == a.num_requests
    with pytest.raises(HaqmoeError, match="is a file"):
        (tmp_path / "f").write_text("x")
        TraceWriter(tmp_path / "f", header_of(tr))


def test_resuming_a_finished_trace_marks_it_incomplete_until_finished(tmp_path):
    tr = random_trace(requests=(2, 2, 2, 2))
    w = TraceWriter(tmp_path / "t", header_of(tr))
    w.append_trace(tr.select_requests([0, 1]))
    w.finish()
    w2 = TraceWriter(tmp_path / "t", header_of(tr), resume=True)
    w2.append_trace(tr.select_requests([2, 3]))  # a reader now: incomplete, not "damaged"
    with pytest.raises(HaqmoeError, match="incomplete"):
        load_trace(tmp_path / "t")
    np.testing.assert_array_equal(load_trace(w2.finish()).experts, tr.experts)


def test_truncated_chunk_is_a_clear_error(tmp_path):
    path = save_trace(random_trace(), tmp_path / "t")
    chunk = sorted(path.glob("chunk-*.npz"))[0]
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(HaqmoeError, match="truncated or corrupt"):
        load_trace(path)


def test_missing_chunk_and_bad_header(tmp_path):
    path = save_trace(random_trace(), tmp_path / "t")
    sorted(path.glob("chunk-*.npz"))[0].unlink()
    with pytest.raises(HaqmoeError, match="damaged"):
        load_trace(path)
    (path / "header.json").write_text("{not json")
    with pytest.raises(HaqmoeError, match="corrupt"):
        load_trace(path)
    (path / "header.json").write_text(json.dumps({"format": "haqmoe-trace", "version": 99}))
    with pytest.raises(HaqmoeError, match="version"):
        load_trace(path)
    with pytest.raises(HaqmoeError, match="not a routing trace"):
        load_trace(tmp_path / "nowhere")


def test_trace_from_another_model_refused(tmp_path):
    path = save_trace(random_trace(L=3, E=6), tmp_path / "t")
    with pytest.raises(HaqmoeError, match="3 MoE layers x 6 experts"):
        load_trace(path, num_layers=30, num_experts=8)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "gpt_oss"])
def test_profile_equals_routers_own_topk(family):
    """The trace must be the model's routing: recompute top-k from router logits of a plain forward."""
    model = tiny_model(family)
    ad = adapter_for(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    tr = trace_windows(model, ad, ids, guess_width=3)
    assert tr.experts.shape == (24, 2, 2) and tr.num_requests == 2
    routers = [ad.router(b) for b in ad.blocks(model) if ad.is_moe_block(b)]
    norms = [ad.router_norm(b) for b in ad.blocks(model) if ad.is_moe_block(b)]
    logits = {}
    hooks = [r.register_forward_hook(lambda m, i, o, j=j: logits.__setitem__(j, (o[0], i[0])))
             for j, r in enumerate(routers)]
    with torch.no_grad():
        for r in range(2):
            model(ids[r:r + 1], use_cache=False)
            for layer, (lg, h) in logits.items():
                want = torch.softmax(lg.float(), -1).topk(2, dim=-1).indices.sort(-1).values.numpy()
                got = np.sort(tr.experts[r * 12:(r + 1) * 12, layer], axis=-1)
                np.testing.assert_array_equal(got, want)
                if layer + 1 < len(routers):  # guess = next router's ranking of this input under the next norm
                    ratio = norms[layer + 1].weight / norms[layer].weight
                    bias = getattr(routers[layer + 1], "bias", None)  # gpt-oss's router: x·Wᵀ + b
                    g = (h.reshape(-1, h.shape[-1]) * ratio) @ routers[layer + 1].weight.t()
                    g = (g if bias is None else g + bias).topk(3, -1).indices
                    g = g.numpy()
                    np.testing.assert_array_equal(tr.guesses[r * 12:(r + 1) * 12, layer], g)
    for h in hooks:
        h.remove()
    assert (tr.guesses[:, -1] == -1).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_generation_trace_is_the_full_sequence_routing(family):
    """Prompt + greedy decode on the KV cache: each step's routing equals a plain forward (no cache) over
    the whole sequence at that position, the sequence grown by brute-force greedy argmax without a cache."""
    model = tiny_model(family)
    ad = adapter_for(model)
    prompts = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    tr = trace_windows(model, ad, prompts, guess_width=2, new_tokens=5)
    assert tr.experts.shape == (30, 2, 2) and tr.num_requests == 2
    assert tr.decode.tolist() == ([False] * 10 + [True] * 5) * 2
    for r in range(2):
        seq = prompts[r:r + 1]
        with torch.no_grad():
            for _ in range(5):
                nxt = model(seq, use_cache=False).logits[:, -1:].argmax(-1)
                seq = torch.cat([seq, nxt], dim=1)
        ref = trace_windows(model, ad, seq[:, :15], guess_width=2)
        np.testing.assert_array_equal(tr.request(r).experts, ref.experts)
        np.testing.assert_array_equal(tr.request(r).guesses, ref.guesses)
        np.testing.assert_allclose(tr.request(r).weights, ref.weights, atol=1e-5)


@pytest.mark.slow
def test_cli_profile_smollm2_moe_resumes(tmp_path):
    """Real model through the CLI: 2 requests, then --resume to 3; the resumed trace extends the first."""
    from typer.testing import CliRunner

    from haqmoe.cli.main import app

    out = tmp_path / "tr"
    args = ["-q", "profile", "smollm2-moe", "--out", str(out), "--data", "pydoc", "--seqlen", "32", "--chunk", "1"]
    r = CliRunner().invoke(app, args + ["--requests", "2", "--json"])
    assert r.exit_code == 0, r.output
    first = load_trace(out)
    r = CliRunner().invoke(app, args + ["--requests", "3", "--resume", "--json"])
    assert r.exit_code == 0, r.output
    more = load_trace(out)
    assert first.num_requests == 2 and first.experts.shape == (64, 30, 2) and more.num_requests == 3
    np.testing.assert_array_equal(more.experts[:64], first.experts)
    other = [a if a != "32" else "16" for a in args]  # another window length
    r = CliRunner().invoke(app, other + ["--requests", "4", "--resume"])
    assert r.exit_code != 0  # other settings: refused instead of mixing traces
    r = CliRunner().invoke(app, args + ["--requests", "4", "--resume", "--generate", "3"])
    assert r.exit_code != 0  # generating is another setting too
    gen = tmp_path / "gen"
    gen_args = [a if a != str(out) else str(gen) for a in args]
    r = CliRunner().invoke(app, gen_args + ["--requests", "2", "--generate", "3"])
    assert r.exit_code == 0, r.output
    g = load_trace(gen)
    assert g.experts.shape == (70, 30, 2) and g.decode.tolist() == ([False] * 32 + [True] * 3) * 2
    np.testing.assert_array_equal(g.request(0).experts[:32], first.request(0).experts)  # same prompt routing


def test_profile_identity_names_generation_only_when_used():
    """Traces profiled before --generate existed carry no new_tokens: resuming them must still match."""
    from haqmoe.routing.profile import ProfileConfig, _identity

    assert "new_tokens" not in _identity(ProfileConfig())
    assert _identity(ProfileConfig(new_tokens=3))["new_tokens"] == 3


def test_chunk_gap_and_chunks_unlike_their_header_are_clear_errors(tmp_path):
    tr = random_trace(requests=(2, 2, 2, 2))
    w = TraceWriter(tmp_path / "t", header_of(tr))
    for r in range(3):
        w.append_trace(tr.select_requests([r]))
    (tmp_path / "t" / "chunk-000001.npz").unlink()  # lost: a resume must not write over chunk 2
    for action in (lambda: TraceWriter(tmp_path / "t", header_of(tr), resume=True),
                   lambda: load_trace(tmp_path / "t", allow_incomplete=True)):
        with pytest.raises(HaqmoeError, match="chunk-000001.npz is missing"):
            action()
    bare = RoutingTrace(tr.experts, tr.num_experts, tr.offsets)  # no weights, where the header has them
    path = save_trace(bare, tmp_path / "u")
    chunk = next(path.glob("chunk-*.npz"))
    with_weights = header_of(tr)
    (path / "header.json").write_text(json.dumps({**json.loads((path / "header.json").read_text()),
                                                  "has_weights": with_weights.has_weights}))
    with pytest.raises(HaqmoeError, match=f"{chunk.name} does not match its header \\(weights"):
        load_trace(path)
