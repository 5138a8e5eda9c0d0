"""Bounded hypothesis fuzz of every on-disk reader: truncated, bit-flipped, overwritten or replaced
files give a ``HaqmoeError`` (one clear line) or load; never another exception (a traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haqmoe.errors import HaqmoeError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A quantized checkpoint, a routing trace, a placement plan and a TOML config, written by haqmoe."""
    from haqmoe.models.adapters import adapter_for
    from haqmoe.models.tiny import tiny_model
    from haqmoe.quant.checkpoint import save_quantized
    from haqmoe.quant.config import QuantConfig
    from haqmoe.quant.methods import quantize_with
    from haqmoe.routing.trace import RoutingTrace
    from haqmoe.routing.trace_io import save_trace

    root = tmp_path_factory.mktemp("orig")
    model = tiny_model("mixtral")
    cfg = QuantConfig.w8a8("rtn")
    quantize_with(model, adapter_for(model), "rtn", cfg, None, progress=False)
    save_quantized(model, None, root / "q", cfg)
    rng = np.random.default_rng(0)
    experts = np.stack([rng.choice(8, size=(40, 2), replace=True) for _ in range(1)], 0).reshape(40, 1, 2)
    experts = np.repeat(experts, 2, axis=1).astype(np.int16)
    save_trace(RoutingTrace(experts, 8, np.array([0, 20, 40])), root / "trace")
    (root / "plan.json").write_text(json.dumps({"num_layers": 2, "num_experts": 8, "gpu": [[0, 1], [2]],
                                                "strategy": "global", "params": {}}))
    (root / "cfg.toml").write_text('[quantize]\nmethod = "rtn"\ncalib_samples = 4\n')
    return root


def _mutate(data: bytes, kind: str, pos: float, byte: int) -> bytes:
    i = min(int(pos * len(data)), max(len(data) - 1, 0))
    if kind == "truncate":
        return data[:i]
    if kind == "flip" and data:
        return data[:i] + bytes([data[i] ^ (1 << (byte % 8))]) + data[i + 1:]
    if kind == "overwrite":
        return data[:i] + bytes([byte]) * 8 + data[i + 8:]
    return bytes([byte]) * (i % 64)  # replace with junk


MUTATION = st.tuples(st.sampled_from(["truncate", "flip", "overwrite", "junk"]), st.floats(0, 1), st.integers(0, 255))


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _expect_clean(fn) -> None:
    try:
        fn()
    except HaqmoeError as exc:
        assert "\n" not in str(exc).strip(), str(exc)


@FUZZ
@given(name=st.sampled_from(["block-0000.safetensors", "rest.safetensors", "model.safetensors.index.json",
                             "haqmoe_quant.json", "config.json", "manifest.json"]),
       mutation=MUTATION, keep_manifest=st.booleans())
def test_fuzz_quantized_checkpoint(originals, tmp_path_factory, name, mutation, keep_manifest):
    from haqmoe.sources import load_model

    d = _copy(originals / "q", tmp_path_factory.getbasetemp() / "fuzz-q")
    if not keep_manifest and name != "manifest.json":
        (d / "manifest.json").unlink()
    f = d / name
    f.write_bytes(_mutate(f.read_bytes(), *mutation))
    _expect_clean(lambda: load_model(str(d), progress=False))


@FUZZ
@given(name=st.sampled_from(["header.json", "chunk-000000.npz"]), mutation=MUTATION)
def test_fuzz_trace_reader(originals, tmp_path_factory, name, mutation):
    from haqmoe.routing.trace_io import load_trace

    d = _copy(originals / "trace", tmp_path_factory.getbasetemp() / "fuzz-t")
    f = d / name
    f.write_bytes(_mutate(f.read_bytes(), *mutation))
    _expect_clean(lambda: load_trace(d))


@FUZZ
@given(which=st.sampled_from(["plan.json", "cfg.toml"]), mutation=MUTATION)
def test_fuzz_plan_and_config(originals, tmp_path_factory, which, mutation):
    import typer.main

    from haqmoe.cli.common import app
    from haqmoe.config import apply_config
    from haqmoe.routing.placement import Plan

    f = tmp_path_factory.getbasetemp() / f"fuzz-{which}"
    f.write_bytes(_mutate((originals / which).read_bytes(), *mutation))
    if which == "plan.json":
        _expect_clean(lambda: Plan.load(f, 2, 8))
    else:
        import haqmoe.cli.main  # noqa: F401  (registers every command)

        _expect_clean(lambda: apply_config(["--config", str(f), "info"], typer.main.get_command(app)))


def test_originals_load(originals):
    from haqmoe.sources import load_model
    from haqmoe.routing.trace_io import load_trace

    assert load_model(str(originals / "q"), progress=False).quant is not None
    assert load_trace(originals / "trace").num_layers == 2
    assert torch.get_num_threads() >= 1
