"""Reliability bench: every bad input tried and the message the user sees, kill-then-resume
(quantize, profile), damaged checkpoint files, the fuzz suites, graceful shutdown, a bounded
loopback soak, and the server's access control (API keys, the non-loopback refusal, CORS, a fuzz
of the Authorization header). Writes bench/results/reliability.json + .md (rows: case, ok, message,
lost).

    .venv/bin/python bench/reliability.py [--soak-seconds 120] [--skip-fuzz]
    .venv/bin/python bench/reliability.py --only auth   # just the "auth:" rows (seconds), merged into the results
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ROWS: list[dict] = []
TITLE = "Reliability: bad inputs, interrupted work, damaged files, fuzz, soak, access control"


def row(case: str, ok: bool, message: str, lost: bool = False, **extra) -> None:
    ROWS.append({"case": case, "ok": bool(ok), "message": message.strip().replace("\n", " ")[:400], "lost": lost,
                 **extra})
    print(f"[{'ok' if ok else 'FAIL'}] {case}: {ROWS[-1]['message'][:160]}", flush=True)


def cli(args: list[str], env: dict | None = None) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, what the user saw on stderr)."""
    from haqmoe.cli.main import main

    err, out = io.StringIO(), io.StringIO()
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            main(["-q", *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, err.getvalue().strip()


def bad_input(case: str, args: list[str], expect: str, env: dict | None = None, check_absent: Path | None = None):
    code, msg = cli(args, env)
    one_line = msg.startswith("haqmoe: error:") and "Traceback" not in msg and msg.count("\n") == 0
    lost = check_absent is not None and check_absent.exists()
    row(case, code == 2 and one_line and expect.lower() in msg.lower() and not lost, msg or f"exit {code}", lost)


# ------------------------------------------------------------------ fixtures
def char_tokenizer(n_chars: int = 95):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))[:n_chars]
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def make_fixtures(root: Path) -> dict[str, Path]:
    from haqmoe.models.tiny import tiny_config, tiny_model
    from transformers import AutoModelForCausalLM

    f: dict[str, Path] = {}
    for fam in ("llama", "mixtral"):
        m = tiny_model(fam)
        m.save_pretrained(root / fam)
        char_tokenizer().save_pretrained(root / fam)
        f[fam] = root / fam
    cfg = tiny_config("llama")
    cfg.vocab_size = 32  # the tokenizer produces ids up to 95
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "small-vocab")
    char_tokenizer().save_pretrained(root / "small-vocab")
    f["small-vocab"] = root / "small-vocab"
    nan = tiny_model("llama")
    with torch.no_grad():
        nan.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    nan.save_pretrained(root / "nan")
    char_tokenizer().save_pretrained(root / "nan")
    f["nan"] = root / "nan"
    shutil.copytree(root / "llama", root / "truncated")
    w = root / "truncated" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    f["truncated"] = root / "truncated"
    shutil.copytree(root / "llama", root / "bert")
    c = json.loads((root / "bert" / "config.json").read_text())
    (root / "bert" / "config.json").write_text(json.dumps({**c, "model_type": "bert"}))
    f["bert"] = root / "bert"
    shutil.copytree(root / "llama", root / "badjson")
    (root / "badjson" / "config.json").write_text("{\"model_type\": ")
    f["badjson"] = root / "badjson"
    (root / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. " * 60)
    (root / "short.txt").write_text("too short")
    f["calib"], f["short"] = root / "calib.txt", root / "short.txt"
    (root / "bad.gguf").write_bytes(b"GGUF" + os.urandom(200))
    f["gguf"] = root / "bad.gguf"
    return f


Q = ["--calib-samples", "4", "--calib-len", "48", "--method", "haq"]


def bad_inputs(f: dict[str, Path], tmp: Path) -> None:
    calib = ["--calib", str(f["calib"])]
    bad_input("model path does not exist", ["info", str(tmp / "nope")], "")
    bad_input("truncated model.safetensors (HF dir, no manifest)", ["info", str(f["truncated"])], "safetensor")
    bad_input("corrupt GGUF file", ["info", str(f["gguf"])], "gguf")
    bad_input("unsupported architecture (bert)", ["info", str(f["bert"])], "bert")
    bad_input("config.json is not JSON", ["info", str(f["badjson"])], "json")
    bad_input("calibration text too short", ["quantize", str(f["llama"]), "-o", str(tmp / "o1"), "--calib",
                                             str(f["short"]), *Q[:2], "--calib-len", "64"], "", check_absent=tmp / "o1")
    bad_input("eval text too short for one window", ["eval", str(f["llama"]), "--data", str(f["short"]),
                                                     "--seqlen", "64"], "")
    bad_input("token ids outside the model's vocabulary", ["quantize", str(f["small-vocab"]), "-o", str(tmp / "o2"),
                                                           *calib, *Q], "vocabulary", check_absent=tmp / "o2")
    bad_input("NaN in a weight (layer named)", ["quantize", str(f["nan"]), "-o", str(tmp / "o3"), *calib, *Q],
              "layers.1.mlp.down_proj", check_absent=tmp / "o3")
    bad_input("unsupported bit width", ["quantize", str(f["llama"]), "-o", str(tmp / "o4"), "--w-bits", "3"], "bits")
    from haqmoe.models.adapters import adapter_for
    from haqmoe.models.tiny import tiny_model
    from haqmoe.reliability.guard import estimate_quant_memory

    m = tiny_model("llama")
    est = estimate_quant_memory(m, adapter_for(m), torch.zeros(4, 48, dtype=torch.long), 8, streaming=True)
    limit = str(est.model + est.block + 2 * est.per_sample)  # room for 2 of the 4 calibration windows
    bad_input("quantization memory estimate exceeds available", ["quantize", str(f["llama"]), "-o", str(tmp / "o5"),
                                                                 *calib, *Q], "--calib-samples 2",
              env={"HAQMOE_MEMORY_LIMIT": limit}, check_absent=tmp / "o5")
    bad_input("--resume with nothing to resume", ["quantize", str(f["llama"]), "-o", str(tmp / "o6"), *calib, *Q,
                                                  "--resume"], "nothing to resume")
    (tmp / "exists").mkdir()
    (tmp / "exists" / "keep.txt").write_text("precious")
    bad_input("output exists (no --overwrite)", ["quantize", str(f["llama"]), "-o", str(tmp / "exists"), *calib, *Q],
              "--overwrite")
    row("existing output untouched", (tmp / "exists" / "keep.txt").read_text() == "precious", "keep.txt intact")
    plan = tmp / "mixtral-plan.json"
    cli(["plan", "mixtral:build", "--strategy", "global-frequency", "--budget", "64", "-o", str(plan)])
    bad_input("placement plan from another model (Mixtral-8x7B plan on a 2-layer model)",
              ["run", str(f["mixtral"]), "--plan", str(plan), "--emulate-gpu", "--prompt", "hi", "--max-tokens", "2"],
              "plan")
    bad_input("config file that is not TOML", ["--config", str(f["gguf"]), "info"], "toml")
    disk_full(f, tmp)


def disk_full(f: dict[str, Path], tmp: Path) -> None:
    """A real ENOSPC: a 64 KiB tmpfs (needs root); skipped (reported) elsewhere."""
    mnt = Path(tempfile.mkdtemp(prefix="haqmoe-full-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        row("disk full during quantize output", False, "could not mount a small tmpfs (not root): not tried")
        return
    try:
        big = tmp / "big"
        cli(["quantize", str(f["mixtral"]), "-o", str(big), "--method", "rtn"])
        code, msg = cli(["quantize", str(f["mixtral"]), "-o", str(mnt / "q"), "--method", "rtn"])
        left = [p.name for p in mnt.iterdir()]
        row("disk full (ENOSPC) while writing a checkpoint", code == 2 and "disk full" in msg and not left,
            msg + f" | left on disk: {left or 'nothing'}", lost=bool(left))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


# ------------------------------------------------------------------ damaged files
def damaged_files(f: dict[str, Path], tmp: Path) -> None:
    q = tmp / "q-ok"
    cli(["quantize", str(f["mixtral"]), "-o", str(q), "--method", "rtn"])
    for kind in ("truncated", "bit-flipped"):
        for name in ("model.safetensors", "config.json", "haqmoe_quant.json"):
            d = tmp / f"q-{kind}-{name}"
            shutil.copytree(q, d)
            p = d / name
            data = bytearray(p.read_bytes())
            if kind == "truncated":
                data = data[: len(data) - 7]
            else:
                data[len(data) // 2] ^= 0x10
            p.write_bytes(bytes(data))
            code, msg = cli(["info", str(d)])
            row(f"{kind} {name} in a quantized checkpoint", code == 2 and name in msg and
                ("truncated" in msg if kind == "truncated" else "corrupt" in msg), msg)
    from haqmoe.routing.trace_io import load_trace
    from haqmoe.errors import HaqmoeError

    tr = tmp / "trace"
    cli(["profile", str(f["mixtral"]), "-o", str(tr), "--data", str(f["calib"]), "--seqlen", "32", "--requests", "8",
         "--chunk", "2"])
    for kind in ("truncated", "bit-flipped"):
        d = tmp / f"trace-{kind}"
        shutil.copytree(tr, d)
        p = sorted(d.glob("chunk-*.npz"))[1]
        data = bytearray(p.read_bytes())
        if kind == "truncated":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 3] ^= 0x04
        p.write_bytes(bytes(data))
        try:
            load_trace(d)
            row(f"{kind} routing-trace chunk", False, "loaded without error")
        except HaqmoeError as exc:
            row(f"{kind} routing-trace chunk", p.name in str(exc), f"haqmoe: error: {exc}")


# ------------------------------------------------------------------ kill then resume
def _haqmoe(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", "from haqmoe.cli.main import main; main()", "-q", *args], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def kill_resume_quantize(f: dict[str, Path], tmp: Path) -> None:
    args = [str(f["mixtral"]), "--calib", str(f["calib"]), *Q, "--threads", "1"]
    ref = _haqmoe(["--threads", "1", "quantize", "-o", str(tmp / "ref"), *args[:-2]])
    killed = _haqmoe(["--threads", "1", "quantize", "-o", str(tmp / "run"), *args[:-2]],
                     env={"HAQMOE_KILL_AFTER_BLOCK": "0"})
    partial = tmp / "run.partial"
    state = json.loads((partial / "state.json").read_text()) if (partial / "state.json").is_file() else {}
    looks_complete = (tmp / "run").exists()
    again = _haqmoe(["--threads", "1", "quantize", "-o", str(tmp / "run"), *args[:-2]])
    resumed = _haqmoe(["--threads", "1", "quantize", "-o", str(tmp / "run"), *args[:-2], "--resume"])
    ok = ref.returncode == 0 and resumed.returncode == 0
    same, n = False, 0
    if ok:
        a, b = _tensors(tmp / "ref"), _tensors(tmp / "run")
        n = len(a)
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    row("quantize: kill -9 after block 0, then --resume", ok and killed.returncode == -9 and state.get("done") == 1
        and not looks_complete and same and not partial.exists(),
        f"killed rc {killed.returncode}, {state.get('done')} block(s) checkpointed, output dir present after kill: "
        f"{looks_complete}; resume rc {resumed.returncode}; {n} tensors bit-identical to an uninterrupted run: "
        f"{same}; rerun without --resume said: {again.stderr.strip()[:160]}", lost=not same)


def kill_resume_profile(f: dict[str, Path], tmp: Path) -> None:
    import haqmoe.routing.profile as prof
    from haqmoe.routing.trace_io import load_trace

    common = ["--data", str(f["calib"]), "--seqlen", "32", "--requests", "8", "--chunk", "2"]
    cli(["profile", str(f["mixtral"]), "-o", str(tmp / "p-ref"), *common])
    real = prof.trace_windows
    calls = {"n": 0}

    def crash(*a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third chunk
        calls["n"] += 1
        return real(*a, **k)

    prof.trace_windows = crash
    try:
        code1, _ = cli(["profile", str(f["mixtral"]), "-o", str(tmp / "p-run"), *common])
    finally:
        prof.trace_windows = real
    code2, msg = cli(["profile", str(f["mixtral"]), "-o", str(tmp / "p-run"), *common, "--resume"])
    a, b = load_trace(tmp / "p-ref"), load_trace(tmp / "p-run")
    same = all(((x is None and y is None) or (x is not None and y is not None and (x == y).all()))
               for x, y in ((a.experts, b.experts), (a.weights, b.weights), (a.guesses, b.guesses),
                            (a.offsets, b.offsets)))
    row("profile: interrupted after 2 of 4 chunks, then --resume", code1 == 130 and code2 == 0 and same,
        f"interrupted exit {code1}, resume exit {code2}, trace identical to an uninterrupted one: {same}", lost=not same)


# ------------------------------------------------------------------ fuzz suites
def fuzz() -> None:
    for name in ("tests/test_fuzz_loaders.py", "tests/test_fuzz_serve.py"):
        t0 = time.perf_counter()
        r = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", name], capture_output=True, text=True,
                           cwd=ROOT, timeout=900)
        last = (r.stdout.strip().splitlines() or ["?"])[-1]
        row(f"hypothesis fuzz ({name}, 200 examples per reader/endpoint)", r.returncode == 0,
            f"{last} in {time.perf_counter() - t0:.0f} s: no tracebacks, no 500s")


# ------------------------------------------------------------------ server: shutdown + soak
def _engine(tmp: Path):
    from haqmoe.sources import load_model
    from haqmoe.runtime.engine import CollaborativeEngine, EngineConfig
    from haqmoe.serve.fixtures import tiny_chat_moe

    return CollaborativeEngine(load_model(str(tiny_chat_moe(tmp / "chat-moe")), progress=False), EngineConfig())


def graceful_shutdown(engine) -> None:
    import httpx2 as httpx

    from haqmoe.reliability.live import ThreadedServer
    from haqmoe.serve.app import ServeConfig, create_app

    body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0}
    srv = ThreadedServer(create_app(engine, ServeConfig(model_name="tiny", max_tokens_limit=64))).__enter__()
    ref = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    text, finished = "", False
    with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():  # the first token arrived: the request is in flight now
            if line.startswith("data: {"):
                ch = json.loads(line[6:])
                text += ch["choices"][0]["text"] if ch.get("choices") else ""
                srv._server.should_exit = True  # what SIGTERM/SIGINT does in uvicorn
            finished = finished or line == "data: [DONE]"
    srv._thread.join(30)
    ok = finished and text == ref
    row("server: shutdown requested with a streaming request in flight", ok and not srv._thread.is_alive(),
        f"in-flight stream ran to [DONE] with the full answer after shutdown was requested: {ok}; "
        f"server exited afterwards: {not srv._thread.is_alive()}")


def soak(engine, seconds: float) -> None:
    import httpx2 as httpx
    import psutil

    from haqmoe.reliability.live import ThreadedServer
    from haqmoe.serve.app import ServeConfig, create_app

    prompts = ["The capital of France is", "def fib(n):", "Once upon a time", "1, 2, 3, 4,", "Hello"]
    proc = psutil.Process()
    counts = {"valid": 0, "wrong": 0, "invalid": 0, "invalid_ok": 0, "disconnects": 0, "5xx": 0, "errors": 0}
    rss: list[float] = []
    with ThreadedServer(create_app(engine, ServeConfig(model_name="tiny", max_tokens_limit=16,
                                                       max_body_bytes=8192))) as srv:
        base = srv.url
        refs = {}
        for p in prompts:
            for stream in (False,):
                refs[p] = httpx.post(base + "/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0},
                                     timeout=60).json()["choices"][0]["text"]
        rss.append(proc.memory_info().rss / 2**20)
        stop = time.monotonic() + seconds
        lock = threading.Lock()

        def bump(k: str, n: int = 1) -> None:
            with lock:
                counts[k] += n

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=base, timeout=60) as c:
                while time.monotonic() < stop:
                    kind = rng.random()
                    p = rng.choice(prompts)
                    try:
                        if kind < 0.35:
                            r = c.post("/v1/completions", json={"prompt": p, "max_tokens": 12, "temperature": 0})
                            bump("valid")
                            bump("5xx", r.status_code >= 500)
                            bump("wrong", r.status_code != 200 or r.json()["choices"][0]["text"] != refs[p])
                        elif kind < 0.55:
                            text = ""
                            with c.stream("POST", "/v1/completions", json={"prompt": p, "max_tokens": 12,
                                                                          "temperature": 0, "stream": True}) as r:
                                for line in r.iter_lines():
                                    if line.startswith("data: {"):
                                        ch = json.loads(line[6:])
                                        text += ch["choices"][0]["text"] if ch.get("choices") else ""
                            bump("valid")
                            bump("wrong", text != refs[p])
                        elif kind < 0.7:
                            with c.stream("POST", "/v1/completions", json={"prompt": p, "max_tokens": 16,
                                                                          "stream": True}) as r:
                                for _ in r.iter_lines():
                                    break  # disconnect mid-stream
                            bump("disconnects")
                        else:
                            bad = rng.choice([b"{", b"[1,2]", b'{"prompt": 3}', b'{"prompt": "x", "max_tokens": 999}',
                                              b'{"prompt": "' + b"y" * 9000 + b'"}', b"\xff\xfe\x00",
                                              json.dumps({"prompt": "word " * 600, "max_tokens": 4}).encode(),
                                              b'{"messages": [{"role": "user"}]}'])
                            path = rng.choice(["/v1/completions", "/v1/chat/completions"])
                            r = c.post(path, content=bad, headers={"content-type": "application/json"})
                            bump("invalid")
                            bump("5xx", r.status_code >= 500)
                            bump("invalid_ok", 400 <= r.status_code < 500 and "error" in r.json())
                    except Exception as exc:  # a transport error is a server failure here
                        bump("errors")
                        print("soak client error:", type(exc).__name__, exc, flush=True)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            rss.append(proc.memory_info().rss / 2**20)
        for t in threads:
            t.join()
        metrics = httpx.get(base + "/metrics", timeout=30).text
        final = httpx.post(base + "/v1/completions", json={"prompt": prompts[0], "max_tokens": 12, "temperature": 0},
                           timeout=60).json()["choices"][0]["text"]
        alive = srv.alive()
    running = [l for l in metrics.splitlines() if l.startswith(("haqmoe_requests_running", "haqmoe_requests_waiting"))]
    ok = (counts["5xx"] == 0 and counts["wrong"] == 0 and counts["errors"] == 0 and alive
          and counts["invalid_ok"] == counts["invalid"] and final == refs[prompts[0]])
    row(f"server soak {seconds:.0f} s, 4 loopback clients (valid, streaming, invalid, disconnects)", ok,
        f"{counts['valid']} valid ({counts['wrong']} wrong), {counts['invalid']} invalid ({counts['invalid_ok']} "
        f"clean 4xx), {counts['disconnects']} disconnects, {counts['5xx']} 5xx, {counts['errors']} transport errors; "
        f"server alive: {alive}; after: {'; '.join(running) or 'no queue gauges'}; RSS {rss[0]:.0f} -> {rss[-1]:.0f} "
        f"MiB (max {max(rss):.0f})", lost=False, rss_mib=[round(x, 1) for x in rss], **counts)


# ------------------------------------------------------------------ server: access control
AUTH_KEYS = ("bench-key-1", "bench-key-2")


def _auth_values(rng: random.Random) -> list[bytes]:
    """Authorization header values: random bytes, near misses of the real keys, other schemes, huge ones."""
    k = rng.choice(AUTH_KEYS).encode()
    i = rng.randrange(len(k))
    near = [k[:i], k + bytes([rng.randrange(33, 127)]), k[:i] + bytes([k[i] ^ 0x01]) + k[i + 1:], k.upper(),
            k[::-1], k * 2, b"%s %s" % (AUTH_KEYS[0].encode(), AUTH_KEYS[1].encode()), k + b"\x00", b"\xff" + k]
    schemes = [b"Bearer ", b"bearer ", b"Bearer  ", b"Basic ", b"", b"Bearer\t", b"Token ", b"Bearer Bearer "]
    token = rng.choice([rng.choice(near), bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))),
                        bytes(rng.randrange(33, 127) for _ in range(rng.choice([1, 16, 4000, 12000])))])
    value = (rng.choice(schemes) + token).replace(b"\r", b"").replace(b"\n", b"")
    return [value, b"Bearer " + k] if rng.random() < 0.05 else [value]  # a right key beside a wrong one: ambiguous


