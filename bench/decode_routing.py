"""Does a request's prompt tell which experts its generation will use? (placement per request)

    .venv/bin/python bench/decode_routing.py

Records real generations of the upcycled SmolLM2 MoE (`haqmoe profile --generate`: prompt windows of
WikiText-2 test and Python's pydoc topics, then greedy decode on the KV cache) and scores, on each
request's *decode* tokens, static placements of the same size per layer chosen from:

- `global`: the other requests' routing (prompt and decode), leave-one-out: one plan for all;
- `prompt`: this request's prompt routing only (ties broken by `global`);
- `blend`: the two frequency vectors averaged;
- `oracle`: this request's decode routing itself (in-sample: an upper bound no online plan reaches).

`gap_closed` = (hit - global) / (oracle - global): how much of what re-placing per request could give
at best a placement read off the prompt recovers. Writes bench/results/decode_routing.json/.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from haqmoe.data.text import load_text, tokenize
from haqmoe.sources import load_model
from haqmoe.results import run_meta, write_results
from haqmoe.routing.placement import layer_top_mask
from haqmoe.routing.profile import trace_windows
from haqmoe.routing.stats import layer_counts
from haqmoe.routing.trace import RoutingTrace, concat_traces

PLACEMENTS = ("global", "prompt", "blend", "oracle")


def spread_windows(ids: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """``n`` windows of ``length`` tokens spread evenly over the text (different articles / topics)."""
    starts = np.linspace(0, ids.numel() - length, n).astype(int)
    return torch.stack([ids[s:s + length] for s in starts])


def normalised(counts: np.ndarray) -> np.ndarray:
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def decode_hits(trace: RoutingTrace, per_layer: int) -> dict[str, np.ndarray]:
    """Per request, the decode-token hit rate of each placement (tiny epsilons only break ties)."""
    parts = [trace.request(r) for r in range(trace.num_requests)]
    prompt = [layer_counts(p.slice_tokens(0, int((~p.decode).sum()))) for p in parts]
    decode = [layer_counts(p.slice_tokens(int((~p.decode).sum()), p.num_tokens)) for p in parts]
    out: dict[str, list[float]] = {k: [] for k in PLACEMENTS}
    for r in range(len(parts)):
        glob = normalised(sum(prompt[i] + decode[i] for i in range(len(parts)) if i != r))
        scores = {"global": glob, "prompt": normalised(prompt[r]) + 1e-6 * glob,
                  "blend": 0.5 * normalised(prompt[r]) + 0.5 * glob, "oracle": decode[r] + 1e-6 * glob}
        for name, s in scores.items():
            out[name].append(float((decode[r] * layer_top_mask(s, per_layer)).sum() / decode[r].sum()))
    return {k: np.array(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-moe")
    ap.add_argument("--per-source", type=int, default=8, help="requests per text source")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per request")
    ap.add_argument("--generate", type=int, default=64, help="greedy tokens generated per request")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/decode_routing.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    sources = ["wikitext2:test", "pydoc"]
    traces = {}
    for src in sources:
        windows = spread_windows(tokenize(lm.tokenizer, load_text(src)).reshape(-1), args.per_source, args.prompt)
        traces[src] = trace_windows(lm.model, lm.adapter, windows, new_tokens=args.generate, progress=True)
    everything = concat_traces(list(traces.values()))
    E = everything.num_experts
    rows = []
    for per_layer in (2, 4, 5):
        hits = decode_hits(everything, per_layer)  # leave-one-out over both sources
        groups = {"all": slice(None)}
        start = 0
        for src in sources:
            groups[src] = slice(start, start + traces[src].num_requests)
            start += traces[src].num_requests
        for group, sl in groups.items():
            base, best = hits["global"][sl].mean(), hits["oracle"][sl].mean()
            for name in PLACEMENTS:
                h = float(hits[name][sl].mean())
                rows.append({"requests": group, "resident_per_layer": f"{per_layer}/{E}", "placement": name,
                             "decode_hit": h, "gap_closed": (h - base) / (best - base) if best > base else None,
                             "model": args.model})
    def closed(group: str) -> str:
        return ", ".join(f"{r['gap_closed']:.2f} at {r['resident_per_layer']}" for r in rows
                         if r["requests"] == group and r["placement"] == "prompt")

    notes = (f"Real routing of `{args.model}` ({everything.num_layers} MoE layers x {E} experts, top-"
             f"{everything.top_k}): {args.per_source} requests per source, {args.prompt}-token prompts, "
             f"{args.generate} greedy decode tokens each; hit rates are over decode tokens only, averaged per "
             f"request; `global` is leave-one-out over all {everything.num_requests} requests. Share of the "
             f"global-to-oracle gap a placement read off the prompt closes: "
             + "; ".join(f"{g}: {closed(g)}" for g in ["all", *sources]) + ".")
    write_results(args.out, rows, run_meta(), "Prompt vs decode routing", notes)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
