"""Model-building commands: ``moefy`` (a dense model's FFN neurons carved into experts that differ)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import app, check_output_dir, emit, state


@app.command()
def moefy(model: str = typer.Argument("smollm2-135m", help="Dense Llama-family model to carve."),
          out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
          experts: int = typer.Option(8, min=1, help="Routed experts per layer."),
          top_k: int = typer.Option(2, min=1, help="Routed experts per token."),
          shared: int = typer.Option(0, min=0, help="Always-active experts (same width as a routed one); "
                                     "> 0 writes a Qwen2-MoE checkpoint, 0 a Mixtral one."),
          router: str = typer.Option("fitted", help="fitted (least-squares router from activation statistics) "
                                     "or random (Gaussian router rows: a baseline)."),
          calib: Optional[str] = typer.Option(None, help="Calibration text (default: wikitext2:valid when the "
                                              "data folder has it, else pydoc; never the test split)."),
          samples: int = typer.Option(16, min=1, help="Calibration windows."),
          seqlen: int = typer.Option(512, min=8, help="Calibration window length (tokens)."),
          seed: int = typer.Option(0, help="Seed of the clustering and of the calibration windows."),
          overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
          as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Carve a dense model's FFN neurons into experts (MoEfication, no training): shared experts by
    activation rate, routed experts by balanced co-activation clustering, a router fitted by least
    squares. With --top-k equal to --experts the MoE computes the dense model."""
    from ..models.moefy import MoefyConfig, moefy_to_dir
    from ..sources import load_model

    check_output_dir(out, overwrite, model)
    cfg = MoefyConfig(experts=experts, top_k=top_k, shared=shared, router=router, calib_source=calib,
                      calib_samples=samples, calib_len=seqlen, seed=seed)
    record = moefy_to_dir(load_model(model, progress=state["progress"]), out, cfg, state["progress"], overwrite)
    payload = {"model": model, "out": str(out), "experts": experts, "top_k": top_k, "shared": shared,
               "router": router, "architecture": record["architecture"], "calib_source": record["calib_source"],
               "neurons_per_expert": record["neurons_per_expert"], "active_share": record["active_share"]}
    emit(payload, as_json, f"wrote {record['architecture']} MoE ({experts} routed experts, top-{top_k}, {shared} "
                           f"shared, {record['neurons_per_expert']} neurons each; {100 * cfg.active_share:.0f} % "
                           f"of the FFN active per token; router calibrated on {record['calib_source']}) to {out}")
