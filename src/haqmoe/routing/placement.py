"""Expert placement: which experts live on the GPU, from routing statistics and a budget
(docs/design.md, Placement strategies).

Every strategy implements ``place(stats, budget) -> Plan`` (the ``Strategy`` protocol):

- ``global-frequency``: the N most selected (layer, expert) pairs over all layers. Maximises the
  build-set hit rate, but hot layers take most slots, so hit rates differ a lot across layers.
- ``path-frequency``: experts of the hottest activation paths (windows of w layers, see
  ``stats``) until the budget is full.
- ``two-stage`` (the paper's Algorithm 2): a FIXED count per layer; Stage I takes experts of the
  hottest paths through that layer up to ``top_k_per_layer``, Stage II adds the most frequent
  remaining experts up to ``top_k_per_layer + supplement_k_per_layer``.
- ``layer-frequency``: fixed count per layer, most frequent experts (two-stage without Stage I).
- ``latency`` (ours): minimises the expected expert time of requests of a target length under
  the one cost model (``costs/planning.py``: resident T_gpu(n), missing min(CPU, copy + GPU, split),
  the simulator's and the engine's curves). The cost is separable over (layer, expert), so the exact
  optimum for a budget in experts is the top-N pairs by expected saving. Because a resident expert
  can save at most one miss per request, savings
  saturate for hot experts, which spreads the budget over layers by marginal gain instead of
  piling it into the hottest layers. Optionally a per-layer band (``min_per_layer``/``max_per_layer``).
- ``latency-balanced`` (ours): ``latency`` with a fixed count per layer (B // L, as two-stage),
  for deployments that want two-stage's even per-layer hit rates.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..costs.planning import DEFAULT_DECODE_TOKENS, PlanningCosts, request_costs
from ..errors import HaqmoeError
from ..registry import COST_STRATEGIES, STRATEGIES
from ..io import atomic_write_text
from .stats import RoutingStats
from .trace_io import check_model

PLAN_FORMAT = "haqmoe-plan"
PLAN_VERSION = 1


@dataclass(frozen=True)
class Budget:
    """GPU slots for experts: a count, or bytes divided by the (quantized) size of one expert."""

    experts: int

    @classmethod
    def of(cls, stats_or_shape, experts: int | None = None, gpu_bytes: float | None = None,
           expert_bytes: float | None = None) -> "Budget":
        L, E = _shape(stats_or_shape)
        if (experts is None) == (gpu_bytes is None):
            raise HaqmoeError("give a budget either in experts or in bytes (not both, not neither)")
        if gpu_bytes is not None:
            if not expert_bytes or expert_bytes <= 0:
                raise HaqmoeError("a byte budget needs the size of one expert in bytes")
            if gpu_bytes < 0:
                raise HaqmoeError(f"budget must be >= 0 bytes, got {gpu_bytes}")
            experts = int(gpu_bytes // expert_bytes)
            experts = min(experts, L * E)  # more memory than all experts: everything fits
        assert experts is not None
        if experts < 0 or experts > L * E:
            raise HaqmoeError(f"budget must be between 0 and {L * E} experts ({L} layers x {E}), got {experts}")
        return cls(int(experts))


def _shape(x) -> tuple[int, int]:
    if isinstance(x, RoutingStats):
        return x.num_layers, x.num_experts
    return int(x[0]), int(x[1])


@dataclass
class Plan:
    """GPU-resident experts per MoE layer (what the runtime pins), plus identity and build-set hit rates."""

    num_layers: int
    num_experts: int
    resident: list[list[int]]  # per layer, sorted expert ids
    strategy: str
    params: dict = field(default_factory=dict)
    expert_bytes: float = 0.0
    model: str = ""
    top_k: int = 0
    expected_hit: list[float] = field(default_factory=list)  # per layer, on the statistics it was built from

    @property
    def size(self) -> int:
        return sum(len(r) for r in self.resident)

    def mask(self) -> np.ndarray:
        m = np.zeros((self.num_layers, self.num_experts), bool)
        for layer, ids in enumerate(self.resident):
            m[layer, ids] = True
        return m

    def pinned(self) -> dict[int, list[int]]:
        """{layer: experts}: the runtime cache's ``CacheConfig.pinned`` form."""
        return {layer: list(ids) for layer, ids in enumerate(self.resident) if ids}

    def check_model(self, num_layers: int | None, num_experts: int | None) -> None:
        check_model(self.num_layers, self.num_experts, num_layers, num_experts, f"plan '{self.strategy}'")

    def to_json(self) -> dict:
        layers = [{"layer": i, "experts": ids, "bytes": len(ids) * self.expert_bytes,
                   "expected_hit": self.expected_hit[i] if self.expected_hit else None}
                  for i, ids in enumerate(self.resident)]
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION,
                "model": {"name": self.model, "num_layers": self.num_layers, "num_experts": self.num_experts,
                          "top_k": self.top_k},
                "strategy": self.strategy, "params": self.params, "experts": self.size,
                "expert_bytes": self.expert_bytes, "bytes": self.size * self.expert_bytes,
                "expected_hit_mean": float(np.mean(self.expected_hit)) if self.expected_hit else None,
                "layers": layers}

    @classmethod
    def from_json(cls, d: dict, where: str = "plan") -> "Plan":
        if d.get("format") != PLAN_FORMAT or d.get("version") != PLAN_VERSION:
            raise HaqmoeError(f"{where} is not a haqmoe placement plan (version {PLAN_VERSION})")
        try:
            m = d["model"]
            plan = cls(int(m["num_layers"]), int(m["num_experts"]), [list(map(int, x["experts"])) for x in d["layers"]],
                       str(d["strategy"]), dict(d.get("params", {})), float(d.get("expert_bytes", 0.0)),
                       str(m.get("name", "")), int(m.get("top_k", 0)),
                       [float(x["expected_hit"]) for x in d["layers"] if x.get("expected_hit") is not None])
        except (KeyError, TypeError, ValueError) as exc:
            raise HaqmoeError(f"{where} is malformed ({exc})") from exc
        if len(plan.resident) != plan.num_layers or any(
                e < 0 or e >= plan.num_experts for ids in plan.resident for e in ids):
            raise HaqmoeError(f"{where} is inconsistent with its own model shape")
        return plan

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, num_layers: int | None = None, num_experts: int | None = None) -> "Plan":
        p = Path(path)
        if not p.is_file():
            raise HaqmoeError(f"plan file {p} does not exist")
        try:
            d = json.loads(p.read_text())
        except ValueError as exc:  # JSONDecodeError or not UTF-8 at all
            raise HaqmoeError(f"plan file {p} is not valid JSON ({getattr(exc, 'msg', None) or type(exc).__name__})"
                              ) from exc
        if not isinstance(d, dict):
            raise HaqmoeError(f"plan file {p} is not a JSON object")
        plan = cls.from_json(d, str(p))
        plan.check_model(num_layers, num_experts)
        return plan


