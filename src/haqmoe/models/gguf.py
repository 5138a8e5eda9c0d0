"""GGUF files (llama.cpp's format) read through transformers' GGUF loader, dequantized to float."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import HaqmoeError
from ..io import atomic_directory
from .adapters import adapter_for
from .base import LoadedModel, first_line, quiet_transformers


def read_gguf(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The model in a GGUF file, dequantized: a plain float model afterwards."""
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # gguf raises a variety of types on corrupt files
        raise HaqmoeError(f"cannot read GGUF file {path}: {first_line(exc)}") from exc
    model.config.quantization_config = None  # weights are dequantized: a plain fp checkpoint now
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model.eval()


def load_gguf(path: Path, name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    model = read_gguf(path, dtype)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return LoadedModel(model, tok, name, adapter_for(model))


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors checkpoint directory (atomic)."""
    model = read_gguf(gguf, torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "haqmoe_source.json").write_text(json.dumps({"converted_from": str(gguf)}) + "\n")
    return target
