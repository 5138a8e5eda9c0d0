"""Expert cost curves and the cost predictor (docs/design.md, Cost predictor): compute a non-resident
expert on the CPU, ship it to the GPU, or split it?

One ``CostModel`` serves every user: the engine's (measured at start-up, ``runtime/calibrate.py``, or
derived from a hardware profile), the simulator's and the placement objective's (``costs/roofline.py``
derives it from a hardware profile and a model shape, ``costs/planning.py`` sums it over requests).

T_cpu(n) and T_gpu(n) are cost curves in milliseconds for n tokens through one expert. The
linear form of the paper (``n * lat``) is wrong at small n: one decode token still streams the
whole expert from memory, so a curve is ``overhead + max(floor, n * per_token)`` (roofline), or
a measured table interpolated piecewise-linearly. ``T_gpu`` of a non-resident expert adds the
copy time ``T_e = expert bytes / host-to-device bandwidth``.

``n_critical`` = the largest n for which the CPU is no slower than transfer + GPU; a miss with
n > n_critical goes through the cache to the GPU, otherwise to the CPU. The peers' rules are
the policies ``always-transfer`` (mixtral-offloading) and ``always-cpu`` (Fiddler).

``split`` (ours) adds a third way to serve a miss: the CPU computes the first k/8 of the gate/up rows
while the copy engine ships the other rows and the whole down projection; the GPU finishes the
rows, joins the intermediate vector and runs down. A one-token miss then streams its bytes over CPU
memory and PCIe at once, instead of over one of them (and the result is the same function: every
output row is computed by one side in full, down sees the whole intermediate vector).

``miss_ms(n)`` = min(T_cpu(n), T_e + T_gpu(n), best split) is what a miss costs served the fastest way
with idle queues (the ``split`` policy's choice); ``resident_ms(n)`` = T_gpu(n). Both take arrays: the
placement objective evaluates them over every (request, layer, expert) count at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import HaqmoeError
from ..registry import DECISION_POLICIES

N_MAX = 1 << 16
SPLIT_STEPS = 8  # a split keeps k / SPLIT_STEPS of the gate/up rows on the CPU, k = 1 .. SPLIT_STEPS - 1


@dataclass
class CostCurve:
    """Time (ms) for n tokens through one expert on one device."""

    overhead_ms: float = 0.0
    floor_ms: float = 0.0  # memory-bound time: the weights are read once whatever n is
    per_token_ms: float = 0.0  # compute-bound slope
    points: list[tuple[float, float]] = field(default_factory=list)  # measured (n, ms), overrides

    def __call__(self, n: float) -> float:
        if n <= 0:
            return 0.0
        if self.points:
            ns, ts = zip(*sorted(self.points))
            if n <= ns[-1] or len(ns) < 2:
                return float(np.interp(n, ns, ts))
            slope = (ts[-1] - ts[-2]) / max(ns[-1] - ns[-2], 1e-12)
            return float(ts[-1] + slope * (n - ns[-1]))
        return self.overhead_ms + max(self.floor_ms, n * self.per_token_ms)

    def at(self, n) -> np.ndarray:
        """``self(n)`` over an array of token counts (0 where n <= 0)."""
        n = np.asarray(n, np.float64)
        if self.points:
            ns, ts = (np.array(v, np.float64) for v in zip(*sorted(self.points)))
            out = np.interp(n, ns, ts)
            if len(ns) >= 2:
                slope = (ts[-1] - ts[-2]) / max(ns[-1] - ns[-2], 1e-12)
                out = np.where(n > ns[-1], ts[-1] + slope * (n - ns[-1]), out)
        else:
            out = self.overhead_ms + np.maximum(self.floor_ms, n * self.per_token_ms)
        return np.where(n > 0, out, 0.0)

    @classmethod
    def fit(cls, ns: Sequence[float], ms: Sequence[float]) -> "CostCurve":
        """Keep the measured table (the real shape) and a least-squares line for reporting."""
        if len(ns) != len(ms) or not ns:
            raise HaqmoeError("calibration needs matching, non-empty (n, ms) lists")
        pts = sorted(zip(map(float, ns), map(float, ms)))
        slope, intercept = np.polyfit([p[0] for p in pts], [p[1] for p in pts], 1) if len(pts) > 1 else (0.0, pts[0][1])
        return cls(overhead_ms=float(max(intercept, 0.0)), per_token_ms=float(max(slope, 0.0)), points=pts)

    def as_dict(self) -> dict:
        return {"overhead_ms": self.overhead_ms, "floor_ms": self.floor_ms,
                "per_token_ms": self.per_token_ms, "points": [list(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict) -> "CostCurve":
        return cls(d.get("overhead_ms", 0.0), d.get("floor_ms", 0.0), d.get("per_token_ms", 0.0),
                   [tuple(p) for p in d.get("points", [])])


def copied_share(k: int) -> float:
    """Share of an expert's bytes (and work) a split at k / SPLIT_STEPS leaves to the copy and the GPU.
    The three matrices of a SwiGLU expert are the same size: gate/up rows are 2/3 of it, down 1/3."""
    return 1.0 - k / SPLIT_STEPS * 2 / 3


@dataclass
class CostModel:
    cpu: CostCurve
    gpu: CostCurve
    transfer_ms: float  # T_e: one expert host -> device
    n_critical_override: float | None = None
    # measured one-token (CPU rows ms, GPU part ms) of a split at k = 1 .. SPLIT_STEPS - 1 (engine start-up on
    # CUDA); without it a split's parts are the whole expert's times scaled by their share of the rows
    split_ms: list[tuple[float, float]] | None = None
    # miss lever: the low-precision (int4) host copy's bytes / the expert's; a ``low`` miss runs on the CPU from
    # it (docs/design.md, Miss levers)
    low_ratio: float = 0.5

    def t_cpu(self, n: float) -> float:
        return self.cpu(n)

    def t_low(self, n: float) -> float:
        """A miss served on the CPU from its low-precision copy: the CPU curve with its memory floor (the
        weights read once) scaled by the copy's bytes; a measured table scaled as a whole."""
        c = self.cpu
        if c.points:
            return c(n) * self.low_ratio
        return 0.0 if n <= 0 else c.overhead_ms + max(c.floor_ms * self.low_ratio, n * c.per_token_ms)

    def low_costs(self, n: float, k: int) -> tuple[float, float, float]:
        """(CPU ms, copy ms, GPU ms) of a miss served from its low-precision copy: ``k`` = 0 copied whole and
        run on the GPU, 1 .. SPLIT_STEPS - 1 split as ``split_costs`` (the CPU's rows and the copied bytes of
        the low copy), SPLIT_STEPS on the CPU alone."""
        if k >= SPLIT_STEPS:
            return self.t_low(n), 0.0, 0.0
        if k <= 0:
            return 0.0, self.transfer_ms * self.low_ratio, self.t_gpu(n)
        cpu, copy, gpu = self.split_costs(n, k)
        return cpu * self.t_low(n) / max(self.t_cpu(n), 1e-12), copy * self.low_ratio, gpu

    def best_low(self, n: float, cpu_queue_ms: float = 0.0, copy_wait_ms: float = 0.0) -> tuple[int, float]:
        """(k, finish ms) of the low-precision service (``low_costs``) that finishes first behind the queues."""
        def finish(k: int) -> float:
            cpu, copy, gpu = self.low_costs(n, k)
            return max(cpu_queue_ms + cpu, copy_wait_ms + copy if copy > 0 else 0.0) + gpu
        k = min(range(SPLIT_STEPS, -1, -1), key=finish)  # ties: the most on the CPU
        return k, finish(k)

    def t_gpu(self, n: float, resident: bool = True) -> float:
        return self.gpu(n) + (0.0 if resident else self.transfer_ms)

    @property
    def n_critical(self) -> float:
        """Largest n where CPU compute is no slower than transfer + GPU (inf if never slower)."""
        if self.n_critical_override is not None:
            return float(self.n_critical_override)
        if not hasattr(self, "_ncrit"):
            self._ncrit = self._solve()
        return self._ncrit

    def _solve(self) -> float:
        lo = 0
        n = 1
        while n <= N_MAX:  # exponential search, then bisection on integers
            if self.t_cpu(n) > self.t_gpu(n, resident=False):
                break
            lo, n = n, n * 2
        else:
            return math.inf
        hi = n
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.t_cpu(mid) > self.t_gpu(mid, resident=False):
                hi = mid
            else:
                lo = mid
        return float(lo)

    def split_costs(self, n: float, k: int) -> tuple[float, float, float]:
        """(CPU ms, copy ms, GPU ms) of a miss split at k / SPLIT_STEPS of the gate/up rows. Measured parts
        (``split_ms``, scaled with n as the whole expert is) replace the share scaling, which ignores per-call
        costs a share of the rows does not shrink (activation quantization, launches, the join of the halves)."""
        copied = copied_share(k)
        if self.split_ms:
            cpu1, gpu1 = self.split_ms[k - 1]
            return (cpu1 * self.t_cpu(n) / max(self.t_cpu(1), 1e-9), self.transfer_ms * copied,
                    gpu1 * self.t_gpu(n) / max(self.t_gpu(1), 1e-9))
        return self.t_cpu(n) * (1 - copied), self.transfer_ms * copied, self.t_gpu(n) * copied

    def split_finish_ms(self, n) -> np.ndarray:
        """Finish time of the best split with idle queues, over an array of token counts (``best_split``'s)."""
        n = np.asarray(n, np.float64)
        cpu, gpu = self.cpu.at(n), self.gpu.at(n)
        best = np.full(n.shape, np.inf)
        for k in range(1, SPLIT_STEPS):
            copied = copied_share(k)
            if self.split_ms:
                cpu1, gpu1 = self.split_ms[k - 1]
                parts = (cpu1 * cpu / max(self.t_cpu(1), 1e-9), gpu1 * gpu / max(self.t_gpu(1), 1e-9))
            else:
                parts = (cpu * (1 - copied), gpu * copied)
            best = np.minimum(best, np.maximum(parts[0], self.transfer_ms * copied) + parts[1])
        return np.where(n > 0, best, 0.0)

    def resident_ms(self, n) -> np.ndarray:
        """T_gpu(n) of a resident expert, over an array of token counts."""
        return self.gpu.at(n)

    def miss_ms(self, n, split: bool = True) -> np.ndarray:
        """What a miss of n tokens costs served the fastest way with idle queues: min(CPU, copy + GPU[, split]),
        over an array of token counts (0 where n <= 0)."""
        n = np.asarray(n, np.float64)
        out = np.minimum(self.cpu.at(n), np.where(n > 0, self.transfer_ms + self.gpu.at(n), 0.0))
        return np.minimum(out, self.split_finish_ms(n)) if split else out

    def best_split(self, n: float, cpu_queue_ms: float = 0.0, copy_wait_ms: float = 0.0) -> tuple[int, float]:
        """(k, finish ms) of the split that finishes first behind the given queues."""
        def finish(k: int) -> float:
            cpu, copy, gpu = self.split_costs(n, k)
            return max(cpu_queue_ms + cpu, copy_wait_ms + copy) + gpu
        k = min(range(1, SPLIT_STEPS), key=finish)
        return k, finish(k)

    def decide(self, resident: bool, n: int, policy: str = "predictor",
               inflight_ms: float | None = None, cpu_queue_ms: float = 0.0, copy_wait_ms: float = 0.0) -> str:
        """'gpu' (resident), 'wait' (copy in flight, then GPU), 'transfer' or 'cpu'.

        ``balanced`` also counts what this layer already queued: ``cpu_queue_ms`` of CPU expert work
        and ``copy_wait_ms`` until the copy engine is free. The paper's predictor sends every
        one-token miss to the CPU and leaves PCIe idle at decode; balanced sends a miss to whichever
        channel finishes it first, so CPU compute and weight copies run side by side. ``split`` may also
        return 'split' (``best_split``), when serving one miss on both channels finishes first.
        """
        if policy not in DECISION_POLICIES:
            raise HaqmoeError(f"unknown policy {policy!r} (choose from {', '.join(DECISION_POLICIES)})")
        if resident:
            return "gpu"
        if inflight_ms is not None:
            if policy == "always-transfer":
                return "wait"
            if policy == "always-cpu":
                return "cpu"
            queued = cpu_queue_ms if policy in ("balanced", "split") else 0.0
            return "wait" if inflight_ms + self.t_gpu(n) < queued + self.t_cpu(n) else "cpu"
        if policy in ("balanced", "split"):
            options = {"cpu": cpu_queue_ms + self.t_cpu(n), "transfer": copy_wait_ms + self.transfer_ms + self.t_gpu(n)}
            if policy == "split":
                options["split"] = self.best_split(n, cpu_queue_ms, copy_wait_ms)[1]
            return min(options, key=options.get)  # ties: the first (cpu, then transfer)
        if policy == "always-transfer":
            return "transfer"
        if policy == "always-cpu":
            return "cpu"
        return "transfer" if n > self.n_critical else "cpu"

    def as_dict(self) -> dict:
        d = {"cpu": self.cpu.as_dict(), "gpu": self.gpu.as_dict(), "transfer_ms": self.transfer_ms,
             "n_critical": self.n_critical}
        if self.split_ms:
            d["split_ms"] = [list(p) for p in self.split_ms]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        split = d.get("split_ms")
        if split is not None and len(split) != SPLIT_STEPS - 1:
            raise HaqmoeError(f"split_ms holds {len(split)} entries, expected {SPLIT_STEPS - 1}")
        return cls(CostCurve.from_dict(d["cpu"]), CostCurve.from_dict(d["gpu"]), float(d["transfer_ms"]),
                   split_ms=[tuple(map(float, p)) for p in split] if split is not None else None)
