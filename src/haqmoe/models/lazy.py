"""Checkpoints read without materialising them: safetensors headers, one tensor at a time, a model
skeleton on ``meta``.

Why: a real MoE (Mixtral-8x7B: 93 GB in bf16, 187 GB in fp32) does not fit in host memory, so no
command may build the whole model first. Three pieces make every command bounded:

- ``SafetensorsFolder`` lists every tensor of a checkpoint folder (one ``model.safetensors`` or the
  Hub's ``model.safetensors.index.json`` + shards) from the files' headers alone, and reads one
  tensor as a view of a private memory map: the bytes stay file-backed page cache (not anonymous
  memory) until something writes them, as llama.cpp's mmap does.
- ``ModelReader`` maps the model's state-dict keys to checkpoint keys through transformers' own
  conversion tables, so Hub layouts load as transformers loads them: Mixtral's per-expert
  ``block_sparse_moe.experts.E.w1/w2/w3`` become the fused ``mlp.experts.gate_up_proj [E, 2I, H]``
  and ``down_proj [E, H, I]``, stacked and concatenated only when that block is loaded.
- ``skeleton`` builds the model on ``meta`` (parameters without storage; buffers such as rotary
  frequencies are real, they are computed, not stored); ``materialize`` loads one module's tensors
  (upcast to the working dtype only then) and ``release`` returns it to ``meta``.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (Concatenate, MergeModulelist, WeightConverter, WeightRenaming,
                                             rename_source_key)

from ..errors import HaqmoeError
from .adapters import get_module

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: file, dtype, shape and absolute byte range."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict:
    """A safetensors file's JSON header (8-byte little-endian length, then JSON): no tensor is read."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than a header")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 2**20:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as exc:
        raise HaqmoeError(f"{path} is not a readable safetensors file: {exc}") from exc
    header["__data_start__"] = 8 + length
    return header


