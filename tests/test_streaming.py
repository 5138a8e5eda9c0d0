"""Bounded-memory operation: lazy checkpoint reading, streaming quantization, sharded checkpoints.

References: transformers' own ``from_pretrained`` (what the lazy reader must reproduce, Hub layouts
included), and the in-memory pipeline (what streaming must reproduce bit for bit).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from haqmoe.cli.main import main
from haqmoe.errors import HaqmoeError
from haqmoe.models.adapters import adapter_for
from haqmoe.models.lazy import SafetensorsFolder, materialize, open_reader, skeleton
from haqmoe.sources import load_model
from haqmoe.models.tiny import char_tokenizer, tiny_model
from haqmoe.quant import stream
from haqmoe.quant.checkpoint import save_quantized
from haqmoe.quant.config import QuantConfig
from haqmoe.quant.methods import MethodOptions, quantize_with
from haqmoe.reliability.resume import BlockCheckpoint, partial_dir

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = ["--calib-samples", "4", "--calib-len", "32", "--grid", "3"]
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def _save(family: str, root, dtype=torch.float32, shard: str | None = None, layers: int = 3):
    """A tiny checkpoint as transformers writes it (Hub layout: per-expert keys), optionally sharded."""
    model = tiny_model(family, layers=layers).to(dtype)
    out = root / f"{family}-{str(dtype)[6:]}-{shard or 'one'}"
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    char_tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "llama", "deepseek_v2", "gpt_oss"])
def test_lazy_reader_equals_transformers(family, tmp_path):
    path = _save(family, tmp_path, torch.bfloat16, shard="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    if family == "mixtral":  # the Hub's per-expert layout, fused only when loaded
        assert any(".block_sparse_moe.experts.3.w1.weight" in k for k in SafetensorsFolder.open(path).entries)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = skeleton(ref.config, torch.float32)
    materialize(model, "", open_reader(path, model))
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, model(ids).logits)


def test_reader_names_missing_and_truncated_shards(tmp_path):
    path = _save("mixtral", tmp_path, shard="40KB")
    shards = sorted(path.glob("model-*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:-64])
    with pytest.raises(HaqmoeError, match="truncated"):
        SafetensorsFolder.open(path)
    shards[-1].unlink()
    with pytest.raises(HaqmoeError, match="missing"):
        SafetensorsFolder.open(path)


def _tensors(path) -> dict[str, torch.Tensor]:
    folder = SafetensorsFolder.open(path)
    return {k: folder.read(k).clone() for k in folder.entries}


def _in_memory(src, out, method: str) -> None:
    """Today's pipeline: the whole FP model in memory, quantized in place, then saved."""
    from haqmoe.data.text import calibration_ids

    lm = load_model(str(src), progress=False)
    cfg = QuantConfig.w8a8(method)
    opts = MethodOptions(grid=3)
    ids = calibration_ids(lm.tokenizer, str(src / "calib.txt"), 4, 32, 0, eval_spec="wikitext2:test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_with(lm.model, lm.adapter, method, cfg, ids if method != "rtn" else None, opts, progress=False)
    save_quantized(lm.model, lm.tokenizer, out, cfg)


@pytest.mark.parametrize("family,method", [("mixtral", "haq"), ("mixtral", "rtn"), ("llama", "haq"),
                                           ("qwen2_moe", "smoothquant"), ("deepseek_v2", "haq"), ("gpt_oss", "haq")])
def test_streaming_quantization_is_bit_identical_to_in_memory(family, method, tmp_path):
    src = _save(family, tmp_path, torch.bfloat16, shard="40KB")
    (src / "calib.txt").write_text(TEXT)
    _in_memory(src, tmp_path / "mem", method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["-q", "quantize", str(src), "-o", str(tmp_path / "stream"), "--method", method,
              "--calib", str(src / "calib.txt"), *OPTS])
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    meta = json.loads((tmp_path / "stream" / "haqmoe_quant.json").read_text())
    assert meta["format_version"] == 2 and meta["experts" if family != "llama" else "linears"]
    assert not partial_dir(tmp_path / "stream").exists()
    # and the streamed checkpoint loads and runs like the in-memory quantized one
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = load_model(str(tmp_path / "mem"), progress=False).model(ids).logits
        y = load_model(str(tmp_path / "stream"), progress=False).model(ids).logits
    assert torch.equal(x, y)


def test_at_most_one_block_is_in_memory(tmp_path, monkeypatch):
    """The largest set of weight bytes alive at once: one block (fp32) plus the non-block weights."""
    src = _save("mixtral", tmp_path, torch.bfloat16, shard="40KB", layers=4)
    (src / "calib.txt").write_text(TEXT)
    ref = tiny_model("mixtral", layers=4)
    block_bytes = max(sum(t.numel() * 4 for t in b.state_dict().values()) for b in ref.model.layers)
    rest_bytes = sum(t.numel() * 4 for k, t in ref.state_dict().items() if ".layers." not in k)
    peaks: list[int] = []
    real_load = stream.LazyBlocks.load

    def alive(model) -> int:
        seen, total = set(), 0
        for t in model.state_dict(keep_vars=True).values():
            if t.device.type != "meta" and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.numel() * t.element_size()
        return total

    def load(self, i, block):
        real_load(self, i, block)
        peaks.append(alive(self.model))
    monkeypatch.setattr(stream.LazyBlocks, "load", load)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["-q", "quantize", str(src), "-o", str(tmp_path / "q"), "--method", "haq",
              "--calib", str(src / "calib.txt"), *OPTS])
    assert len(peaks) == 4
    assert max(peaks) <= block_bytes + rest_bytes, (peaks, block_bytes, rest_bytes)
    assert min(peaks) >= block_bytes  # it did load a whole block each time


