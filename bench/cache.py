"""Cache policies (+ next-layer prefetch) on held-out traces, Belady bound beside.

    .venv/bin/python bench/cache.py                      # mixtral stats + synthetic + tiny models (+ --trace DIRs)
    .venv/bin/haqmoe profile smollm2-moe -o /tmp/traces/smollm2-moe-gen --requests 16 --seqlen 256 --generate 64
    .venv/bin/haqmoe profile smollm2-moefied -o /tmp/traces/smollm2-moefied-gen --requests 16 --seqlen 256 --generate 64
    .venv/bin/python bench/cache.py --trace /tmp/traces/smollm2-moe-gen --trace /tmp/traces/smollm2-moefied-gen

Writes bench/results/cache.json/.md and one plot per source (cache-<source>.png). Pure
numpy/python replay: light on the CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from haqmoe.results import run_meta, write_results
from haqmoe.routing.trace import RoutingTrace  # noqa: F401
from haqmoe.studies.experiments import (MIXTRAL_LOCALITY, cache_rows, guess_rows, load_pair, mixtral_pair,
                                        plot_cache, synthetic_pair)
from haqmoe.runtime.policies import BOUNDS
from haqmoe.runtime.prefetch import DEFAULT_GUESS_RECALL
from haqmoe.costs.hardware import load_profile

POLICIES = ["static", "lru", "lfu", "pinned+lru", "lru+alloc", "pinned+lfu+alloc", "freq-oracle", "belady"]
FRACS = [0.25, 0.5, 0.625]
TINY = ["tiny:mixtral", "tiny:qwen3_moe", "tiny:olmoe"]  # distinct-expert tiny models, real routing

NOTES = f"""Sources. `mixtral-8x7b`: **synthetic-from-statistics** - decode-like token sequences sampled
from the real Mixtral-8x7B per-prompt per-layer expert fractions (MMLU, shared data), each request
from one prompt's distribution, with temporal locality {MIXTRAL_LOCALITY} (P(a top-k slot keeps the
previous token's expert)), calibrated so held-out LRU / Belady at 50 % land near the 59 % / 74 %
measured on real Mixtral decode traces. Plans, allocations and LFU histories are built on prompts
of the even-indexed MMLU subjects, numbers are measured on prompts of the odd-indexed ones.
`synthetic`: Zipf + per-request drift + locality generator (routing/synthetic.py), split by request.
`tiny-*`: real routing of tiny random MoEs with distinct experts (models/tiny.py: Mixtral, Qwen3-MoE,
OLMoE shapes, 8 experts top-2, 4 layers) on WikiText-2 valid text, with their own next-layer guesses.
`smollm2-moe`: **real generations** of the upcycled SmolLM2 MoE (`haqmoe profile --generate 64`: 16
WikiText-2 valid windows of 256 tokens as prompts, 64 greedy tokens each on the KV cache), split by
request (first half builds, second half held out), replayed as served: each prompt one batched
prefill through the cache, then its generated tokens one by one; every metric is over the generated
tokens (and so is the guess table below).

