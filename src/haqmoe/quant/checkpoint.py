"""Quantized checkpoints: config.json + tokenizer + model.safetensors (int8 weights, scales, zero
points, every float tensor) + ``haqmoe_quant.json`` (the QuantConfig and which modules are quantized;
``vocab`` where lm_head, and the tied embedding with it, is stored as int8 rows).

Loading rebuilds the model skeleton from its config, swaps in the quantized modules named in the
JSON, and loads the tensors strictly: save -> load is bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model
from transformers import AutoModelForCausalLM, GenerationConfig

from ..errors import HaqmoeError
from ..io import atomic_directory
from ..models.adapters import adapter_for, get_module, set_module
from ..reliability.manifest import verify_manifest
from .config import QuantConfig
from .modules import QuantExperts, QuantLinear, tie_vocabulary, vocab_names

QUANT_CONFIG = "haqmoe_quant.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


def quantized_modules(model: torch.nn.Module) -> dict:
    linears = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and ".experts." not in n]
    experts = [n for n, m in model.named_modules() if isinstance(m, QuantExperts)]
    vocab = vocab_names(model)
    return {"linears": linears, "experts": experts, **({"vocab": vocab} if vocab else {})}


def save_quantized(model, tokenizer, out: str | Path, cfg: QuantConfig, extra: dict | None = None,
                   overwrite: bool = False) -> Path:
    out = Path(out)
    meta = {"format_version": FORMAT_VERSION, "quant": cfg.as_dict(), **quantized_modules(model),
            **(extra or {})}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:  # e.g. several EOS ids of chat models
            # as the source shipped it: save_pretrained's validation refuses common hub configs
            model.generation_config.to_json_file(tmp / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        st_save_model(model, str(tmp / WEIGHTS))
        (tmp / QUANT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32):
    from ..models.loading import LoadedModel, load_tokenizer

    path = Path(path)
    verify_manifest(path)  # names a truncated or bit-flipped file before any parser sees it
    try:
        meta = json.loads((path / QUANT_CONFIG).read_text())
        cfg = QuantConfig.from_dict(meta["quant"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise HaqmoeError(f"{path / QUANT_CONFIG} is unreadable or malformed: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise HaqmoeError(f"{path} has quantized-checkpoint format {meta.get('format_version')}, "
                          f"this haqmoe reads {FORMAT_VERSION}")
    from ..models.loading import _load_config

    config = _load_config(str(path))  # unreadable or unsupported config: one clear HaqmoeError
    adapter = adapter_for(config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise HaqmoeError(f"cannot read {path / 'generation_config.json'}: {exc}") from exc
    try:  # module names come from the JSON: a damaged name must not become a traceback
        for name in meta["linears"]:
            lin = get_module(model, name)
            set_module(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                                cfg.weights, cfg.acts, dtype))
        for name in meta["experts"]:
            ex = get_module(model, name)
            set_module(model, name, QuantExperts(ex.num_experts, ex.hidden_dim, ex.intermediate_dim, ex.act_fn,
                                                 cfg.weights, cfg.acts))
        if "vocab" in meta:
            head = get_module(model, meta["vocab"]["head"])
            tie_vocabulary(model, meta["vocab"], head.out_features, head.in_features)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise HaqmoeError(f"{path / QUANT_CONFIG} lists modules this model does not have "
                          f"({type(exc).__name__}: {exc}): the file is damaged") from exc
    weights = path / WEIGHTS
    if not weights.is_file():
        raise HaqmoeError(f"{weights} is missing")
    try:
        missing, unexpected = st_load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise HaqmoeError(f"cannot read {weights}: {str(exc).splitlines()[0]}") from exc
    if missing or unexpected:
        raise HaqmoeError(f"{weights} does not match its config: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    return LoadedModel(model, load_tokenizer(path), str(path), adapter, quant=meta)
