"""--config TOML files: options and arguments per command, global options, CLI overriding, errors."""

from __future__ import annotations

import json

import pytest
import typer.main

from haqmoe.cli.common import app
from haqmoe.cli.main import main
from haqmoe.config import default_map, split_config_arg
from haqmoe.errors import HaqmoeError


def _write(tmp_path, text: str):
    path = tmp_path / "haqmoe.toml"
    path.write_text(text)
    return path


def test_split_config_arg(monkeypatch):
    monkeypatch.delenv("HAQMOE_CONFIG", raising=False)
    assert split_config_arg(["--config", "a.toml", "serve", "-q"]) == (["serve", "-q"], "a.toml")
    assert split_config_arg(["serve", "--config=b.toml"]) == (["serve"], "b.toml")
    assert split_config_arg(["serve"]) == (["serve"], None)
    monkeypatch.setenv("HAQMOE_CONFIG", "c.toml")
    assert split_config_arg(["serve"]) == (["serve"], "c.toml")


def test_default_map_validates_against_the_commands():
    group = typer.main.get_command(app)
    m = default_map({"quiet": True, "serve": {"port": 9000, "emulate-gpu": True, "model": "x"}}, group)
    assert m == {"quiet": True, "serve": {"port": 9000, "emulate_gpu": True, "model": "x"}}
    with pytest.raises(HaqmoeError, match="unknown option 'prot'"):
        default_map({"serve": {"prot": 1}}, group)
    with pytest.raises(HaqmoeError, match=r"unknown command table \[srve\]"):
        default_map({"srve": {"port": 1}}, group)


def test_config_drives_a_command_and_the_cli_overrides_it(tmp_path, capsys):
    from haqmoe.models.adapters import adapter_for
    from haqmoe.models.tiny import tiny_model
    from haqmoe.quant.checkpoint import save_quantized
    from haqmoe.quant.config import QuantConfig
    from haqmoe.quant.rtn import quantize_rtn

    m = tiny_model("mixtral")
    cfg = QuantConfig.w8a8("rtn", w_sym=False)
    quantize_rtn(m, adapter_for(m), cfg, progress=False)
    src = save_quantized(m, None, tmp_path / "q", cfg)
    conf = _write(tmp_path, f'quiet = true\n[export]\nquant-dir = "{src}"\nout = "{tmp_path / "ct"}"\n'
                            f'requantize = true\ndtype = "float32"\nverify = false\nas_json = true\n')
    main(["--config", str(conf), "export"])  # argument, options and flags all from the file
    out = json.loads(capsys.readouterr().out)
    assert out["requantized"] and out["out"] == str(tmp_path / "ct")
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["torch_dtype"] == "float32"

    main(["--config", str(conf), "export", "--out", str(tmp_path / "ct2"), "--dtype", "bfloat16"])
    assert json.loads((tmp_path / "ct2" / "config.json").read_text())["torch_dtype"] == "bfloat16"

    with pytest.raises(SystemExit) as exc:  # a flag on the command line beats the file
        main(["--config", str(conf), "export", "--out", str(tmp_path / "ct3"), "--no-requantize"])
    assert exc.value.code == 2 and "asymmetric" in capsys.readouterr().err


def test_bad_config_files_are_clean_errors(tmp_path, capsys):
    for text, msg in (("[serve\nport=1", "not valid TOML"), ("[serve]\nbogus = 1\n", "unknown option 'bogus'")):
        with pytest.raises(SystemExit) as exc:
            main(["--config", str(_write(tmp_path, text)), "serve"])
        assert exc.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tmp_path / "missing.toml"), "serve"])
    assert exc.value.code == 2 and "cannot read config file" in capsys.readouterr().err


def test_config_keys_are_the_names_help_shows():
    group = typer.main.get_command(app)
    m = default_map({"eval": {"exec": "real", "json": True, "int8-lm-head": True, "batch_size": 2}}, group)
    assert m == {"eval": {"exec_mode": "real", "as_json": True, "int8_lm_head": True, "batch_size": 2}}
    m = default_map({"quantize": {"w-sym": True}, "export": {"quant_dir": "x"}}, group)
    assert m == {"quantize": {"w_sym": True}, "export": {"quant_dir": "x"}}
    assert default_map({"eval": {"as_json": True}}, group) == {"eval": {"as_json": True}}  # older files still load
    with pytest.raises(HaqmoeError) as exc:
        default_map({"eval": {"exec_modee": "real"}}, group)
    known = str(exc.value).split("known: ")[1]
    assert "exec," in known and "json" in known and "int8-lm-head" in known
    assert "exec_mode" not in known and "as_json" not in known and "int8_lm_head" not in known
    with pytest.raises(HaqmoeError, match="unknown option 'version'"):  # command-line only
        default_map({"version": True}, group)


def _exit_code(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_config_and_version_are_in_the_root_help(capsys):
    from haqmoe import __version__

    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--version" in out
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"haqmoe {__version__}"
