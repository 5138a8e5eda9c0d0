"""What a new user meets first: build caches, resume messages, output wording, offline hub ids."""

from __future__ import annotations

import pytest
import torch

from haqmoe.exec import kernels


def _checkout(root, text: str):
    root.mkdir(parents=True, exist_ok=True)
    (root / "w8a8_cpu.cpp").write_text(text)
    return root / "w8a8_cpu.cpp"


def test_kernel_build_folder_is_keyed_on_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("HAQMOE_CACHE", str(tmp_path / "cache"))
    a, b = _checkout(tmp_path / "a", "int f();\n"), _checkout(tmp_path / "b", "int f();\n")
    changed = _checkout(tmp_path / "c", "int f(int);\n")
    assert kernels.build_dir(a) == kernels.build_dir(b)  # two checkouts of one kernel share one build
    assert kernels.build_dir(a).name.startswith(f"torch-{torch.__version__}-")
    assert kernels.build_dir(changed) != kernels.build_dir(a)
    assert kernels.build_dir(a, ("-O2",)) != kernels.build_dir(a, ("-O3",))


def test_kernel_compiles_a_staged_copy_so_checkouts_do_not_rebuild_in_turn(tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setenv("HAQMOE_CACHE", str(tmp_path / "cache"))
    seen: list[dict] = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append(kw))
    kernels._build_and_load()
    staged = kernels.staged_source(kernels.build_dir())
    stamp = staged.stat().st_mtime_ns
    kernels._build_and_load()
    assert [kw["sources"] for kw in seen] == [[str(staged)]] * 2  # the same path from any checkout
    assert seen[0]["build_directory"] == str(kernels.build_dir()) == str(staged.parent)
    assert staged.read_text() == kernels.SOURCE.read_text() and staged.stat().st_mtime_ns == stamp  # untouched


