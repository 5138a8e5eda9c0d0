"""Bounded load test of `haqmoe serve` on loopback with the official openai client.

A `haqmoe serve` subprocess serves a tiny random Mixtral with SmolLM2's tokenizer and chat
template (haqmoe.serve.fixtures; tokens cost milliseconds, so the test measures the server's
queueing and HTTP/SSE overhead, not model compute) through the emulated GPU tier. Every response
is checked against the answer the same prompt/seed got alone: a failed or mixed-up response
counts in ``failed``. Rows: clients, requests, failed, p50_s, p95_s, tok_s.

    python bench/serve.py [--clients 8] [--requests 20] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Write a haiku about the sea.", "What is 2 + 2?", "Name a famous painter.", "Say hello in French.",
           "Describe a cat in one sentence.", "List three fruits.", "What is the capital of Italy?",
           "Give me a word that rhymes with moon."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from haqmoe.cli.main import main; main()", "--quiet", "--threads", "1", "serve", str(ckpt), "--port", str(port),
           "--served-name", "tiny", "--emulate-gpu", "--slots", "4", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    import httpx2 as httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def ask(client, i: int, max_tokens: int, stream: bool) -> tuple[str, int, float]:
    """(text, completion tokens, latency) of request ``i``: prompt i mod 8, seed i mod 8, sampled."""
    msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    t0 = time.perf_counter()
    kw = dict(model="tiny", messages=msgs, max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=i % 8)
    if stream:
        parts, tokens = [], 0
        for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return "".join(parts), tokens, time.perf_counter() - t0
    out = client.chat.completions.create(**kw)
    return out.choices[0].message.content, out.usage.completion_tokens, time.perf_counter() - t0


def load(client, clients: int, requests: int, max_tokens: int, refs: dict[int, str]) -> dict:
    """``clients`` threads, each sending ``requests`` requests back to back (half of them streamed)."""

    def one_client(c: int) -> list[tuple[bool, int, float]]:
        res = []
        for r in range(requests):
            i = c * requests + r
            try:
                text, toks, lat = ask(client, i, max_tokens, stream=(i % 2 == 0))
                res.append((text == refs[i % len(PROMPTS)], toks, lat))
            except Exception as exc:  # counted as failed
                print(f"request {i} failed: {exc}", file=sys.stderr)
                res.append((False, 0, float("nan")))
        return res

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lats = np.array([lat for ok, _, lat in results if ok])
    return {"clients": clients, "requests": len(results), "failed": sum(not ok for ok, _, _ in results),
            "p50_s": float(np.percentile(lats, 50)) if len(lats) else None,
            "p95_s": float(np.percentile(lats, 95)) if len(lats) else None,
            "tok_s": sum(t for _, t, _ in results) / wall, "req_s": len(results) / wall, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import openai

    from haqmoe.results import run_meta, write_results
    from haqmoe.serve.fixtures import tiny_chat_moe

    ckpt = tiny_chat_moe(Path(tempfile.gettempdir()) / "haqmoe-bench-tiny-chat-moe")
    port = free_port()
    proc = start_server(ckpt, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=300)
        refs = {i: ask(client, i, args.max_tokens, stream=False)[0] for i in range(len(PROMPTS))}
        rows = [load(client, 1, args.requests, args.max_tokens, refs),
                load(client, args.clients, args.requests, args.max_tokens, refs)]
    finally:
        proc.terminate()
        proc.wait(30)
    for r in rows:
        print(r)
    notes = (f"Model: tiny random Mixtral (2 layers, 8 experts, hidden 64) with SmolLM2's 49152-token tokenizer "
             f"and chat template (haqmoe.serve.fixtures), emulated GPU tier with 4 slots/layer, served by a "
             f"`haqmoe serve` subprocess on loopback (1 torch thread). Chat completions, max_tokens="
             f"{args.max_tokens}, temperature 0.8, top_p 0.95, 8 prompts x seeds, half streamed (SSE). "
             f"`failed` counts errors and any response that differs from the same prompt/seed answered alone "
             f"(mixed-up or interleaved output). One engine, one worker: requests queue, so p50/p95 grow with "
             f"clients while tokens/s stays the engine's rate. Client threads share the 2 CPU cores.")
    write_results(args.out, rows, run_meta(max_tokens=args.max_tokens, model="tiny-chat-moe"),
                  "Serving load test (loopback, openai client)", notes,
                  ["clients", "requests", "failed", "p50_s", "p95_s", "tok_s", "req_s", "wall_s"])
    if any(r["failed"] for r in rows):
        raise SystemExit("some responses failed or were mixed up")


if __name__ == "__main__":
    main()
