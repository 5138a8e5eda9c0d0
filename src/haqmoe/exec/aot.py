"""Ahead-of-time compiled generation: one forward over a static KV cache, exported (``torch.export``) and
compiled to a C++ package (AOTInductor), run from a small Python loop.

Why: ``torch.compile`` decode still pays dynamo's guard evaluation, the graph's Python wrapper and
``generate``'s loop on every token; for SmolLM2 int8 that is ~5 of its ~18 ms (bench/results/
int8_breakdown.md). The package calls its kernels straight from C++: inductor's, and for the int8
products our fused op (``kernels``, through AOTInductor's proxy executor, ~2 us a call) or ``_int_mm``.

One program serves prefill and decode: the token dimension is dynamic (1 ... cache length), and
only the last position's logits are computed. The KV cache is state inside the package; a new prompt
overwrites it from position 0 and the causal mask over cache positions hides whatever an earlier,
longer generation left beyond the current position, so nothing is reset between prompts.

A package holds its own copy of the weights and is built once per (weights, cache length, versions):
3.5-5 min for SmolLM2-135M on 2 cores, cached under ``<cache>/aot``. Cache lengths come in 256-token
buckets (``compiled.cache_len``, shared with the engine's compiled decode).
MoE models export where every MoE block's routed experts run as one op: real int8 experts on haqmoe's
fused ``moe_w8a8`` (``int8.Int8Experts``: SiLU-gated, unbiased, a CPU with the kernel). The router's
softmax and top-k are tensor ops; the op takes the top-k ids and weights and returns their weighted sum
with a static shape, so nothing depends on which experts a token picks. Per-expert dispatch
(fake-quant or float experts, gpt-oss's clamped GLU) is data-dependent and does not export.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Iterator

import torch
import transformers
from torch import nn
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .. import __version__
from ..errors import HaqmoeError
from ..models.adapters import adapter_for
from ..paths import cache_dir
from . import kernels
from .compiled import cache_len, require_compiler
from .int8 import Int8Experts
from .kernels import w8a8_op

EXPORT_VERSION = 2  # bump when export_step changes what a package computes or how: old packages are then rebuilt


def package_key(model: nn.Module, max_len: int) -> str:
    """Digest of everything the package bakes in: weights and buffers, module types, config, cache
    length and the compiler stack's versions."""
    h = hashlib.blake2b(digest_size=16)
    meta = {"export": EXPORT_VERSION, "max_len": max_len, "torch": torch.__version__,
            "kernel": w8a8_op() is not None and kernels.VERSION,  # the package calls our op (else _int_mm)
            "transformers": transformers.__version__, "haqmoe": __version__,
            "config": model.config.to_json_string(use_diff=False),
            "modules": [type(m).__name__ for m in model.modules()]}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fused_experts(experts: nn.Module | None) -> bool:
    """Whether an MoE block's routed experts run as one exportable op (``Int8Experts.fused_kernel``)."""
    return isinstance(experts, Int8Experts) and experts.fused_kernel(torch.device("cpu")) is not None


def _check_exportable(model: nn.Module) -> None:
    if model.device.type != "cpu":
        raise HaqmoeError("ahead-of-time compiled generation runs on the CPU (load the model there)")
    spec = adapter_for(model)
    if not all(_fused_experts(spec.experts(b)) for b in spec.blocks(model) if spec.is_moe_block(b)):
        raise HaqmoeError("ahead-of-time compiled generation of a MoE model needs its experts on haqmoe's fused "
                          "int8 CPU op (--exec real, SiLU-gated experts without biases, a CPU with AVX512-VNNI): "
                          "per-expert dispatch is data-dependent and does not export (use `haqmoe run` or "
                          "`generate` without --aot)")
    require_compiler("cpu")
    w8a8_op()  # resolved (built, loaded) before tracing, which only reads it, and before loading a package


