"""On-disk routing traces: a directory with a JSON header and append-only ``.npz`` chunks.

Format (``FORMAT`` = "haqmoe-trace", ``VERSION`` = 1)::

    trace/
      header.json        model identity (num_layers, num_experts, top_k), guess width, which
                         optional arrays exist, free-form meta, and on completion
                         {"complete": true, "chunks": C, "tokens": T, "requests": R}
      chunk-000000.npz   whole requests only: experts [t, L, k] int16, lengths [r] int64,
      chunk-000001.npz   optional weights [t, L, k] float32, decode [t] bool, guesses [t, L, G] int16
      ...

Why this shape: profiling is long and may be interrupted, so chunks are appended one at a time,
each written to a temporary name and renamed (a crash never leaves a half chunk under a real
name); resuming counts the requests already in complete chunks and skips them. npz is compact
(zip-compressed int16) and every array carries a CRC, so damaged files are detected on read and
reported as a ``HaqmoeError`` instead of silently wrong statistics.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import HaqmoeError
from ..io import atomic_write_text
from .trace import RoutingTrace

FORMAT = "haqmoe-trace"
VERSION = 1
HEADER = "header.json"
_OPTIONAL = ("weights", "decode", "guesses")


@dataclass
class TraceHeader:
    """Identity of a trace: checked on resume and against the model a plan or cache targets."""

    num_layers: int
    num_experts: int
    top_k: int
    guess_width: int = 0
    has_weights: bool = False
    has_decode: bool = False
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "top_k": self.top_k, "guess_width": self.guess_width,
                "has_weights": self.has_weights, "has_decode": self.has_decode, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict, where: Path) -> "TraceHeader":
        if d.get("format") != FORMAT:
            raise HaqmoeError(f"{where} is not a haqmoe routing trace (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise HaqmoeError(f"{where}: trace format version {d.get('version')} is not supported "
                              f"(this haqmoe reads version {VERSION})")
        try:
            return cls(int(d["num_layers"]), int(d["num_experts"]), int(d["top_k"]), int(d.get("guess_width", 0)),
                       bool(d.get("has_weights")), bool(d.get("has_decode")), dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise HaqmoeError(f"{where}: trace header is malformed ({exc})") from exc

    def same_identity(self, other: "TraceHeader") -> bool:
        keys = ("num_layers", "num_experts", "top_k", "guess_width", "has_weights", "has_decode")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def header_of(trace: RoutingTrace) -> TraceHeader:
    g = 0 if trace.guesses is None else int(trace.guesses.shape[2])
    return TraceHeader(trace.num_layers, trace.num_experts, trace.top_k, g, trace.weights is not None,
                       trace.decode is not None, dict(trace.meta))


def _read_header(path: Path) -> dict:
    f = path / HEADER
    if not path.is_dir() or not f.is_file():
        raise HaqmoeError(f"{path} is not a routing trace directory (no {HEADER})")
    try:
        raw = json.loads(f.read_text())
    except ValueError as exc:  # JSONDecodeError, or bytes that are not even UTF-8
        raise HaqmoeError(f"{f} is corrupt (not JSON: {getattr(exc, 'msg', None) or type(exc).__name__})") from exc
    if not isinstance(raw, dict):
        raise HaqmoeError(f"{f} is corrupt (not a JSON object)")
    return raw


def _chunk_files(path: Path) -> list[Path]:
    """The chunks in order; a gap in their numbering is damage (a resume would write over a chunk)."""
    files = sorted(path.glob("chunk-*.npz"))
    for i, f in enumerate(files):
        if f.name != f"chunk-{i:06d}.npz":
            raise HaqmoeError(f"trace {path} is damaged: chunk-{i:06d}.npz is missing (found {f.name})")
    return files


class TraceWriter:
    """Streaming, resumable writer: ``append`` whole requests; ``finish`` marks the trace complete."""

    def __init__(self, path: str | Path, header: TraceHeader, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.header = header
        self.done_requests = 0
        self.tokens = 0
        self.chunks = 0
        if self.path.exists() and not self.path.is_dir():
            raise HaqmoeError(f"trace path {self.path} is a file: a trace is a directory")
        if self.path.exists() and any(self.path.iterdir()):
            if resume:
                self._resume()
                return
            if not overwrite:
                raise HaqmoeError(f"trace {self.path} exists (use --resume to continue it or --overwrite)")
            for p in _chunk_files(self.path) + [self.path / HEADER]:
                p.unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / HEADER, json.dumps(header.to_json(), indent=1) + "\n")

    def _resume(self) -> None:
        old = TraceHeader.from_json(_read_header(self.path), self.path)
        def settings(h: TraceHeader) -> dict:  # the request count may grow on resume; nothing else
            return {k: v for k, v in dict(h.meta.get("config") or {}).items() if k != "max_requests"}

        def model(h: TraceHeader) -> tuple:  # a local model path counts however it was spelt
            name = str(h.meta.get("model") or "")
            path = Path(name).expanduser()
            return (str(path.resolve()) if name and path.exists() else name), h.meta.get("model_type")

        if not old.same_identity(self.header) or settings(old) != settings(self.header) or \
                model(old) != model(self.header):
            raise HaqmoeError(f"cannot resume {self.path}: it was profiled with another model or settings "
                              f"({model(old)} {old.meta.get('config')} vs {model(self.header)} "
                              f"{self.header.meta.get('config')}): rerun with the same options to continue it, "
                              f"or pass --overwrite instead of --resume to start over")
        for f in _chunk_files(self.path):
            data = _load_chunk(f, old)
            self.done_requests += len(data["lengths"])
            self.tokens += int(data["experts"].shape[0])
            self.chunks += 1
        old.meta["config"] = self.header.meta.get("config")
        self.header = old
        # a finished trace grows again: incomplete until finish(), so a reader never takes it as whole
        atomic_write_text(self.path / HEADER, json.dumps(old.to_json(), indent=1) + "\n")

    def append(self, experts: np.ndarray, lengths: np.ndarray, weights: np.ndarray | None = None,
               decode: np.ndarray | None = None, guesses: np.ndarray | None = None) -> None:
        h = self.header
        if experts.ndim != 3 or experts.shape[1:] != (h.num_layers, h.top_k):
            raise HaqmoeError(f"chunk experts shape {experts.shape} does not match the trace "
                              f"({h.num_layers} layers, top-{h.top_k})")
        if int(np.sum(lengths)) != experts.shape[0]:
            raise HaqmoeError("chunk request lengths do not sum to its token count")
        arrays = {"experts": experts.astype(np.int16), "lengths": np.asarray(lengths, np.int64)}
        for name, arr, want, dtype in (("weights", weights, h.has_weights, np.float32),
                                       ("decode", decode, h.has_decode, bool),
                                       ("guesses", guesses, h.guess_width > 0, np.int16)):
            if want != (arr is not None):
                raise HaqmoeError(f"chunk {'lacks' if want else 'has unexpected'} {name}")
            if arr is not None:
                arrays[name] = np.asarray(arr, dtype)
        target = self.path / f"chunk-{self.chunks:06d}.npz"
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".chunk.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.chunks += 1
        self.done_requests += len(lengths)
        self.tokens += int(experts.shape[0])

    def append_trace(self, trace: RoutingTrace) -> None:
        self.append(trace.experts, np.diff(trace.offsets), trace.weights, trace.decode, trace.guesses)

    def finish(self, **meta) -> Path:
        d = self.header.to_json()
        d["meta"].update(meta)
        d.update(complete=True, chunks=self.chunks, tokens=self.tokens, requests=self.done_requests)
        atomic_write_text(self.path / HEADER, json.dumps(d, indent=1) + "\n")
        return self.path


def _load_chunk(f: Path, h: TraceHeader) -> dict[str, np.ndarray]:
    try:
        with np.load(f, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as exc:
        raise HaqmoeError(f"trace chunk {f} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    e = data.get("experts")
    if e is None or "lengths" not in data or e.ndim != 3 or e.shape[1:] != (h.num_layers, h.top_k):
        raise HaqmoeError(f"trace chunk {f} does not match its header ({h.num_layers} layers, top-{h.top_k})")
    if int(data["lengths"].sum()) != e.shape[0]:
        raise HaqmoeError(f"trace chunk {f} is corrupt (request lengths do not sum to its tokens)")
    if e.size and (e.min() < 0 or e.max() >= h.num_experts):
        raise HaqmoeError(f"trace chunk {f} has expert ids outside 0..{h.num_experts - 1}")
    for name, want, shape in (("weights", h.has_weights, e.shape), ("decode", h.has_decode, e.shape[:1]),
                              ("guesses", h.guess_width > 0, (e.shape[0], h.num_layers, h.guess_width))):
        if (name in data) != want or (want and data[name].shape != shape):
            raise HaqmoeError(f"trace chunk {f} does not match its header ({name}: "
                              f"{'expected ' + str(shape) if want else 'not expected'})")
    return data


def load_trace(path: str | Path, allow_incomplete: bool = False, num_layers: int | None = None,
               num_experts: int | None = None) -> RoutingTrace:
    """Read a trace directory; optionally check it belongs to a model with the given shape."""
    path = Path(path)
    raw = _read_header(path)
    h = TraceHeader.from_json(raw, path)
    if not raw.get("complete") and not allow_incomplete:
        raise HaqmoeError(f"trace {path} is incomplete (profiling was interrupted: rerun with --resume)")
    files = _chunk_files(path)
    if raw.get("complete") and len(files) != raw.get("chunks"):
        raise HaqmoeError(f"trace {path} is damaged: header lists {raw.get('chunks')} chunks, found {len(files)}")
    check_model(h.num_layers, h.num_experts, num_layers, num_experts, f"trace {path}")
    parts = [_load_chunk(f, h) for f in files]
    if not parts:
        empty = np.zeros((0, h.num_layers, h.top_k), np.int16)
        return RoutingTrace(empty, h.num_experts, np.zeros(1, np.int64), meta=dict(h.meta))
    lengths = np.concatenate([d["lengths"] for d in parts])

    def cat(name: str) -> np.ndarray | None:
        return np.concatenate([d[name] for d in parts]) if name in parts[0] else None

    return RoutingTrace(cat("experts"), h.num_experts, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        cat("weights"), cat("decode"), cat("guesses"), dict(h.meta))


def check_model(have_layers: int, have_experts: int, want_layers: int | None, want_experts: int | None,
                what: str) -> None:
    """One clear error when a trace or plan belongs to a model of another shape."""
    if (want_layers is not None and have_layers != want_layers) or \
            (want_experts is not None and have_experts != want_experts):
        raise HaqmoeError(f"{what} is for a model with {have_layers} MoE layers x {have_experts} experts, "
                          f"not {want_layers} x {want_experts}")


def save_trace(trace: RoutingTrace, path: str | Path, overwrite: bool = False) -> Path:
    """Write a whole in-memory trace (one chunk per up to 256 requests)."""
    w = TraceWriter(path, header_of(trace), overwrite=overwrite)
    step = 256
    for r0 in range(0, max(trace.num_requests, 1), step):
        ids = range(r0, min(r0 + step, trace.num_requests))
        if len(ids):
            w.append_trace(trace.select_requests(ids))
    return w.finish()
