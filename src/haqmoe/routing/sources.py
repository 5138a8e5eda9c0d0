"""One grammar for routing data, used by every command and benchmark that reads routing (docs/design.md,
Routing and placement).

A spec names routing data of one of the kinds of ``SOURCE_KINDS``; each kind says what it can give:
**statistics** (selection counts, paths, per-request counts: ``plan``, ``placement-eval``,
``routing-stats``, through ``load_source``) and/or **traces to replay** (per-token routing in order:
``simulate``, ``cache-eval``, through ``studies/experiments.load_pair``). ``parse_source`` is the only
parser; the kinds and the commands' help text (``source_help``) are in ``registry.py``.

- a trace directory (from ``haqmoe profile``): both;
- ``mixtral:build`` / ``mixtral:heldout`` / ``mixtral:all`` (MMLU subjects of the shared frac_vecs, split by
  ``mixtral.split_subjects``) or ``mixtral:SUBJ+SUBJ`` (named subjects): statistics;
- ``fiddler:original`` / ``fiddler:instruct`` (all 7 subjects' popularity, frequency only: no per-request
  data): statistics;
- ``mixtral-stats`` (decode-like traces sampled from the Mixtral statistics), ``synthetic``, ``tiny:FAMILY``
  (real routing of a tiny random MoE): traces to replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import HaqmoeError
from ..registry import SOURCE_KINDS, SOURCE_USES, kinds_for
from . import mixtral as mx
from .evaluate import request_counts
from .stats import DEFAULT_WINDOW, RoutingStats, layer_counts, stats_from_trace
from .trace import RoutingTrace
from .trace_io import load_trace


@dataclass(frozen=True)
class ParsedSource:
    spec: str
    kind: str  # a SOURCE_KINDS key
    arg: str  # what follows "kind:" (the path, for a trace directory)

    def require(self, use: str) -> "ParsedSource":
        """This spec, if its kind gives ``use`` ("stats" or "replay"); else a clear error naming the kinds that do."""
        if not getattr(SOURCE_KINDS[self.kind], use):
            raise HaqmoeError(f"routing source '{self.spec}' ({SOURCE_KINDS[self.kind].help}) gives no {SOURCE_USES[use]}: "
                              f"use {kinds_for(use)}")
        return self


def parse_source(spec: str) -> ParsedSource:
    """The kind of a routing-data spec: a fixed name, ``kind:arg``, or else a trace directory's path."""
    if spec in SOURCE_KINDS and SOURCE_KINDS[spec].syntax == spec:  # names without an argument
        return ParsedSource(spec, spec, "")
    kind, sep, arg = spec.partition(":")
    if sep and arg and kind in SOURCE_KINDS and kind != "trace" and ":" in SOURCE_KINDS[kind].syntax:
        return ParsedSource(spec, kind, arg)
    return ParsedSource(spec, "trace", spec)


@dataclass
class RoutingSource:
    spec: str
    model: str
    counts: np.ndarray  # [L, E] exact pooled selection counts
    stats_fn: Callable[[int], RoutingStats]
    requests_fn: Callable[[int | None, int], np.ndarray] | None  # (len or None = whole requests, seed) -> [C, L, E]
    exact_requests: bool  # False: short requests are sampled from per-prompt fractions (synthetic)
    trace: RoutingTrace | None = None
    _cache: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.counts.shape[0]), int(self.counts.shape[1])

    def stats(self, window: int = DEFAULT_WINDOW) -> RoutingStats:
        key = ("stats", window)
        if key not in self._cache:
            self._cache[key] = self.stats_fn(window)
        return self._cache[key]

    def has_requests(self, request_len: int | None) -> bool:
        try:
            self.requests(request_len, seed=2)
        except HaqmoeError:
            return False
        return True

    def requests(self, request_len: int | None, seed: int = 0) -> np.ndarray:
        if self.requests_fn is None:
            raise HaqmoeError(f"{self.spec} has no per-request data (frequency only)")
        key = ("req", request_len, seed)
        if key not in self._cache:
            rc = self.requests_fn(request_len, seed)
            if rc.shape[0] == 0:
                raise HaqmoeError(f"{self.spec} has no request of {request_len} tokens (its requests are shorter): "
                                  "choose a shorter --request-len")
            self._cache[key] = rc
        return self._cache[key]


def _trace_requests(trace: RoutingTrace) -> Callable[[int | None, int], np.ndarray]:
    def fn(n: int | None, seed: int) -> np.ndarray:
        if n is None:
            return np.stack([layer_counts(trace.request(r)) for r in range(trace.num_requests)])
        return request_counts(trace, n)
    return fn


def from_trace(trace: RoutingTrace, spec: str = "trace") -> RoutingSource:
    return RoutingSource(spec, str(trace.meta.get("model", "")), layer_counts(trace),
                         lambda w: stats_from_trace(trace, w, with_pairs=False), _trace_requests(trace), True, trace)


def from_prompts(pc: mx.PromptCounts, spec: str, synthetic_tokens_per_prompt: int = 16) -> RoutingSource:
    def req(n: int | None, seed: int) -> np.ndarray:
        return pc.counts if n is None else mx.synthetic_requests(pc, n, 1, seed)
    return RoutingSource(spec, "mixtral-8x7b", pc.total(),
                         lambda w: mx.stats_from_prompts(pc, w, synthetic_tokens_per_prompt), req, False)


def _mixtral_subjects(arg: str) -> list[str]:
    """The MMLU subjects of ``mixtral:ARG``: build, heldout, all, or SUBJ+SUBJ."""
    subjects = mx.list_subjects()
    build, held = mx.split_subjects(subjects)
    return {"build": build, "heldout": held, "all": subjects}.get(arg) or arg.split("+")


def _data_of(spec: str) -> set[str]:
    """What a spec is made of, without loading it: MMLU subjects, or a trace directory's path."""
    p = parse_source(spec)
    if p.kind == "mixtral":
        return set(_mixtral_subjects(p.arg))
    if p.kind == "fiddler":
        return set(mx.load_fiddler(p.arg))  # popularity measured on these MMLU subjects' prompts
    if p.kind == "trace":
        return {str(Path(spec).expanduser().resolve())} if spec else set()
    return {spec}  # generated data: the same spec, the same data


def shares_data(built_on: str, evaluated_on: str) -> bool:
    """True when a plan built on ``built_on`` would be evaluated on some of the same data (in-sample)."""
    try:
        return bool(_data_of(built_on) & _data_of(evaluated_on))
    except HaqmoeError:  # the build data is gone or unreadable: nothing to compare
        return False


def load_source(spec: str, synthetic_tokens_per_prompt: int = 16) -> RoutingSource:
    """The statistics of a spec (``plan``, ``placement-eval``, ``routing-stats``)."""
    p = parse_source(spec)
    if p.kind == "trace":
        path = Path(spec).expanduser()
        if not path.exists():
            raise HaqmoeError(f"routing source '{spec}' not found (a trace directory; or {kinds_for('stats')})")
        return from_trace(load_trace(path), spec)
    p.require("stats")
    if p.kind == "mixtral":
        return from_prompts(mx.load_frac_vecs(_mixtral_subjects(p.arg)), spec, synthetic_tokens_per_prompt)
    total = sum(mx.load_fiddler(p.arg).values())  # fiddler
    return RoutingSource(spec, "mixtral-8x7b", total, lambda w: mx.stats_from_counts(total), None, False)
