"""Prefetch: which experts of the layers ahead to start copying while the current layer computes.

One rule for the engine (hybrid.py) and the simulator (simulator.py), so a routing replayed through
the simulator prefetches what the engine prefetched (docs/design.md, Prefetch and lookahead):

- At MoE layer l the runtime guesses the experts of layers l+1 .. l+D (``lookahead`` D; 1: the next
  layer only), from layer l's hidden state (routing/guess.py: layer l+d's router re-based onto layer
  l's normalised input). ``prefetch_guesses`` copies the top guesses that are not cached, nearest
  layer first (its guesses are the surest and its copies needed soonest), best guess first.
- Budget: the copy engine's idle time during layer l. A prefetch copy may start only while the copy
  engine's backlog, seen at layer l's router output, is below ``budget_layers`` x the layer's expert
  time as the cost model predicts it from the layer's decisions (``prefetch_budget_ms``; demand copies
  and splits are booked first, so they are never delayed by more than the budget). Both sides know
  that time when they prefetch; the layer's measured time (engine) or the profile's host terms
  (simulator) would differ between them.
- A wrong guess costs bandwidth and a slot (an evicted expert), never correctness: the expert that
  is really needed is served as usual.

Traces without guesses (built from statistics) get synthetic guesses with a given top-k recall per
layer. Default ``DEFAULT_GUESS_RECALL`` = 0.8 at distance 1, below what was measured on the profiled
upcycled SmolLM2 MoE (recall 0.88 mean over layers with the norm re-based guesses of routing/guess.py,
0.86 before; held-out WikiText-2 windows; bench/results/cache.md): real Mixtral routers change more
between layers than an upcycled model's, so we stay conservative. Farther ahead the guesses are
worse: on smollm2-moefied (WikiText-2 test, top-2 of 4 experts, chance 0.5) recall fell from 0.786 at
d = 1 to 0.747 and 0.718 at d = 2, 3 (bench/results/levers.md), i.e. 86 % and 76 % of the above-chance
part remained; ``DEFAULT_LOOKAHEAD_RECALL`` keeps those shares of 0.8's above-chance part for a top-2
of 8 router (chance 0.25): 0.25 + 0.55 x (0.86, 0.76). Pass measured values when you have them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..costs.curves import CostModel
from ..errors import HaqmoeError
from ..routing.synthetic import synthesize_guesses
from ..routing.trace import RoutingTrace
from .cache import MAX_LOOKAHEAD, ExpertCache
from .decide import Decision, layer_end

DEFAULT_GUESS_RECALL = 0.8
# synthetic recall at distances 2 and 3 (the drop measured on smollm2-moefied, applied above chance)
DEFAULT_LOOKAHEAD_RECALL = (0.72, 0.67)


@dataclass
class PrefetchConfig:
    enabled: bool = False
    num_guesses: int | None = None  # guesses considered per layer ahead (default: top_k)
    budget_layers: float = 1.0  # copy budget in units of "the time layer l takes"
    lookahead: int = 1  # guess and prefetch layers l+1 .. l+lookahead at layer l (1: next layer only)
    exact: bool = False  # replay the trace's own guesses; error if it has none
    guess_recall: float | Sequence[float] | None = None  # for traces without guesses (distance 1)
    lookahead_recall: Sequence[float] = DEFAULT_LOOKAHEAD_RECALL  # synthetic recall at distances 2 .. lookahead
    seed: int = 0

    def __post_init__(self) -> None:
        check_lookahead(self.lookahead)
        if self.budget_layers < 0:
            raise HaqmoeError(f"the prefetch budget must be >= 0 layers, got {self.budget_layers}")
        if len(self.lookahead_recall) < self.lookahead - 1:
            raise HaqmoeError(f"lookahead {self.lookahead} needs a synthetic recall for each distance 2 .. "
                              f"{self.lookahead}, got {len(self.lookahead_recall)}")


def check_lookahead(lookahead: int) -> None:
    """Lookahead is 1 (the next layer) .. MAX_LOOKAHEAD layers: the distances the cache counts apart."""
    if not 1 <= lookahead <= MAX_LOOKAHEAD:
        raise HaqmoeError(f"lookahead must be 1 .. {MAX_LOOKAHEAD} layers, got {lookahead}")


def prefetch_budget_ms(decisions: list[Decision], at: float, budget_layers: float) -> float:
    """The copy engine's backlog below which a prefetch copy may still start: ``budget_layers`` x the
    layer's expert time, from its decisions (decide.layer_end with the cost model's times alone)."""
    return budget_layers * (layer_end(decisions, at) - at)


def prefetch_guesses(cache: ExpertCache, cost: CostModel, layer: int, rankings: Sequence[Sequence[int]],
                     at: float, budget_ms: float) -> list[tuple[int, int, int]]:
    """Copy guessed experts of the layers ahead into the cache; returns (layer, expert, slot) of each copy
    booked. ``rankings[d - 1]``: the guesses for layer ``layer + d``, best first, already cut to the
    guesses considered (-1: none). Stops once the copy engine's backlog at ``at`` reaches ``budget_ms``
    (ideal copies, ``transfer_ms`` 0: only the guess count limits it); a layer ahead whose pool has no
    slot to free gets no more copies, the next one may."""
    copies, ms = cache.copies, cost.transfer_ms
    out: list[tuple[int, int, int]] = []
    for d, ranking in enumerate(rankings, start=1):
        target = layer + d
        for g in ranking:
            g = int(g)
            if g < 0 or cache.contains(target, g):
                continue
            if ms > 0 and copies.backlog(at) >= budget_ms:
                return out
            slot = cache.admit(target, g, ready_at=copies.lands(at, ms), prefetch=d)
            if slot is None:
                break
            copies.book(at, ms)
            out.append((target, g, slot))
    return out


def guesses_for(trace: RoutingTrace, cfg: PrefetchConfig) -> list[np.ndarray] | None:
    """The guess rankings the replay uses, one [T, L, G] array per distance d = 1 .. lookahead (row l
    ranks layer l+d), or None when prefetch is off. Distance 1: the trace's own guesses where it has
    them, else synthetic; farther: synthetic (a profiled trace records the next layer's only)."""
    if not cfg.enabled:
        return None
    if cfg.exact and (trace.guesses is None or cfg.guess_recall is not None):
        raise HaqmoeError("this trace has no prefetch guesses: exact prefetch replay needs a trace profiled "
                          "with guesses (or drop --exact and give --guess-recall)")
    if cfg.exact and cfg.lookahead > 1:
        raise HaqmoeError("exact prefetch replay has the next layer's guesses only (what a trace records): "
                          "lookahead 1, or drop --exact for synthetic guesses farther ahead")
    counts = np.zeros((trace.num_layers, trace.num_experts))
    for l in range(trace.num_layers):
        counts[l] = np.bincount(trace.experts[:, l].ravel().astype(np.int64), minlength=trace.num_experts)
    probs = (counts + 1) / (counts + 1).sum(axis=1, keepdims=True)
    rng = np.random.default_rng(cfg.seed)
    if trace.guesses is not None and cfg.guess_recall is None:
        out = [trace.guesses]
    else:
        recall = DEFAULT_GUESS_RECALL if cfg.guess_recall is None else cfg.guess_recall
        out = [synthesize_guesses(trace.experts, trace.num_experts, recall, rng, probs)]
    for d in range(2, cfg.lookahead + 1):
        out.append(synthesize_guesses(trace.experts, trace.num_experts, cfg.lookahead_recall[d - 2], rng, probs, d))
    return out
