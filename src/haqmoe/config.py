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


def config_keys(param: click.Parameter) -> list[str]:
    """The keys a config file may use for ``param``: the long option names ``--help`` shows (``exec``
    for ``--exec``, ``w-sym`` for ``--w-sym/--w-asym``) or an argument's name (``quant-dir``), each
    with dashes or underscores. The README promises these names; the Python parameter names behind
    them (``exec_mode``, ``as_json``) are an implementation detail.
    """
    if param.param_type_name == "option":  # duck-typed: typer's options are its vendored click's
        names = [o[2:] for o in param.opts if o.startswith("--")]
    else:
        names = [param.name.replace("_", "-")] if param.name else []
    return names


def _lookup(cmd: click.Command) -> tuple[dict[str, str], list[str]]:
    """(config key normalized to underscores -> parameter name, the shown names for error messages).

    The Python parameter name stays accepted so files written against it keep working, but it is never
    listed: an error shows only the names ``--help`` shows.
    """
    table: dict[str, str] = {}
    shown: list[str] = []
    for param in cmd.params:
        if not param.name or param.name == "help" or not param.expose_value or getattr(param, "hidden", False):
            continue  # --config and --version: command-line only
        names = config_keys(param)
        shown.extend(names)
        for key in names:
            table[key.replace("-", "_")] = param.name
    for param in cmd.params:  # legacy spelling: the Python name, unless it is another option's CLI name
        if param.name and param.name != "help" and param.expose_value:
            table.setdefault(param.name, param.name)
    return table, sorted(shown)


def _section(values: dict, cmd: click.Command, where: str) -> dict:
    """Validate one table against a command's parameters; keys normalized to parameter names."""
    table, shown = _lookup(cmd)
    out = {}
    for key, value in values.items():
        name = table.get(key.replace("-", "_"))
        if name is None:
            raise HaqmoeError(f"config {where}: unknown option '{key}' (known: {', '.join(shown)})")
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
