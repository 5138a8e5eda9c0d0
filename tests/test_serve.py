"""The OpenAI-compatible server against a live uvicorn on loopback, driven by the official client.

The model is a tiny random Mixtral with SmolLM2's tokenizer and chat template (tokens cost ms),
served through the emulated GPU tier so the expert cache has hits and misses to report.
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from haqmoe.exec.compiled import compiler_available

openai = pytest.importorskip("openai")

ENGINE_ARGS = ["--emulate-gpu", "--slots", "4"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from haqmoe.serve.fixtures import tiny_chat_moe

    return tiny_chat_moe(tmp_path_factory.mktemp("serve") / "tiny-chat-moe")


def _engine(ckpt):
    from haqmoe.sources import load_model
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig

    return CollaborativeEngine(load_model(str(ckpt), progress=False), EngineConfig(emulate_gpu=True,
                                                                                   slots_per_layer=4))


class LiveServer:
    """uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(ckpt):
    from haqmoe.serve.app import ServeConfig, create_app

    live = LiveServer(create_app(_engine(ckpt), ServeConfig(model_name="tiny", max_tokens_limit=64)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _haqmoe_run(capsys, ckpt, *args: str) -> dict:
    from haqmoe.cli.main import main

    capsys.readouterr()
    main(["--quiet", "run", str(ckpt), *args, *ENGINE_ARGS, "--json"])
    return json.loads(capsys.readouterr().out)


def _metric(text: str, name: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}\{{layer="(\d+)"\}} (\S+)$', text, re.M)}


def test_stream_chat_equals_haqmoe_run_and_metrics(server, client, ckpt, capsys):
    prompt = "Name three colors."
    ref = _haqmoe_run(capsys, ckpt, "--prompt", prompt, "--chat", "--max-tokens", "12", "--temperature", "0.8",
                      "--top-p", "0.9", "--seed", "7")
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=12, temperature=0.8, top_p=0.9, seed=7, stream=True)
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == ref["text"] and ref["text"]
    assert finish in ("length", "stop")

    metrics = httpx.get(server.url + "/metrics").text
    hits, misses = _metric(metrics, "haqmoe_expert_cache_hits_total"), \
        _metric(metrics, "haqmoe_expert_cache_misses_total")
    inflight = _metric(metrics, "haqmoe_expert_cache_inflight_total")
    assert set(hits) == set(misses) == set(inflight) == {"0", "1"}
    assert sum(hits.values()) > 0 and sum(misses.values()) > 0
    lookups = sum(hits.values()) + sum(misses.values()) + sum(inflight.values())
    hit_rate = httpx.get(server.url + "/v1/haqmoe/telemetry").json()["engine"]["hit_rate"]
    assert sum(hits.values()) / lookups == pytest.approx(hit_rate, abs=1e-4)  # one meaning of hit rate
    assert sum(_metric(metrics, "haqmoe_expert_bytes_transferred_total").values()) > 0
    assert 'haqmoe_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert re.search(r"^haqmoe_generation_tokens_total [1-9]", metrics, re.M)
    assert re.search(r'^haqmoe_request_latency_seconds_bucket\{le="\+Inf"\} [1-9]', metrics, re.M)


def test_completion_greedy_and_stop(client, ckpt, capsys):
    ref = _haqmoe_run(capsys, ckpt, "--prompt", "The capital of France is", "--max-tokens", "10")
    out = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=10, temperature=0)
    assert out.choices[0].text == ref["text"]
    assert out.usage.completion_tokens == ref["tokens"] and out.usage.prompt_tokens == ref["prompt_tokens"]
    stop = ref["text"].strip()[3:6]
    if stop:
        cut = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=10,
                                        temperature=0, stop=[stop])
        assert stop not in cut.choices[0].text and ref["text"].startswith(cut.choices[0].text)
        assert cut.choices[0].finish_reason == "stop"
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_concurrent_requests_are_not_interleaved(server, client):
    prompts = [f"Story number {i}:" for i in range(4)]

    def ask(p: str) -> str:
        return client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts * 2))
    assert together == alone * 2


