"""What every model source produces: a ``LoadedModel``, its tokenizer and config helpers.

This module imports nothing above ``models/`` so that the format readers (``quant.checkpoint``,
``quant.ctformat``), the builders (``models.upcycle``, ``models.moefy``) and ``data.text`` can all
use it, while ``haqmoe.sources`` (which picks the reader for a source) sits above them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from ..errors import HaqmoeError
from .adapters import ArchSpec, adapter_for

QUANT_CONFIG = "haqmoe_quant.json"  # present in a haqmoe-quantized checkpoint folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    name: str
    adapter: ArchSpec
    quant: dict | None = None  # the haqmoe quantization config when the checkpoint is quantized

    @property
    def is_moe(self) -> bool:
        return any(self.adapter.is_moe_block(b) for b in self.adapter.blocks(self.model))


def context_of(config) -> int:
    """The model's context in tokens (0: the config does not say)."""
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def require_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise HaqmoeError("this model has no tokenizer (its folder has no tokenizer files): it cannot read text")


def load_tokenizer(target: str | Path):
    """The checkpoint's tokenizer; None for a local folder without one (random-weight test models)."""
    path = Path(target)
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(target)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise HaqmoeError(f"cannot read the tokenizer of {target}: {first_line(exc)}") from exc


def encode_prompt(tokenizer, config, prompt: str | list[dict]) -> torch.Tensor:
    """Token ids [1, T] of a prompt (a string, or chat messages rendered with the model's template),
    refused when empty or as long as the model's context."""
    require_tokenizer(tokenizer)
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=False)
        ids = ids if isinstance(ids, torch.Tensor) else torch.tensor([ids])
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise HaqmoeError("empty prompt")
    limit = context_of(config)
    if limit and ids.shape[1] >= limit:
        raise HaqmoeError(f"prompt has {ids.shape[1]} tokens; the model's context is {limit}")
    return ids


def quiet_transformers() -> None:
    """transformers' own warnings and per-tensor progress bars are noise in our CLI output."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def is_compressed_tensors(path: Path) -> bool:
    """A peer's (e.g. llm-compressor's) checkpoint: evaluated with the same quantized execution as ours."""
    try:
        qcfg = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qcfg.get("quant_method") == "compressed-tensors"


def load_config(target: str | Path):
    """The transformers config of a checkpoint folder or hub id, refusing architectures we do not support."""
    local = Path(target) / "config.json"
    if local.is_file():  # name our own supported list before transformers' generic message
        try:
            doc = json.loads(local.read_text())
        except ValueError as exc:
            raise HaqmoeError(f"{local} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise HaqmoeError(f"{local} is not a model config (a JSON object)")
        adapter_for(str(doc.get("model_type")))
    try:
        return AutoConfig.from_pretrained(target)
    except (OSError, ValueError, KeyError) as exc:
        msg = first_line(exc)
        if "model_type" in msg or "Unrecognized model" in msg or isinstance(exc, KeyError):
            raise HaqmoeError(f"unsupported architecture in {target}: {msg}") from exc
        raise HaqmoeError(f"cannot read model config from {target}: {msg}") from exc


def load_pretrained(target: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A plain (unquantized) transformers checkpoint folder or cached hub id, in eval mode."""
    quiet_transformers()
    target = str(target)
    config = load_config(target)
    adapter = adapter_for(config.model_type)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError, ImportError) as exc:
        raise HaqmoeError(f"cannot load checkpoint {target} ({type(exc).__name__}): {first_line(exc)}") from exc
    return LoadedModel(model.eval(), load_tokenizer(target), name or target, adapter)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
