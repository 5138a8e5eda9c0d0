"""Bounded load test of `haqmoe serve` on loopback with the official openai client.

A `haqmoe serve` subprocess serves a tiny random Mixtral with SmolLM2's tokenizer and chat
template (haqmoe.serve.fixtures; tokens cost milliseconds, so the test measures the server's
queueing and HTTP/SSE overhead, not model compute) through the emulated GPU tier. Every response
is checked against the answer the same prompt/seed got alone: a failed or mixed-up response
counts in ``failed``. Rows: clients, requests, failed, p50_s, p95_s, tok_s.

    python bench/serve.py [--clients 8] [--requests 20] [--max-tokens 16]

``--batched``: continuous batching against one request at a time, side by side in one run, on the
MoEfied SmolLM2 (``smollm2-moefied``) with the GPU tier emulated: two ``haqmoe serve`` subprocesses,
``--max-batch 8`` and ``--max-batch 1``, both up at once, loaded in turn by 1, 2, 4 and 8 concurrent
clients (greedy chat completions, half streamed); every answer is checked against the answer its
prompt got alone.
Writes bench/results/serve_batched.{json,md}; ``--render`` rewrites the .md from the .json.

    python bench/serve.py --batched [--int8] [--requests 2] [--max-tokens 32] [--batched-clients 1,2,4,8] [--render]

``--int8`` serves the model's W8A8 checkpoint (RTN, int8 LM head: the one bench/int8.py decodes) with real
int8 products (``--exec real``), the way haqmoe deploys a quantized model, and writes
bench/results/serve_batched_int8.{json,md}.
"""

from __future__ import annotations

import argparse
import json
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


def start_server(ckpt: Path | str, port: int, extra: tuple[str, ...] = ("--slots", "4", "--max-batch", "1"),
                 name: str = "tiny", threads: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from haqmoe.cli.main import main; main()", "--quiet", "--threads", str(threads),
           "serve", str(ckpt), "--port", str(port), "--served-name", name, "--emulate-gpu", *extra,
           "--log-level", "warning"]
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


def complete(client, stream: bool, **kw) -> tuple[str, int, float]:
    """(text, completion tokens, latency) of one chat completion, streamed over SSE or not."""
    t0 = time.perf_counter()
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


def ask(client, i: int, max_tokens: int, stream: bool) -> tuple[str, int, float]:
    """(text, completion tokens, latency) of request ``i``: prompt i mod 8, seed i mod 8, sampled."""
    msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    return complete(client, stream, model="tiny", messages=msgs, max_tokens=max_tokens, temperature=0.8, top_p=0.95,
                    seed=i % 8)


def run_clients(clients: int, requests: int, index, send, refs: dict[int, str]) -> tuple[list, float]:
    """``clients`` threads, each sending ``requests`` requests back to back (request ``index(c, r)``,
    every other one streamed); (ok, tokens, latency) per request, ok = the answer equals its solo
    answer, and the wall time of the whole load."""

    def one_client(c: int) -> list[tuple[bool, int, float]]:
        res = []
        for r in range(requests):
            i = index(c, r)
            try:
                text, toks, lat = send(i, stream=(i % 2 == 0))
                res.append((text == refs[i % len(PROMPTS)], toks, lat))
            except Exception as exc:  # counted as failed
                print(f"request {i} failed: {exc}", file=sys.stderr)
                res.append((False, 0, float("nan")))
        return res

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    return results, time.perf_counter() - t0


def load(client, clients: int, requests: int, max_tokens: int, refs: dict[int, str]) -> dict:
    """``clients`` threads, each sending ``requests`` sampled requests back to back (half of them streamed)."""
    results, wall = run_clients(clients, requests, lambda c, r: c * requests + r,
                                lambda i, stream: ask(client, i, max_tokens, stream), refs)
    lats = np.array([lat for ok, _, lat in results if ok])
    return {"clients": clients, "requests": len(results), "failed": sum(not ok for ok, _, _ in results),
            "p50_s": float(np.percentile(lats, 50)) if len(lats) else None,
            "p95_s": float(np.percentile(lats, 95)) if len(lats) else None,
            "tok_s": sum(t for _, t, _ in results) / wall, "req_s": len(results) / wall, "wall_s": wall}


BATCHED_OUT = ROOT / "bench/results/serve_batched.json"
BATCHED_INT8_OUT = ROOT / "bench/results/serve_batched_int8.json"
INT8 = "W8A8 (RTN, int8 LM head), real int8 products (`--exec real`)"
BATCHED_MODEL = "smollm2-moefied"
BATCHED_CLIENTS = (1, 2, 4, 8)
BATCHED_SERVERS = (("one-at-a-time", 1), ("batched", 8))
BATCHED_TITLE = "Serving with continuous batching vs one request at a time (loopback, openai client)"
EVIDENCE = "measured on this CPU (2 cores, shared)"