class SafetensorsFolder:
    """Every tensor of a checkpoint folder, from headers; one tensor read at a time on demand."""

    def __init__(self, folder: Path, entries: dict[str, TensorEntry]):
        self.folder, self.entries = folder, entries
        self._maps: dict[str, mmap.mmap] = {}

    @staticmethod
    def present(folder: str | Path) -> bool:
        """Does ``folder`` hold safetensors weights (one file, or an index and shards)?"""
        return (Path(folder) / INDEX_FILE).is_file() or (Path(folder) / SINGLE_FILE).is_file()

    @classmethod
    def open(cls, folder: str | Path) -> "SafetensorsFolder":
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
                if not all(isinstance(f, str) and "/" not in f for f in files):
                    raise ValueError("shard names must be file names")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise HaqmoeError(f"{index} is unreadable or malformed: {exc}") from exc
        elif (folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise HaqmoeError(f"{folder} has no {SINGLE_FILE} nor {INDEX_FILE}")
        entries: dict[str, TensorEntry] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise HaqmoeError(f"{path} is missing (listed in {INDEX_FILE})")
            header = read_header(path)
            base = header.pop("__data_start__")
            header.pop("__metadata__", None)
            size = path.stat().st_size
            for key, e in header.items():
                try:
                    lo, hi = (base + int(o) for o in e["data_offsets"])
                    entry = TensorEntry(name, str(e["dtype"]), tuple(int(d) for d in e["shape"]), lo, hi)
                    if entry.dtype in DTYPES and entry.numel * DTYPES[entry.dtype].itemsize != entry.nbytes:
                        raise ValueError("shape and byte range disagree")
                    if lo < base or min(entry.shape, default=0) < 0:
                        raise ValueError("negative extent")
                except (KeyError, TypeError, ValueError) as exc:
                    raise HaqmoeError(f"{path}: damaged header entry for {key}") from exc
                if hi > size:
                    raise HaqmoeError(f"{path} is truncated: {key} ends at byte {hi}, the file has {size}")
                entries[key] = entry
        return cls(folder, entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def _map(self, file: str) -> mmap.mmap:
        if file not in self._maps:
            with open(self.folder / file, "rb") as f:  # the map keeps its own reference to the file
                self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[file]

    def read(self, key: str) -> torch.Tensor:
        """One tensor as a view of a private (copy-on-write) map of its file: file-backed, no copy."""
        e = self.entries[key]
        if e.dtype not in DTYPES:
            raise HaqmoeError(f"{key}: unsupported tensor dtype {e.dtype}")
        dtype = DTYPES[e.dtype]
        if e.numel == 0:
            return torch.empty(e.shape, dtype=dtype)
        flat = torch.frombuffer(self._map(e.file), dtype=dtype, count=e.numel, offset=e.start)
        return flat.view(e.shape)

    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


# ------------------------------------------------------------------ model keys -> checkpoint keys
@dataclass(frozen=True)
class _Source:
    key: str  # checkpoint key
    converter: WeightConverter | None = None
    pattern: str | None = None  # the converter's source pattern this key matched
    index: int = 0  # expert index parsed from the key (fused targets)


def _pattern_regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\*", r"(\d+)"))


class ModelReader:
    """A model's state-dict tensors, read from a checkpoint folder through transformers' key
    conversions (renamings, and per-expert keys merged into fused expert tensors)."""

    def __init__(self, folder: SafetensorsFolder, model: PreTrainedModel):
        self.folder = folder
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        meta_keys = dict.fromkeys(model.state_dict(keep_vars=True))
        self.sources: dict[str, list[_Source]] = {}
        for key in folder.entries:
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_keys)
            if pattern is None:
                self.sources.setdefault(target, []).append(_Source(key))
                continue
            conv = next(c for c in converters if pattern in c.source_patterns)
            m = _pattern_regex(pattern.lstrip("^")).search(key)
            self.sources.setdefault(target, []).append(_Source(key, conv, pattern, int(m.group(1)) if m and m.groups() else 0))

    def __contains__(self, key: str) -> bool:
        return key in self.sources

    def tensor(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The model tensor ``key``; floating tensors cast to ``dtype`` (a copy only when it differs)."""
        srcs = self.sources.get(key)
        if not srcs:
            raise HaqmoeError(f"the checkpoint in {self.folder.folder} has no tensor for '{key}'")
        if srcs[0].converter is not None:
            return _convert(srcs, self.folder, dtype)
        t = self.folder.read(srcs[0].key)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t



def _convert(srcs: list[_Source], folder: SafetensorsFolder, dtype: torch.dtype | None) -> torch.Tensor:
    """Apply a converter's merge/concatenate operations to the per-expert tensors of one target.

    The target is allocated once in ``dtype`` and filled expert by expert, so assembling Mixtral's
    fused [8, 28672, 4096] gate/up from bf16 shards costs its fp32 size, not that plus a stacked
    bf16 copy."""
    conv = srcs[0].converter
    assert conv is not None
    groups = [sorted((s for s in srcs if s.pattern == p), key=lambda s: s.index) for p in conv.source_patterns]
    groups = [g for g in groups if g]
    kinds = [type(op) for op in conv.operations]
    merge = conv.operations[0] if kinds and kinds[0] is MergeModulelist else None
    concat = conv.operations[1] if kinds[1:] == [Concatenate] else None
    if merge is None or merge.dim != 0 or len(kinds) > 2 or (len(kinds) == 2 and (concat is None or concat.dim != 1)):
        raise HaqmoeError(f"checkpoint layout needs the conversion {', '.join(k.__name__ for k in kinds)}, "
                          "which haqmoe's lazy reader does not apply")
    if len(groups) != len(conv.source_patterns) or len({len(g) for g in groups}) != 1:
        raise HaqmoeError(f"cannot assemble {srcs[0].key}: incomplete expert tensors")
    first = [folder.entries[g[0].key] for g in groups]
    rows = [e.shape[0] for e in first]
    n, cols = len(groups[0]), first[0].shape[1:]
    out = torch.empty((n, sum(rows), *cols), dtype=dtype or DTYPES[first[0].dtype])
    offset = 0
    for g, r in zip(groups, rows):
        for i, src in enumerate(g):
            out[i, offset:offset + r].copy_(folder.read(src.key))
        offset += r
    return out


# ------------------------------------------------------------------ skeleton, load, release
def skeleton(config, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model with every parameter on ``meta`` (no storage) and computed buffers real, in eval mode."""
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:  # e.g. an unknown hidden_act
        raise HaqmoeError(f"cannot build a {config.model_type} model from its config "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    return model.eval()


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = get_module(module, owner_path) if owner_path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def tied_keys(model: PreTrainedModel) -> dict[str, str]:
    """Tied parameters (target -> source state-dict key), e.g. lm_head.weight -> embed_tokens.weight."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(cfg, "tie_word_embeddings", False):
        return {}
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return dict(tied) if isinstance(tied, dict) else {}


@torch.no_grad()
def materialize(model: PreTrainedModel, prefix: str, reader: ModelReader, skip: tuple[str, ...] = ()) -> int:
    """Load every tensor of the module at ``prefix`` ("" = the whole model) that is still on ``meta``
    and not under a ``skip`` prefix, cast to the skeleton's dtype for it (a bf16 checkpoint is
    upcast here, one tensor at a time). Aliases (one tensor under two names: tied embeddings, an
    int8 vocabulary shared by head and embedding) stay one tensor. Returns the bytes loaded."""
    module = get_module(model, prefix) if prefix else model
    tied = tied_keys(model)
    loaded_by_id: dict[int, torch.Tensor] = {}
    deferred: list[tuple[str, str]] = []
    total = 0
    for name, t in module.state_dict(keep_vars=True).items():
        full = f"{prefix}.{name}" if prefix else name
        if t.device.type != "meta" or any(full.startswith(s + ".") for s in skip):
            continue
        if id(t) in loaded_by_id:
            _set_tensor(module, name, loaded_by_id[id(t)])
            continue
        if full not in reader and full in tied:
            deferred.append((name, tied[full]))  # tied: points at its source once that is real
            continue
        value = reader.tensor(full, t.dtype)
        if tuple(value.shape) != tuple(t.shape):
            raise HaqmoeError(f"{full}: the checkpoint holds shape {tuple(value.shape)}, the model expects "
                              f"{tuple(t.shape)}")
        _set_tensor(module, name, value)
        loaded_by_id[id(t)] = module.get_parameter(name) if isinstance(t, nn.Parameter) else value
        total += value.numel() * value.element_size()
    for name, source in deferred:
        src = model.get_parameter(source)
        if src.device.type == "meta":
            raise HaqmoeError(f"{name} is tied to {source}, which is not loaded")
        _set_tensor(module, name, src)
    return total


def release(module: nn.Module) -> None:
    """Drop a module's stored tensors (back to ``meta``; computed buffers stay): the memory is freed
    once nothing else holds it."""
    for name, t in module.state_dict(keep_vars=True).items():
        _set_tensor(module, name, torch.empty_like(t, device="meta"))


def open_reader(folder: str | Path, model: PreTrainedModel) -> ModelReader:
    return ModelReader(SafetensorsFolder.open(folder), model)