def test_bad_requests_are_clear_4xx(server, client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="word " * 600, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="limit"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=3.0)
    with pytest.raises(openai.BadRequestError, match="n"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=4, n=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi", max_tokens=4)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_client_disconnect_cancels_generation(server, client):
    def cancelled() -> float:
        m = re.search(r"^haqmoe_requests_cancelled_total (\S+)$", httpx.get(server.url + "/metrics").text, re.M)
        return float(m.group(1))

    before = cancelled()
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "Once upon a time", "max_tokens": 64, "stream": True, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # first token only, then hang up
    deadline = time.time() + 20
    while cancelled() == before and time.time() < deadline:
        time.sleep(0.05)
    assert cancelled() == before + 1
    # The engine is free again and still answers correctly.
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_malformed_json_is_a_400_without_a_byte_offset_for_param(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi",, "max_tokens": 2}',
                   headers={"Content-Type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] is None, err
    assert err["message"].startswith("request body is not valid JSON: ") and "character 16" in err["message"]


def test_non_streaming_client_that_disconnects_stops_its_generation(ckpt):
    """A client that hangs up before a non-streamed answer: the engine stops within a token or two and
    the request counts as cancelled (status 499), not as a 200 after generating every token."""
    import socket

    from haqmoe.serve.app import ServeConfig, create_app

    engine = _engine(ckpt)
    real, made = engine.stream, []

    def slow_stream(*args, **kwargs):  # ~20 tokens a second: the hang-up lands mid-generation
        for item in real(*args, **kwargs):
            made.append(1)
            time.sleep(0.05)
            yield item
    engine.stream = slow_stream
    live = LiveServer(create_app(engine, ServeConfig(model_name="tiny", max_tokens_limit=64)))
    try:
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0,
                           "stop": []}).encode()
        with socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.time() + 20
            while not made and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
        deadline = time.time() + 20
        while time.time() < deadline and "haqmoe_requests_cancelled_total 1" not in \
                httpx.get(live.url + "/metrics").text:
            time.sleep(0.05)
        text = httpx.get(live.url + "/metrics").text
        assert "haqmoe_requests_cancelled_total 1" in text
        assert 'haqmoe_requests_total{endpoint="/v1/completions",status="499"} 1' in text
        assert 'endpoint="/v1/completions",status="200"' not in text
        assert len(made) < 30, len(made)  # stopped, not run to its 64 tokens
    finally:
        live.stop()


@pytest.mark.parametrize("kind,field,value", [("completion", "echo", True), ("completion", "logprobs", 3),
                                              ("chat", "logprobs", True), ("chat", "tools", [{"type": "function"}])])
def test_unsupported_openai_options_are_refused_by_name(kind, field, value):
    from pydantic import ValidationError

    from haqmoe.serve.schemas import ChatRequest, CompletionRequest

    cls, base = ((CompletionRequest, {"prompt": "hi"}) if kind == "completion"
                 else (ChatRequest, {"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(ValidationError, match=f"'{field}' is not supported"):
        cls(**base, **{field: value})
    cls(**base, **{field: False if value is True else None})  # unset / false is fine


def test_haqmoe_run_admit_copies_cpu_served_experts_and_keeps_text(ckpt, capsys):
    args = ("--prompt", "Hello there", "--max-tokens", "10", "--policy", "always-cpu")
    plain, admitted = _haqmoe_run(capsys, ckpt, *args), _haqmoe_run(capsys, ckpt, *args, "--admit")
    assert admitted["text"] == plain["text"]
    assert plain["background_copies"] == 0 and plain["gpu_expert_calls"] == 0
    assert admitted["background_copies"] > 0 and admitted["gpu_expert_calls"] > 0


@pytest.mark.skipif(not compiler_available(), reason="torch.compile on the CPU needs a C++ compiler")
def test_haqmoe_run_compile_keeps_text(ckpt, capsys):
    args = ("--prompt", "Hello there", "--max-tokens", "10", "--policy", "split")
    plain, compiled = _haqmoe_run(capsys, ckpt, *args), _haqmoe_run(capsys, ckpt, *args, "--compile")
    assert compiled["text"] == plain["text"] and compiled["split_expert_calls"] == plain["split_expert_calls"] > 0


def test_bench_runtime_reports_each_policy_with_its_host_times(ckpt, tmp_path, capsys):
    """`haqmoe bench-runtime`: one row per policy, and what each policy did shows in its counters and in
    the decode's host-time breakdown (always-cpu computes misses on the CPU, always-transfer copies them in)."""
    from haqmoe.cli.main import main

    out = tmp_path / "bench.json"
    main(["--quiet", "bench-runtime", str(ckpt), "--policies", "always-cpu,always-transfer", "--prompt-tokens", "16",
          "--max-tokens", "4", *ENGINE_ARGS, "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()  # without --json: a labelled table, not JSON lines
    assert "decode tok/s" in printed[0] and "hit rate" in printed[0] and not any(x.startswith("{") for x in printed)
    assert [x.split()[0] for x in printed[1:]] == ["always-cpu", "always-transfer"]
    rows = {r["policy"]: r for r in json.loads(out.read_text())["rows"]}
    cpu, transfer = rows["always-cpu"], rows["always-transfer"]
    assert cpu["cpu_expert_calls"] > 0 and cpu["bytes_moved_gb"] == 0 and cpu["host_cpu_tier_est_ms"] > 0
    assert transfer["bytes_moved_gb"] > 0 and transfer["gpu_expert_calls"] > 0
    # no CPU work at decode (the prefill may run an expert on the CPU when every slot serves that batch)
    assert transfer["host_cpu_tier_ms"] == transfer["host_cpu_tier_est_ms"] == 0
    assert (tmp_path / "bench.md").is_file()


def test_serve_takes_the_engine_levers_and_metrics_count_them(ckpt, monkeypatch):
    """`haqmoe serve` builds its engine with the same lever options as `haqmoe run`, and /metrics
    reports what the levers did, per layer, as the engine's telemetry counts it."""
    import uvicorn

    from haqmoe.cli.main import main
    from haqmoe.serve import app as app_mod

    built = {}
    real_create = app_mod.create_app

    def create_app(engine, cfg, executor):  # keep what `serve` built instead of running it
        built["engine"], built["app"] = engine, real_create(engine, cfg, executor)
        return built["app"]

    monkeypatch.setattr(app_mod, "create_app", create_app)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    main(["--quiet", "serve", str(ckpt), "--emulate-gpu", "--slots", "2", "--skip-below", "1", "--prefetch", "1",
          "--lookahead", "2", "--max-batch", "2", "--served-name", "tiny"])
    engine = built["engine"]
    assert (engine.cfg.skip_below, engine.cfg.prefetch, engine.cfg.lookahead) == (1.0, 1, 2)
    live = LiveServer(built["app"])
    try:
        r = httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "Colors are", "max_tokens": 8},
                       timeout=60)
        assert r.status_code == 200, r.text
        metrics = httpx.get(live.url + "/metrics").text
    finally:
        live.stop()
    skipped = _metric(metrics, "haqmoe_expert_calls_skipped_total")
    assert [int(v) for _, v in sorted(skipped.items())] == engine.telemetry.skipped_experts.tolist()
    assert sum(skipped.values()) > 0  # two slots per layer: second-ranked misses happen, and all are skipped
    prefetched = _metric(metrics, "haqmoe_expert_prefetch_copies_total")
    assert [int(v) for _, v in sorted(prefetched.items())] == engine.cache.stats.prefetch_copies.tolist()
