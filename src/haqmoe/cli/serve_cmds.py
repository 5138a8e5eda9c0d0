"""Serving commands: ``serve`` (OpenAI-compatible HTTP server) and ``export`` (compressed-tensors for vLLM)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from ..errors import HaqmoeError
from ..serve.auth import ENV_KEY, check_keys, is_loopback, read_key_file
from .common import app, check_output_dir, emit
from .engine_cmds import ENGINE_OPTIONS_HERE, build_engine, engine_options

if TYPE_CHECKING:  # the runtime loads torch: imported where a command runs, not for --help
    from ..runtime.engine import EngineConfig


@app.command()
@engine_options()
def serve(ctx: typer.Context,
          model: str = typer.Argument("smollm2-moe", help="MoE model source (embedded name, directory, ...)."),
          host: str = typer.Option("127.0.0.1", help="Bind address. Loopback by default; any other address needs an "
                                                     "API key or --allow-unauthenticated."),
          port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0 = any free port)."),
          api_key: Optional[list[str]] = typer.Option(None, "--api-key", envvar=ENV_KEY, show_default=False,
                                                      help="Require 'Authorization: Bearer KEY' on /v1/*, /metrics "
                                                           "and the docs (repeatable; $HAQMOE_API_KEY: keys separated "
                                                           "by spaces; a command line is visible to other users, a "
                                                           "key file or the variable is not)."),
          api_key_file: Optional[Path] = typer.Option(None, help="File of API keys, one per line (blank lines and "
                                                                 "# comments ignored); adds to --api-key."),
          allow_unauthenticated: bool = typer.Option(False, help="Accept serving a non-loopback --host without an "
                                                                 "API key (anyone who reaches the port can use it)."),
          metrics_open: bool = typer.Option(False, help="Serve /metrics without an API key (for a scraper)."),
          cors_origin: Optional[list[str]] = typer.Option(None, "--cors-origin", show_default=False,
                                                          help="Browser origin allowed cross-origin access, e.g. "
                                                               "https://app.example.com (repeatable; default none)."),
          served_name: Optional[str] = typer.Option(None, help="Model id reported by /v1/models "
                                                               "(default: the model argument)."),
          max_tokens_limit: int = typer.Option(2048, min=1, help="Largest max_tokens a request may ask for."),
          max_waiting: int = typer.Option(64, min=1, help="Queued requests beyond this are refused with 503."),
          max_body_bytes: int = typer.Option(1 << 20, min=1, help="Request bodies above this get 413."),
          request_timeout: float = typer.Option(600.0, min=0.001, help="Seconds a request may queue + generate "
                                                "before 504 (in-band error when streaming)."),
          max_batch: int = typer.Option(8, min=1, help="Requests decoded together in one continuously refilled "
                                                       "batch (1: one request at a time)."),
          reuse_prefix: bool = typer.Option(False, help="Batched: take the keys and values of a prompt prefix shared "
                                                        "with the last prompt (a chat template's system prompt) "
                                                        "instead of computing them again. Faster prefill, but a "
                                                        "request's answer may then differ from its answer alone in "
                                                        "the last bits (on a W8A8 model: in its greedy text)."),
          page: bool = typer.Option(True, help="Serve the web page (chat + live telemetry) at /; its static "
                                               "files need no key, the API it calls does."),
          engine: EngineConfig = ENGINE_OPTIONS_HERE,
          log_level: str = typer.Option("info", help="uvicorn log level.")) -> None:
    """Serve the model over the collaborative runtime with an OpenAI-compatible API (+ /health, /metrics,
    a web page at /), batching concurrent requests (--max-batch).

    Loopback by default; to expose it, set API keys (clients send 'Authorization: Bearer KEY')."""
    import uvicorn

    from ..serve.app import ServeConfig, create_app, engine_thread

    cfg = ServeConfig(model_name=served_name or model, max_tokens_limit=max_tokens_limit, max_waiting=max_waiting,
                      max_body_bytes=max_body_bytes, request_timeout_s=request_timeout,
                      api_keys=serve_keys(ctx, api_key, api_key_file), metrics_open=metrics_open,
                      cors_origins=tuple(cors_origin or ()), max_batch=max_batch, reuse_prefix=reuse_prefix,
                      page=page)
    check_exposure(host, bool(cfg.api_keys), allow_unauthenticated)  # before the (slow) model load
    runner = engine_thread()  # loads the model and runs it: one OpenMP pool (serve/app.py)
    served = runner.submit(build_engine, model, engine).result()
    uvicorn.run(create_app(served, cfg, runner), host=host, port=port, log_level=log_level)


def serve_keys(ctx: typer.Context, keys: Optional[list[str]], key_file: Optional[Path]) -> tuple[str, ...]:
    """The keys of --api-key / $HAQMOE_API_KEY and --api-key-file together.

    A config file may name a key file but not hold a key: config files get shared and committed, a
    secret in one leaks with it."""
    if "api_key" in (ctx.default_map or {}):
        raise HaqmoeError(f"a config file cannot hold api_key (config files get shared): set api_key_file = "
                          f"\"PATH\" there, or ${ENV_KEY}")
    return check_keys(keys or ()) + (read_key_file(key_file) if key_file is not None else ())


def check_exposure(host: str, has_keys: bool, allow_unauthenticated: bool) -> None:
    """Refuse a non-loopback bind without a key (an open port is an open model), unless the user accepts it."""
    if has_keys or is_loopback(host):
        return
    if not allow_unauthenticated:
        raise HaqmoeError(f"refusing to serve {host} (not loopback) without an API key: pass --api-key KEY, "
                          f"--api-key-file FILE or ${ENV_KEY}, or --allow-unauthenticated to accept the risk")
    typer.echo(f"haqmoe: warning: serving {host} without an API key (--allow-unauthenticated): anyone who can "
               f"reach this port can generate and read /metrics", err=True)


@app.command()
def export(quant_dir: str = typer.Argument(..., help="haqmoe quantized checkpoint directory (haqmoe quantize)."),
           out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
           format: str = typer.Option("compressed-tensors", "--format",
                                      help="compressed-tensors (W8A8 int8, for vLLM) | gguf (Q8_0, for llama.cpp; "
                                           "--out is the .gguf file, or a directory to write MODEL.Q8_0.gguf in)."),
           requantize: bool = typer.Option(False, help="Asymmetric weights: re-quantize them symmetric per channel "
                                                       "(vLLM's int8 kernels need it) instead of refusing."),
           dtype: str = typer.Option("bfloat16", help="dtype of the unquantized tensors: bfloat16 | float16 | float32."),
           verify: bool = typer.Option(True, help="Reload with the compressed-tensors library and compare."),
           overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Export a quantized checkpoint: for vLLM (compressed-tensors int8 W8A8, per-expert Linear weights) or
    for llama.cpp (GGUF, Q8_0 re-quantized from the dequantized int8 weights)."""
    from dataclasses import asdict

    from ..errors import HaqmoeError
    from ..serve.export import ExportConfig, export_compressed_tensors, verify_export

    if format == "gguf":
        return _export_gguf(quant_dir, out, verify, overwrite, as_json)
    if format != "compressed-tensors":
        raise HaqmoeError(f"unknown export format '{format}' (supported: compressed-tensors, gguf)")
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


