"""Serving beyond loopback: API keys (flag, key file, env var), the non-loopback refusal, CORS, JSON-only
POSTs, the unauthorized counter, and keys kept out of logs and metrics. Live loopback servers over one
tiny engine; the CLI is driven in-process with uvicorn.run captured."""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haqmoe.reliability.live import ThreadedServer, raw_status

openai = pytest.importorskip("openai")

KEY, KEY2 = "sk-haqmoe-test-0123456789abcdef", "second.key_XYZ~!"
MISSING = {"error": {"message": "missing API key: send the header 'Authorization: Bearer <key>'",
                     "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
INVALID = {"error": {"message": "invalid API key", "type": "invalid_request_error", "param": None,
                     "code": "invalid_api_key"}}
NOT_JSON = {"error": {"message": "Content-Type must be application/json", "type": "invalid_request_error",
                      "param": None, "code": "unsupported_media_type"}}
PREFLIGHT = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}
BODY = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from haqmoe.sources import load_model
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig
    from haqmoe.serve.fixtures import tiny_chat_moe

    ckpt = tiny_chat_moe(tmp_path_factory.mktemp("auth") / "m")
    return CollaborativeEngine(load_model(str(ckpt), progress=False), EngineConfig())


def _serve(engine, **cfg):
    from haqmoe.serve.app import ServeConfig, create_app

    return ThreadedServer(create_app(engine, ServeConfig(model_name="tiny", max_tokens_limit=8, **cfg)))


@pytest.fixture(scope="module")
def keyed(engine):
    with _serve(engine, api_keys=(KEY, KEY2)) as srv:
        yield srv


def _client(url: str, key: str):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _counter(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------ the key on every endpoint
def test_openai_client_with_right_wrong_and_no_key(keyed):
    for key in (KEY, KEY2):
        out = _client(keyed.url, key).completions.create(model="tiny", prompt="Hello", max_tokens=2, temperature=0)
        assert out.usage.completion_tokens >= 1
        assert [m.id for m in _client(keyed.url, key).models.list().data] == ["tiny"]
    for wrong in ("wrong", KEY[:-1], KEY + "x", KEY.upper(), f"{KEY} {KEY2}"):
        with pytest.raises(openai.AuthenticationError) as exc:
            _client(keyed.url, wrong).chat.completions.create(model="tiny", max_tokens=2,
                                                              messages=[{"role": "user", "content": "hi"}])
        assert exc.value.status_code == 401 and exc.value.response.json() == INVALID
    with pytest.raises(openai.AuthenticationError) as exc:  # the client with its Authorization header dropped
        _client(keyed.url, KEY).completions.create(model="tiny", prompt="Hello", max_tokens=2,
                                                   extra_headers={"Authorization": openai.Omit()})
    assert exc.value.status_code == 401 and exc.value.response.json() == MISSING


def test_no_key_is_401_everywhere_but_health(keyed):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/metrics"), ("GET", "/docs"), ("GET", "/openapi.json"),
                         ("GET", "/v1/haqmoe/telemetry"), ("GET", "/nope"), ("GET", "/uix/app.js")):
        r = httpx.request(method, keyed.url + path, json=BODY if method == "POST" else None)
        assert (r.status_code, r.json()) == (401, MISSING), path
        assert r.headers["www-authenticate"] == 'Bearer realm="haqmoe"'
    for header in ("Basic " + KEY, KEY, "Bearer", "Token " + KEY):  # not a Bearer token: missing, not wrong
        r = httpx.get(keyed.url + "/v1/models", headers={"Authorization": header})
        assert (r.status_code, r.json()) == (401, MISSING), header
    r = httpx.get(keyed.url + "/v1/models", headers=[("Authorization", f"Bearer {KEY}")] * 2)  # ambiguous
    assert (r.status_code, r.json()) == (401, INVALID)
    assert httpx.get(keyed.url + "/health").json() == {"status": "ok", "model": "tiny"}
    # The web page's static files are public (a browser navigating sends no Bearer header); they hold no
    # data and the API calls the page makes need the key.
    page = httpx.get(keyed.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/haqmoe/telemetry" in httpx.get(keyed.url + "/ui/app.js").text
    assert httpx.get(keyed.url + "/ui/nope.js").status_code == 404
    assert httpx.get(keyed.url + "/ui/..%2Fapp.py").status_code == 404
    assert httpx.get(keyed.url + "/v1/haqmoe/telemetry", headers=_bearer(KEY)).json()["model"] == "tiny"
    assert httpx.get(keyed.url + "/metrics", headers=_bearer(KEY)).status_code == 200
    assert httpx.get(keyed.url + "/v1/models", headers={"authorization": f"bearer  {KEY2}"}).status_code == 200


def test_unauthorized_counter_counts_and_metrics_never_show_keys(keyed):
    def metrics() -> str:
        return httpx.get(keyed.url + "/metrics", headers=_bearer(KEY)).text

    before = metrics()
    n, n401 = _counter(before, "haqmoe_requests_unauthorized_total"), \
        re.search(r'^haqmoe_requests_total\{endpoint="/v1/completions",status="401"\} (\S+)$', before, re.M)
    httpx.post(keyed.url + "/v1/completions", json=BODY)
    httpx.post(keyed.url + "/v1/completions", json=BODY, headers=_bearer("guess-" + KEY))
    httpx.get(keyed.url + "/metrics", headers=_bearer("guess-2"))
    after = metrics()
    assert _counter(after, "haqmoe_requests_unauthorized_total") == n + 3
    assert re.search(r'^haqmoe_requests_total\{endpoint="/v1/completions",status="401"\} (\S+)$', after,
                     re.M).group(1) == str((int(n401.group(1)) if n401 else 0) + 2)
    assert "# TYPE haqmoe_requests_unauthorized_total counter" in after
    for secret in (KEY, KEY2, "guess-"):
        assert secret not in after


def test_keys_are_compared_against_every_key_without_early_exit(monkeypatch):
    import hmac

    from haqmoe.serve import auth
    from haqmoe.serve.app import ServeConfig
    from haqmoe.serve.metrics import ServerMetrics

    guard = auth.Guard(None, ServeConfig(api_keys=("a1", "b2", "c3")), ServerMetrics())
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert guard.authorized([(b"authorization", b"Bearer a1")]) is True  # the first key matches ...
    assert len(calls) == 3  # ... and all three are still compared
    assert guard.authorized([(b"authorization", b"Bearer zz")]) is False and len(calls) == 6
    assert guard.authorized([]) is None


def test_metrics_open(engine):
    with _serve(engine, api_keys=(KEY,), metrics_open=True) as srv:
        r = httpx.get(srv.url + "/metrics")
        assert r.status_code == 200 and "haqmoe_requests_unauthorized_total" in r.text
        assert (httpx.get(srv.url + "/v1/models").json()) == MISSING


# ------------------------------------------------------------------ JSON only: no cross-site simple POST
def test_non_json_posts_are_415_and_generate_nothing(engine):
    with _serve(engine) as srv:  # no key: the case a foreign web page could exploit
        gen0 = _counter(httpx.get(srv.url + "/metrics").text, "haqmoe_generation_tokens_total")
        for headers in ({"Content-Type": "text/plain;charset=UTF-8"}, {"Content-Type": "application/x-www-form-urlencoded"},
                        {"Content-Type": "multipart/form-data; boundary=x"}, {}):
            r = httpx.post(srv.url + "/v1/completions", content=json.dumps(BODY).encode(), headers=headers)
            assert (r.status_code, r.json()) == (415, NOT_JSON), headers
        assert _counter(httpx.get(srv.url + "/metrics").text, "haqmoe_generation_tokens_total") == gen0
        r = httpx.post(srv.url + "/v1/completions", content=json.dumps(BODY).encode(),
                       headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        text = httpx.get(srv.url + "/metrics").text
        assert 'haqmoe_requests_total{endpoint="/v1/completions",status="415"} 4' in text


def test_key_is_checked_before_the_content_type(keyed):
    r = httpx.post(keyed.url + "/v1/completions", content=b"x", headers={"Content-Type": "text/plain"})
    assert (r.status_code, r.json()) == (401, MISSING)


# ------------------------------------------------------------------ CORS
def test_no_cors_by_default(engine, keyed):
    with _serve(engine) as open_srv:
        for srv, status in ((open_srv, 405), (keyed, 401)):
            r = httpx.options(srv.url + "/v1/chat/completions", headers=PREFLIGHT)
            assert r.status_code == status
            assert not any(h.startswith("access-control-") for h in r.headers), dict(r.headers)
            r = httpx.get(srv.url + "/health", headers={"Origin": "https://evil.example"})
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_origin_allows_exactly_that_origin(engine):
    app_origin = "https://app.example"
    with _serve(engine, api_keys=(KEY,), cors_origins=(app_origin, "http://localhost:3000")) as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers={**PREFLIGHT, "Origin": app_origin})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app_origin
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.options(srv.url + "/v1/chat/completions", headers=PREFLIGHT)  # evil.example
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": app_origin, **_bearer(KEY)})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app_origin
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": app_origin})  # the page can read the 401
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == app_origin
        r = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://evil.example", **_bearer(KEY)})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("origin", ["https://app.example/", "app.example", "https://app.example/path", ""])
def test_bad_cors_origins_are_refused(origin):
    from haqmoe.errors import HaqmoeError
    from haqmoe.serve.app import ServeConfig

    with pytest.raises(HaqmoeError, match="is not an origin"):
        ServeConfig(cors_origins=(origin,))


# ------------------------------------------------------------------ the CLI: keys, key file, env, refusal
@pytest.fixture
def serve_cli(monkeypatch, engine, capsys):
    """``haqmoe serve`` in-process with the engine build and uvicorn.run captured: (exit code, stderr,
    what uvicorn.run was given)."""
    import uvicorn

    from haqmoe.cli import serve_cmds
    from haqmoe.cli.main import main

    monkeypatch.delenv("HAQMOE_API_KEY", raising=False)
    monkeypatch.delenv("HAQMOE_CONFIG", raising=False)
    built = []
    monkeypatch.setattr(serve_cmds, "build_engine", lambda *a, **k: built.append(a) or engine)
    seen: dict = {}

    def run(*args: str):
        capsys.readouterr()
        seen.clear()
        built.clear()
        monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, loaded=bool(built), **kw))
        try:
            main(["-q", *args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().err, seen

    return run


def _accepts(app, keys: list[str], refused: list[str]) -> None:
    with ThreadedServer(app) as srv:
        for k in keys:
            out = _client(srv.url, k).completions.create(model="tiny", prompt="Hi", max_tokens=1)
            assert out.usage.completion_tokens == 1, k
        for k in refused:
            with pytest.raises(openai.AuthenticationError):
                _client(srv.url, k).models.list()


def test_cli_key_file_with_several_keys_and_the_flag(serve_cli, tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# production keys\nkey-alpha\n\n   key-beta  \n#key-retired\nkey-gamma\n")
    code, err, seen = serve_cli("serve", "tiny", "--api-key-file", str(f), "--api-key", "key-flag",
                                "--max-tokens-limit", "4")
    assert code == 0 and seen["host"] == "127.0.0.1", err
    _accepts(seen["app"], ["key-alpha", "key-beta", "key-gamma", "key-flag"], ["key-retired", "#key-retired"])


def test_cli_env_var(serve_cli, monkeypatch):
    monkeypatch.setenv("HAQMOE_API_KEY", "env-one env-two")  # whitespace-separated
    code, err, seen = serve_cli("serve", "tiny", "--host", "0.0.0.0")  # a key: no refusal
    assert code == 0 and seen["host"] == "0.0.0.0" and "warning" not in err, err
    _accepts(seen["app"], ["env-one", "env-two"], ["env-one env-two", "wrong"])


def test_cli_config_file_takes_a_key_file_not_a_key(serve_cli, tmp_path):
    (tmp_path / "keys").write_text("cfg-key\n")
    conf = tmp_path / "haqmoe.toml"
    conf.write_text(f'[serve]\napi_key_file = "{tmp_path / "keys"}"\nmetrics_open = true\n'
                    f'cors_origin = ["https://app.example"]\n')
    code, err, seen = serve_cli("--config", str(conf), "serve", "tiny")
    assert code == 0, err
    with ThreadedServer(seen["app"]) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 200  # metrics_open from the file
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        r = httpx.get(srv.url + "/v1/models", headers={**_bearer("cfg-key"), "Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    conf.write_text('[serve]\napi_key = ["inline-secret"]\n')
    code, err, seen = serve_cli("--config", str(conf), "serve", "tiny")
    assert code == 2 and not seen and err.count("\n") == 1 and "api_key_file" in err
    assert "inline-secret" not in err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "my-host.example", "::ffff:10.0.0.1"])
def test_cli_refuses_non_loopback_without_a_key_before_loading(serve_cli, host):
    code, err, seen = serve_cli("serve", "no-such-model", "--host", host)
    assert code == 2 and not seen  # the model was never loaded ("no-such-model" would fail later)
    assert err == (f"haqmoe: error: refusing to serve {host} (not loopback) without an API key: pass --api-key "
                   f"KEY, --api-key-file FILE or $HAQMOE_API_KEY, or --allow-unauthenticated to accept the risk\n")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"])
def test_cli_loopback_needs_no_key(serve_cli, host):
    code, err, seen = serve_cli("serve", "tiny", "--host", host)
    assert code == 0 and seen["host"] == host and seen["loaded"] and err == ""


def test_cli_allow_unauthenticated_warns(serve_cli):
    code, err, seen = serve_cli("serve", "tiny", "--host", "0.0.0.0", "--allow-unauthenticated")
    assert code == 0 and seen["host"] == "0.0.0.0"
    assert err.startswith("haqmoe: warning: serving 0.0.0.0 without an API key (--allow-unauthenticated)")


@pytest.mark.parametrize("content,msg", [("", "holds no keys"), ("# only a comment\n\n  \n", "holds no keys"),
                                         (None, "cannot read API key file"),
                                         ("ok-key\nbad key with spaces\n", "API key #2 is empty or not printable")])
def test_cli_bad_key_files_are_one_line_errors(serve_cli, tmp_path, content, msg):
    f = tmp_path / "keys.txt"
    if content is not None:
        f.write_text(content)
    code, err, seen = serve_cli("serve", "tiny", "--api-key-file", str(f))
    assert code == 2 and not seen and err.startswith("haqmoe: error: ") and err.count("\n") == 1 and msg in err, err
    assert "ok-key" not in err and "bad key" not in err  # keys are never echoed


def test_cli_keys_never_in_logs_help_or_config_repr(serve_cli, monkeypatch, capsys, caplog, request):
    import uvicorn

    from haqmoe.cli.main import main

    monkeypatch.setenv("HAQMOE_API_KEY", KEY)
    main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "HAQMOE_API_KEY" in help_text and "no auth" not in help_text and KEY not in help_text
    code, err, seen = serve_cli("serve", "tiny", "--host", "0.0.0.0", "--log-level", "trace")
    assert code == 0 and KEY not in err
    assert KEY not in repr(seen["app"].user_middleware)
    # the CLI's app under uvicorn at its most verbose, its log records captured
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")]
    levels = [lg.level for lg in loggers]
    request.addfinalizer(lambda: [lg.setLevel(lv) for lg, lv in zip(loggers, levels)])  # the Config sets TRACE
    server = uvicorn.Server(uvicorn.Config(seen["app"], host="127.0.0.1", port=0, log_level="trace", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    for lg in loggers:  # an earlier server's log config keeps its records at its own (captured, closed) streams
        monkeypatch.setattr(lg, "handlers", [])
        monkeypatch.setattr(lg, "propagate", True)
    with caplog.at_level(5):  # uvicorn's TRACE
        thread.start()
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        assert httpx.post(url + "/v1/completions", json=BODY, headers=_bearer(KEY)).status_code == 200
        assert httpx.post(url + "/v1/completions", json=BODY, headers=_bearer("wrong-" + KEY)).status_code == 401
        metrics = httpx.get(url + "/metrics", headers=_bearer(KEY)).text
        server.should_exit = True
        thread.join(10)
    assert any("POST /v1/completions" in r.getMessage() for r in caplog.records)  # the access log was captured
    logged = "\n".join(r.getMessage() for r in caplog.records
                       if r.name.startswith(("uvicorn", "haqmoe", "fastapi", "starlette"))) + capsys.readouterr().err
    assert KEY not in logged and KEY not in metrics


def test_unsendable_keys_are_refused_without_echo():
    from haqmoe.errors import HaqmoeError
    from haqmoe.serve.app import ServeConfig

    for bad in ("", "two words", "naïve", "tab\there"):
        with pytest.raises(HaqmoeError) as exc:
            ServeConfig(api_keys=("fine", bad))
        assert "API key #2" in str(exc.value) and (not bad or bad not in str(exc.value))
    assert "fine" not in repr(ServeConfig(api_keys=("fine",)))


# ------------------------------------------------------------------ fuzz the Authorization header
_token = st.one_of(st.binary(max_size=80), st.sampled_from([KEY.encode(), KEY2.encode()]).flatmap(
    lambda k: st.sampled_from([k[:-1], k + b"\x00", k.upper(), b" " + k[1:], k[:1] + b"\xff" + k[2:], k * 2])))
_scheme = st.sampled_from([b"Bearer ", b"bearer ", b"BEARER  ", b"Basic ", b"", b"Bearer\t", b"Token "])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(scheme=_scheme, token=_token, path=st.sampled_from([b"/v1/models", b"/metrics", b"/v1/completions"]))
def test_fuzz_authorization_header_never_accepted_never_500(keyed, scheme, token, path):
    value = (scheme + token).replace(b"\r", b"").replace(b"\n", b"")
    req = (b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: " + value + b"\r\nConnection: close\r\n\r\n")
    status = raw_status(keyed.url, req)
    assert status in (400, 401), (value, status)  # 400: the HTTP parser refused the header itself
    assert keyed.alive()

