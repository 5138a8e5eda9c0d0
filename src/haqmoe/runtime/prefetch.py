"""Next-layer prefetch: which experts to start copying while the current layer computes.

At MoE layer l the runtime scores layer l+1's router on layer l's hidden state (the trace's
``guesses``); the top guesses that are not cached are copied asynchronously, within a copy
budget of bandwidth x the time layer l takes (``budget_layers`` scales it). A wrong guess costs
bandwidth and a slot, never correctness: the expert that is really needed is served as usual.

Traces without guesses (built from statistics) get synthetic guesses with a given top-k recall
per layer. Default ``DEFAULT_GUESS_RECALL`` = 0.8, below what was measured on the profiled
upcycled SmolLM2 MoE (recall 0.88 mean over layers with the norm re-based guesses of
routing/guess.py, 0.86 before; held-out WikiText-2 windows; bench/results/cache.md): real Mixtral
routers change more between layers than an upcycled model's, so we stay conservative. Pass the
measured value when you have one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import HaqmoeError
from ..routing.synthetic import synthesize_guesses
from ..routing.trace import RoutingTrace

DEFAULT_GUESS_RECALL = 0.8


@dataclass
class PrefetchConfig:
    enabled: bool = False
    num_guesses: int | None = None  # guesses considered per layer (default: top_k)
    budget_layers: float = 1.0  # copy budget in units of "the time layer l takes"
    exact: bool = False  # replay the trace's own guesses; error if it has none
    guess_recall: float | Sequence[float] | None = None  # for traces without guesses
    seed: int = 0


def guesses_for(trace: RoutingTrace, cfg: PrefetchConfig) -> np.ndarray | None:
    """The guess rankings [T, L, G] the replay uses, or None when prefetch is off."""
    if not cfg.enabled:
        return None
    if trace.guesses is not None and cfg.guess_recall is None:
        return trace.guesses
    if cfg.exact:
        raise HaqmoeError("this trace has no prefetch guesses: exact prefetch replay needs a trace profiled "
                          "with guesses (or drop --exact and give --guess-recall)")
    recall = DEFAULT_GUESS_RECALL if cfg.guess_recall is None else cfg.guess_recall
    counts = np.zeros((trace.num_layers, trace.num_experts))
    for l in range(trace.num_layers):
        counts[l] = np.bincount(trace.experts[:, l].ravel().astype(np.int64), minlength=trace.num_experts)
    probs = (counts + 1) / (counts + 1).sum(axis=1, keepdims=True)
    return synthesize_guesses(trace.experts, trace.num_experts, recall, np.random.default_rng(cfg.seed), probs)
