"""Foundation results: FP32 and RTN-W8A8 perplexity of the embedded dense model and its upcycled MoE
on the FULL WikiText-2 raw test split (all 2048-token windows).

    .venv/bin/python bench/foundation.py            # full split (~80 min on 2 cores)
    .venv/bin/python bench/foundation.py --windows 4  # quick look

Writes bench/results/foundation.json and foundation.md (rows written as each finishes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from haqmoe.data.text import eval_windows, load_text, tokenize
from haqmoe.eval.perplexity import perplexity
from haqmoe.models.embedded import DENSE, MOE
from haqmoe.sources import load_model
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.rtn import quantize_rtn
from haqmoe.results import run_meta, write_results

NOTES = """RTN W8A8 = asymmetric int8 weights per output channel, asymmetric int8 activations per token
(dynamic), every decoder linear and every expert; embeddings, lm_head and routers stay fp32.
Text: WikiText-2 raw test in its original layout, rows joined by blank lines (GPTQ/LLMC protocol),
non-overlapping windows of 2048 tokens; `tokens` = windows x 2048."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=None, help="limit windows (default: all)")
    ap.add_argument("--out", default="bench/results/foundation.json")
    args = ap.parse_args()
    rows: list[dict] = []
    meta = run_meta(data="wikitext2:test")
    for name in (DENSE, MOE):
        for method in ("fp32", "rtn"):
            lm = load_model(name)
            wins = eval_windows(tokenize(lm.tokenizer, load_text("wikitext2:test")), 2048, args.windows)
            if method == "rtn":
                quantize_rtn(lm.model, lm.adapter, QuantConfig.w8a8("rtn"))
            res = perplexity(lm.model, wins, desc=f"{name} {method}")
            rows.append({"model": name, "method": method, "ppl": round(res.ppl, 4), "windows": res.windows,
                         "tokens": res.tokens, "seconds": round(res.seconds, 1)})
            print(rows[-1], flush=True)
            write_results(Path(args.out), rows, meta, "Foundation: FP32 vs RTN W8A8 perplexity", NOTES)


if __name__ == "__main__":
    main()