class _Killed(Exception):
    pass


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from haqmoe.cli.main import main

    capsys.readouterr()
    try:
        main(["-q", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def test_resume_refusals_name_the_way_out_not_each_other(tmp_path, monkeypatch, capsys):
    """An interrupted quantize, then other options: with --resume the refusal names --overwrite (it
    used to say "without --resume", whose refusal says "add --resume"), and --overwrite starts over."""
    from haqmoe.models.tiny import char_tokenizer, tiny_model
    from haqmoe.reliability.resume import BlockCheckpoint

    src = tmp_path / "llama"
    tiny_model("llama").save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    out = str(tmp_path / "q")
    real = BlockCheckpoint.save

    def save(self, i, *a):
        real(self, i, *a)
        raise _Killed
    monkeypatch.setattr(BlockCheckpoint, "save", save)
    code, err = _cli(["quantize", str(src), "--method", "rtn", "-o", out], capsys)
    assert code == 1 and "_Killed" in err  # an internal error to main: killed after the first block
    monkeypatch.undo()
    code, err = _cli(["quantize", str(src), "--method", "rtn", "--w-sym", "-o", out, "--resume"], capsys)
    assert code == 2 and "different run" in err and "--overwrite" in err and "without --resume" not in err, err
    code, err = _cli(["quantize", str(src), "--method", "rtn", "--w-sym", "-o", out], capsys)
    assert code == 2 and "--resume" in err and "--overwrite" in err, err
    code, err = _cli(["quantize", str(src), "--method", "rtn", "--w-sym", "-o", out, "--overwrite"], capsys)
    assert code == 0, err



def test_info_on_a_quantized_checkpoint_counts_every_parameter_and_reads_its_quantization(tmp_path, capsys):
    from haqmoe.models.adapters import adapter_for
    from haqmoe.models.tiny import tiny_model
    from haqmoe.quant.checkpoint import save_quantized
    from haqmoe.quant.config import QuantConfig
    from haqmoe.quant.rtn import quantize_rtn

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "fp")
    cfg = QuantConfig.w8a8("rtn")
    quantize_rtn(model, adapter_for(model), cfg, progress=False)
    save_quantized(model, None, tmp_path / "q", cfg)
    from haqmoe.cli.main import main

    lines = {}
    for name in ("fp", "q"):
        main(["-q", "info", str(tmp_path / name)])
        lines[name] = dict(x.split(": ", 1) for x in capsys.readouterr().out.splitlines() if ": " in x)
    assert lines["q"]["parameters"] == lines["fp"]["parameters"]  # int8 weights count too
    assert lines["q"]["quantized"] == ("rtn (weights int8 asymmetric per channel, activations int8 asymmetric "
                                       "per token dynamic)")
    assert lines["fp"]["quantized"] == "no (float weights)"


def test_generate_reports_exec_as_the_option_names_it():
    from haqmoe.cli.main import exec_name

    assert [exec_name(m, True) for m in ("fake", "dequant", "int8", "auto")] == ["fake", "dequant", "real", "auto"]
    assert exec_name("fake", False) == "float"


def test_a_hub_id_offline_fails_at_once_and_says_so(tmp_path, monkeypatch, capsys):
    """No network: one connection attempt (not the hub client's ~30 s of retries), then the cache or a
    clear error; HF_HUB_OFFLINE skips even that attempt."""
    import socket

    from haqmoe import sources

    calls: list[str] = []

    def refused(*args, **kwargs):
        calls.append("connect")
        raise OSError(101, "Network is unreachable")

    def cache_only(repo_id, allow_patterns=None, local_files_only=False):
        calls.append(f"snapshot local_files_only={local_files_only}")
        raise FileNotFoundError("not cached")
    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(sources, "list_repo_files", lambda *a, **k: calls.append("list") or [])
    monkeypatch.setattr(sources, "snapshot_download", cache_only)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, err = _cli(["info", "someone/not-cached"], capsys)
    assert code == 2 and "out of reach (cannot connect to huggingface.co: Network is unreachable)" in err, err
    assert "not in the Hugging Face cache" in err and calls == ["connect", "snapshot local_files_only=True"]
    calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _cli(["info", "someone/not-cached"], capsys)
    assert code == 2 and "HF_HUB_OFFLINE is set" in err and calls == ["snapshot local_files_only=True"]
    src = tmp_path / "cached"  # in the cache: offline is no obstacle
    from haqmoe.models.tiny import tiny_model

    tiny_model("llama").save_pretrained(src)
    monkeypatch.setattr(sources, "snapshot_download", lambda repo_id, **kw: str(src))
    code, err = _cli(["info", "someone/cached"], capsys)
    assert code == 0, err


def test_compile_and_aot_speedups_in_help_and_readme_come_from_the_results_file():
    """One figure each, read off the results file --help names, and the README quotes the same."""
    import json
    from pathlib import Path

    import typer.main

    from haqmoe.cli.common import app
    from haqmoe.cli.main import SPEEDUPS

    root = Path(__file__).resolve().parents[1]
    source = root / SPEEDUPS["source"]
    tok_s = {r["mode"]: r["decode_tok_s"] for r in json.loads(source.with_suffix(".json").read_text())["rows"]}
    eager = tok_s["real-int8-lm-head"]
    assert SPEEDUPS["compile"] == f"{tok_s['real-int8-lm-head-compiled'] / eager:.2f}x"
    assert SPEEDUPS["aot"] == f"{tok_s['real-int8-lm-head-aot'] / eager:.2f}x"
    generate = typer.main.get_command(app).commands["generate"]
    helps = {p.opts[0]: p.help for p in generate.params if p.param_type_name == "option"}
    readme = (root / "README.md").read_text()
    for flag, key in (("--compile", "compile"), ("--aot", "aot")):
        assert SPEEDUPS[key] in helps[flag] and SPEEDUPS["source"] in helps[flag]
        assert f"{SPEEDUPS[key]} with `{flag}`" in readme
    assert "1.9x" not in helps["--compile"] and "1.2-1.4x" not in helps["--aot"]
