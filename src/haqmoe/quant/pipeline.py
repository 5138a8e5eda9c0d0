"""The sequential block-by-block quantization pipeline every calibrated method runs through
(docs/design.md, The block-by-block pipeline).

1. Run the calibration windows up to decoder block 0 and keep its inputs (and the kwargs the model
   passes each block: position embeddings, masks, which differ per block where attention types
   alternate), batch by batch.
2. For each block, in order: run the (still FP) block on its inputs with hooks that accumulate the
   statistics of every linear group's input (``adapter.groups``: one hook per group, since the
   layers of a group share the input) and, for MoE blocks, per-expert statistics of the tokens the
   router sends to each expert (their Hessians come later, see below); smooth every group (folding 1/s into its producer); quantize every
   linear (GPTQ with the smoothed Hessian, or RTN); swap in ``QuantLinear``/``QuantExperts``; run the
   QUANTIZED block to produce the next block's inputs, so later blocks calibrate on what they will
   really see.

Only the block being worked on and the calibration activations are touched at a time. With a
``BlockLoader`` (``quant.stream``) that is also all that is in memory: each block is loaded from the
checkpoint's shards before its step and released after its shard is written; the result is
bit-identical to the in-memory run. Seeded and deterministic (token samples for the grid search
come from a seeded generator).

MoE: the router(s) and all experts' gate/up share one smoothing vector (routers are scaled by s,
so routing is unchanged); each expert's down projection gets its own vector, folded into that
expert's up rows (skipped, reported, where the expert function is not linear in up: gpt-oss's
clamped SwiGLU). Each expert's Hessians (gate/up input, down input) come from the tokens routed to
it and are built AFTER smoothing, a few experts at a time: one pass of the smoothed block over the
calibration inputs (stopped at the experts) accumulates XᵀX for as many experts as fit
``hessian_budget`` bytes, those experts are quantized, and their Hessians freed. Mixtral's down
projection alone has a 14336² fp64 Hessian (1.6 GB): eight at once would not fit. An expert that saw
fewer than ``min_expert_tokens`` calibration tokens is quantized by RTN (warning, reported): a
Hessian from a handful of tokens is mostly damping, and zeros would silently break the model.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm import tqdm

from ..errors import HaqmoeError
from ..models.adapters import EXPERTS, ArchSpec, FusedExperts, LinearGroup, expert_glu, get_module, set_module
from .config import QuantConfig
from .gptq import GPTQConfig, gptq_quantize
from .modules import QuantExperts, QuantLinear
from .quantizer import QuantSpec, compute_qparams
from .smooth import (SmoothConfig, SmoothProblem, SmoothSkip, fold_prev, group_tie, scale_columns,
                     search_scales)
from .stats import InputStats


HESSIAN_BUDGET = 2**30  # bytes of expert Hessians alive at once (a pass holds at least one expert's)


@dataclass(frozen=True)
class PipelineConfig:
    quant: QuantConfig
    smooth: SmoothConfig | None = None
    gptq: GPTQConfig | None = None
    batch_size: int = 8  # calibration windows per block forward
    search_tokens: int = 1024  # sampled tokens the smoothing loss is evaluated on
    min_expert_tokens: int = 32
    seed: int = 0
    hessian_budget: int = HESSIAN_BUDGET


@dataclass
class QuantReport:
    seconds: float = 0.0
    calib_tokens: int = 0
    groups: list[dict] = field(default_factory=list)  # per smoothed group: block, name, exponent, stat
    fallbacks: list[str] = field(default_factory=list)  # experts quantized by RTN for lack of tokens

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "calib_tokens": self.calib_tokens, "groups": self.groups,
                "fallbacks": self.fallbacks}


class _Stop(Exception):
    pass


class BlockLoader(Protocol):
    """Where blocks come from when the model is not all in memory (``quant.stream.LazyBlocks``)."""

    def inputs_captured(self) -> None:
        """Block 0's calibration inputs exist (or none are needed): the weights outside the blocks
        are not read again until every block is done and may leave memory meanwhile."""

    def load(self, i: int, block: nn.Module) -> None: ...

    def release(self, i: int, block: nn.Module) -> None: ...


# ------------------------------------------------------------------ checks and capture
def check_finite(module: nn.Module, prefix: str = "") -> None:
    """Refuse NaN/Inf weights up front, naming the first bad tensor (``prefix``: the module's path
    in the model, for the message). Tensors still on ``meta`` (not loaded) are skipped."""
    for name, p in module.named_parameters():
        if p.device.type != "meta" and not all_finite(p):
            raise HaqmoeError(f"weight '{prefix}{name}' contains NaN/Inf values: the model is corrupt")


def all_finite(t: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``torch.isfinite(t).all()`` in slices: isfinite builds |t| and two masks, 2x the tensor's size
    (6 GB for Mixtral's fused experts in fp32)."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def check_token_ids(ids: torch.Tensor, model: nn.Module) -> None:
    """Ids outside the embedding table would crash deep in the model (or read garbage rows)."""
    vocab = int(model.get_input_embeddings().num_embeddings)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise HaqmoeError(f"calibration token ids span [{int(ids.min())}, {int(ids.max())}] but the model's "
                          f"vocabulary has {vocab} entries: tokenizer and model do not match")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: ArchSpec, calib: torch.Tensor, batch_size: int
                         ) -> tuple[list[tuple[torch.Tensor, tuple, dict]], list[list[tuple[tuple, dict]]]]:
    """Inputs (hidden states, extra args, kwargs) of decoder block 0 for each calibration batch, and
    the (extra args, kwargs) the model passes each block, ``[block][batch]``.

    The kwargs differ between blocks where layers differ in attention type: gpt-oss alternates
    sliding-window and full attention, each with its own mask; block 0's mask on every block would
    calibrate the full-attention blocks on the wrong function. So the model's forward runs once per
    batch with every block's forward replaced by a recorder that passes the hidden states on (no
    block computes, none needs its weights); the last one stops the forward."""
    blocks = adapter.blocks(model)
    cache: list[tuple[torch.Tensor, tuple, dict]] = []
    per_block: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]

    def recorder(i: int):
        def forward(*args, **kwargs):
            kwargs = dict(kwargs)
            hs = args[0] if args else kwargs.pop("hidden_states")
            for k in ("past_key_values", "past_key_value"):
                kwargs.pop(k, None)
            per_block[i].append((tuple(args[1:]), kwargs))
            if i == 0:
                cache.append((hs.detach(), tuple(args[1:]), kwargs))
            if i == len(blocks) - 1:
                raise _Stop
            return hs
        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # an instance attribute: shadows the class's forward
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[i: i + batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        for block in blocks:
            del block.forward
    return cache, per_block


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, tuple, dict]]) -> list[torch.Tensor]:
    outs = []
    for hs, args, kwargs in inputs:
        out = block(hs, *args, **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


# ------------------------------------------------------------------ statistics of one block
@dataclass
class ExpertStats:
    """Each routed expert's input statistics: at gate/up (hidden) and at the down projection (ffn)."""

    gate_up: list[InputStats]
    down: list[InputStats]

    @classmethod
    def for_experts(cls, experts: nn.Module, hessian: bool = False) -> "ExpertStats":
        n, hidden, inter = FusedExperts.dims(experts)
        return cls([InputStats(hidden, hessian) for _ in range(n)], [InputStats(inter, hessian) for _ in range(n)])

    @torch.no_grad()
    def add(self, experts: nn.Module, glu: nn.Module, hs: torch.Tensor, idx: torch.Tensor,
            in_sample: torch.Tensor | None = None) -> None:
        """Tokens ``hs`` [n, hidden] routed by ``idx`` [n, k]: each expert's statistics from the tokens its
        router sends it (``in_sample``: which rows also go to the sampled rows)."""
        for e in range(len(self.gate_up)):
            tok = torch.where((idx == e).any(dim=-1))[0]
            if tok.numel() == 0:
                continue
            x = hs[tok]
            rows = torch.where(in_sample[tok])[0] if in_sample is not None else None
            self.gate_up[e].add(x, rows)
            self.down[e].add(FusedExperts.get(experts, e).intermediate(x, glu), rows)


