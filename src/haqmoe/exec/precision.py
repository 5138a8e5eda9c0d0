"""Device-aware precision (docs/design.md, Precision): how a W8A8 model's quantized modules execute.

Modes (all compute the same W8A8 function; they differ in speed and memory):

- ``fake``    — the ``QuantLinear``/``QuantExperts`` as stored: int8 weights only, dequantized on
                each call, activations quantize-dequantized. The accuracy reference, and the
                default: it keeps no float copy, so a model that fits as int8 stays so.
- ``dequant`` — CPU tier "dequantize once at load": fp32 weights only (int8 released).
- ``int8``    — real int8 GEMM (``torch._int_mm``), int8 weights only. ``real`` is an alias.
- ``auto``    — per weight shape, a micro-benchmark at load picks the faster of int8 and dequant
                on the device the model is on (the answer depends on the CPU's int8 dot-product
                support, on token counts, and on a GPU on kernel-launch overhead: eager int8 lost
                to dequant on an H200 at SmolLM2's shapes, bench/results/int8_cuda.md — so it is
                measured, not assumed).

Per-group weights have no per-channel scale for the int8 GEMM epilogue: they fall back to dequant
(reported in ``ConversionReport.fallbacks``); weight-only (no activation quantization) too.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..errors import HaqmoeError
from ..models.adapters import EXPERTS, adapter_for, get_module, set_module
from ..quant.modules import QuantExperts, QuantLinear, QuantVocab, quantize_vocabulary, vocab_names
from ..quant.quantizer import QuantSpec
from .int8 import (ACT_CACHE, DequantExperts, DequantLinear, Int8Experts, Int8Linear, Int8LinearGroup, Int8Sibling,
                   cpu_int8_path, int8_head)

ExecMode = Literal["fake", "dequant", "int8", "auto"]
EXEC_MODES: tuple[str, ...] = ("fake", "dequant", "int8", "auto")
ALIASES = {"real": "int8", "dequant-once": "dequant", "fake-quant": "fake"}


def normalize_mode(mode: str) -> ExecMode:
    m = ALIASES.get(mode, mode)
    if m not in EXEC_MODES:
        raise HaqmoeError(f"unknown execution mode '{mode}' (choose from {', '.join(EXEC_MODES)}, real)")
    return m  # type: ignore[return-value]


@dataclass(frozen=True)
class AutoConfig:
    """Micro-benchmark settings. ``tokens``: the token counts that matter (1 = decode, a prefill
    chunk); a shape goes int8 when the geometric mean of int8/dequant time ratios is below 1."""

    tokens: tuple[int, ...] = (1, 128)
    reps: int = 15
    warmup: int = 3
    seed: int = 0


@dataclass
class ShapeChoice:
    kind: str  # "linear" or "experts"
    shape: str
    mode: str
    int8_us: dict[int, float] = field(default_factory=dict)
    dequant_us: dict[int, float] = field(default_factory=dict)


@dataclass
class ConversionReport:
    mode: str
    device: str
    counts: dict[str, int] = field(default_factory=dict)  # chosen module mode -> count
    fallbacks: list[str] = field(default_factory=list)
    choices: list[ShapeChoice] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        parts = [f"{k}: {v}" for k, v in sorted(self.counts.items())]
        text = f"exec {self.mode} on {self.device} ({', '.join(parts) or 'nothing quantized'})"
        if self.fallbacks:
            text += (f"; {len(self.fallbacks)} module(s) kept a slower exact path (dequant, or fake-quant for "
                     "experts with static or sub-8-bit activations; per-group or weight-only weights)")
        if self.counts.get("int8") and self.device == "cpu":
            text += f"; int8 products on {cpu_int8_path()}"
        return text


def _device(m: nn.Module) -> torch.device:
    return (m.gate[0] if isinstance(m, QuantExperts) else m).qweight.device


def _per_token(a: QuantSpec) -> bool:
    """Dynamic activations quantized per row, as the int8 GEMM and the converted experts do."""
    return a.dynamic and a.granularity in ("token", "channel")


def _int8_capable(m: nn.Module) -> bool:
    lin = m.gate[0] if isinstance(m, QuantExperts) else m
    a = lin.a_spec
    if a is None or a.bits != 8 or lin.w_spec.bits != 8 or lin.w_spec.granularity == "group":
        return False
    return _per_token(a) if isinstance(m, QuantExperts) or a.dynamic else True


def _dequant_capable(m: nn.Module) -> bool:
    """A linear always converts; experts only with dynamic per-token 8-bit activations (the converted
    experts' own quantizer), the others keep their fake-quant module: the same function, slower."""
    a = m.gate[0].a_spec if isinstance(m, QuantExperts) else None
    return not isinstance(m, QuantExperts) or (a is not None and a.bits == 8 and _per_token(a))


def _median_us(fn, x: torch.Tensor, cfg: AutoConfig) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(cfg.warmup):
        ACT_CACHE.clear()
        fn(x)
    times = []
    for _ in range(cfg.reps):
        ACT_CACHE.clear()  # the cache would hide the activation quantization cost
        sync()
        t = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


@torch.inference_mode()
def _bench_linear(ql: QuantLinear, cfg: AutoConfig) -> ShapeChoice:
    int8, deq = Int8Linear.from_quant_linear(ql), DequantLinear.from_quant_linear(ql)
    g = torch.Generator().manual_seed(cfg.seed)
    ch = ShapeChoice("linear", f"{ql.in_features}x{ql.out_features}", "int8")
    for t in cfg.tokens:
        x = torch.randn(t, ql.in_features, generator=g).to(ql.qweight.device)
        ch.int8_us[t], ch.dequant_us[t] = _median_us(int8, x, cfg), _median_us(deq, x, cfg)
    ch.mode = _pick(ch)
    return ch


@torch.inference_mode()
def _bench_experts(qe: QuantExperts, cfg: AutoConfig) -> ShapeChoice:
    """Both variants of one expert (gate/up then down), on the tokens routed to it."""
    int8, deq = Int8Experts.from_quant_experts(_first_expert(qe)), DequantExperts.from_quant_experts(_first_expert(qe))
    g = torch.Generator().manual_seed(cfg.seed)
    ch = ShapeChoice("experts", f"{qe.hidden_dim}x{qe.intermediate_dim}", "int8")
    dev = _device(qe)
    for t in cfg.tokens:
        x = torch.randn(t, qe.hidden_dim, generator=g).to(dev)
        idx, w = torch.zeros(t, 1, dtype=torch.long, device=dev), torch.ones(t, 1, device=dev)
        ch.int8_us[t] = _median_us(lambda h: int8(h, idx, w), x, cfg)
        ch.dequant_us[t] = _median_us(lambda h: deq(h, idx, w), x, cfg)
    ch.mode = _pick(ch)
    return ch


def _first_expert(qe: QuantExperts) -> nn.Module:
    """A one-expert view of ``qe`` (shares its modules), for benchmarking one expert."""
    view = nn.Module()
    view.num_experts, view.hidden_dim, view.intermediate_dim, view.glu = 1, qe.hidden_dim, qe.intermediate_dim, qe.glu
    view.gate, view.up, view.down = qe.gate[:1], qe.up[:1], qe.down[:1]
    return view


def _pick(ch: ShapeChoice) -> str:
    logs = [math.log(ch.int8_us[t] / ch.dequant_us[t]) for t in ch.int8_us]
    return "int8" if sum(logs) < 0 else "dequant"


def _shape_key(m: nn.Module) -> tuple:
    if isinstance(m, QuantExperts):
        return ("experts", m.hidden_dim, m.intermediate_dim, m.gate[0].w_spec, m.gate[0].a_spec)
    return ("linear", m.in_features, m.out_features, m.bias is not None, m.w_spec, m.a_spec)


def _convert_one(m: nn.Module, mode: str) -> nn.Module:
    if isinstance(m, QuantExperts):
        return Int8Experts.from_quant_experts(m) if mode == "int8" else DequantExperts.from_quant_experts(m)
    return Int8Linear.from_quant_linear(m) if mode == "int8" else DequantLinear.from_quant_linear(m)


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level quantized modules (a QuantExperts' own QuantLinears are converted with it)."""
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, QuantExperts):
            inside.append(name)
            out.append((name, m))
        elif isinstance(m, QuantLinear):
            out.append((name, m))
    return out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _clear_cache_hook(module: nn.Module, args) -> None:
    if not torch.compiler.is_compiling():
        ACT_CACHE.clear()  # drop the previous forward's activation (and its strong reference)


def int8_experts(experts: nn.Module) -> nn.Module:
    """``experts`` on the int8 GEMM where its recipe allows, else unchanged (fake-quant). What the
    collaborative engine's CPU tier runs whatever the mode: its GPU tier reads the same int8 host
    copy (``runtime.store``), where a dequantized fp32 tier would be a second, 4x larger copy."""
    if isinstance(experts, QuantExperts) and _int8_capable(experts):
        return Int8Experts.from_quant_experts(experts)
    return experts


def convert(model: nn.Module, mode: str = "auto", auto: AutoConfig | None = None,
            int8_lm_head: bool = False) -> ConversionReport:
    """Replace the model's quantized modules in place by the executors of ``mode``.

    ``int8_lm_head``: also quantize a float lm_head to int8 rows (symmetric, per row) shared with a
    tied input embedding. Off by default: it is not part of the W8A8 recipe being evaluated (lm_head
    stays fp32 there, as in every peer), but at decode the fp32 vocabulary matrix is a large share
    of the bytes read per token (SmolLM2: 21 % of parameters). A checkpoint quantized with
    ``--int8-lm-head`` already stores those rows; the int8 modes then run it on the int8 GEMM.
    """
    start = time.perf_counter()
    mode = normalize_mode(mode)
    targets = _targets(model)
    device = _device(targets[0][1]) if targets else torch.device("cpu")
    report = ConversionReport(mode, str(device))
    if mode == "fake":
        report.counts["fake"] = len(targets)
        return report
    decided: dict[tuple, str] = {}
    for name, m in targets:
        if not _int8_capable(m):
            chosen = "dequant" if _dequant_capable(m) else "fake"
            if mode != chosen:
                report.fallbacks.append(name)
        elif mode != "auto":
            chosen = mode
        else:
            key = _shape_key(m)
            if key not in decided:
                ch = _bench_experts(m, auto or AutoConfig()) if isinstance(m, QuantExperts) \
                    else _bench_linear(m, auto or AutoConfig())
                report.choices.append(ch)
                decided[key] = ch.mode
            chosen = decided[key]
        if chosen != "fake":
            _set(model, name, _convert_one(m, chosen).to(device))
        report.counts[chosen] = report.counts.get(chosen, 0) + 1
    if mode != "dequant":
        _fuse_siblings(model, report)
    stored = isinstance(model.get_output_embeddings(), QuantVocab)
    if (int8_lm_head or stored) and mode != "dequant":
        _int8_vocab(model, targets, report)
    if not getattr(model, "_haqmoe_act_cache_hook", False):
        model.register_forward_pre_hook(_clear_cache_hook)
        model._haqmoe_act_cache_hook = True
    report.seconds = time.perf_counter() - start
    return report


def _fuse_siblings(model: nn.Module, report: ConversionReport) -> None:
    """Each group of linears sharing one input (the adapter's LinearGroups: q/k/v, gate/up) whose
    members all run on the int8 GEMM with dynamic activations becomes one ``Int8LinearGroup``,
    registered on its block as ``int8_<group name>``."""
    try:
        adapter = adapter_for(model)
    except HaqmoeError:
        return  # an architecture without a description: linears stay separate
    for block in adapter.blocks(model):
        for g in adapter.groups(block):
            paths = [p for p in g.layers if p != EXPERTS]
            members = [get_module(block, p) for p in paths]
            if len(members) < 2 or not all(type(m) is Int8Linear and m.a_scale is None for m in members):
                continue
            if len({(m.in_features, m.a_spec, m.w.device) for m in members}) != 1:
                continue
            group = Int8LinearGroup(members)
            block.add_module(f"int8_{g.name}", group)
            for i, path in enumerate(paths):
                set_module(block, path, Int8Sibling(group, i))
            report.counts["fused-groups"] = report.counts.get("fused-groups", 0) + 1


def _int8_vocab(model: nn.Module, targets: list[tuple[str, nn.Module]], report: ConversionReport) -> None:
    """lm_head on the int8 GEMM (quantized here unless the checkpoint stores int8 rows)."""
    if not targets:
        raise HaqmoeError("--int8-lm-head needs a quantized model")
    lin = targets[0][1].gate[0] if isinstance(targets[0][1], QuantExperts) else targets[0][1]
    vocab = quantize_vocabulary(model)
    if lin.a_spec is None or lin.a_spec.bits != 8:  # no 8-bit activation recipe: it stays weight-only
        report.fallbacks.append(vocab_names(model)["head"])
        return
    model.set_output_embeddings(int8_head(vocab, lin.a_spec).to(vocab.q.device))
    report.counts["int8-lm-head"] = 1


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied embeddings, views)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


__all__ = ["AutoConfig", "ConversionReport", "ExecMode", "EXEC_MODES", "convert", "int8_experts", "normalize_mode",
           "weight_bytes"]