class _Killed(Exception):
    pass


def test_kill_then_resume_continues_from_the_shards(tmp_path, monkeypatch):
    src = _save("mixtral", tmp_path, torch.bfloat16, shard="40KB")
    (src / "calib.txt").write_text(TEXT)
    args = ["-q", "quantize", str(src), "--method", "haq", "--calib", str(src / "calib.txt"), *OPTS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main([*args, "-o", str(tmp_path / "ref")])
        real = BlockCheckpoint.save

        def save(self, i, *a):
            real(self, i, *a)
            if i == 1:
                raise _Killed
        monkeypatch.setattr(BlockCheckpoint, "save", save)
        with pytest.raises(_Killed):
            stream.quantize_checkpoint(str(src), tmp_path / "run", "haq", QuantConfig.w8a8("haq"),
                                       MethodOptions(grid=3), stream.CalibSpec(str(src / "calib.txt"), 4, 32, 0),
                                       progress=False)
        monkeypatch.undo()
        part = partial_dir(tmp_path / "run")
        assert sorted(p.name for p in part.glob("block-*")) == ["block-0000.safetensors", "block-0001.safetensors"]
        loaded: list[int] = []
        real_load = stream.LazyBlocks.load
        monkeypatch.setattr(stream.LazyBlocks, "load", lambda self, i, b: (loaded.append(i), real_load(self, i, b)))
        main([*args, "-o", str(tmp_path / "run"), "--resume"])
    assert loaded == [2]  # finished blocks stay on disk: only the rest is loaded and quantized
    a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_file_checkpoints_of_format_1_still_load(tmp_path):
    """Quantized checkpoints written before shards (one model.safetensors) are read as they are."""
    from safetensors.torch import save_model

    model = tiny_model("mixtral")
    cfg = QuantConfig.w8a8("rtn")
    quantize_with(model, adapter_for(model), "rtn", cfg, None, progress=False)
    save_quantized(model, None, tmp_path / "v2", cfg)
    old = tmp_path / "v1"
    old.mkdir()
    model.config.save_pretrained(old)
    save_model(model, str(old / "model.safetensors"))
    meta = json.loads((tmp_path / "v2" / "haqmoe_quant.json").read_text())
    (old / "haqmoe_quant.json").write_text(json.dumps({**meta, "format_version": 1}))
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v1 = load_model(str(old), progress=False).model(ids).logits
        v2 = load_model(str(tmp_path / "v2"), progress=False).model(ids).logits
        ref = model(ids).logits  # eager attention in memory, sdpa loaded: equal to float rounding
    assert torch.equal(v1, v2)
    assert torch.allclose(v2, ref, atol=1e-5)


def test_quantized_loading_keeps_no_float_copy(tmp_path):
    """Loaded int8 weights are views of the mapped shards, and fake-quant keeps no fp32 copy."""
    from haqmoe.quant.modules import QuantLinear

    model = tiny_model("mixtral")
    cfg = QuantConfig.w8a8("rtn")
    quantize_with(model, adapter_for(model), "rtn", cfg, None, progress=False)
    save_quantized(model, None, tmp_path / "q", cfg)
    lm = load_model(str(tmp_path / "q"), progress=False)
    with torch.no_grad():
        lm.model(torch.tensor([[1, 2, 3]]))
    lins = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert lins and all(not hasattr(m, "_weight") or m._weight is None for m in lins)
    floats = sum(t.numel() for n, t in lm.model.state_dict().items() if t.is_floating_point() and t.dim() == 2)
    ints = sum(t.numel() for t in lm.model.state_dict().values() if t.dtype == torch.int8)
    assert ints > floats  # the expert/attention weights are int8 only


def test_hub_ids_are_downloaded_then_streamed(tmp_path, monkeypatch, capsys):
    """A hub id is fetched into the Hugging Face cache (config, tokenizer, safetensors only) and then
    read like a local folder; no network: the hub client is replaced by a local checkpoint."""
    from haqmoe import sources

    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)  # the hub "answers"
    src = _save("mixtral", tmp_path, torch.bfloat16, shard="40KB")
    asked = {}

    def snapshot(repo_id, allow_patterns):
        asked["patterns"] = allow_patterns
        return str(src)
    monkeypatch.setattr(sources, "list_repo_files", lambda repo_id: ["config.json", "model-1.safetensors"])
    monkeypatch.setattr(sources, "snapshot_download", snapshot)
    main(["-q", "info", "someone/tiny-mixtral", "--json"])
    assert json.loads(capsys.readouterr().out)["sizes_gb"]["on_disk"] is not None  # read from headers
    main(["-q", "quantize", "someone/tiny-mixtral", "-o", str(tmp_path / "q"), "--method", "rtn"])
    assert (tmp_path / "q" / "block-0002.safetensors").is_file() and "*.safetensors" in asked["patterns"]

    def offline(repo_id):
        raise OSError("network unreachable")
    monkeypatch.setattr(sources, "list_repo_files", offline)
    with pytest.raises(SystemExit) as exc:
        main(["-q", "info", "someone/tiny-mixtral"])
    assert exc.value.code == 2 and "cannot download someone/tiny-mixtral" in capsys.readouterr().err