class BlockCollector:
    """Hooks that accumulate each group's input statistics during one pass over a block."""

    def __init__(self, block: nn.Module, groups: list[LinearGroup], adapter: ArchSpec, hessian: bool):
        self.stats: dict[str, InputStats] = {}
        self.experts: ExpertStats | None = None
        self._rows: torch.Tensor | None = None  # sampled token rows of the current batch
        self._handles = []
        for g in groups:
            path = next((p for p in g.layers if p != EXPERTS), None)
            if EXPERTS in g.layers:
                path = g.routers[0] if g.routers else path
            mod = get_module(block, path)
            width = mod.weight.shape[1]
            self.stats[g.name] = InputStats(width, hessian)
            self._handles.append(mod.register_forward_pre_hook(self._group_hook(g.name)))
        ex = adapter.experts(block)
        self._glu = expert_glu(ex) if ex is not None else None
        if ex is not None:
            self.experts = ExpertStats.for_experts(ex)  # Hessians: later, a few experts at a time
            self._handles.append(ex.register_forward_pre_hook(self._expert_hook, with_kwargs=True))

    def _group_hook(self, name: str):
        def hook(_mod, args):
            self.stats[name].add(args[0], self._rows)
        return hook

    def _expert_hook(self, mod, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = list(args) + [kwargs[k] for k in names[len(args):] if k in kwargs]
        hs, idx = vals[0].reshape(-1, vals[0].shape[-1]).float(), vals[1]
        in_sample = torch.zeros(hs.shape[0], dtype=torch.bool)
        if self._rows is not None:
            in_sample[self._rows] = True
        assert self.experts is not None
        self.experts.add(mod, self._glu, hs, idx, in_sample)

    @torch.no_grad()
    def collect(self, block: nn.Module, inputs, search_tokens: int, gen: torch.Generator) -> None:
        per_batch = math.ceil(search_tokens / max(len(inputs), 1))
        try:
            for hs, args, kwargs in inputs:
                tokens = hs.shape[0] * hs.shape[1] if hs.dim() == 3 else hs.shape[0]
                self._rows = torch.randperm(tokens, generator=gen)[: min(per_batch, tokens)].sort().values
                block(hs, *args, **kwargs)
        finally:
            self._rows = None
            for h in self._handles:
                h.remove()


# ------------------------------------------------------------------ smoothing a block
def _group_weights(block: nn.Module, group: LinearGroup) -> list[torch.Tensor]:
    return [get_module(block, p).weight for p in group.layers if p != EXPERTS]


@torch.no_grad()
def apply_group_smoothing(block: nn.Module, group: LinearGroup, adapter: ArchSpec, s_free: torch.Tensor,
                          s_full: torch.Tensor) -> None:
    """Fold 1/s into the group's producer, s into its linears, experts' gate/up and routers."""
    fold_prev(get_module(block, group.prev_op), s_free)
    for w in _group_weights(block, group):
        scale_columns(w, s_full)
    if EXPERTS in group.layers:
        FusedExperts.scale_inputs(adapter.experts(block), s_full)
    for r in group.routers:
        scale_columns(get_module(block, r).weight, s_full)


@torch.no_grad()
def apply_expert_down_smoothing(experts: nn.Module, e: int, s: torch.Tensor) -> None:
    """One expert's down input: 1/s into its up rows and up bias (exact through act(gate)·up, which
    is linear in up), s into down's columns. Refused (``SmoothSkip``) for an expert function that
    is not linear in up: the fold would change the model."""
    glu = expert_glu(experts)
    if not glu.linear_in_up:
        raise SmoothSkip(f"{type(glu).__name__} is not linear in up: no scale folds into the up rows")
    w = FusedExperts.get(experts, e)  # views: written in place
    w.up.div_(s[:, None].to(w.up.dtype))
    if w.up_bias is not None:
        w.up_bias.div_(s.to(w.up_bias.dtype))
    w.down.mul_(s.to(w.down.dtype))


@torch.no_grad()
def smooth_block(block: nn.Module, groups: list[LinearGroup], adapter: ArchSpec, col: BlockCollector,
                 cfg: PipelineConfig, config, block_idx: int, report: QuantReport) -> None:
    """Choose and fold a smoothing vector for every group of the block (FP weights, in place)."""
    assert cfg.smooth is not None
    w_spec, a_spec = cfg.quant.weights, cfg.quant.acts
    experts = adapter.experts(block)
    for g in groups:
        st = col.stats[g.name]
        prev = get_module(block, g.prev_op)
        dense = _group_weights(block, g)
        terms = [(torch.cat(dense).float(), st.sample())] if dense else []
        if EXPERTS in g.layers:
            assert col.experts is not None and experts is not None
            terms += [(FusedExperts.gate_up(experts, e).float(), col.experts.gate_up[e].sample())
                      for e in range(FusedExperts.count(experts))]
        try:
            if g.act is not None and getattr(config, g.act, None) != "relu":
                raise SmoothSkip(f"{getattr(config, g.act, None)} between {g.prev_op} and {g.name} does not "
                                 "commute with the scales (only ReLU does)")
            tie = group_tie(prev, st.dim, config)
            problem = SmoothProblem(terms, st.stat_dict(), tie)
            res = search_scales(problem, cfg.smooth, w_spec, a_spec)
            s_free = res.s_free
            s_full = problem.to_full(s_free)
            if torch.equal(s_free, torch.ones_like(s_free)):
                report.groups.append({"block": block_idx, "group": g.name, "exponent": 0.0, "stat": None})
                continue
            apply_group_smoothing(block, g, adapter, s_free, s_full)
        except SmoothSkip as exc:
            report.groups.append({"block": block_idx, "group": g.name, "skipped": str(exc)})
            continue
        if EXPERTS in g.layers:
            for e_stats in col.experts.gate_up:
                e_stats.rescale(s_full)
        st.rescale(s_full)
        entry = {"block": block_idx, "group": g.name, "exponent": res.exponent, "stat": res.stat}
        if res.loss_identity:
            entry["loss_ratio"] = min(res.losses) / res.loss_identity
        report.groups.append(entry)
    if experts is not None and col.experts is not None:
        _smooth_expert_down(experts, col.experts, cfg, w_spec, a_spec, block_idx, report)


def _smooth_expert_down(experts: nn.Module, stats: ExpertStats, cfg: PipelineConfig, w_spec: QuantSpec,
                        a_spec: QuantSpec | None, block_idx: int, report: QuantReport) -> None:
    """Each expert's down projection: its own vector, folded into that expert's up rows."""
    glu = expert_glu(experts)
    if not glu.linear_in_up:
        report.groups.append({"block": block_idx, "group": "experts_down", "skipped":
                              f"{type(glu).__name__} is not linear in up: no scale folds into the up rows"})
        return
    exps = []
    for e, st in enumerate(stats.down):
        if st.count == 0:
            continue
        problem = SmoothProblem([(FusedExperts.get(experts, e).down.float(), st.sample())], st.stat_dict())
        res = search_scales(problem, cfg.smooth, w_spec, a_spec)
        s = res.s_free
        if torch.equal(s, torch.ones_like(s)):
            continue
        apply_expert_down_smoothing(experts, e, s)
        st.rescale(s)
        exps.append(res.exponent)
    report.groups.append({"block": block_idx, "group": "experts_down", "exponent":
                          sum(exps) / len(exps) if exps else 0.0, "stat": cfg.smooth.stat})


# ------------------------------------------------------------------ quantizing a block
def _static_range(lin: QuantLinear, lo: torch.Tensor, hi: torch.Tensor) -> None:
    spec = lin.a_spec
    if spec is None or spec.dynamic:
        return
    scale, zero = compute_qparams(torch.stack([lo.min(), hi.max()]), QuantSpec(spec.bits, spec.symmetric,
                                                                                 "tensor", dynamic=False))
    lin.a_scale.copy_(scale.reshape(1, 1))
    lin.a_zero.copy_(zero.reshape(1, 1))


def _quantize_weight(lin: QuantLinear, weight: torch.Tensor, bias: torch.Tensor | None,
                     st: InputStats | None, cfg: PipelineConfig, xtx: torch.Tensor | None = None,
                     consume: bool = False) -> None:
    """GPTQ with the input's Hessian (``xtx``, else the statistics' own) where there is one, else RTN.
    ``consume``: ``xtx`` is used for this weight only and may be overwritten."""
    spec = cfg.quant.weights
    xtx = xtx if xtx is not None else (st.xtx if st is not None else None)
    if cfg.gptq is not None and st is not None and xtx is not None and st.count > 0:
        res = gptq_quantize(weight, xtx, spec, cfg.gptq, st.absmax, consume=consume)
        lin.set_quantized(res.qweight, res.scale, res.zero, bias)
    else:
        ref = QuantLinear.from_weight(weight.detach(), bias, spec, None)
        lin.set_quantized(ref.qweight, ref.w_scale, ref.w_zero, bias)
    if st is not None:
        _static_range(lin, st.lo, st.hi)


def make_quant_linear(linear: nn.Linear, st: InputStats | None, cfg: PipelineConfig) -> QuantLinear:
    w = linear.weight.detach()
    q = QuantLinear(w.shape[1], w.shape[0], linear.bias is not None, cfg.quant.weights, cfg.quant.acts, w.dtype)
    _quantize_weight(q, w, None if linear.bias is None else linear.bias.detach(), st, cfg)
    return q


def expert_batches(experts: nn.Module, budget: int) -> list[list[int]]:
    """Experts grouped so that each group's fp64 Hessians (gate/up input H², down input I²) fit
    ``budget`` bytes (a group holds at least one expert)."""
    n, hidden, inter = FusedExperts.dims(experts)
    one = (hidden ** 2 + inter ** 2) * 8
    per = max(1, budget // one)
    return [list(range(i, min(i + per, n))) for i in range(0, n, per)]


@torch.no_grad()
def expert_hessians(block: nn.Module, adapter: ArchSpec, inputs, wanted: list[int]) -> dict[int, tuple]:
    """XᵀX of the gate/up inputs and of the down inputs of the ``wanted`` experts, over the tokens
    routed to each: one pass of the block over the calibration inputs, stopped at the experts module
    (the experts themselves do not run)."""
    experts = adapter.experts(block)
    _, hidden, inter = FusedExperts.dims(experts)
    glu = expert_glu(experts)
    acc = {e: (torch.zeros(hidden, hidden, dtype=torch.float64), torch.zeros(inter, inter, dtype=torch.float64))
           for e in wanted}

    def hook(mod, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        vals = list(args) + [kwargs[k] for k in names[len(args):] if k in kwargs]
        hs, idx = vals[0].reshape(-1, vals[0].shape[-1]).float(), vals[1]
        for e in wanted:
            tok = torch.where((idx == e).any(dim=-1))[0]
            if tok.numel() == 0:
                continue
            x = hs[tok]
            z = FusedExperts.get(mod, e).intermediate(x, glu)
            acc[e][0].add_((x.T @ x).double())
            acc[e][1].add_((z.T @ z).double())
        raise _Stop

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for hs, args, kwargs in inputs:
            try:
                block(hs, *args, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc


def quantize_experts(block: nn.Module, adapter: ArchSpec, inputs, stats: ExpertStats | None,
                     router_stats: InputStats | None, cfg: PipelineConfig, block_idx: int,
                     report: QuantReport) -> QuantExperts:
    experts = adapter.experts(block)
    q = QuantExperts.like(experts, cfg.quant.weights, cfg.quant.acts)
    down_lo = min((float(s.lo.min()) for s in stats.down if s.count), default=0.0) if stats else 0.0
    down_hi = max((float(s.hi.max()) for s in stats.down if s.count), default=0.0) if stats else 0.0
    for batch in expert_batches(experts, cfg.hessian_budget):
        hess = expert_hessians(block, adapter, inputs, batch) if cfg.gptq is not None and stats else {}
        for e in batch:
            w = FusedExperts.get(experts, e)
            gu, dn = (stats.gate_up[e], stats.down[e]) if stats else (None, None)
            h_gu, h_dn = hess.pop(e, (None, None))
            enough = gu is not None and gu.count >= cfg.min_expert_tokens
            if not enough and stats is not None:
                msg = (f"block {block_idx} expert {e}: {gu.count if gu else 0} calibration tokens "
                       f"(< {cfg.min_expert_tokens}); quantized by RTN")
                warnings.warn(msg, stacklevel=2)
                report.fallbacks.append(msg)
            for lin, weight, bias, st, h in ((q.gate[e], w.gate, w.gate_bias, gu, h_gu),
                                             (q.up[e], w.up, w.up_bias, gu, h_gu),
                                             (q.down[e], w.down, w.down_bias, dn, h_dn)):
                _quantize_weight(lin, weight, bias, st if enough else None, cfg, h, consume=st is dn)
                if not enough:  # static ranges: all-token ranges of the block instead
                    if st is gu and router_stats is not None:
                        _static_range(lin, router_stats.lo, router_stats.hi)
                    elif st is dn:
                        _static_range(lin, torch.tensor(down_lo), torch.tensor(down_hi))
            del h_gu, h_dn
    return q


@torch.no_grad()
def quantize_block(block: nn.Module, groups: list[LinearGroup], adapter: ArchSpec, col: BlockCollector,
                   cfg: PipelineConfig, block_idx: int, report: QuantReport, inputs) -> None:
    """Replace the block's linears by quantized ones. The experts go first: their Hessians come from
    passes of the block over ``inputs``, which must see the float (smoothed) attention, as the
    other linears' statistics did."""
    for g in sorted(groups, key=lambda g: EXPERTS not in g.layers):
        st = col.stats[g.name]
        for p in g.layers:
            if p == EXPERTS:
                set_module(block, adapter.moe.experts,
                           quantize_experts(block, adapter, inputs, col.experts, st, cfg, block_idx, report))
            else:
                lin = get_module(block, p)
                if isinstance(lin, nn.Linear):
                    set_module(block, p, make_quant_linear(lin, st, cfg))
    router = adapter.router(block)
    if cfg.quant.quantize_routers and router is not None:
        rq = QuantLinear.from_weight(router.weight, None, cfg.quant.weights, None)
        router.weight.data.copy_(rq.weight_float(router.weight.dtype))


# ------------------------------------------------------------------ the whole model
def quantize_model(model: nn.Module, adapter: ArchSpec, calib: torch.Tensor, cfg: PipelineConfig,
                   progress: bool = True, checkpoint=None, loader: BlockLoader | None = None) -> QuantReport:
    """Quantize ``model`` in place with calibration windows ``calib`` [n, length].

    ``checkpoint`` (a ``reliability.resume.BlockCheckpoint``): persist every finished block and
    continue after the last one a previous, interrupted run finished (bit-identical result).
    ``loader``: the blocks are on ``meta`` and loaded one at a time (streaming; needs ``checkpoint``,
    where each finished block goes before it is released).
    """
    start = time.perf_counter()
    if loader is None:
        check_finite(model)
    check_token_ids(calib, model)
    report = QuantReport(calib_tokens=int(calib.numel()))
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        inputs, block_kwargs = capture_block_inputs(model, adapter, calib, cfg.batch_size)
        if loader is not None:
            loader.inputs_captured()
        blocks = adapter.blocks(model)
        first = 0
        if checkpoint is not None:
            first, inputs = checkpoint.restore(blocks, inputs, gen, report, load_blocks=loader is None)
        before = report.seconds  # restored: the time the interrupted run(s) had spent
        bar = tqdm(range(len(blocks)), desc=f"{cfg.quant.method}", unit="block", disable=not progress, leave=False)
        for i in bar:
            if i < first:  # restored from the checkpoint
                continue
            block = blocks[i]
            if loader is not None:
                loader.load(i, block)
            groups = adapter.groups(block)
            block_in = [(hs, *block_kwargs[i][j]) for j, (hs, _, _) in enumerate(inputs)]  # block i's mask
            col = BlockCollector(block, groups, adapter, hessian=cfg.gptq is not None)
            col.collect(block, block_in, cfg.search_tokens, gen)
            if cfg.smooth is not None:
                smooth_block(block, groups, adapter, col, cfg, model.config, i, report)
            quantize_block(block, groups, adapter, col, cfg, i, report, block_in)
            del col
            outs = run_block(block, block_in)
            if not all(torch.isfinite(o).all() for o in outs):
                raise HaqmoeError(f"block {i} produced NaN/Inf after quantization")
            inputs = [(o, a, k) for o, (_, a, k) in zip(outs, inputs)]
            if checkpoint is not None:
                report.seconds = before + time.perf_counter() - start
                checkpoint.save(i, block, inputs, gen, report)
            if loader is not None:
                loader.release(i, block)
    report.seconds = before + time.perf_counter() - start
    return report