def _export_gguf(quant_dir: str, out: Path, verify: bool, overwrite: bool, as_json: bool) -> None:
    from dataclasses import asdict

    from ..serve.gguf_export import export_gguf, verify_gguf

    if out.suffix != ".gguf":
        out = out / f"{Path(quant_dir).resolve().name}.Q8_0.gguf"
    check_output_dir(out, overwrite, quant_dir)
    rep = export_gguf(quant_dir, out, overwrite)
    payload = asdict(rep)
    human = (f"wrote {out} ({rep.bytes / 1e6:.1f} MB, llama.cpp arch {rep.arch}, tokenizer {rep.tokenizer}): "
             f"{rep.q8_0_tensors} Q8_0 tensors re-quantized from our dequantized int8 weights (max rel. error "
             f"{rep.max_rel_error:.2e}, rms {rep.rms_rel_error:.2e}), {rep.f32_tensors} F32"
             + (f" ({len(rep.f32_fallback)} quantized ones kept F32: rows not a multiple of 32)" if rep.f32_fallback
                else ""))
    if verify:
        v = verify_gguf(out, quant_dir)
        payload["verify"] = v
        human += ("\nverify: llama-cpp-python is not installed, not run" if v is None else
                  f"\nverified with llama.cpp {v['llama_cpp']}: logits over {v['tokens']} tokens rel. diff "
                  f"{v['rel_logits_diff']:.3f} vs our W8A8 forward, {v['argmax_agree']:.0%} of next-token argmaxes agree")
    emit(payload, as_json, human)
