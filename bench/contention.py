"""SmolLM2 int8 decode with a core taken by another process: 2 threads vs 1 (README "Busy machine").

    .venv/bin/python bench/contention.py  # -> bench/results/contention.{json,md}

Every kernel (eager aten ops, inductor's C++ kernels) ends in a barrier of its OpenMP worker threads; when
another process holds a core, a barrier waits for a descheduled thread and each step stalls. One process,
the int8 lm_head checkpoint in real int8, 32 greedy tokens after a 32-token prompt, eager `generate` and
the ahead-of-time package (`haqmoe generate --aot`), idle and then with a busy-loop process running.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
PROMPT, NEW = 32, 32


def main() -> None:
    import int8 as bench_int8

    from haqmoe.sources import load_model
    from haqmoe.exec.aot import AotGenerator
    from haqmoe.exec.precision import convert
    from haqmoe.results import run_meta, write_results

    lm = load_model(str(bench_int8.ensure_quantized("smollm2-135m", int8_lm_head=True)), progress=False)
    convert(lm.model, "int8")
    ids = torch.tensor([bench_int8.prompt_ids(lm.tokenizer, PROMPT)])
    gen = AotGenerator.for_model(lm.model, PROMPT + NEW + 1, log=print)
    runs = {"aot": lambda n: gen.generate(ids, n),
            "eager": lambda n: lm.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                 pad_token_id=lm.tokenizer.eos_token_id)}
    rows = []
    for load in ("idle", "one core busy"):
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "idle" else None
        try:
            for threads in (2, 1):
                torch.set_num_threads(threads)
                row = {"load": load, "threads": threads}
                for name, generate in runs.items():
                    generate(2)  # warm-up at this thread count
                    row[f"{name}_decode_tok_s"] = bench_int8.decode_rate(generate, NEW + 1)[0]
                rows.append(row)
                print(row, flush=True)
        finally:
            if burner is not None:
                burner.kill()
    out = ROOT / "bench" / "results" / "contention.json"
    write_results(out, rows, run_meta(prompt_tokens=PROMPT, new_tokens=NEW),
                  "SmolLM2 int8 decode beside a busy core: threads vs free cores", __doc__ or "")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
