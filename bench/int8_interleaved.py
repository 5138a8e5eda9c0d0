"""SmolLM2-135M int8 decode through the ahead-of-time package vs llama.cpp Q8_0, interleaved.

    .venv/bin/python bench/int8_interleaved.py [--pairs 10]  # -> bench/results/int8_interleaved.{json,md}

This machine shares its host: in bench/int8.py, where every mode runs in its own process, a mode's best
round moves by 10-25 % between runs, and the ratio to llama.cpp with it.
Here each decoder lives in its own long-lived process (two OpenMP/thread-pool runtimes in one process
slowed the package by ~15 %) and the two alternate in short bursts on command (64 greedy tokens after the
same 32-token prompt, 2 threads each, a short pause between bursts, the first side alternating), and the
ratio is taken per adjacent pair, so a slow spell of the host falls on both sides. Decode tok/s of a
burst: tokens after the first over the time from the first to the last. The package is `haqmoe generate
--aot`'s (real int8, int8 lm_head checkpoint; its int8 products on our fused kernel where the CPU has
AVX512-VNNI, see meta.fused_kernel); llama.cpp runs the same weights requantized to Q8_0 (bench/int8.py's
file; meta.llama_cpp is its version, built as `make peer-llamacpp` does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))  # also in spawned workers: set at import
PROMPT, NEW, THREADS = 32, 64, 2


class Stamps:
    """A streamer that only records when each token arrives (the prompt's put is not a token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if value.dim() == 1:  # a new token ([1]); the prompt comes as [1, T]
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_tok_s(self) -> float:
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def aot_decoder():
    """A burst function over `haqmoe generate --aot`'s package, and its load (or build) time."""
    import int8 as bench_int8

    from haqmoe.sources import load_model
    from haqmoe.exec.aot import AotGenerator
    from haqmoe.exec.precision import convert

    lm = load_model(str(bench_int8.ensure_quantized("smollm2-135m", int8_lm_head=True)), progress=False)
    convert(lm.model, "int8")
    prompt = torch.tensor([bench_int8.prompt_ids(lm.tokenizer, PROMPT)])
    t = time.perf_counter()
    gen = AotGenerator.for_model(lm.model, PROMPT + NEW, log=print)
    load_s = time.perf_counter() - t

    def burst() -> float:
        stamps = Stamps()
        gen.generate(prompt, NEW, streamer=stamps)
        return stamps.decode_tok_s()

    return burst, load_s


def llama_decoder():
    import int8 as bench_int8
    import llama_cpp
    from transformers import AutoTokenizer

    from haqmoe.models.embedded import ensure_embedded

    ids = bench_int8.prompt_ids(AutoTokenizer.from_pretrained(ensure_embedded("smollm2-135m", progress=False)),
                                PROMPT)
    llm = llama_cpp.Llama(str(bench_int8.ensure_gguf("llama.cpp-q8_0")), n_threads=THREADS,
                          n_threads_batch=THREADS, n_ctx=512, verbose=False)

    def burst() -> float:
        times = []
        for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == NEW:
                break
        return (len(times) - 1) / (times[-1] - times[0])

    return burst, 0.0


def serve(kind: str, conn) -> None:
    """Worker process: build the decoder, then run one burst per request until told to stop."""
    torch.set_num_threads(THREADS)
    burst, load_s = (aot_decoder if kind == "aot" else llama_decoder)()
    burst()  # warm-up
    conn.send(load_s)
    while conn.recv():
        conn.send(burst())


def main() -> None:
    import multiprocessing as mp

    from haqmoe.results import run_meta, write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10, help="bursts of each decoder")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for kind in ("aot", "llama"):
        here, there = ctx.Pipe()
        procs.append(ctx.Process(target=serve, args=(kind, there), daemon=True))
        procs[-1].start()
        conns[kind] = here
    load_s = conns["aot"].recv() + conns["llama"].recv()
    rows = []
    for i in range(args.pairs):
        speeds = {}
        for side in (("aot", "llama") if i % 2 == 0 else ("llama", "aot")):
            time.sleep(0.2)  # let the other side's spinning worker threads go idle
            conns[side].send(True)
            speeds[side] = conns[side].recv()
        rows.append({"pair": i, "aot_tok_s": speeds["aot"], "llamacpp_q8_0_tok_s": speeds["llama"],
                     "ratio": speeds["aot"] / speeds["llama"]})
        print(rows[-1], flush=True)
    for kind, conn in conns.items():
        conn.send(False)
    for p in procs:
        p.join(10)
    ratios = [r["ratio"] for r in rows]
    summary = {"pair": "median", "aot_tok_s": statistics.median(r["aot_tok_s"] for r in rows),
               "llamacpp_q8_0_tok_s": statistics.median(r["llamacpp_q8_0_tok_s"] for r in rows),
               "ratio": statistics.median(ratios)}
    rows.append(summary)
    notes = (__doc__ or "") + (
        f"\n\nMedian over {args.pairs} pairs: ahead-of-time int8 {summary['aot_tok_s']:.1f} tok/s, llama.cpp Q8_0 "
        f"{summary['llamacpp_q8_0_tok_s']:.1f} tok/s, ratio {summary['ratio']:.2f} (pairs {min(ratios):.2f}-"
        f"{max(ratios):.2f}). Package loaded (or built) in {load_s:.0f} s.")
    out = ROOT / "bench" / "results" / "int8_interleaved.json"
    import int8 as bench_int8

    from haqmoe.exec.kernels import w8a8_op

    meta = run_meta(pairs=args.pairs, prompt_tokens=PROMPT, new_tokens=NEW, threads=THREADS,
                    llama_cpp=bench_int8.llama_cpp_version(), fused_kernel=w8a8_op() is not None)
    write_results(out, rows, meta,
                  "SmolLM2 int8 decode: ahead-of-time package vs llama.cpp Q8_0, interleaved", notes)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
