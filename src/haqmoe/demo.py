"""``haqmoe demo``: the product tour on the embedded models, minutes on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from .data.text import eval_windows, load_text, tokenize
from .eval.perplexity import perplexity
from .models.embedded import DENSE, MOE
from .models.loading import load_model
from .paths import shared_data_dir
from .quant.config import QuantConfig
from .quant.rtn import quantize_rtn
from .results import run_meta, write_results


def run_demo(windows: int = 4, report_dir: Path = Path("demo-report"), progress: bool = True) -> list[dict]:
    console = Console()
    data = "wikitext2:test" if shared_data_dir() is not None else "pydoc"
    console.print(f"[bold]haqmoe demo[/bold]: FP32 vs RTN W8A8 on {DENSE} and {MOE}, {windows} windows of {data}")
    rows = []
    for name in (DENSE, MOE):
        for method in ("fp32", "rtn"):
            lm = load_model(name, progress=progress)
            wins = eval_windows(tokenize(lm.tokenizer, load_text(data)), 2048, windows)
            if method == "rtn":
                quantize_rtn(lm.model, lm.adapter, QuantConfig.w8a8("rtn"), progress)
            res = perplexity(lm.model, wins, progress=progress, desc=f"{name} {method}")
            rows.append({"model": name, "method": method, "ppl": res.ppl, "windows": res.windows,
                         "tokens": res.tokens, "seconds": res.seconds})
    base = {r["model"]: r["ppl"] for r in rows if r["method"] == "fp32"}
    for r in rows:
        r["delta_ppl_pct"] = 100 * (r["ppl"] / base[r["model"]] - 1)
    table = Table(title=f"Perplexity, {data}, {windows} x 2048 tokens")
    for col in ("model", "method", "ppl", "Δppl %", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["method"], f"{r['ppl']:.3f}", f"{r['delta_ppl_pct']:+.2f}", f"{r['seconds']:.1f}")
    console.print(table)
    out = write_results(Path(report_dir) / "report.json", rows, run_meta(data=data), "haqmoe demo report")
    console.print(f"report written to {out.with_suffix('.md')}")
    return rows
