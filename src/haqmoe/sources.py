"""Model sources: which reader loads a name the user typed.

A source is an embedded name, a checkpoint folder (plain transformers, haqmoe-quantized, or a peer's
compressed-tensors), a GGUF file, or a hub id. ``resolve_source`` classifies it; a folder's format is
picked from ``FOLDER_FORMATS`` (first match wins). ``inspect_source`` describes a source from its
config and file headers alone (what ``haqmoe info`` reads). This module sits above ``models/`` and the
checkpoint formats of ``quant/`` (checkpoint, ctformat): the readers it dispatches to import only what
is below them; the streaming quantizer (``quant/stream.py``) reads its model through it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import list_repo_files, snapshot_download
from torch import nn

from .errors import HaqmoeError
from .models.adapters import ArchSpec, adapter_for
from .models.base import (QUANT_CONFIG, LoadedModel, first_line, is_compressed_tensors, load_config,
                          load_pretrained, quiet_transformers)
from .models.embedded import EMBEDDED, ensure_embedded
from .models.gguf import load_gguf
from .models.lazy import SafetensorsFolder, skeleton
from .quant.checkpoint import load_quantized
from .quant.ctformat import load_compressed_tensors
from .reliability.manifest import verify_manifest

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
HUB_CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class FolderFormat:
    """One kind of checkpoint folder: how to recognise it and how to load it."""
    name: str
    matches: Callable[[Path], bool]
    load: Callable[[Path, str, torch.dtype], LoadedModel]


def _load_plain(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    verify_manifest(path)  # haqmoe-written dirs: name a truncated or bit-flipped file up front
    return load_pretrained(path, name, dtype)


FOLDER_FORMATS: tuple[FolderFormat, ...] = (
    FolderFormat("haqmoe-quantized", lambda p: (p / QUANT_CONFIG).is_file(),
                 lambda p, name, dtype: load_quantized(p, dtype)),  # verifies its manifest
    FolderFormat("compressed-tensors", is_compressed_tensors,  # our fake-quant execution, not the library's
                 lambda p, name, dtype: load_compressed_tensors(p, dtype)),
    FolderFormat("transformers", lambda p: True, _load_plain),
)


def folder_format(path: Path) -> FolderFormat:
    return next(f for f in FOLDER_FORMATS if f.matches(path))


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


def load_model(source: str, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    """Load any supported model source in eval mode (fp32 by default)."""
    quiet_transformers()
    kind, path = resolve_source(source)
    if kind == "gguf":
        assert path is not None
        return load_gguf(path, source, dtype)
    if kind == "embedded":
        path = ensure_embedded(source, progress=progress)
    if kind == "hub":
        reason = hub_unreachable()
        if reason is None:
            return load_pretrained(source, source, dtype)  # transformers downloads what it needs
        path = cached_snapshot(source, reason)  # every cached file: this path may load .bin weights
    assert path is not None
    return folder_format(path).load(path, source, dtype)


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


@dataclass
class Inspected:
    """A model source as ``info`` sees it: the skeleton (or, for GGUF files and .bin folders, the
    loaded model), its adapter, the quantization metadata and the bytes its tensors take on disk."""

    model: nn.Module
    adapter: ArchSpec
    quant: dict | None
    disk_bytes: int | None


def inspect_source(source: str, progress: bool = True) -> Inspected:
    """Read a model source's config and headers only (checkpoint folders and embedded models)."""
    path = lazy_folder(source, progress)
    if path is None:
        lm = load_model(source, progress=progress)  # GGUF, folders of .bin weights
        return Inspected(lm.model, lm.adapter, lm.quant, None)
    config = load_config(str(path))  # an unsupported architecture is named before any file is read
    folder = SafetensorsFolder.open(path)
    quant = None
    if (path / QUANT_CONFIG).is_file():
        try:
            quant = json.loads((path / QUANT_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise HaqmoeError(f"{path / QUANT_CONFIG} is unreadable: {exc}") from exc
    elif is_compressed_tensors(path):
        quant = {"quant": {"method": "compressed-tensors"}}
    return Inspected(skeleton(config), adapter_for(config.model_type), quant, folder.nbytes())


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now (None: it accepts a connection).

    Why ask first: without network the hub client retries for ~30 s before it fails; one connection
    attempt with a short timeout (or ``HF_HUB_OFFLINE``) tells at once, and the cache is used instead."""
    if hub_constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(hub_constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return f"cannot connect to {host}: {exc.strerror or exc or type(exc).__name__}"
    return None


def cached_snapshot(repo_id: str, reason: str, patterns: list[str] | None = None) -> Path:
    """A hub model's files from the Hugging Face cache alone (the hub being out of reach for ``reason``)."""
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
    reason = hub_unreachable()
    if reason is not None:
        path = cached_snapshot(repo_id, reason, HUB_PATTERNS)
        return path if SafetensorsFolder.present(path) else None
    try:
        if not any(f.endswith(".safetensors") for f in list_repo_files(repo_id)):
            return None
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub client raises its own, httpx's and OS errors alike
        raise HaqmoeError(f"cannot download {repo_id} from the hub: {first_line(exc)}") from exc
