"""``--config FILE.toml``: every CLI option from a file, the command line overriding it.

The file mirrors the CLI: top-level keys are the global options (``quiet``, ``threads``, ...),
and one table per command holds that command's options and arguments, named as in ``--help``
(dashes or underscores)::

    threads = 2
    [serve]
    model = "runs/haq-w8a8"
    port = 8080
    emulate_gpu = true
    [export]
    requantize = true

It becomes click's ``default_map``, so a value from the file is exactly an option's default:
typed and validated by the same code as the command line, and any flag given there wins.
Unknown tables or keys are errors (a typo must not be silently ignored).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import click

from .errors import HaqmoeError

ENV = "HAQMOE_CONFIG"


def split_config_arg(argv: list[str]) -> tuple[list[str], str | None]:
    """Remove ``--config PATH`` / ``--config=PATH`` from ``argv``; fall back to $HAQMOE_CONFIG."""
    rest, path, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise HaqmoeError("--config needs a TOML file path")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return rest, path or os.environ.get(ENV) or None


def load_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise HaqmoeError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise HaqmoeError(f"config file {path} is not valid TOML: {exc}") from exc


def _params(cmd: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in cmd.params if p.name}


def _section(values: dict, cmd: click.Command, where: str) -> dict:
    """Validate one table against a command's parameters; keys normalized to parameter names."""
    params, out = _params(cmd), {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in params:
            known = ", ".join(sorted(n for n in params if n != "help"))
            raise HaqmoeError(f"config {where}: unknown option '{key}' (known: {known})")
        out[name] = value  # typed and validated by the option itself, like a command-line value
    return out


def default_map(data: dict, group: click.Group, path: str | Path = "config") -> dict:
    """click ``default_map`` for ``group`` from the parsed TOML ``data``."""
    ctx = click.Context(group)
    commands = {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    result = _section(top, group, f"{path} (top level)")
    for name, table in data.items():
        if not isinstance(table, dict):
            continue
        cmd = commands.get(name) or commands.get(name.replace("_", "-"))
        if cmd is None:
            raise HaqmoeError(f"config {path}: unknown command table [{name}] (commands: {', '.join(commands)})")
        result[cmd.name] = _section(table, cmd, f"{path} [{name}]")
    return result


def apply_config(argv: list[str], group: click.Group) -> tuple[list[str], dict | None]:
    """(argv without --config, default_map or None when no config file is given)."""
    argv, path = split_config_arg(argv)
    if path is None:
        return argv, None
    return argv, default_map(load_toml(path), group, path)