class Strategy(Protocol):
    name: str

    def place(self, stats: RoutingStats, budget: Budget) -> Plan: ...


def _plan(stats: RoutingStats, mask: np.ndarray, name: str, params: dict) -> Plan:
    freq = stats.frequency
    return Plan(stats.num_layers, stats.num_experts, [sorted(np.flatnonzero(r).tolist()) for r in mask], name,
                params, 0.0, stats.source, stats.top_k, [float(freq[i][mask[i]].sum()) for i in range(len(mask))])


def _top_pairs(score: np.ndarray, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Add the ``n`` best (layer, expert) pairs by score to ``mask``; ties by (layer, expert) order."""
    mask = np.zeros(score.shape, bool) if mask is None else mask.copy()
    free = np.flatnonzero(~mask.ravel())
    order = free[np.argsort(-score.ravel()[free], kind="stable")]
    mask.ravel()[order[:n]] = True
    return mask


def layer_top_mask(score: np.ndarray, per_layer: int) -> np.ndarray:
    """[L, E] mask of the ``per_layer`` best-scored experts of every layer; ties by expert id."""
    mask = np.zeros(score.shape, bool)
    np.put_along_axis(mask, np.argsort(-score, axis=1, kind="stable")[:, :per_layer], True, axis=1)
    return mask


def _per_layer_count(stats: RoutingStats, budget: Budget) -> tuple[int, int]:
    return budget.experts // stats.num_layers, budget.experts % stats.num_layers


@dataclass
class GlobalFrequency:
    name: str = "global-frequency"

    def place(self, stats: RoutingStats, budget: Budget) -> Plan:
        return _plan(stats, _top_pairs(stats.frequency, budget.experts), self.name, {})


@dataclass
class PathFrequency:
    name: str = "path-frequency"

    def place(self, stats: RoutingStats, budget: Budget) -> Plan:
        if not stats.paths:
            raise HaqmoeError("path-frequency needs path statistics (per-token routing), none in these stats")
        mask = np.zeros((stats.num_layers, stats.num_experts), bool)
        left = budget.experts
        for key, _ in sorted(stats.paths.items(), key=lambda kc: (-kc[1], kc[0])):
            for i, experts in enumerate(key[1:]):
                for e in experts:
                    if left and not mask[key[0] + i, e]:
                        mask[key[0] + i, e] = True
                        left -= 1
            if not left:
                break
        if left:  # fewer distinct path experts than slots: fill by frequency
            mask = _top_pairs(stats.frequency, left, mask)
        return _plan(stats, mask, self.name, {"window": stats.window, "synthetic_paths": stats.synthetic_paths})


@dataclass
class LayerFrequency:
    name: str = "layer-frequency"

    def place(self, stats: RoutingStats, budget: Budget) -> Plan:
        per, rest = _per_layer_count(stats, budget)
        freq = stats.frequency
        mask = layer_top_mask(freq, per)
        return _plan(stats, _top_pairs(freq, rest, mask), self.name, {"per_layer": per, "remainder": rest})


@dataclass
class TwoStage:
    """Algorithm 2. ``top_k_per_layer`` None: half of the per-layer count (rounded up) from paths."""

    top_k_per_layer: int | None = None
    supplement_k_per_layer: int | None = None
    name: str = "two-stage"

    def counts(self, stats: RoutingStats, budget: Budget) -> tuple[int, int, int]:
        per, rest = _per_layer_count(stats, budget)
        top, sup = self.top_k_per_layer, self.supplement_k_per_layer
        if top is None and sup is None:
            sup = per // 2
            top = per - sup
        elif top is None:
            top = per - sup
        elif sup is None:
            sup = per - top
        if top < 0 or sup < 0 or top + sup > stats.num_experts:
            raise HaqmoeError(f"two-stage needs 0 <= top_k_per_layer + supplement_k_per_layer <= "
                              f"{stats.num_experts}, got {top} + {sup}")
        if (top + sup) * stats.num_layers > budget.experts:
            raise HaqmoeError(f"two-stage with {top} + {sup} experts per layer needs "
                              f"{(top + sup) * stats.num_layers} slots, budget is {budget.experts}")
        return top, sup, budget.experts - (top + sup) * stats.num_layers

    def place(self, stats: RoutingStats, budget: Budget) -> Plan:
        top, sup, rest = self.counts(stats, budget)
        if top > 0 and not stats.paths:  # Stage I would silently become Stage II (layer-frequency)
            raise HaqmoeError("two-stage's Stage I needs path statistics (per-token routing), none in these "
                              "stats: use layer-frequency, or --top-k-per-layer 0")
        freq = stats.frequency
        mask = np.zeros(freq.shape, bool)
        for layer in range(stats.num_layers):
            chosen: list[int] = []
            for experts, _ in stats.layer_paths(layer):  # Stage I: hottest paths through this layer
                for e in sorted(experts, key=lambda x: (-freq[layer, x], x)):
                    if len(chosen) < top and e not in chosen:
                        chosen.append(e)
                if len(chosen) >= top:
                    break
            for e in np.argsort(-freq[layer], kind="stable"):  # Stage II: most frequent of the rest
                if len(chosen) >= top + sup:
                    break
                if int(e) not in chosen:
                    chosen.append(int(e))
            mask[layer, chosen] = True
        mask = _top_pairs(freq, rest, mask)  # budget not divisible by L: remainder by global frequency
        return _plan(stats, mask, self.name, {"top_k_per_layer": top, "supplement_k_per_layer": sup,
                                              "remainder": rest, "window": stats.window,
                                              "synthetic_paths": stats.synthetic_paths})


@dataclass
class LatencyOptimal:
    """Ours: exact minimiser of expected request expert time (see module doc).

    ``request_counts`` [C, L, E]: per-layer expert counts of sample requests of the target length
    from the BUILD data (``evaluate.request_counts``); None: decode (one token per request), where
    the saving is proportional to frequency.
    """

    profile: PlanningCosts
    request_counts: np.ndarray | None = None
    min_per_layer: int = 0
    max_per_layer: int | None = None  # with min_per_layer: a band around B/L that bounds layer imbalance
    decode_tokens: int = DEFAULT_DECODE_TOKENS
    name: str = "latency"

    def savings(self, stats: RoutingStats) -> np.ndarray:
        """[L, E] expected ms one request saves when the expert is resident."""
        if self.request_counts is None:
            p = stats.counts / max(stats.tokens, 1)  # P(expert selected by one decode token)
            return p * float(self.profile.saving_ms(np.array(1.0)))
        rc = self.request_counts
        if rc.shape[1:] != (stats.num_layers, stats.num_experts):
            raise HaqmoeError("request counts do not match the statistics' model shape")
        hit, miss = request_costs(rc, self.profile, stats.top_k, self.decode_tokens)
        return (miss - hit).mean(axis=0)

    def place(self, stats: RoutingStats, budget: Budget) -> Plan:
        s = self.savings(stats)
        # tie-break equal savings by frequency so saturated cases stay sensible
        score = (s + 1e-9 * stats.frequency).ravel()
        floor = min(self.min_per_layer, budget.experts // stats.num_layers)
        mask = layer_top_mask(score.reshape(s.shape), floor)
        cap = stats.num_experts if self.max_per_layer is None else max(self.max_per_layer, floor)
        left = budget.experts - int(mask.sum())
        for idx in np.argsort(-score, kind="stable"):
            if left <= 0:
                break
            layer = idx // stats.num_experts
            if not mask.ravel()[idx] and mask[layer].sum() < cap:
                mask.ravel()[idx] = True
                left -= 1
        if left > 0:  # caps too tight for the budget: fill the rest by score regardless of caps
            mask = _top_pairs(score.reshape(s.shape), left, mask)
        n = None if self.request_counts is None else int(self.request_counts[0, 0].sum() // max(stats.top_k, 1))
        return _plan(stats, mask, self.name, {"profile": self.profile.name, "request_len": n,
                                              "min_per_layer": floor, "decode_tokens": self.decode_tokens,
                                              "max_per_layer": self.max_per_layer})




def make_strategy(name: str, profile: PlanningCosts | None = None, request_counts: np.ndarray | None = None,
                  **kw) -> Strategy:
    if name == "global-frequency":
        return GlobalFrequency()
    if name == "path-frequency":
        return PathFrequency()
    if name == "layer-frequency":
        return LayerFrequency()
    if name == "two-stage":
        return TwoStage(kw.get("top_k_per_layer"), kw.get("supplement_k_per_layer"))
    if name in COST_STRATEGIES and profile is None:
        raise HaqmoeError(f"the {name} strategy needs a hardware profile")
    if name == "latency":
        return LatencyOptimal(profile, request_counts, int(kw.get("min_per_layer", 0) or 0),
                              kw.get("max_per_layer"), _decode(kw))
    if name == "latency-balanced":  # fixed count per layer (as two-stage), experts by expected saving
        return _Balanced(profile, request_counts, decode_tokens=_decode(kw))
    raise HaqmoeError(f"unknown strategy '{name}' (known: {', '.join(STRATEGIES)})")


def _decode(kw: dict) -> int:
    d = kw.get("decode_tokens")
    return DEFAULT_DECODE_TOKENS if d is None else int(d)


@dataclass
class _Balanced(LatencyOptimal):
    """``latency`` restricted to B // L experts per layer (remainder by saving): two-stage's balance,
    with experts chosen by expected request-time saving instead of hot paths."""

    name: str = "latency-balanced"

    def place(self, stats: RoutingStats, budget: Budget) -> Plan:
        per = budget.experts // stats.num_layers
        self.min_per_layer, self.max_per_layer = per, per + (1 if budget.experts % stats.num_layers else 0)
        return LatencyOptimal.place(self, stats, budget)


def build_plan(strategy: Strategy, stats: RoutingStats, budget: Budget, expert_bytes: float = 0.0) -> Plan:
    """Place, then check the result never exceeds the budget (a bug, not user input, if it does)."""
    plan = strategy.place(stats, budget)
    if plan.size > budget.experts:
        raise AssertionError(f"{strategy.name} placed {plan.size} experts with a budget of {budget.experts}")
    plan.expert_bytes = float(expert_bytes)
    plan.params = {**plan.params, "budget": budget.experts}
    return plan


def plan_dict(plan: Plan) -> dict:
    return asdict(plan)