def ask_greedy(client, model: str, i: int, max_tokens: int, stream: bool) -> tuple[str, int, float]:
    """(text, completion tokens, latency) of greedy chat request ``i`` (prompt i mod 8)."""
    msgs = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    return complete(client, stream, model=model, messages=msgs, max_tokens=max_tokens, temperature=0)


def load_greedy(client, model: str, clients: int, requests: int, max_tokens: int, refs: dict[int, str]) -> dict:
    """``clients`` threads, each sending ``requests`` greedy requests back to back (every other one
    streamed); client c starts at prompt c, so concurrent requests differ."""
    results, wall = run_clients(clients, requests, lambda c, r: c + r * clients,
                                lambda i, stream: ask_greedy(client, model, i, max_tokens, stream), refs)
    lats = np.array([lat for _, _, lat in results if lat == lat])
    return {"clients": clients, "requests": len(results), "failed": sum(not ok for ok, _, _ in results),
            "tokens": sum(t for _, t, _ in results), "tok_s": sum(t for _, t, _ in results) / wall,
            "p50_s": float(np.percentile(lats, 50)) if len(lats) else None,
            "p95_s": float(np.percentile(lats, 95)) if len(lats) else None, "wall_s": wall}


def telemetry(port: int) -> dict:
    import httpx2 as httpx

    return httpx.get(f"http://127.0.0.1:{port}/v1/haqmoe/telemetry", timeout=30).json()


def measure_server(client, port: int, label: str, max_batch: int, clients: int, args, refs: dict[int, str]) -> dict:
    """One load of ``clients`` greedy clients on one server, with the server's decode telemetry over it, and
    what the experts' decisions did meanwhile: the share of expert calls the (emulated) GPU tier served,
    and of misses the decision moved to the GPU tier rather than computing on the CPU (the predictor copies
    when enough of the batch's tokens need the expert: n > n_critical)."""
    first = telemetry(port)
    row = load_greedy(client, BATCHED_MODEL, clients, args.requests, args.max_tokens, refs)
    last = telemetry(port)
    before, after = first["server"], last["server"]
    steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    batched = after.get("batched_tokens", 0) - before.get("batched_tokens", 0)
    decode_s = after.get("decode_s", 0.0) - before.get("decode_s", 0.0)
    d = {k: (last["engine"].get(k) or 0) - (first["engine"].get(k) or 0)
         for k in ("gpu_expert_calls", "cpu_expert_calls", "misses", "bytes_moved")}
    calls = d["gpu_expert_calls"] + d["cpu_expert_calls"]
    return {"server": label, "max_batch": max_batch, **row, "mean_batch": (batched / steps) if steps else 1.0,
            "decode_tok_s": batched / decode_s if decode_s > 0 else None,
            "gpu_call_share": d["gpu_expert_calls"] / calls if calls else None,
            "misses_moved_share": (d["misses"] - d["cpu_expert_calls"]) / d["misses"] if d["misses"] else None,
            "moved_gb": d["bytes_moved"] / 1e9}


