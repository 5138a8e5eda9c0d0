"""The names the code and the CLI share, one table per kind, with one line of help each: the CLI's
choices and help text are generated from these tables, and the modules that implement the names
look their entries up here, so no name is parsed twice. Pure data (no numpy, no torch): the CLI
imports it at start-up.

- ``METHODS``: quantization methods (``quant/methods.py`` runs them);
- ``DECISION_POLICIES``: what a miss does (``costs/curves.py``, docs/design.md, Expert decisions);
- ``CACHE_POLICIES``: GPU expert cache policies (``runtime/policies.py``, ``runtime/simulator.py``);
- ``SIM_POLICIES``: the simulator's runtime configurations (``studies/experiments.py``);
- ``STRATEGIES``: placement strategies (``routing/placement.py``);
- ``SOURCE_KINDS``: kinds of routing data (``routing/sources.py`` parses specs);
- hardware profiles live with their numbers (``costs/hardware.py``, also light).
"""

from __future__ import annotations

from dataclasses import dataclass

METHOD_HELP: dict[str, str] = {
    "rtn": "round to nearest",
    "smoothquant": "fixed alpha",
    "awq": "weight-only objective",
    "gptq": "Hessian-aware weights",
    "smooth": "adaptive smoothing + RTN",
    "haq": "adaptive smoothing + GPTQ",
}
METHODS: tuple[str, ...] = tuple(METHOD_HELP)

DECISION_POLICIES: dict[str, str] = {
    "predictor": "the paper: transfer if n > n_critical, else CPU",
    "always-transfer": "copy every miss in (mixtral-offloading)",
    "always-cpu": "every miss on the CPU (Fiddler)",
    "balanced": "CPU and copies side by side: whichever finishes first",
    "split": "also one miss on both: CPU rows + copied rest",
}


@dataclass(frozen=True)
class CachePolicy:
    """What a cache-policy name means: an eviction rule plus cache options."""

    name: str
    eviction: str  # the eviction rule: lru, lfu, belady, freq-oracle
    help: str
    pinned: bool = False  # a share of the slots (pin_frac; all of them if static) pinned to the plan
    alloc: bool = False  # per-layer slot counts by greedy marginal LRU hits on a profiling trace
    static: bool = False  # every slot pinned to the plan, nothing cached on demand
    bound: bool = False  # needs the replayed trace's future: simulator only
    engine: bool = False  # the engine runs it (per-layer allocation and bounds are simulator only)


CACHE_POLICIES: dict[str, CachePolicy] = {p.name: p for p in (
    CachePolicy("lru", "lru", "least recently used", engine=True),
    CachePolicy("lfu", "lfu", "least frequently used, decayed by a half-life in tokens", engine=True),
    CachePolicy("pinned+lru", "lru", "the plan's experts pinned, LRU on the rest", pinned=True, engine=True),
    CachePolicy("pinned+lfu", "lfu", "the plan's experts pinned, LFU on the rest", pinned=True, engine=True),
    CachePolicy("lru+alloc", "lru", "LRU, slots per layer allocated on a profiling trace", alloc=True),
    CachePolicy("pinned+lfu+alloc", "lfu", "pinned+lfu, slots per layer allocated on a profiling trace",
                pinned=True, alloc=True),
    CachePolicy("static", "lru", "every slot pinned to the plan", pinned=True, static=True),
    CachePolicy("freq-oracle", "freq-oracle", "bound: evict what the current request uses least", bound=True),
    CachePolicy("belady", "belady", "bound: evict the expert used furthest ahead", bound=True),
)}
ENGINE_CACHE_POLICIES = tuple(n for n, p in CACHE_POLICIES.items() if p.engine)

SIM_POLICIES: dict[str, tuple[str, str, bool, bool]] = {
    # name: (cache policy, decision, async admission, prefetch)
    "always-transfer": ("lru", "always-transfer", False, False),  # mixtral-offloading: LRU + transfer
    "always-cpu": ("static", "always-cpu", False, False),  # Fiddler: popular experts resident, rest on CPU
    "predictor": ("static", "predictor", False, False),  # the paper: plan + cost predictor
    "full": ("pinned+lru", "predictor", True, False),  # + cache with background admission
    "full+prefetch": ("pinned+lru", "predictor", True, True),
    "balanced+prefetch": ("pinned+lru", "balanced", True, True),  # misses split between CPU and PCIe
    "full+split": ("pinned+lru", "split", True, False),  # one miss served by CPU and PCIe at once
}

STRATEGIES: dict[str, str] = {
    "global-frequency": "the N most selected (layer, expert) pairs",
    "path-frequency": "experts of the hottest activation paths",
    "two-stage": "the paper's Algorithm 2: B // L per layer, hot paths then frequency",
    "layer-frequency": "B // L per layer, most frequent",
    "latency": "ours: least expected request expert time under the cost model",
    "latency-balanced": "ours: latency with B // L per layer",
}
COST_STRATEGIES = ("latency", "latency-balanced")  # plan with a cost model and sample requests


@dataclass(frozen=True)
class SourceKind:
    name: str
    syntax: str  # how a spec of this kind is written
    help: str
    stats: bool  # gives statistics (plan, placement-eval, routing-stats)
    replay: bool  # gives per-token traces to replay (simulate, cache-eval)


SOURCE_KINDS: dict[str, SourceKind] = {k.name: k for k in (
    SourceKind("trace", "DIR", "a trace directory written by `haqmoe profile`", True, True),
    SourceKind("mixtral", "mixtral:build|heldout|all|SUBJ+SUBJ",
               "real Mixtral-8x7B MMLU per-prompt expert fractions, split by subject", True, False),
    SourceKind("fiddler", "fiddler:original|instruct", "Fiddler's Mixtral-8x7B expert popularity, frequency only",
               True, False),
    SourceKind("mixtral-stats", "mixtral-stats", "decode-like traces sampled from the real Mixtral-8x7B MMLU "
               "statistics", False, True),
    SourceKind("synthetic", "synthetic", "a synthetic trace of the upcycled MoE's shape", False, True),
    SourceKind("tiny", "tiny:FAMILY", "real routing of a tiny random MoE of FAMILY, e.g. mixtral", False, True),
)}
SOURCE_USES = {"stats": "statistics", "replay": "traces to replay"}


def kinds_for(use: str) -> str:
    """The spellings of the kinds that give ``use`` ("stats" or "replay")."""
    return ", ".join(k.syntax for k in SOURCE_KINDS.values() if getattr(k, use))


def source_help(use: str) -> str:
    """The ``--help`` text of a command argument that takes routing data for ``use``."""
    return ("Routing data: " + "; ".join(f"{k.syntax} ({k.help})" for k in SOURCE_KINDS.values() if getattr(k, use))
            + ".")


def choices_help(table: dict, sep: str = " | ") -> str:
    """``name (help)`` for every entry of a name table."""
    return sep.join(f"{n} ({getattr(h, 'help', h)})" for n, h in table.items())