def auth(engine, tmp: Path, fuzz_n: int = 2000) -> None:
    """`haqmoe serve` beyond loopback: the refusal and key-file errors (CLI, before any model load), the
    key on every endpoint, /metrics, CORS, cross-site simple POSTs, and a raw fuzz of the Authorization header."""
    import httpx2 as httpx
    import openai

    from haqmoe.reliability.live import ThreadedServer, raw_status
    from haqmoe.serve.app import ServeConfig, create_app

    nomodel = str(tmp / "no-such-model")  # were it loaded, the error would be "not found"
    bad_input("auth: serve --host 0.0.0.0 without an API key (refused before loading)",
              ["serve", nomodel, "--host", "0.0.0.0"], "--allow-unauthenticated")
    (tmp / "empty-keys").write_text("# no keys yet\n\n")
    bad_input("auth: --api-key-file with no keys", ["serve", nomodel, "--api-key-file", str(tmp / "empty-keys")],
              "holds no keys")
    bad_input("auth: --api-key-file unreadable", ["serve", nomodel, "--api-key-file", str(tmp / "missing-keys")],
              "cannot read API key file")
    (tmp / "key.toml").write_text('[serve]\napi_key = ["in-a-config-file"]\n')
    bad_input("auth: api_key in a config file", ["--config", str(tmp / "key.toml"), "serve", nomodel], "api_key_file")

    def cfg(**kw) -> ServeConfig:
        return ServeConfig(model_name="tiny", max_tokens_limit=4, **kw)

    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
    with ThreadedServer(create_app(engine, cfg(api_keys=AUTH_KEYS))) as srv:
        u = srv.url
        bearer = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731
        no_key = {p: (httpx.post(u + p, json=body) if "compl" in p else httpx.get(u + p)).status_code
                  for p in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/metrics", "/docs",
                            "/v1/haqmoe/telemetry")}
        wrong = {k: httpx.get(u + "/v1/models", headers=bearer(k)).status_code for k in ("wrong", AUTH_KEYS[0][:-1])}
        right = {}
        for k in AUTH_KEYS:
            c = openai.OpenAI(base_url=u + "/v1", api_key=k, max_retries=0, timeout=60)
            right[k[-1]] = c.completions.create(model="tiny", prompt="Hello", max_tokens=2).usage.completion_tokens
        try:
            openai.OpenAI(base_url=u + "/v1", api_key="wrong", max_retries=0).models.list()
            client_wrong = "accepted"
        except openai.AuthenticationError as exc:
            client_wrong = f"{exc.status_code} {exc.response.json()['error']['code']}"
        health = httpx.get(u + "/health").status_code
        page = httpx.get(u + "/").status_code  # the web page's static files: public, its API calls are not
        row("auth: API keys on every endpoint (openai client + raw requests)",
            set(no_key.values()) == {401} and set(wrong.values()) == {401} and all(right.values())
            and client_wrong == "401 invalid_api_key" and health == 200 and page == 200,
            f"no key: {no_key}; wrong key: {set(wrong.values())}; openai client with a wrong key: {client_wrong}; "
            f"each right key (tokens generated): {right}; /health and the page / without a key: {health}, {page}")

        rng = random.Random(0)
        seen: dict[int, int] = {}
        errors = 0
        t0 = time.perf_counter()
        for _ in range(fuzz_n):
            path = rng.choice([b"/v1/models", b"/metrics", b"/v1/completions", b"/v1/chat/completions"])
            lines = b"".join(b"Authorization: " + v + b"\r\n" for v in _auth_values(rng))
            req = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + lines + b"Connection: close\r\n\r\n"
            try:
                st = raw_status(u, req)
            except OSError:
                errors += 1
                continue
            seen[st] = seen.get(st, 0) + 1
        secs = time.perf_counter() - t0
        metrics = httpx.get(u + "/metrics", headers=bearer(AUTH_KEYS[0])).text
        unauth = float(next(l.split()[-1] for l in metrics.splitlines()
                            if l.startswith("haqmoe_requests_unauthorized_total ")))
        accepted = sum(n for st, n in seen.items() if 200 <= st < 300)
        crashes = sum(n for st, n in seen.items() if st >= 500 or st < 0)
        row(f"auth: Authorization header fuzz ({fuzz_n} random/malformed/near-miss headers, raw HTTP)",
            accepted == 0 and crashes == 0 and errors == 0 and srv.alive() and set(seen) <= {400, 401, 431},
            f"statuses {dict(sorted(seen.items()))} (400/431: refused by the HTTP parser); {accepted} accepted, "
            f"{crashes} 5xx or hang-ups, {errors} transport errors in {secs:.1f} s; server alive: {srv.alive()}",
            fuzz_requests=fuzz_n, fuzz_accepted=accepted, fuzz_5xx=crashes, fuzz_transport_errors=errors)
        leaked = [k for k in AUTH_KEYS if k in metrics]
        row("auth: unauthorized requests counted, keys absent from /metrics", unauth >= seen.get(401, 0) > 0
            and not leaked, f"haqmoe_requests_unauthorized_total {unauth:.0f} (fuzz 401s: {seen.get(401, 0)}); "
                            f"keys in the exposition: {leaked or 'none'}")

    with ThreadedServer(create_app(engine, cfg(api_keys=AUTH_KEYS, metrics_open=True))) as srv:
        m, v = httpx.get(srv.url + "/metrics").status_code, httpx.get(srv.url + "/v1/models").status_code
        row("auth: --metrics-open", m == 200 and v == 401, f"/metrics without a key: {m}; /v1/models: {v}")

    pre = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    with ThreadedServer(create_app(engine, cfg())) as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers=pre)
        acao = r.headers.get("access-control-allow-origin")
        tokens = lambda: next(l.split()[-1] for l in httpx.get(srv.url + "/metrics").text.splitlines()  # noqa: E731
                              if l.startswith("haqmoe_generation_tokens_total "))
        before = tokens()
        simple = {ct or "none": httpx.post(srv.url + "/v1/completions", content=json.dumps(body).encode(),
                                           headers={"Content-Type": ct} if ct else {}).status_code
                  for ct in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x", None)}
        after = tokens()
        control = httpx.post(srv.url + "/v1/completions", json=body).status_code  # the same body as JSON
        row("auth: no CORS by default (foreign preflight, keyless server)", acao is None and r.status_code >= 400,
            f"preflight from https://evil.example: {r.status_code}, Access-Control-Allow-Origin: {acao}")
        row("auth: cross-site simple POSTs refused (keyless server)",
            set(simple.values()) == {415} and before == after and control == 200,
            f"by Content-Type: {simple}; tokens generated by them: {before} -> {after}; the same body as "
            f"application/json: {control}")
    with ThreadedServer(create_app(engine, cfg(api_keys=AUTH_KEYS, cors_origins=("https://app.example",)))) as srv:
        ok_r = httpx.options(srv.url + "/v1/chat/completions", headers={**pre, "Origin": "https://app.example"})
        bad_r = httpx.options(srv.url + "/v1/chat/completions", headers=pre)
        a, b = ok_r.headers.get("access-control-allow-origin"), bad_r.headers.get("access-control-allow-origin")
        row("auth: --cors-origin https://app.example", a == "https://app.example" and b is None,
            f"preflight from https://app.example: {ok_r.status_code}, allowed origin {a}; from https://evil.example: "
            f"{bad_r.status_code}, allowed origin {b}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--soak-seconds", type=float, default=120)
    ap.add_argument("--skip-fuzz", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    ap.add_argument("--only", choices=["auth"], help="Run one part; its rows replace that part's rows in --out.")
    a = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    if a.only:
        return main_part(a.only, a.out, t0)
    with tempfile.TemporaryDirectory(prefix="haqmoe-rel-") as d:
        tmp = Path(d)
        f = make_fixtures(tmp / "fx")
        bad_inputs(f, tmp)
        damaged_files(f, tmp)
        kill_resume_quantize(f, tmp)
        kill_resume_profile(f, tmp)
        if not a.skip_fuzz:
            fuzz()
        engine = _engine(tmp)
        graceful_shutdown(engine)
        soak(engine, a.soak_seconds)
        auth(engine, tmp)
    from haqmoe.results import run_meta, write_results

    n_ok = sum(r["ok"] for r in ROWS)
    write_results(a.out, ROWS, run_meta(), TITLE,
                  f"{n_ok}/{len(ROWS)} cases ok, {sum(r['lost'] for r in ROWS)} lost anything; "
                  f"{time.perf_counter() - t0:.0f} s on a shared 2-core CPU. `message` is what the user saw "
                  f"(stderr of the CLI, or the error line a library call raises).",
                  columns=["case", "ok", "message", "lost"])
    print(f"{n_ok}/{len(ROWS)} ok -> {a.out}")



def main_part(part: str, out: str, t0: float) -> None:
    """Rerun one part alone and merge: its rows (case "PART: ...") replace the old ones, the other rows and
    the meta of the full run stay, and the notes say which rows came from which run."""
    from haqmoe.results import run_meta, write_results

    with tempfile.TemporaryDirectory(prefix="haqmoe-rel-") as d:
        auth(_engine(Path(d)), Path(d))
    old = json.loads(Path(out).read_text()) if Path(out).is_file() else {"meta": {}, "rows": []}
    new_rows = list(ROWS)
    prefix = f"{part}: "
    rows = [r for r in old["rows"] if not r["case"].startswith(prefix)] + new_rows
    part_meta = run_meta()
    meta = {**(old["meta"] or part_meta), f"{part}_rerun": {k: part_meta[k] for k in ("command", "date", "machine")}}
    n_ok = sum(r["ok"] for r in rows)
    write_results(out, rows, meta, TITLE,
                  f"{n_ok}/{len(rows)} cases ok, {sum(r['lost'] for r in rows)} lost anything. The \"{prefix}\" rows "
                  f"were rerun alone (`{part_meta['command']}`, {part_meta['date']}, "
                  f"{time.perf_counter() - t0:.0f} s); "
                  f"the others are from the full run below. `message` is what the user saw (stderr of the CLI, or "
                  f"the error line a library call raises).", columns=["case", "ok", "message", "lost"])
    print(f"{sum(r['ok'] for r in new_rows)}/{len(new_rows)} {part} cases ok; {n_ok}/{len(rows)} in all -> {out}")


if __name__ == "__main__":
    main()
