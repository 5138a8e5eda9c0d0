"""Atomic file and directory writes: a crash never leaves something that looks complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import HaqmoeError
from .reliability.manifest import write_manifest


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_dir(out: Path, overwrite: bool, source: str | Path | None = None) -> None:
    """Refuse (early, before hours of work) to replace a non-empty output without --overwrite, and an
    output that is, holds or lies inside ``source`` (a local input): --overwrite would delete the input."""
    if source is not None and Path(source).expanduser().exists():
        o, s = Path(out).expanduser().resolve(), Path(source).expanduser().resolve()
        if o == s or s.is_relative_to(o) or o.is_relative_to(s):
            raise HaqmoeError(f"output {out} is, holds or lies inside the input {source}: choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise HaqmoeError(f"output {out} exists and is not empty (use --overwrite)")


def publish_directory(tmp: Path, target: Path, overwrite: bool, manifest: bool = True,
                      known: dict | None = None) -> None:
    """Make the finished directory ``tmp`` appear as ``target`` in one rename (replacing an old
    ``target`` only with ``overwrite``). ``manifest``: write ``manifest.json`` first (size + sha256
    of every file; ``known`` digests, taken when big shards were written, are not computed again)."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise HaqmoeError(f"output {target} exists and is not empty (use --overwrite)")
    if manifest:
        write_manifest(tmp, known)
    for p in tmp.rglob("*"):
        if p.is_file() and (known is None or p.name not in known):  # known shards were synced when written
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False, manifest: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename.

    ``manifest``: write ``manifest.json`` (size + sha256 of every file) just before the rename, so
    a later load can name a truncated or bit-flipped file (``reliability.manifest``).
    """
    target = Path(target)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        publish_directory(tmp, target, overwrite=True, manifest=manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
