"""Server hardening: size and time limits, malformed bodies, and a bounded hypothesis fuzz of request
parsing against a live loopback server: every answer is a JSON 2xx/4xx/5xx-free response."""

from __future__ import annotations

import json
import re

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haqmoe.reliability.live import ThreadedServer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from haqmoe.sources import load_model
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig
    from haqmoe.serve.app import ServeConfig, create_app
    from haqmoe.serve.fixtures import tiny_chat_moe

    ckpt = tiny_chat_moe(tmp_path_factory.mktemp("fuzz") / "m")
    engine = CollaborativeEngine(load_model(str(ckpt), progress=False), EngineConfig())
    cfg = ServeConfig(model_name="tiny", max_tokens_limit=4, max_body_bytes=4096, request_timeout_s=30)
    with ThreadedServer(create_app(engine, cfg)) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            yield srv, client, engine


def _post(client, path: str, content: bytes, headers: dict | None = None):
    return client.post(path, content=content, headers={"content-type": "application/json", **(headers or {})})


def test_body_limit_413(live):
    _, client, _ = live
    r = _post(client, "/v1/completions", json.dumps({"prompt": "x" * 10_000, "max_tokens": 1}).encode())
    assert r.status_code == 413 and "exceeds 4096 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while streaming in
        for _ in range(10):
            yield b" " * 1000
    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize("body", [b"{", b"not json", b"[]", b'{"prompt": 5}', b'{"prompt": "a", "max_tokens": "x"}',
                                  b'{"messages": "hi"}', b'{"prompt": "a", "temperature": "hot"}', b"\xff\xfe"])
def test_malformed_bodies_are_400(live, body):
    _, client, _ = live
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = _post(client, path, body)
        assert r.status_code == 400, (path, body, r.text)
        assert r.json()["error"]["message"]


def test_request_timeout_is_504(live):
    srv, client, engine = live
    from haqmoe.serve.app import ServeConfig, create_app

    with ThreadedServer(create_app(engine, ServeConfig(model_name="tiny", max_tokens_limit=256,
                                                       request_timeout_s=0.001))) as fast:
        r = httpx.post(fast.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 256}, timeout=60)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
    assert srv.alive()


_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=30))
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
_keys = st.sampled_from(["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                         "seed", "stop", "stream", "stream_options", "model", "n", "echo", "logprobs", "tools",
                         "user", "role", "content"])
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                  "content": st.one_of(st.text(max_size=40), _value)})
_body = st.one_of(
    st.dictionaries(_keys, _value, max_size=6),
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=60), _value),
                           "max_tokens": st.one_of(st.integers(-3, 6), _value)},
                          optional={"temperature": st.floats(-1, 3), "stream": st.booleans(),
                                    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3)))}),
    st.fixed_dictionaries({"messages": st.lists(_message, max_size=3), "max_tokens": st.integers(-1, 5)},
                          optional={"stream": st.booleans(), "seed": st.integers(-5, 2**33)}),
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=_body, chat=st.booleans(), raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_fuzz_request_parsing_never_500(live, body, chat, raw):
    srv, client, _ = live
    path = "/v1/chat/completions" if chat else "/v1/completions"
    content = raw if raw is not None else json.dumps(body, allow_nan=True).encode()
    r = _post(client, path, content)
    assert r.status_code < 500, (content, r.status_code, r.text)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert "server_error" not in r.text, r.text
    else:
        payload = r.json()
        assert ("error" in payload) == (r.status_code >= 400), payload
    assert srv.alive()


def _events(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def _text(events: list) -> str:
    return "".join(json.loads(e)["choices"][0]["text"] for e in events if e != "[DONE]" and json.loads(e)["choices"])


def test_values_the_engine_cannot_take_are_400(live):
    _, client, _ = live
    r = client.post("/v1/completions", json={"prompt": "a", "seed": 2**64})
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
    for path, body in (("/v1/completions", {"prompt": "a\ud800b"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]})):
        r = _post(client, path, json.dumps({**body, "max_tokens": 1}).encode())  # JSON's "\\ud800" escape
        assert r.status_code == 400, (path, r.text)


def test_metrics_labels_only_known_endpoints(live):
    _, client, _ = live
    assert client.get('/x%22y').status_code == 404
    text = client.get("/metrics").text
    assert 'endpoint="other",status="404"' in text and '"/x' not in text


def test_first_token_eos_ends_cleanly(live, monkeypatch):
    """An empty answer (EOS sampled first): 200 with "" and finish_reason stop, and a stream that ends
    with its finish chunk and [DONE] (it used to be a 500, and a stream without an end)."""
    _, client, engine = live
    monkeypatch.setattr(engine, "_sample", lambda *a: engine.tokenizer.eos_token_id)
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0] == {"index": 0, "text": "", "finish_reason": "stop",
                                                               "logprobs": None}
    ev = _events(client, "/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert ev[-1] == "[DONE]" and json.loads(ev[-2])["choices"][0]["finish_reason"] == "stop"


def test_stream_with_a_stop_string_sends_what_the_answer_keeps(live):
    _, client, _ = live
    body = {"prompt": "The", "max_tokens": 4, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    if len(full) < 4:
        pytest.skip(f"greedy text too short to cut: {full!r}")
    stop = full[len(full) // 2 - 1: len(full) // 2 + 1]  # two characters, likely across a token boundary
    kept = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]["text"]
    assert kept == full[: full.index(stop)]
    assert _text(_events(client, "/v1/completions", {**body, "stop": stop})) == kept


def test_stream_errors_count_as_failed_not_cancelled(live, monkeypatch):
    _, client, engine = live

    def counter(name: str) -> float:
        return float(re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.M).group(1))

    def broken(*a, **k):
        raise RuntimeError("engine failure")
        yield

    monkeypatch.setattr(engine, "stream", broken)
    before = counter("haqmoe_requests_failed_total"), counter("haqmoe_requests_cancelled_total")
    ev = _events(client, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert "engine failure" in ev[-1]
    assert (counter("haqmoe_requests_failed_total"), counter("haqmoe_requests_cancelled_total")) == \
        (before[0] + 1, before[1])
