"""Quantized checkpoints: sharded, written block by block, loaded lazily.

Layout (format 2)::

    OUT/
      config.json, generation_config.json, tokenizer files
      haqmoe_quant.json             the QuantConfig, which modules are quantized (``linears``,
                                    ``experts``; ``vocab`` where lm_head is int8 rows), the report
      block-0000.safetensors ...    one shard per decoder block (int8 weights, scales, zero points,
                                    the block's float tensors), keys as in the model's state dict
      rest.safetensors              embedding, final norm, lm_head
      model.safetensors.index.json  key -> shard, as the Hub's sharded checkpoints
      manifest.json                 size + sha256 of every file

Why shards: the quantization pipeline writes each block as it finishes, so the shards are also the
resume state of an interrupted run, and no step ever holds the whole model. Format 1 (one
``model.safetensors``) is still read: such checkpoints exist on users' disks.

Loading builds the model skeleton on ``meta``, swaps in empty quantized modules (also on ``meta``)
and assigns each tensor as a view of the mapped shard: nothing is copied, and no float copy of a
quantized weight exists (fake-quant execution dequantizes per call).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig

from ..errors import HaqmoeError
from ..io import atomic_directory, publish_directory
from ..models.adapters import ArchSpec, adapter_for, get_module, set_module
from ..models.base import LoadedModel, load_config, load_tokenizer
from ..models.lazy import INDEX_FILE, materialize, open_reader, read_header, skeleton
from ..reliability.manifest import FileEntry, verify_manifest
from ..reliability.resume import block_file, block_tensors, write_shard
from .config import QuantConfig
from .modules import QuantExperts, QuantLinear, tie_vocabulary, vocab_names

QUANT_CONFIG = "haqmoe_quant.json"
REST_FILE = "rest.safetensors"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def quantized_modules(model: nn.Module) -> dict:
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and ".experts." not in n]
    experts = [n for n, m in model.named_modules() if isinstance(m, QuantExperts)]
    vocab = vocab_names(model)
    return {"linears": linears, "experts": experts, **({"vocab": vocab} if vocab else {})}


def rest_tensors(model: nn.Module, adapter: ArchSpec) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder blocks (embedding, final norm, lm_head), each storage once."""
    seen: set[int] = set()
    out = {}
    for key, t in model.state_dict().items():
        if key.startswith(adapter.layers + "."):
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied: the loader restores the alias from the config / haqmoe_quant.json
            continue
        seen.add(ptr)
        out[key] = t
    return out


def write_metadata(root: Path, model: nn.Module, tokenizer, meta: dict, shards: list[str]) -> None:
    """Everything of a quantized checkpoint but its block shards: config, tokenizer, the rest shard,
    the index and ``haqmoe_quant.json`` (``meta``)."""
    model.config.save_pretrained(root)
    if getattr(model, "generation_config", None) is not None:  # e.g. several EOS ids of chat models
        # as the source shipped it: save_pretrained's validation refuses common hub configs
        model.generation_config.to_json_file(root / "generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(root)
    weight_map = {}
    for name in shards:
        header = read_header(root / name)
        weight_map.update({k: name for k in header if not k.startswith("__")})
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {"format": "haqmoe"}, "weight_map": weight_map},
                                              indent=1) + "\n")
    (root / QUANT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def quant_meta(cfg: QuantConfig, modules: dict, extra: dict | None) -> dict:
    return {"format_version": FORMAT_VERSION, "quant": cfg.as_dict(), **modules, **(extra or {})}


def save_quantized(model, tokenizer, out: str | Path, cfg: QuantConfig, extra: dict | None = None,
                   overwrite: bool = False) -> Path:
    """Write an in-memory quantized model as a sharded checkpoint (the streaming pipeline writes the
    same files block by block: ``finish_streamed``)."""
    out = Path(out)
    adapter = adapter_for(model)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        shards = []
        for i, block in enumerate(adapter.blocks(model)):
            write_shard(block_tensors(block, adapter.layers, i), tmp / block_file(i))
            shards.append(block_file(i))
        write_shard(rest_tensors(model, adapter), tmp / REST_FILE)
        write_metadata(tmp, model, tokenizer, quant_meta(cfg, quantized_modules(model), extra), shards + [REST_FILE])
    return out


def finish_streamed(root: Path, out: Path, model: nn.Module, adapter: ArchSpec, tokenizer, cfg: QuantConfig,
                    modules: dict, extra: dict, shards: dict[str, FileEntry], overwrite: bool) -> Path:
    """Complete a checkpoint whose block shards the pipeline wrote into ``root`` (its partial
    directory): add the rest shard and metadata, then publish ``root`` as ``out`` in one rename.
    The shards' digests were taken as they were written, so they are not read again."""
    shards = dict(shards)
    shards[REST_FILE] = write_shard(rest_tensors(model, adapter), root / REST_FILE)
    blocks = sorted(n for n in shards if n != REST_FILE)
    write_metadata(root, model, tokenizer, quant_meta(cfg, modules, extra), blocks + [REST_FILE])
    publish_directory(root, out, overwrite, known=shards)
    return out


# ------------------------------------------------------------------ loading
def read_quant_meta(path: Path) -> tuple[dict, QuantConfig]:
    try:
        meta = json.loads((path / QUANT_CONFIG).read_text())
        cfg = QuantConfig.from_dict(meta["quant"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HaqmoeError(f"{path / QUANT_CONFIG} is unreadable or malformed: {exc}") from exc
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise HaqmoeError(f"{path} has quantized-checkpoint format {meta.get('format_version')}, "
                          f"this haqmoe reads {', '.join(map(str, READABLE_VERSIONS))}")
    return meta, cfg


def quant_skeleton(config, meta: dict, cfg: QuantConfig, dtype: torch.dtype) -> nn.Module:
    """The model on ``meta`` with the quantized modules ``meta`` names swapped in (also on meta)."""
    model = skeleton(config, dtype)
    try:  # module names come from the JSON: a damaged name must not become a traceback
        with torch.device("meta"):
            for name in meta["linears"]:
                lin = get_module(model, name)
                set_module(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                                    cfg.weights, cfg.acts, dtype))
            for name in meta["experts"]:
                set_module(model, name, QuantExperts.like(get_module(model, name), cfg.weights, cfg.acts))
            if "vocab" in meta:
                head = get_module(model, meta["vocab"]["head"])
                tie_vocabulary(model, meta["vocab"], head.out_features, head.in_features)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise HaqmoeError(f"{QUANT_CONFIG} lists modules this model does not have "
                          f"({type(exc).__name__}: {exc}): the file is damaged") from exc
    return model


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32):
    path = Path(path)
    verify_manifest(path)  # names a truncated or bit-flipped file before any parser sees it
    meta, cfg = read_quant_meta(path)
    config = load_config(str(path))  # unreadable or unsupported config: one clear HaqmoeError
    adapter = adapter_for(config.model_type)
    model = quant_skeleton(config, meta, cfg, dtype)
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise HaqmoeError(f"cannot read {path / 'generation_config.json'}: {exc}") from exc
    reader = open_reader(path, model)
    expected = set(model.state_dict(keep_vars=True))
    unexpected = sorted(k for k in reader.sources if k not in expected)
    if unexpected:
        raise HaqmoeError(f"{path} does not match its config: unexpected tensors {unexpected[:3]}")
    materialize(model, "", reader)  # a missing tensor is a one-line HaqmoeError naming it
    return LoadedModel(model, load_tokenizer(path), str(path), adapter, quant=meta)
