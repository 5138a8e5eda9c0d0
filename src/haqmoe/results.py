"""Results files share one shape: ``{"meta": {...}, "rows": [flat dicts]}`` plus a markdown twin."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import transformers

from . import __version__
from .io import atomic_write_text


def run_meta(command: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "command": command or " ".join(sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "haqmoe": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu, torch threads {torch.get_num_threads()}",
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **extra,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(path: str | Path, rows: list[dict[str, Any]], meta: dict[str, Any],
                  title: str, notes: str = "", columns: Sequence[str] | None = None) -> Path:
    """Write ``path`` (.json) and its markdown twin (.md) atomically."""
    path = Path(path).with_suffix(".json")
    atomic_write_text(path, json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = f"# {title}\n\n{markdown_table(rows, columns)}\n"
    if notes:
        md += notes.strip() + "\n\n"
    md += f"Command: `{meta.get('command', '')}`  \nMachine: {meta.get('machine', '')}, " \
          f"torch {meta.get('torch', '')}, date {meta.get('date', '')}\n"
    atomic_write_text(path.with_suffix(".md"), md)
    return path
