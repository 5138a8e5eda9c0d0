"""`haqmoe serve --max-batch N`: concurrent HTTP requests decoded in one batch give the answers they
get one at a time, and the telemetry endpoint the web page polls reports the batch and the experts."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

from haqmoe.reliability.live import ThreadedServer

openai = pytest.importorskip("openai")

PROMPTS = [f"Story number {i}: once" for i in range(3)] + ["Hi", "The capital of France is a city that",
                                                             "List three fruits:"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig
    from haqmoe.serve.fixtures import tiny_chat_moe
    from haqmoe.sources import load_model

    ckpt = tiny_chat_moe(tmp_path_factory.mktemp("serve-batch") / "m")
    return CollaborativeEngine(load_model(str(ckpt), progress=False),
                               EngineConfig(emulate_gpu=True, slots_per_layer=4))


def _serve(engine, **cfg):
    from haqmoe.serve.app import ServeConfig, create_app

    return ThreadedServer(create_app(engine, ServeConfig(model_name="tiny", max_tokens_limit=64, **cfg)))


def _ask(client, i: int, stream: bool, **kw) -> str:
    args = dict(model="tiny", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=6 + 2 * (i % len(PROMPTS) % 5), temperature=0, **kw)
    if not stream:
        return client.completions.create(**args).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **args) if c.choices)


def test_concurrent_requests_batched_equal_one_at_a_time(engine):
    with _serve(engine, max_batch=1) as one:
        solo_client = openai.OpenAI(base_url=one.url + "/v1", api_key="-", max_retries=0, timeout=60)
        alone = [_ask(solo_client, i, stream=False) for i in range(len(PROMPTS))]
        sampled_alone = [_ask(solo_client, i, stream=False, seed=i, top_p=0.9) for i in range(2)]
    with _serve(engine, max_batch=4) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda i: _ask(client, i, stream=i % 2 == 0), range(2 * len(PROMPTS))))
        assert together == alone * 2
        tel = httpx.get(srv.url + "/v1/haqmoe/telemetry").json()
        assert tel["server"]["max_batch"] == 4 and 1 < tel["server"]["max_batch_seen"] <= 4
        assert tel["server"]["mean_batch"] > 1 and tel["server"]["waiting"] == 0 and tel["server"]["running"] == 0
        layers, experts = tel["engine"]["layers"], tel["engine"]["experts"]
        assert (layers, experts) == (2, 8)
        calls = tel["heatmap"]["calls"]
        assert len(calls) == layers and all(len(r) == experts for r in calls) and sum(map(sum, calls)) > 0
        assert all(sum(r) <= 4 for r in tel["heatmap"]["resident"])  # 4 slots per layer
        assert all(-1 <= x <= 1 for r in tel["heatmap"]["hit_rate"] for x in r)
        assert tel["server"]["generated_tokens"] > 0 and tel["engine"]["gpu_tier"]
        metrics = httpx.get(srv.url + "/metrics").text
        assert re.search(r"^haqmoe_requests_running 0$", metrics, re.M)
        # seeded sampling through the batch: the same text as alone
        with ThreadPoolExecutor(4) as pool:
            sampled = list(pool.map(lambda i: _ask(client, i, stream=False, seed=i, top_p=0.9), [0, 1, 0, 1]))
        assert sampled == sampled_alone * 2


def test_batched_client_disconnect_and_queue_timeout(engine):
    with _serve(engine, max_batch=2) as srv:
        def cancelled() -> float:
            m = re.search(r"^haqmoe_requests_cancelled_total (\S+)$", httpx.get(srv.url + "/metrics").text, re.M)
            return float(m.group(1))

        with httpx.stream("POST", srv.url + "/v1/completions",
                          json={"prompt": "Once upon a time", "max_tokens": 64, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # first token, then hang up
        deadline = time.time() + 20
        while cancelled() < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert cancelled() == 1
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        assert client.completions.create(model="tiny", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1
        tel = httpx.get(srv.url + "/v1/haqmoe/telemetry").json()["server"]
        assert tel["running"] == 0 and tel["batch"] == 0
    with _serve(engine, max_batch=2, request_timeout_s=0.001) as fast:
        r = httpx.post(fast.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 64}, timeout=60)
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]


def test_page_is_served_with_its_files(engine):
    with _serve(engine, max_batch=2) as srv:
        html = httpx.get(srv.url + "/").text
        assert "/ui/app.js" in html and "/ui/app.css" in html and "heatmap" in html
        js = httpx.get(srv.url + "/ui/app.js")
        assert js.headers["content-type"].startswith("text/javascript") and "/v1/chat/completions" in js.text
        assert "http://" not in js.text and "https://" not in html  # nothing fetched from elsewhere
    with _serve(engine, page=False) as bare:
        assert httpx.get(bare.url + "/").status_code == 404


def test_max_batch_refused_for_compiled_decode(engine):
    from haqmoe.errors import HaqmoeError
    from haqmoe.serve.app import ServeConfig, create_app

    decode, engine._decode = engine._decode, object()  # as if built with --compile
    try:
        with pytest.raises(HaqmoeError, match="--max-batch 1"):
            create_app(engine, ServeConfig(max_batch=4))
        create_app(engine, ServeConfig(max_batch=1))
    finally:
        engine._decode = decode


def test_cli_max_batch_and_page_flags(monkeypatch, engine, capsys):
    """`haqmoe serve --max-batch N` reaches the server (default 8), and --reuse-prefix its scheduler (default
    off); `--no-page` drops the page."""
    import uvicorn

    from haqmoe.cli import serve_cmds
    from haqmoe.cli.main import main

    monkeypatch.delenv("HAQMOE_API_KEY", raising=False)
    monkeypatch.delenv("HAQMOE_CONFIG", raising=False)
    monkeypatch.setattr(serve_cmds, "build_engine", lambda *a, **k: engine)
    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    cases = ((["--max-batch", "3"], 3, 200, False), ([], 8, 200, False), (["--reuse-prefix"], 8, 200, True),
             (["--max-batch", "1", "--no-page"], 1, 404, None))
    for args, batch, page, reuse in cases:
        main(["-q", "serve", "tiny", *args])
        with ThreadedServer(seen["app"]) as srv:
            server = httpx.get(srv.url + "/v1/haqmoe/telemetry").json()["server"]
            assert server["max_batch"] == batch and server.get("reuse_prefix") == reuse
            assert httpx.get(srv.url + "/").status_code == page


@pytest.mark.parametrize("max_batch", ["1", "8"])
def test_serve_runs_the_model_on_the_thread_that_loaded_it(monkeypatch, engine, max_batch):
    """`haqmoe serve` builds the engine on its engine thread and every forward runs there: with the model
    loaded on another thread, torch's OpenMP runtime keeps two worker pools and stops letting idle
    workers spin (a W8A8 batched decode step took 2.3x as long on 2 cores)."""
    import threading

    import uvicorn

    from haqmoe.cli import serve_cmds
    from haqmoe.cli.main import main

    monkeypatch.delenv("HAQMOE_API_KEY", raising=False)
    monkeypatch.delenv("HAQMOE_CONFIG", raising=False)
    built_on, ran_on, seen = [], set(), {}
    monkeypatch.setattr(serve_cmds, "build_engine", lambda *a, **k: built_on.append(threading.get_ident()) or engine)
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda *a, **k: ran_on.add(threading.get_ident()) or forward(*a, **k))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    main(["-q", "serve", "tiny", "--max-batch", max_batch])
    with ThreadedServer(seen["app"]) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
    assert ran_on == {built_on[0]} and built_on[0] != threading.get_ident()
