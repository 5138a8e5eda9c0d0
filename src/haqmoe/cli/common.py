"""Shared CLI pieces: the typer app every command module registers on, global state, output helpers."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .. import __version__
from ..io import check_output_dir  # noqa: F401  (re-exported for command modules)
from ..registry import METHOD_HELP, METHODS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Hessian-aware W8A8 quantization and CPU-GPU collaborative inference for MoE LLMs.")
state = {"debug": False, "progress": True}


# Quantization methods (registry.py; haqmoe.quant.methods runs them): the choices of every --method
Method = Enum("Method", {m: m for m in METHODS}, type=str)
METHOD_HELP_TEXT = " | ".join(f"{m} ({h})" for m, h in METHOD_HELP.items())


class Order(str, Enum):
    natural = "natural"
    act = "act"
    rank1 = "rank1"
    rank2 = "rank2"


def _above_zero(value: float) -> float:
    if value <= 0:  # typer's ranges have no open bound; top-p 0 would keep no token at all
        raise typer.BadParameter(f"{value} is not above 0.")
    return value


GEN_OPTS = dict(  # the prompt and sampling options of every generating command (run, generate)
    prompt=typer.Option("The capital of France is", "--prompt", "-p", help="Prompt text."),
    chat=typer.Option(False, help="Wrap the prompt in the model's chat template."),
    max_tokens=typer.Option(64, min=1, help="Tokens to generate."),
    temperature=typer.Option(0.0, min=0.0, help="0 = greedy."),
    top_p=typer.Option(1.0, max=1.0, callback=_above_zero, help="Nucleus sampling mass (0 < p <= 1)."),
    seed=typer.Option(0, help="Sampling seed."),
)


def _print_version(value: bool) -> None:
    """``haqmoe --version``: eager, so it answers before a command is required."""
    if value:
        typer.echo(f"haqmoe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
          threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
          cache_dir: Optional[Path] = typer.Option(None, envvar="HAQMOE_CACHE",
                                                   help="Where converted models are cached."),
          _config: Optional[Path] = typer.Option(None, "--config", metavar="FILE.toml", expose_value=False,
                                                 help="Read options from a TOML file (default: $HAQMOE_CONFIG): "
                                                      "global options at the top, then one table per command, keys "
                                                      "named as in --help; the command line overrides it."),
          _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                        expose_value=False, help="Print the version and exit.")) -> None:
    state["debug"], state["progress"] = debug, not quiet
    if cache_dir is not None:
        os.environ["HAQMOE_CACHE"] = str(cache_dir)
    if threads:
        import torch

        torch.set_num_threads(threads)


def emit(payload: dict, as_json: bool, human: str) -> None:
    typer.echo(json.dumps(payload, indent=2) if as_json else human)


def echo_summary(payload: dict) -> None:
    """After streamed text: the payload (text aside) as one key=value line on stderr."""
    typer.echo("\n---\n" + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in payload.items() if k != "text"), err=True)
