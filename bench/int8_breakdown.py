"""Where a compiled int8 decode step of SmolLM2-135M spends its time, beside the int8 GEMV alone.

    .venv/bin/python bench/int8_breakdown.py [--aoti]  # -> bench/results/int8_breakdown.{json,md}
    .venv/bin/python bench/int8_breakdown.py --render  # re-render the .md from the .json, no measurement

Two measurements in one process, 2 threads:

1. the decode step as `bench/int8.py`'s `real-int8-lm-head-compiled` mode runs it (int8 lm_head checkpoint,
   real int8, transformers' compiled decode over a static cache): greedy tokens/s over 64 new tokens (best of
   2), then one generation under torch.profiler, split into the int8 GEMM (`aten::_int_mm`), the inductor
   graph's own time (fused kernels + its Python wrapper), dynamo's guard evaluation (`TorchDynamo Cache
   Lookup`), attention (`sdpa`) and the rest (generate's loop, sampling, stopping checks), per token;
2. the GEMV floor: one token through `_int_mm` over int8 weights of every decoder linear and lm_head at
   their real shapes, all distinct tensors (135 MB, so they stream from DRAM as in decode), on 1 and on 2
   threads.

``--aoti`` adds the same model generating ahead-of-time compiled (``haqmoe.exec.aot``, what ``haqmoe
generate --aot`` runs: torch.export + AOTInductor, no dynamo, no Python wrapper at run time; minutes to
build), timed on a greedy decode whose first 8 tokens are checked against eager ``generate``.

The profiler adds its own per-op cost, so the split is a guide to shares; the tokens/s rows are unprofiled.
llama.cpp Q8_0 on the same model and machine: int8.md and int8_kernel.md (measured in their own runs).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
NEW_TOKENS = 64
PROMPT = 64
BUCKETS = {"int8 GEMM (_int_mm)": ("aten::_int_mm",), "inductor graph (fused kernels + wrapper)": ("CompiledFxGraph",),
           "dynamo guards": ("TorchDynamo Cache Lookup",), "attention (sdpa)": ("scaled_dot_product",)}


def decode_rows() -> list[dict]:
    import int8 as bench_int8
    from torch.profiler import ProfilerActivity, profile

    from haqmoe.sources import load_model
    from haqmoe.exec.compiled import compiled_decode_kwargs
    from haqmoe.exec.precision import convert

    lm = load_model(str(bench_int8.ensure_quantized("smollm2-135m", int8_lm_head=True)), progress=False)
    convert(lm.model, "int8")
    m = lm.model
    ids = torch.tensor([bench_int8.prompt_ids(lm.tokenizer, PROMPT)])
    gen = dict(do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)

    def generate(n: int):
        return m.generate(ids, max_new_tokens=n, min_new_tokens=n, **gen,
                          **compiled_decode_kwargs(m, PROMPT + NEW_TOKENS))

    with torch.inference_mode():
        generate(4)  # compile
        best = min(1 / bench_int8.decode_rate(generate, NEW_TOKENS)[0] for _ in range(2))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            generate(NEW_TOKENS)
            wall = time.perf_counter() - t
    events = prof.key_averages()
    total_ms = 1e3 * wall / NEW_TOKENS
    rows = [{"part": "decode step, unprofiled", "ms_per_token": 1e3 * best, "tok_s": 1 / best}]
    shown = 0.0
    for name, keys in BUCKETS.items():
        ms = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / 1e3 / NEW_TOKENS
        calls = sum(e.count for e in events if any(k in e.key for k in keys)) / NEW_TOKENS
        rows.append({"part": name, "ms_per_token": ms, "calls_per_token": calls, "share": ms / total_ms})
        shown += ms
    rows.append({"part": "rest (generate loop, sampling, small ops)", "ms_per_token": total_ms - shown,
                 "share": (total_ms - shown) / total_ms})
    rows.append({"part": "profiled generation (prefill + decode, per token)", "ms_per_token": total_ms, "share": 1.0})
    return rows


def aoti_rows() -> list[dict]:
    """The same model generating through ``haqmoe.exec.aot`` (what ``haqmoe generate --aot`` runs): one
    exported forward (dynamic token count) over a static cache, AOTInductor package built afresh here;
    greedy tokens are checked against eager ``generate``."""
    import tempfile

    import int8 as bench_int8

    from haqmoe.sources import load_model
    from haqmoe.exec.aot import AotGenerator
    from haqmoe.exec.precision import convert

    lm = load_model(str(bench_int8.ensure_quantized("smollm2-135m", int8_lm_head=True)), progress=False)
    convert(lm.model, "int8")
    m = lm.model
    ids = torch.tensor([bench_int8.prompt_ids(lm.tokenizer, PROMPT)])
    with torch.inference_mode():
        ref = m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         pad_token_id=lm.tokenizer.eos_token_id)[0, PROMPT:].tolist()
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        gen = AotGenerator.for_model(m, PROMPT + NEW_TOKENS, root=Path(root))
        build_s = time.perf_counter() - t
        gen.generate(ids, 2)  # warm-up
        tok_s, _, out = bench_int8.decode_rate(lambda n: gen.generate(ids, n), NEW_TOKENS)
        step, out = 1 / tok_s, out[0, PROMPT:].tolist()
    return [{"part": f"AOTInductor package of the step (built in {build_s:.0f} s), decode, unprofiled",
             "ms_per_token": 1e3 * step, "tok_s": 1 / step, "greedy_equals_eager": out[:8] == ref}]


def gemv_rows(cfg) -> list[dict]:
    """Every int8 weight of one decode step at its real shape (fused q/k/v and gate/up as the model runs them)."""
    hidden, ffn, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
    shapes = [(hidden, hidden + 2 * kv), (hidden, hidden), (hidden, 2 * ffn), (ffn, hidden)] * layers
    shapes.append((hidden, cfg.vocab_size))
    weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for k, n in shapes]
    xs = {k: torch.randint(-127, 128, (1, k), dtype=torch.int8) for k in {k for k, _ in shapes}}
    mb = sum(k * n for k, n in shapes) / 1e6
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for _ in range(3):
            for w in weights:
                torch._int_mm(xs[w.shape[1]], w.t())
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(10):
                for w in weights:
                    torch._int_mm(xs[w.shape[1]], w.t())
            best = min(best, (time.perf_counter() - t) / 10)
        part = f"int8 GEMV floor: {len(weights)} one-token _int_mm calls, {mb:.0f} MB, {threads} thread(s)"
        rows.append({"part": part,
                     "ms_per_token": 1e3 * best, "tok_s": 1 / best, "gb_s": mb / 1e3 / best})
    torch.set_num_threads(2)
    return rows



TITLE = "Compiled int8 decode step of SmolLM2-135M: where the time goes"


def notes(rows: list[dict]) -> str:
    """The results notes: the module doc and sentences computed from ``rows`` (nothing hand-written)."""
    step, floor = rows[0]["ms_per_token"], rows[-1]["ms_per_token"]
    text = (__doc__ or "") + (
        f"\n\nThe int8 GEMV alone (2 threads) takes {floor:.1f} ms per token of the {step:.1f} ms step: the rest "
        f"({step - floor:.1f} ms) is framework time around it.")
    aot = next((r for r in rows if r["part"].startswith("AOTInductor")), None)
    if aot is not None:
        aot_ms = aot["ms_per_token"]
        text += (f" Ahead-of-time compiled, the step takes {aot_ms:.1f} ms ({step / aot_ms:.2f}x "
                 f"faster than the compiled generate step in this run; greedy tokens equal eager: "
                 f"{aot['greedy_equals_eager']}): no guards, no Python wrapper (`haqmoe generate --aot`).")
    return text


def render() -> None:
    """Re-render the markdown of the existing results JSON (numbers untouched)."""
    sys.path.insert(0, str(ROOT / "src"))
    import json

    from haqmoe.results import write_results

    out = ROOT / "bench" / "results" / "int8_breakdown.json"
    data = json.loads(out.read_text())
    write_results(out, data["rows"], data["meta"], TITLE, notes(data["rows"]))


def main() -> None:
    if "--render" in sys.argv:
        return render()
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoConfig

    from haqmoe.models.embedded import ensure_embedded
    from haqmoe.results import run_meta, write_results

    torch.set_num_threads(2)
    rows = decode_rows()
    if "--aoti" in sys.argv:
        rows += aoti_rows()
    rows += gemv_rows(AutoConfig.from_pretrained(ensure_embedded("smollm2-135m", progress=False)))
    out = ROOT / "bench" / "results" / "int8_breakdown.json"
    write_results(out, rows, run_meta(), TITLE, notes(rows))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
