"""Model sources: embedded names, checkpoint directories (plain or haqmoe-quantized), GGUF files, hub ids."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import HaqmoeError
from ..io import atomic_directory
from .adapters import ArchSpec, adapter_for
from .embedded import EMBEDDED, ensure_embedded
from .lazy import SafetensorsFolder

QUANT_CONFIG = "haqmoe_quant.json"


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


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
        raise HaqmoeError(f"cannot read the tokenizer of {target}: {_first_line(exc)}") from exc


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


def _quiet_transformers() -> None:
    """transformers' own warnings and per-tensor progress bars are noise in our CLI output."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_source(source: str) -> tuple[str, Path | None]:
    """Classify ``source`` as ('embedded'|'dir'|'gguf'|'hub', path). A checkpoint folder in the working
    directory wins over the embedded model of the same name (the user's own files are meant)."""
    path = Path(source).expanduser()
    if source in EMBEDDED and not (path / "config.json").is_file():
        return "embedded", None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HaqmoeError(f"{path} is not a model checkpoint directory (no config.json)")
        return "dir", path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HaqmoeError(f"GGUF file {path} does not exist")
        return "gguf", path
    if path.exists():
        raise HaqmoeError(f"{path} is neither a checkpoint directory nor a .gguf file")
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") != 1
    if looks_like_path:
        raise HaqmoeError(f"model '{source}' not found: not an embedded name ({', '.join(EMBEDDED)}), "
                          "a directory, a .gguf file or a hub id (owner/name)")
    return "hub", None


def lazy_folder(source: str, progress: bool = True) -> Path | None:
    """The safetensors folder behind ``source`` (a checkpoint folder, an embedded model's cache, or
    a hub id's files downloaded into the Hugging Face cache), which can be read lazily; None for a
    GGUF file or a folder of .bin weights."""
    kind, path = resolve_source(source)
    if kind == "embedded":
        path = ensure_embedded(source, progress=progress)
    if kind == "hub":
        path = hub_snapshot(source)
    if path is not None and SafetensorsFolder.present(path):
        return path
    return None


HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
HUB_CONNECT_TIMEOUT_S = 3.0


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now (None: it accepts a connection).

    Why ask first: without network the hub client retries for ~30 s before it fails; one connection
    attempt with a short timeout (or ``HF_HUB_OFFLINE``) tells at once, and the cache is used instead."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot connect to {host}: {exc.strerror or exc or type(exc).__name__}"
    return None


def cached_snapshot(repo_id: str, reason: str, patterns: list[str] | None = None) -> Path:
    """A hub model's files from the Hugging Face cache alone (the hub being out of reach for ``reason``)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception as exc:  # the hub client's "not cached" errors vary by version
        raise HaqmoeError(f"{repo_id} looks like a hub id, but the hub is out of reach ({reason}) and it is not "
                          f"in the Hugging Face cache: download it once with network, or give a local checkpoint "
                          f"folder") from exc


def hub_snapshot(repo_id: str) -> Path | None:
    """Download (or find in the Hugging Face cache) a hub model's config, tokenizer and safetensors
    shards; None when it has no safetensors weights. Needs network the first time; offline, the
    cached files or one clear error at once."""
    from huggingface_hub import list_repo_files, snapshot_download

    reason = hub_unreachable()
    if reason is not None:
        path = cached_snapshot(repo_id, reason, HUB_PATTERNS)
        return path if SafetensorsFolder.present(path) else None
    try:
        if not any(f.endswith(".safetensors") for f in list_repo_files(repo_id)):
            return None
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub client raises its own, httpx's and OS errors alike
        raise HaqmoeError(f"cannot download {repo_id} from the hub: {_first_line(exc)}") from exc


def load_model(source: str, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    """Load any supported model source in eval mode (fp32 by default)."""
    _quiet_transformers()
    kind, path = resolve_source(source)
    if kind == "embedded":
        path = ensure_embedded(source, progress=progress)
    if kind == "gguf":
        assert path is not None
        model = _load_gguf(path, dtype)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return LoadedModel(model, tok, source, adapter_for(model))
    if kind == "hub" and (reason := hub_unreachable()) is not None:
        path = cached_snapshot(source, reason)  # every cached file: this path may load .bin weights
    target = str(path) if path is not None else source
    quant_file = path / QUANT_CONFIG if path is not None else None
    if quant_file is not None and quant_file.is_file():
        from ..quant.checkpoint import load_quantized

        return load_quantized(path, dtype)  # verifies its manifest
    if path is not None and is_compressed_tensors(path):
        from ..quant.ctformat import load_compressed_tensors

        return load_compressed_tensors(path, dtype)  # our fake-quant execution, not the library's
    if path is not None and path.is_dir():
        from ..reliability.manifest import verify_manifest

        verify_manifest(path)  # haqmoe-written dirs: name a truncated or bit-flipped file up front
    config = load_config(target)
    adapter = adapter_for(config.model_type)
    try:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError, ImportError) as exc:
        raise HaqmoeError(f"cannot load checkpoint {target} ({type(exc).__name__}): {_first_line(exc)}") from exc
    return LoadedModel(model.eval(), load_tokenizer(target), source, adapter)


def is_compressed_tensors(path: Path) -> bool:
    """A peer's (e.g. llm-compressor's) checkpoint: evaluated with the same quantized execution as ours."""
    try:
        qcfg = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qcfg.get("quant_method") == "compressed-tensors"


def load_config(target: str):
    local = Path(target) / "config.json"
    if local.is_file():  # name our own supported list before transformers' generic message
        try:
            doc = json.loads(local.read_text())
        except ValueError as exc:
            raise HaqmoeError(f"{local} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise HaqmoeError(f"{local} is not a model config (a JSON object)")
        model_type = doc.get("model_type")
        adapter_for(str(model_type))
    try:
        return AutoConfig.from_pretrained(target)
    except (OSError, ValueError, KeyError) as exc:
        msg = _first_line(exc)
        if "model_type" in msg or "Unrecognized model" in msg or isinstance(exc, KeyError):
            raise HaqmoeError(f"unsupported architecture in {target}: {msg}") from exc
        raise HaqmoeError(f"cannot read model config from {target}: {msg}") from exc


def _load_gguf(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # gguf raises a variety of types on corrupt files
        raise HaqmoeError(f"cannot read GGUF file {path}: {_first_line(exc)}") from exc
    model.config.quantization_config = None  # weights are dequantized: a plain fp checkpoint now
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model.eval()


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors checkpoint directory (atomic)."""
    _quiet_transformers()
    model = _load_gguf(gguf, torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "haqmoe_source.json").write_text(json.dumps({"converted_from": str(gguf)}) + "\n")
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
