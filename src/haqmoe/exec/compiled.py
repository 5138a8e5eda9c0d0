"""Compiled decode: ``torch.compile`` of the decode step over a static KV cache.

Why: eager decode of a small model is dispatch-bound, not bandwidth-bound (SmolLM2 int8: ~4,700 aten
calls per token, ~32 ms where its 137 MB of int8 weights stream in ~11 ms through ``_int_mm``).
Inductor fuses each block's quantization, epilogues, norms and rotary math into a few C++ kernels
around the ``_int_mm`` calls. The int8 modules take a tensor-only path while traced (no identity
caches, no Python-number token parameters), so one graph holds the whole step.

transformers compiles only the decode steps (prefill stays eager, any prompt length) when the cache is
static and a ``CompileConfig`` is given; on CPU it needs the (private) ``_compile_all_devices`` switch.
The first generation pays the compile (~20-120 s for SmolLM2 on 2 cores; inductor needs a C++
compiler) and a new ``max_cache_len`` compiles again, so keep it fixed across calls. MoE expert
dispatch is data-dependent (Python expert ids) and breaks the graph once per layer: it runs, but
slower than eager (upcycled MoE: 15.5 vs 24.3 tok/s), so MoE models get a warning.

Same function as the eager int8 model up to float rounding (inductor may fuse float ops in another
order). A W8A8 model amplifies such rounding where an activation sits on a rounding boundary, so
greedy tokens can part where two logits nearly tie (SmolLM2: identical logits to ~1e-7 for 12 steps,
first different token at step 16 of 24, where the top-2 margin was 0.005) — the same noise floor as
real int8 vs fake-quant.
"""

from __future__ import annotations

import shutil
import warnings

from torch import nn
from transformers import CompileConfig, StaticCache

from ..errors import HaqmoeError
from ..quant.modules import QuantExperts
from .int8 import GroupedExperts
from .kernels import w8a8_op


def compiler_available() -> bool:
    """Inductor's CPU backend builds C++ kernels at run time."""
    return shutil.which("g++") is not None or shutil.which("c++") is not None


CACHE_BUCKET = 256


def cache_len(tokens: int) -> int:
    """The static KV cache length (a multiple of ``CACHE_BUCKET``) that holds ``tokens``: compiled code
    depends on the cache's length, so nearby generation lengths share it (attention reads the whole
    static cache every step, so a longer bucket would cost decode time)."""
    return max(1, -(-tokens // CACHE_BUCKET)) * CACHE_BUCKET


def require_compiler(device_type: str) -> None:
    """Fail before compiling, with the reason, where inductor could not build its CPU kernels."""
    if device_type == "cpu" and not compiler_available():
        raise HaqmoeError("compiled decode on the CPU needs a C++ compiler (g++) for torch.compile's kernels")


def compiled_decode_kwargs(model: nn.Module, max_cache_len: int) -> dict:
    """Keyword arguments for ``model.generate`` that run its decode steps compiled.

    ``max_cache_len`` bounds prompt + new tokens; a fresh cache is needed per generation (call again).
    """
    require_compiler(model.device.type)
    w8a8_op()  # resolved before tracing: a trace only reads it
    if any(isinstance(m, (GroupedExperts, QuantExperts)) for m in model.modules()):
        warnings.warn("compiled decode of a MoE model: expert dispatch breaks the graph once per layer and "
                      "decode gets slower than eager (use it for dense models)", stacklevel=2)
    cfg = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    cfg._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
    cache = StaticCache(model.config, max_cache_len=max_cache_len)
    return {"past_key_values": cache, "compile_config": cfg}
