"""HAQ results: every W8A8 method of docs/design.md (Quantization) on one model, one calibration set, one evaluator.

    .venv/bin/python bench/haq.py --model smollm2-135m --windows all --resume  # the full table
    .venv/bin/python bench/haq.py --model smollm2-moe --windows 8 --out bench/results/haq_moe.json
    .venv/bin/python bench/haq.py --peer bench/peers/out/smollm2-llmc-w8a8    # + llm-compressor row
    .venv/bin/python bench/haq.py --render bench/results/haq_smollm2.json      # .md from the .json, no run

llm-compressor rows: `llmcompressor` = its stock symmetric ``W8A8`` preset, `llmcompressor-asym` = the
same SmoothQuant + GPTQ recipe configured as close to ours as its schemes allow (asymmetric int8
weights per output channel, asymmetric dynamic per-token activations; bench/peers/llmcompressor_w8a8.py
--asym); the notes name the better of them, computed from the rows.

Rows are written as each finishes (json + md + png beside --out); with --resume a killed row goes on
from its last quantized block and evaluated window (OUT.partial/). Calibration: random windows of
wikitext2:valid (the train split is not available offline), never the test split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from haqmoe.studies.compare import CompareSetup, run_compare
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.methods import MethodOptions

ROWS = "fp32,rtn,haq,smooth,gptq,smoothquant-0.5,smoothquant-0.8,awq,haq-rank1,haq-rank2"

NOTES = """W8A8 = int8 weights per output channel + int8 activations per token (dynamic), asymmetric
both (paper default) unless the row says otherwise; every decoder linear and every routed expert
is quantized, embeddings / lm_head / routers stay fp32. All rows run in the same pipeline
(haqmoe.quant.pipeline) and the same fake-quant evaluator. `haq` = adaptive smoothing (exponent
grid-searched on the joint W8A8 loss, eq. 1) + GPTQ (natural order); `haq-rank1`/`haq-rank2` =
HAQ with the paper's column rankings (rank2 = Σx², which equals GPTQ's act order); `smooth` =
adaptive smoothing + RTN; `awq` = weight-only objective (eq. 2) + RTN; `smoothquant-α` = fixed α.
quant_seconds = quantization wall time (calibration forward passes included), peak_rss_gb = peak
resident memory of the process while loading + quantizing. Machine shared with other jobs: times
are upper bounds."""


PEER_PRESETS = {"llmcompressor": "stock symmetric W8A8 preset",
                "llmcompressor-asym": "asymmetric weights per channel + asymmetric per-token activations"}


def peer_note(rows: list[dict]) -> str:
    """Which llm-compressor row is the peer's best (lowest PPL), and HAQ against it: from the rows."""
    peers = [r for r in rows if str(r["method"]).startswith("llmcompressor")]
    if not peers:
        return ""
    best = min(peers, key=lambda r: r["ppl"])
    text = (f"llm-compressor's best row here: `{best['method']}` "
            f"({PEER_PRESETS.get(best['method'], 'see bench/peers/llmcompressor_w8a8.py')}), PPL {best['ppl']:.4g} "
            f"(+{best['delta_pct']:.3g} % over fp32)")
    others = [r for r in peers if r is not best]
    if others:
        text += "; " + ", ".join(f"`{r['method']}` PPL {r['ppl']:.4g} (+{r['delta_pct']:.3g} %)" for r in others)
    haq = next((r for r in rows if r["method"] == "haq"), None)
    if haq is not None and best["delta_ppl"] > 0:
        text += (f". `haq` PPL {haq['ppl']:.4g} (+{haq['delta_pct']:.3g} %): its increase over fp32 is "
                 f"{haq['delta_ppl'] / best['delta_ppl']:.2f}x the peer's best")
        if haq.get("quant_seconds") and best.get("quant_seconds"):
            text += f", quantization {haq['quant_seconds'] / best['quant_seconds']:.2f}x its time"
    return text + ". Measured on this CPU."


def render(path: Path) -> None:
    """Rewrite the .md of a results file from its .json (notes from the rows; nothing is measured)."""
    import json

    from haqmoe.results import write_results

    data = json.loads(path.read_text())
    meta, rows = data["meta"], data["rows"]
    md = path.with_suffix(".md")
    title = md.read_text().splitlines()[0].lstrip("# ") if md.is_file() else path.stem
    windows = "all" if meta.get("windows") == 148 else meta.get("windows")
    write_results(path, rows, meta, title, notes_for(rows, windows, meta.get("calib_samples", 128),
                                                      meta.get("calib_len", 512)))


def notes_for(rows: list[dict], windows, calib_samples: int, calib_len: int) -> str:
    notes = NOTES + f"\n\nWindows: {windows} of WikiText-2 test; calibration " \
                    f"{calib_samples} x {calib_len} tokens of wikitext2:valid, seed 0."
    peer = peer_note(rows)
    return notes + ("\n\n" + peer if peer else "")


def peer_name(path: str) -> str:
    """Row label of a peer checkpoint: ``llmcompressor`` for the stock preset, ``llmcompressor-asym`` etc."""
    name = Path(path).name
    return "llmcompressor" + name.split("llmc-w8a8", 1)[1] if "llmc-w8a8" in name else name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", default="16", help="number of 2048-token test windows, or 'all'")
    ap.add_argument("--methods", default=ROWS)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--peer", action="append", default=[], help="compressed-tensors checkpoint(s) to add")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy box)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--resume", action="store_true", help="keep rows of --out measured with the same setup")
    ap.add_argument("--render", type=Path, default=None, help="rewrite this results .json's .md, measure nothing")
    args = ap.parse_args()
    if args.render:
        render(args.render)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = None if args.windows == "all" else int(args.windows)
    out = Path(args.out or f"bench/results/haq_{'moe' if 'moe' in args.model else 'smollm2'}.json")
    labels = args.methods.split(",") + [f"{peer_name(p)}=ct:{p}" for p in args.peer]
    setup = CompareSetup(args.model, QuantConfig.w8a8("haq"), "wikitext2:test", 2048, windows,
                         "wikitext2:valid", args.calib_samples, args.calib_len, 0)
    windows_label = "all" if windows is None else windows
    notes = notes_for([], windows_label, args.calib_samples, args.calib_len)
    run_compare(setup, labels, out, MethodOptions(), progress=False, notes=notes,
                command="python " + " ".join(sys.argv), resume=args.resume)
    render(out.with_suffix(".json"))  # notes computed from the finished rows (the peer's best row)


if __name__ == "__main__":
    main()