Policies: `static` = frequency plan pinned in every slot (the paper's placement alone); `lru`;
`lfu` = LFU with exponential decay (half-life 32 tokens); `pinned+lru` = half of each layer's slots
pinned to the plan, the rest LRU; `lru+alloc` = LRU with per-layer slot counts by marginal hit gain on
the profiling split; `pinned+lfu+alloc` = all three; `belady` = offline optimum (demand paging bound);
`freq-oracle` = evicts what the current request uses least over its whole length (handed the true
per-request frequencies: the bound of every frequency-based online policy, simulator only).
Per-layer pools. Caches start warm (free slots filled with the profile's most frequent experts).

Metrics (docs/design.md, Hit rates). `demand_hit_rate` = demand hits (entry cached before any prefetch for
that use); `hit_rate` = resident when needed: adds prefetched entries whose copy completed (equal without
prefetch); `p_all_resident` = P(all of a token's experts resident at
a layer), mean over layers; `bytes_moved_gb` = all copies (demand + prefetch), W8A8 expert size of the
timing shape. Hit metrics come from an ideal-copy replay (instant copies; prefetch = the top-k next-layer
guesses not resident); prefetch guesses: the trace's own (real trace) or synthetic with top-k recall
{DEFAULT_GUESS_RECALL} (assumption, see runtime/prefetch.py) for traces without guesses.
Reading the gap. `freq-oracle` is handed each held-out request's TRUE expert frequencies, i.e. the
most any LFU / decay / plan / prompt-statistics policy could ever learn: where it closes less than
half of the LRU -> Belady gap, no frequency-based online policy can; the rest of Belady's advantage
is the order of the next tokens, which only next-layer prefetch sees. The share each policy closes
is computed from the rows below.

`decode_tok_s` is **simulated** (rtx5090d profile, always-transfer = every miss copied in, as
mixtral-offloading), i.e. what the policy is worth when the cache is the whole system."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", action="append", default=[], help="extra trace directories (haqmoe profile)")
    ap.add_argument("--out", default="bench/results/cache.json")
    ap.add_argument("--profile", default="rtx5090d")
    args = ap.parse_args()
    prof = load_profile(args.profile)
    pairs = [mixtral_pair(), synthetic_pair()] + [load_pair(t) for t in TINY + args.trace]
    rows, guesses = [], []
    for pair in pairs:
        rows += cache_rows(pair, prof, FRACS, POLICIES, progress=True)
        guesses += guess_rows(pair)
        plot_cache([r for r in rows if r["source"] == pair.source],
                   Path(args.out).with_name(f"cache-{pair.source}.png"))
    notes = NOTES + "\n\n" + gap_summary(rows)
    if guesses:
        from haqmoe.results import markdown_table

        notes += "\n\nPrefetch guess quality (top-k guesses of layer l+1 made at layer l, held-out split):\n\n"
        notes += markdown_table(guesses)
    write_results(args.out, rows, run_meta(), "Expert cache policies and prefetch", notes)
    print(Path(args.out).with_suffix(".md").read_text())


def gap_summary(rows: list[dict]) -> str:
    """How much of the LRU -> Belady gap the best online policy closes, per source and size."""
    lines = ["| source | cache_frac | lru | best online (no prefetch) | belady | gap closed | "
             "freq-oracle (gap closed) | best hit rate (resident when needed) with prefetch | beats belady |",
             "|---|---|---|---|---|---|---|---|---|"]
    for src in dict.fromkeys(r["source"] for r in rows):
        for f in FRACS:
            sel = [r for r in rows if r["source"] == src and r["cache_frac"] == f]
            if not sel:  # a cache too small for one token's experts (cache_rows leaves it out)
                continue
            get = {(r["policy"], r["prefetch"]): r for r in sel}
            lru, bel = get[("lru", False)]["demand_hit_rate"], get[("belady", False)]["demand_hit_rate"]
            online = [r for r in sel if not r["prefetch"] and r["policy"] not in BOUNDS]
            oracle = get[("freq-oracle", False)]["demand_hit_rate"]
            best = max(online, key=lambda r: r["demand_hit_rate"])
            pf = max((r for r in sel if r["prefetch"] and r["policy"] not in BOUNDS),
                     key=lambda r: r["hit_rate"])
            gap = (best["demand_hit_rate"] - lru) / (bel - lru) if bel > lru else float("nan")
            oracle_gap = (oracle - lru) / (bel - lru) if bel > lru else float("nan")
            lines.append(f"| {src} | {f} | {lru:.3f} | {best['policy']} {best['demand_hit_rate']:.3f} | {bel:.3f} | "
                         f"{gap:.0%} | {oracle:.3f} ({oracle_gap:.0%}) | "
                         f"{pf['policy']} {pf['hit_rate']:.3f} "
                         f"(+{pf['bytes_moved_gb'] - get[(pf['policy'], False)]['bytes_moved_gb']:.0f} GB) | "
                         f"{'yes' if pf['hit_rate'] > bel else 'no'} |")
    return "Summary:\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
