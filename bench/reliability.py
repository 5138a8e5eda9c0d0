"""Reliability bench: every bad input tried and the message the user sees, kill-then-resume
(quantize, profile), damaged checkpoint files, the fuzz suites, graceful shutdown and a bounded
loopback soak. Writes bench/results/reliability.json + .md (rows: case, ok, message, lost).

    .venv/bin/python bench/reliability.py [--soak-seconds 120] [--skip-fuzz]
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
    est = estimate_quant_memory(m, adapter_for(m), torch.zeros(4, 48, dtype=torch.long), 8)
    limit = str(est.block + 2 * est.per_sample)  # room for 2 of the 4 calibration windows
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
    from haqmoe.models.loading import load_model
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--soak-seconds", type=float, default=120)
    ap.add_argument("--skip-fuzz", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reliability.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
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
    from haqmoe.results import run_meta, write_results

    n_ok = sum(r["ok"] for r in ROWS)
    write_results(a.out, ROWS, run_meta(), "Reliability: bad inputs, interrupted work, damaged files, fuzz, soak",
                  f"{n_ok}/{len(ROWS)} cases ok, {sum(r['lost'] for r in ROWS)} lost anything; "
                  f"{time.perf_counter() - t0:.0f} s on a shared 2-core CPU. `message` is what the user saw "
                  f"(stderr of the CLI, or the error line a library call raises).",
                  columns=["case", "ok", "message", "lost"])
    print(f"{n_ok}/{len(ROWS)} ok -> {a.out}")


if __name__ == "__main__":
    main()