@contextmanager
def quiet_toolchain() -> Iterator[None]:
    """Silence warnings torch's own export and AOTInductor code raises about itself, which a user can
    neither act on nor tell from haqmoe's (the CLI prints every warning as "haqmoe: warning: ...").

    transformers' output-capturing hook is a global dynamo reports as a side effect (unused here);
    torch 2.13's pytree still checks ``isinstance(spec, LeafSpec)`` internally and warns that this
    is deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        yield


def export_step(model: nn.Module, max_len: int) -> torch.export.ExportedProgram:
    """The exported forward: (input_ids [1, T], cache_position [T]) -> last logits [1, 1, V], T dynamic."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class Step(TorchExportableModuleWithStaticCache):  # transformers' static-cache wrapper, last logits only
        def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
            for layer in self.static_cache.layers:
                layer.cumulative_length.copy_(cache_position[0])
            return self.model(input_ids=input_ids, attention_mask=None, past_key_values=self.static_cache,
                              use_cache=True, logits_to_keep=1).logits

    gen = model.generation_config
    saved = gen.cache_implementation, gen.use_cache
    gen.cache_implementation, gen.use_cache = "static", True  # the wrapper's precondition; restored below
    try:
        step = Step(model, batch_size=1, max_cache_len=max_len)
        tokens = torch.export.Dim("tokens", min=1, max=max_len)
        sample = min(8, max_len)
        with torch.no_grad(), quiet_toolchain():
            return torch.export.export(step, (), {"input_ids": torch.zeros(1, sample, dtype=torch.long),
                                                  "cache_position": torch.arange(sample)},
                                       dynamic_shapes={"input_ids": {1: tokens}, "cache_position": {0: tokens}},
                                       strict=True)
    finally:
        gen.cache_implementation, gen.use_cache = saved


def build_package(model: nn.Module, max_len: int, path: Path) -> Path:
    """Export and compile the step into ``path`` (written whole or not at all)."""
    _check_exportable(model)
    program = export_step(model, max_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:  # same name: the archive's root
        built = Path(tmp) / path.name
        with quiet_toolchain():
            torch._inductor.aoti_compile_and_package(program, package_path=str(built))
        os.replace(built, path)
    return path


@dataclass
class AotGenerator:
    """A loaded package and the loop around it (greedy or temperature/top-p sampling, streaming)."""

    runner: Callable
    max_len: int
    path: Path

    @classmethod
    def for_model(cls, model: nn.Module, tokens: int, log: Callable[[str], None] = lambda s: None,
                  root: Path | None = None) -> "AotGenerator":
        """The package for ``model`` with room for ``tokens`` (prompt + new), built on first use."""
        _check_exportable(model)
        max_len = cache_len(tokens)
        path = (root or cache_dir() / "aot") / f"{package_key(model, max_len)}.pt2"
        if not path.exists():
            log(f"building the ahead-of-time package (one-off; minutes): {path}")
            build_package(model, max_len, path)
        try:
            runner = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # a truncated or foreign file: say which, rebuilding would hide a real fault
            raise HaqmoeError(f"could not load the ahead-of-time package {path} ({exc}); delete it to rebuild")
        return cls(runner, max_len, path)

    def logits(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [V] after feeding ``ids`` [1, T] at cache positions ``start`` ... ``start + T - 1``."""
        n = ids.shape[1]
        if start + n > self.max_len:
            raise HaqmoeError(f"{start + n} tokens do not fit the package's cache of {self.max_len}")
        out = self.runner(input_ids=ids, cache_position=torch.arange(start, start + n))
        return (out[0] if isinstance(out, (tuple, list)) else out)[0, -1]

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float = 1.0, eos_token_id: int | list[int] | None = None, streamer=None) -> torch.Tensor:
        """Prompt and new tokens [1, T + new], as ``model.generate`` returns them (stops after an EOS);
        ``temperature`` > 0 samples, warped in transformers' order (temperature, top-k, top-p)."""
        n = ids.shape[1]
        if n + max_new_tokens > self.max_len:
            raise HaqmoeError(f"prompt ({n}) + new tokens ({max_new_tokens}) exceed the package's cache "
                              f"of {self.max_len}")
        warp = LogitsProcessorList()
        if temperature > 0:
            warp.append(TemperatureLogitsWarper(temperature))
            warp += [TopKLogitsWarper(top_k)] if top_k else []
            warp += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        stop = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        if streamer is not None:
            streamer.put(ids)
        out, last = [], self.logits(ids, 0)
        for i in range(max_new_tokens):
            if temperature > 0:
                probs = warp(ids, last[None]).softmax(-1)
                tok = int(torch.multinomial(probs, 1))
            else:
                tok = int(last.argmax())
            out.append(tok)
            if streamer is not None:
                streamer.put(torch.tensor([tok]))
            if tok in stop or i + 1 == max_new_tokens:
                break
            last = self.logits(torch.tensor([[tok]]), n + i)
        if streamer is not None:
            streamer.end()
        return torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], dim=1)