def run_batched(args) -> None:
    """Both servers up at once; each client count loads one, then the other, back to back, so a
    machine whose load drifts during the run weighs on both sides of each ratio alike."""
    import openai

    from haqmoe.models.embedded import ensure_embedded
    from haqmoe.results import run_meta

    if args.int8:  # the W8A8 checkpoint bench/int8.py decodes (RTN, int8 LM head), real int8 products
        sys.path.insert(0, str(ROOT / "bench"))
        import int8 as bench_int8

        ckpt, precision, extra = bench_int8.ensure_quantized(args.model, int8_lm_head=True), INT8, ("--exec", "real")
    else:
        ckpt = ensure_embedded(BATCHED_MODEL, progress=False) if args.model == BATCHED_MODEL else args.model
        precision, extra = "fp32", ()
    procs, servers = [], []
    try:
        for label, max_batch in BATCHED_SERVERS:
            port = free_port()
            reuse = ("--reuse-prefix",) if args.reuse_prefix and max_batch > 1 else ()
            procs.append(start_server(ckpt, port, ("--max-batch", str(max_batch), *reuse, *extra), BATCHED_MODEL,
                                      threads=args.threads))
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                                   timeout=600)
            servers.append((label, max_batch, port, client))
        solo, differ = None, {}
        for label, _, _, client in servers:
            ask_greedy(client, BATCHED_MODEL, 0, 4, stream=False)  # warm-up (first-call allocations)
            answers = [ask_greedy(client, BATCHED_MODEL, i, args.max_tokens, stream=False)
                       for i in range(len(PROMPTS))]  # each prompt alone on this server
            if solo is None:  # the references: every prompt answered alone, one at a time
                solo = {"texts": {i: a[0] for i, a in enumerate(answers)},
                        "p50_s": float(np.median([a[2] for a in answers])),
                        "p95_s": float(np.percentile([a[2] for a in answers], 95)),
                        "tokens": int(sum(a[1] for a in answers))}
            differ[label] = sum(a[0] != solo["texts"][i] for i, a in enumerate(answers))
        rows = []
        for clients in args.batched_clients:
            for label, max_batch, port, client in servers:
                row = measure_server(client, port, label, max_batch, clients, args, solo["texts"])
                row["failed"] += differ[label] if clients == args.batched_clients[0] else 0
                rows.append(row)
                print(row, flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(60)
    meta = run_meta(model=args.model, precision=precision, reuse_prefix=args.reuse_prefix, max_tokens=args.max_tokens,
                    requests_per_client=args.requests,
                    torch_threads=args.threads, solo=solo and {k: v for k, v in solo.items() if k != "texts"},
                    evidence=EVIDENCE)
    write_batched(rows, meta, args.batched_out)
    if any(r["failed"] for r in rows):
        raise SystemExit("some responses failed or differed from the answer alone")


def batched_markdown(rows: list[dict], meta: dict) -> str:
    """The side-by-side table and the notes, computed from the rows (and the solo figures in meta)."""
    by = {(r["server"], r["clients"]): r for r in rows}
    solo = meta.get("solo") or {}
    out = [f"# {BATCHED_TITLE}", "", f"Evidence: {EVIDENCE}.", "",
           "| clients | tok/s one-at-a-time | tok/s batched | speed-up | decode tok/s one / batched | "
           "p50 s one / batched | p95 s one / batched | mean batch | failed (one / batched) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted({r["clients"] for r in rows}):
        one, bat = by.get(("one-at-a-time", c)), by.get(("batched", c))
        if not one or not bat:
            continue
        dec = (f"{one['decode_tok_s']:.1f} / {bat['decode_tok_s']:.1f}"
               if one.get("decode_tok_s") and bat.get("decode_tok_s") else "–")
        out.append(f"| {c} | {one['tok_s']:.1f} | {bat['tok_s']:.1f} | {bat['tok_s'] / one['tok_s']:.2f}x | {dec} | "
                   f"{one['p50_s']:.2f} / {bat['p50_s']:.2f} | {one['p95_s']:.2f} / {bat['p95_s']:.2f} | "
                   f"{bat['mean_batch']:.2f} | {one['failed']} / {bat['failed']} |")
    top = max(r["clients"] for r in rows)
    one, bat = by.get(("one-at-a-time", top)), by.get(("batched", top))
    notes = []
    if one and bat and solo:
        speed = bat["tok_s"] / one["tok_s"]
        p95_ratio = bat["p95_s"] / solo["p95_s"]
        notes.append(
            f"At {top} clients the batched server streams {bat['tok_s']:.1f} tok/s against {one['tok_s']:.1f} one at a "
            f"time: {speed:.2f}x (goal >= 3x: {'met' if speed >= 3 else 'missed'}). Its p95 latency is "
            f"{bat['p95_s']:.2f} s, {p95_ratio:.2f}x the p95 of a request alone ({solo['p95_s']:.2f} s; goal <= 2x: "
            f"{'met' if p95_ratio <= 2 else 'missed'}); one at a time the p95 is {one['p95_s']:.2f} s "
            f"({one['p95_s'] / solo['p95_s']:.2f}x).")
        if one.get("misses_moved_share") is not None and bat.get("misses_moved_share") is not None:
            notes.append(
                f"Expert decisions over the {top}-client load (telemetry): the GPU tier served "
                f"{100 * one['gpu_call_share']:.0f} % of expert calls one at a time and "
                f"{100 * bat['gpu_call_share']:.0f} % batched; of the misses, {100 * one['misses_moved_share']:.0f} % "
                f"were copied to the GPU tier one at a time and {100 * bat['misses_moved_share']:.0f} % batched "
                f"({one['moved_gb']:.2f} vs {bat['moved_gb']:.2f} GB moved; the predictor copies a missed expert "
                f"when more than n_critical of a step's tokens need it, else computes it on the CPU).")
        if one.get("decode_tok_s") and bat.get("decode_tok_s"):
            notes.append(
                f"Decode alone (the server's own step times, prefill left out): {bat['decode_tok_s']:.1f} tok/s batched "
                f"against {one['decode_tok_s']:.1f} one at a time at {top} clients "
                f"({bat['decode_tok_s'] / one['decode_tok_s']:.2f}x), at a mean batch of {bat['mean_batch']:.2f}.")
    # runs before the option existed reused prompt prefixes (their meta has no reuse_prefix)
    reused = (", reusing the keys and values of the prompt prefix they share with the previous prompt (the chat "
              "template's system prompt, `--reuse-prefix`): part of its gain is that prefill work, not the batched "
              "decode" if meta.get("reuse_prefix", True) else
              ", attention called per request (so each answer is its solo answer bit for bit); no prompt prefix "
              "is reused (`--reuse-prefix` off)")
    shape = (" (SmolLM2-135M carved into a Qwen2-MoE: 4 routed experts top-2 + 4 shared, 30 layers)"
             if meta.get("model") == BATCHED_MODEL else "")
    notes.append(
        f"Model: `{meta.get('model')}`{shape}, {meta.get('precision', 'fp32')}, GPU tier emulated on the CPU (`--emulate-gpu`, default slots), "
        f"served by two `haqmoe serve` subprocesses on loopback, both up at once and loaded in turn at each client count, with "
        f"{meta.get('torch_threads')} torch thread(s) each; `--max-batch 1` is the "
        f"one-at-a-time server (requests queue, each prompt prefilled alone as `haqmoe run` does), `--max-batch 8` "
        f"decodes up to 8 requests per step and prefills the requests that join together in one packed forward"
        f"{reused}. Each client "
        f"sends {meta.get('requests_per_client')} greedy chat completions back to back (max_tokens="
        f"{meta.get('max_tokens')}, every other one streamed over SSE); tok/s = completion tokens / wall time of "
        f"the whole load (prefill included); latency is per request, end to end. `failed` counts errors and any "
        f"answer that differs from the one its prompt got alone (all were compared). `mean batch`: requests per "
        f"batched decode step, from the server's telemetry; `decode tok/s`: tokens after each request's first over "
        f"the wall time of the decode steps that made them (telemetry), where the run recorded it. Client threads, the HTTP server and the engine share "
        f"the machine's 2 cores.")
    meta_line = (f"Command: `{meta.get('command', '')}`  \nMachine: {meta.get('machine', '')}, torch "
                 f"{meta.get('torch', '')}, date {meta.get('date', '')}")
    return "\n".join(out) + "\n\n" + "\n\n".join(notes) + "\n\n" + meta_line + "\n"


def write_batched(rows: list[dict], meta: dict, path: Path = BATCHED_OUT) -> None:
    from haqmoe.io import atomic_write_text

    atomic_write_text(path, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(path.with_suffix(".md"), batched_markdown(rows, meta))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=None, help="requests per client (default 20; --batched: 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 16; --batched: 32")
    ap.add_argument("--out", default=str(ROOT / "bench/results/serve.json"))
    ap.add_argument("--batched", action="store_true", help="batched vs one-at-a-time on smollm2-moefied")
    ap.add_argument("--threads", type=int, default=2, help="--batched: torch threads of each server")
    ap.add_argument("--render", action="store_true", help="--batched: rewrite the .md from the .json only")
    ap.add_argument("--model", default=BATCHED_MODEL, help="--batched: checkpoint directory (a quick check of "
                                                           "this script on another model)")
    ap.add_argument("--batched-out", default=None, help="--batched: results file (default "
                    "bench/results/serve_batched.json, with --int8 serve_batched_int8.json)")
    ap.add_argument("--reuse-prefix", action="store_true", help="--batched: the batched server reuses the keys and "
                    "values of a prompt prefix shared with the last prompt (haqmoe serve --reuse-prefix)")
    ap.add_argument("--int8", action="store_true", help="--batched: serve the model's W8A8 checkpoint with real "
                                                        "int8 products (--exec real) instead of fp32")
    ap.add_argument("--batched-clients", default=",".join(map(str, BATCHED_CLIENTS)),
                    type=lambda v: [int(x) for x in v.split(",")], help="--batched: client counts, e.g. 1,8")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.batched:
        args.batched_out = Path(args.batched_out or (BATCHED_INT8_OUT if args.int8 else BATCHED_OUT))
        if args.render:
            doc = json.loads(args.batched_out.read_text())
            write_batched(doc["rows"], doc["meta"], args.batched_out)
            return
        args.requests = args.requests or 2
        args.max_tokens = args.max_tokens or 32
        return run_batched(args)
    args.requests = args.requests or 20
    args.max_tokens = args.max_tokens or 16
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
