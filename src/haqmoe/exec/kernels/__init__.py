"""Our own CPU kernels (``w8a8_cpu.cpp``): the decode GEMV ``torch.ops.haqmoe.w8a8_linear`` and the routed
experts of one MoE layer in one call, ``torch.ops.haqmoe.moe_w8a8`` (built on the former).

Built on first use with torch's C++ extension loader (g++ and ninja; ~10 s once, then loaded from
``<cache>/kernels/torch-VERSION-DIGEST``, one folder per source text and flags) and only on CPUs with
AVX512-VNNI. Anything missing (no compiler, another CPU,
``HAQMOE_KERNELS=0``) leaves ``w8a8_op()`` and ``moe_op()`` returning None and the int8 modules on
``torch._int_mm`` and per-expert Python: the kernels' outputs are bit-identical to those paths, so they are
a speed choice, never a numerics one.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from ...io import atomic_write_text
from ...paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("w8a8_cpu.cpp")
VERSION = 3  # of the ops' schemas and arithmetic: AOT packages that call them are keyed by it
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-ffp-contract=off",
          "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _wanted() -> bool:
    if os.environ.get("HAQMOE_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        return False
    try:  # torch exposes no VNNI query; the kernel is built for Linux x86 anyway
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {flag}" in flags for flag in ("avx512bw", "avx512vl", "avx512dq", "avx512_vnni"))


_OP: list = []  # [op or None] once resolved; a plain global, so traced code reads it as a constant


def w8a8_op():
    """The kernel's op, or None where it cannot run here (then callers use ``_int_mm``). Resolve it
    before tracing (``torch.compile``/``export``): a trace only reads what is resolved already."""
    if not _OP:
        if torch.compiler.is_compiling():
            return None
        _OP.append(_resolve())
    return _OP[0]


def moe_op():
    """The fused routed-experts op where the kernel runs here, else None (same resolution as ``w8a8_op``)."""
    return None if w8a8_op() is None else torch.ops.haqmoe.moe_w8a8


def _resolve():
    if not _wanted():
        return None
    if not hasattr(torch.ops.haqmoe, "w8a8_linear"):
        try:
            _build_and_load()
        except Exception as exc:  # no compiler / ninja / headers: the _int_mm path still works
            log.warning("haqmoe's int8 CPU kernel could not be built (%s); using torch._int_mm", exc)
            return None
        _register_fake()
    return torch.ops.haqmoe.w8a8_linear


def build_dir(source: Path = SOURCE, flags: tuple[str, ...] = (*_FLAGS, *_LDFLAGS)) -> Path:
    """The kernel's build folder: torch's version and a digest of the source text and compiler flags.

    Why the digest: torch's loader rebuilds whenever the ``build.ninja`` it writes changes. A folder
    named by the torch version alone was shared by every checkout on a machine, so two checkouts (or
    two versions of the kernel) rebuilt it in turn, ~10 s each, seen as a slow first prefill.
    """
    h = hashlib.blake2b(source.read_bytes(), digest_size=8)
    h.update("\0".join(flags).encode())
    return cache_dir() / "kernels" / f"torch-{torch.__version__}-{h.hexdigest()}"


def staged_source(build: Path, source: Path = SOURCE) -> Path:
    """The source copied into its build folder, the file the build compiles: ``build.ninja`` names its
    source by path, so compiling a checkout's own file would still rebuild when another checkout with
    the same text builds there. Written only when missing or different (its mtime drives ninja)."""
    staged = build / source.name
    text = source.read_text()
    if not staged.is_file() or staged.read_text() != text:
        atomic_write_text(staged, text)
    return staged


def _build_and_load() -> None:
    from torch.utils import cpp_extension  # only when building: it pulls in setuptools and ninja helpers

    build = build_dir()
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name="haqmoe_w8a8_cpu", sources=[str(staged_source(build))], extra_cflags=_FLAGS,
                       extra_ldflags=_LDFLAGS, build_directory=str(build), is_python_module=False,
                       verbose=False)


def _register_fake() -> None:
    """Shape functions for tracing (torch.compile, torch.export): defined with the ops' schemas."""

    @torch.library.register_fake("haqmoe::w8a8_linear")
    def _(x, w, w_scale, w_zero, colsum, bias, k, qmin, qmax, symmetric, residual=False):
        return x.new_empty(x.shape[0], w_scale.shape[0])

    @torch.library.register_fake("haqmoe::moe_w8a8")
    def _(x, top_k_index, top_k_weights, gate_up_w, gate_up_scale, gate_up_zero, gate_up_colsum, down_w,
          down_scale, down_zero, down_colsum, qmin, qmax, symmetric):
        return x.new_empty(x.shape)
