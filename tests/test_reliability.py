"""Reliability: manifests name damaged files, interrupted quantization resumes bit-identically,
bad inputs give one-line errors, the memory guard refuses what cannot fit."""

from __future__ import annotations

import errno
import json
import warnings

import pytest
import torch

from haqmoe.cli.main import main
from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.tiny import tiny_model
from haqmoe.quant.checkpoint import load_quantized, save_quantized
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.methods import MethodOptions, quantize_with
from haqmoe.reliability import resume as resume_mod
from haqmoe.reliability.guard import check_quant_memory
from haqmoe.reliability.manifest import MANIFEST, verify_manifest
from haqmoe.reliability.resume import BlockCheckpoint, partial_dir, run_fingerprint

OPTS = MethodOptions(batch_size=4, search_tokens=128, grid=3, min_expert_tokens=4)
CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str, layers: int = 3):
    return tiny_model(family, layers=layers)


class _Crash(Exception):
    pass


def _quantize(model, out, resume: bool, crash_after: int | None = None, monkeypatch=None):
    cfg = QuantConfig.w8a8("haq")
    ckpt = BlockCheckpoint.open(out, run_fingerprint(model, CALIB, cfg), cfg, resume, adapter_for(model).layers)
    if crash_after is not None:
        real = BlockCheckpoint.save

        def save(self, i, *a):
            real(self, i, *a)
            if i == crash_after:
                raise _Crash
        monkeypatch.setattr(BlockCheckpoint, "save", save)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = quantize_with(model, adapter_for(model), "haq", cfg, CALIB, OPTS, progress=False, checkpoint=ckpt)
    return report


@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt_oss"])  # gpt-oss: biased experts rebuilt on resume
def test_crash_then_resume_is_bit_identical(family, tmp_path, monkeypatch):
    ref = _model(family)
    ref_report = _quantize(ref, tmp_path / "ref", resume=False)
    crashed = _model(family)
    with pytest.raises(_Crash):
        _quantize(crashed, tmp_path / "run", resume=False, crash_after=1, monkeypatch=monkeypatch)
    monkeypatch.undo()
    assert json.loads((partial_dir(tmp_path / "run") / "state.json").read_text())["done"] == 2
    fresh = _model(family)  # a new process: the FP model again, blocks 0-1 come from the checkpoint
    report = _quantize(fresh, tmp_path / "run", resume=True)
    a, b = ref.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert report.groups == ref_report.groups and report.fallbacks == ref_report.fallbacks


def test_resume_refuses_another_run(tmp_path, monkeypatch):
    model = _model("llama", layers=2)
    with pytest.raises(_Crash):
        _quantize(model, tmp_path / "q", resume=False, crash_after=0, monkeypatch=monkeypatch)
    monkeypatch.undo()
    other = _model("llama", layers=2)
    cfg = QuantConfig.w8a8("haq")
    ckpt = BlockCheckpoint.open(tmp_path / "q", run_fingerprint(other, CALIB[:4], cfg), cfg, resume=True,
                                layers=adapter_for(other).layers)
    with pytest.raises(HaqmoeError, match="different run.*--overwrite instead of --resume"):
        quantize_with(other, adapter_for(other), "haq", cfg, CALIB[:4], OPTS, progress=False, checkpoint=ckpt)


def _saved(tmp_path):
    model = tiny_model("llama")
    cfg = QuantConfig.w8a8("rtn")
    quantize_with(model, adapter_for(model), "rtn", cfg, None, OPTS, progress=False)
    return save_quantized(model, None, tmp_path / "q", cfg)


def test_manifest_names_truncated_and_flipped_files(tmp_path):
    out = _saved(tmp_path)
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert {"block-0000.safetensors", "rest.safetensors", "config.json", "haqmoe_quant.json"} <= set(files)
    assert verify_manifest(out) == len(files)
    load_quantized(out)
    w = out / "block-0000.safetensors"
    original = w.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(HaqmoeError, match=r"block-0000\.safetensors is corrupt: sha256"):
        load_quantized(out)
    w.write_bytes(bytes(data[:-100]))
    with pytest.raises(HaqmoeError, match=r"block-0000\.safetensors is truncated"):
        load_quantized(out)
    w.write_bytes(original)
    (out / "config.json").unlink()
    with pytest.raises(HaqmoeError, match=r"config\.json is missing"):
        load_quantized(out)


def test_disk_full_leaves_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    from haqmoe.io import atomic_directory

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("haqmoe.io.write_manifest", full)  # where publish_directory looks it up
    with pytest.raises(OSError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "a").write_text("x")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory


def test_memory_guard_suggests_fewer_samples():
    model = tiny_model("mixtral")
    calib = torch.zeros(64, 128, dtype=torch.long)
    est = check_quant_memory(model, adapter_for(model), calib, 8, available=2**34)
    with pytest.raises(HaqmoeError, match=r"--calib-samples \d+"):
        check_quant_memory(model, adapter_for(model), calib, 8, available=est.model + est.block + 3 * est.per_sample)


def test_token_ids_out_of_vocabulary_are_refused():
    model = tiny_model("llama")
    bad = torch.full((2, 16), 500)
    with pytest.raises(HaqmoeError, match="vocabulary has 128"):
        quantize_with(model, adapter_for(model), "haq", QuantConfig.w8a8("haq"), bad, OPTS, progress=False)


def test_fault_point_is_inert_without_env(monkeypatch):
    monkeypatch.delenv("HAQMOE_KILL_AFTER_BLOCK", raising=False)
    resume_mod._fault_point(0)


def test_ctrl_c_exits_130_with_a_message(monkeypatch, capsys):
    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("haqmoe.sources.inspect_source", interrupted)
    with pytest.raises(SystemExit) as exc:
        main(["-q", "info", "anything"])
    assert exc.value.code == 130 and "interrupted" in capsys.readouterr().err
