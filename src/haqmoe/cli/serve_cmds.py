"""Serving commands: ``serve`` (OpenAI-compatible HTTP server) and ``export`` (compressed-tensors for vLLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import app, check_output_dir, emit
from .engine_cmds import _ENGINE_OPTS, build_engine


@app.command()
def serve(model: str = typer.Argument("smollm2-moe", help="MoE model source (embedded name, directory, ...)."),
          host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default; the server has no auth)."),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0 = any free port)."),
          served_name: Optional[str] = typer.Option(None, help="Model id reported by /v1/models "
                                                               "(default: the model argument)."),
          max_tokens_limit: int = typer.Option(2048, min=1, help="Largest max_tokens a request may ask for."),
          max_waiting: int = typer.Option(64, min=1, help="Queued requests beyond this are refused with 503."),
          max_body_bytes: int = typer.Option(1 << 20, min=1, help="Request bodies above this get 413."),
          request_timeout: float = typer.Option(600.0, min=0.001, help="Seconds a request may queue + generate "
                                                "before 504 (in-band error when streaming)."),
          policy: str = _ENGINE_OPTS["policy"], cache_policy: str = _ENGINE_OPTS["cache_policy"],
          slots: Optional[int] = _ENGINE_OPTS["slots"], plan: Optional[str] = _ENGINE_OPTS["plan"],
          device: str = _ENGINE_OPTS["device"], emulate_gpu: bool = _ENGINE_OPTS["emulate_gpu"],
          profile: str = _ENGINE_OPTS["profile"], exec_mode: str = _ENGINE_OPTS["exec_mode"],
          log_level: str = typer.Option("info", help="uvicorn log level.")) -> None:
    """Serve the model over the collaborative runtime with an OpenAI-compatible API (+ /health, /metrics)."""
    import uvicorn

    from ..serve.app import ServeConfig, create_app

    engine = build_engine(model, policy, cache_policy, slots, plan, device, emulate_gpu, profile, exec_mode)
    cfg = ServeConfig(model_name=served_name or model, max_tokens_limit=max_tokens_limit, max_waiting=max_waiting,
                      max_body_bytes=max_body_bytes, request_timeout_s=request_timeout)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"haqmoe: warning: binding {host}: the API has no authentication", err=True)
    uvicorn.run(create_app(engine, cfg), host=host, port=port, log_level=log_level)


@app.command()
def export(quant_dir: str = typer.Argument(..., help="haqmoe quantized checkpoint directory (haqmoe quantize)."),
           out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
           format: str = typer.Option("compressed-tensors", "--format", help="Only compressed-tensors (W8A8 int8)."),
           requantize: bool = typer.Option(False, help="Asymmetric weights: re-quantize them symmetric per channel "
                                                       "(vLLM's int8 kernels need it) instead of refusing."),
           dtype: str = typer.Option("bfloat16", help="dtype of the unquantized tensors: bfloat16 | float16 | float32."),
           verify: bool = typer.Option(True, help="Reload with the compressed-tensors library and compare."),
           overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Export a quantized checkpoint for vLLM: compressed-tensors int8 W8A8, per-expert Linear weights."""
    from dataclasses import asdict

    from ..errors import HaqmoeError
    from ..serve.export import ExportConfig, export_compressed_tensors, verify_export

    if format != "compressed-tensors":
        raise HaqmoeError(f"unknown export format '{format}' (supported: compressed-tensors)")
    check_output_dir(out, overwrite, quant_dir)
    rep = export_compressed_tensors(quant_dir, out, ExportConfig(requantize=requantize, dtype=dtype), overwrite)
    payload = asdict(rep)
    human = (f"wrote {out}: {rep.quantized_linears} int8 linears, {rep.tensors} tensors in {rep.shards} file(s), "
             f"{len(rep.ignored)} modules kept in {dtype}"
             + (f"; re-quantized symmetric (max rel. weight error {rep.max_requant_error:.2e})"
                if rep.requantized else ""))
    if verify:
        v = verify_export(out, quant_dir)
        payload["verify"] = asdict(v) | {"layers_run": len(v.layers_run)}
        human += (f"\nverified with compressed-tensors: {v.tensors_compared} tensors, {v.quantized_compared} "
                  f"quantized weights (max diff {v.max_weight_diff:.2e}), {len(v.layers_run)} layer outputs "
                  f"(rel. diff {v.max_weight_output_rel_diff:.1e} weights only, {v.max_output_rel_diff:.1e} W8A8)")
    emit(payload, as_json, human)
