"""``manifest.json``: size + sha256 of every file of an output directory.

Why: a copied or half-downloaded checkpoint can still parse (safetensors headers survive a
truncated tail, a flipped bit in a weight is invisible to every parser). Hashing once at load
names the damaged file instead of serving silently wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import HaqmoeError

MANIFEST = "manifest.json"
FORMAT = "haqmoe-manifest"
VERSION = 1
_CHUNK = 1 << 22


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


def file_digest(path: Path) -> FileEntry:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            size += len(block)
    return FileEntry(size, h.hexdigest())


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(root: str | Path, known: dict[str, FileEntry] | None = None) -> Path:
    """Record every file under ``root`` (call last, inside the atomic directory, before the rename).
    ``known``: digests of files taken when they were written (shards of many GB), keyed by relative
    path; used when the size still matches, so those files are not read again."""
    root = Path(root)
    known = known or {}
    files = {}
    for p in _files(root):
        rel = p.relative_to(root).as_posix()
        entry = known.get(rel)
        if entry is None or entry.size != p.stat().st_size:
            entry = file_digest(p)
        files[rel] = entry.__dict__
    path = root / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, "files": files}, indent=1) + "\n")
    return path


def verification_disabled() -> bool:
    """``HAQMOE_NO_VERIFY=1`` skips hashing (huge checkpoints on trusted storage)."""
    return os.environ.get("HAQMOE_NO_VERIFY", "") not in ("", "0")


def verify_manifest(root: str | Path, required: bool = False) -> int:
    """Check sizes and hashes against ``manifest.json``; returns the number of files checked.

    A directory without a manifest (written before manifests existed) passes unless ``required``.
    Sizes are compared first, so a truncated file is reported as such without hashing everything.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if required:
            raise HaqmoeError(f"{root} has no {MANIFEST}: it was not written completely by haqmoe")
        return 0
    if verification_disabled():
        return 0
    try:
        doc = json.loads(path.read_text())
        entries = {k: FileEntry(int(v["size"]), str(v["sha256"])) for k, v in doc["files"].items()}
        if doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HaqmoeError(f"{path} is corrupt: {exc}") from exc
    for rel, want in entries.items():
        f = root / rel
        if not f.is_file():
            raise HaqmoeError(f"{f} is missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != want.size:
            raise HaqmoeError(f"{f} is truncated or damaged: {size} bytes, expected {want.size} (from {MANIFEST})")
    for rel, want in entries.items():
        if file_digest(root / rel).sha256 != want.sha256:
            raise HaqmoeError(f"{root / rel} is corrupt: sha256 does not match {MANIFEST} (bit flip or edit)")
    return len(entries)
