"""Calibration statistics of linear inputs, accumulated batch by batch (never the full X).

What the methods need: ``XᵀX`` (GPTQ Hessian, fp64 accumulate of fp32 GEMMs), per-channel
max |x|, mean |x|, min and max (smoothing statistics, Ranking 1, static activation ranges), and a
small seeded sample of token rows (the grid-search loss is evaluated on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InputStats:
    dim: int
    hessian: bool = True
    xtx: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    abssum: torch.Tensor | None = None
    lo: torch.Tensor | None = None
    hi: torch.Tensor | None = None
    count: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        d = self.dim
        self.xtx = torch.zeros(d, d, dtype=torch.float64) if self.hessian else None
        self.absmax = torch.zeros(d)
        self.abssum = torch.zeros(d, dtype=torch.float64)
        self.lo = torch.zeros(d)
        self.hi = torch.zeros(d)

    @torch.no_grad()
    def add(self, x: torch.Tensor, sample_rows: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, self.dim).float()
        if x.shape[0] == 0:
            return
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()
        a = x.abs()
        self.absmax = torch.maximum(self.absmax, a.amax(dim=0))
        self.abssum += a.sum(dim=0, dtype=torch.float64)
        self.lo = torch.minimum(self.lo, x.amin(dim=0))
        self.hi = torch.maximum(self.hi, x.amax(dim=0))
        self.count += x.shape[0]
        if sample_rows is not None and sample_rows.numel():
            self.samples.append(x[sample_rows].clone())

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.count, 1)).float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.dim)

    def stat_dict(self) -> dict[str, torch.Tensor]:
        return {"absmax": self.absmax, "absmean": self.absmean}

    @torch.no_grad()
    def rescale(self, s_full: torch.Tensor) -> None:
        """The statistics of X/s, after smoothing folded 1/s into the input's producer."""
        s = s_full.float()
        if self.xtx is not None:
            sd = s.double()
            self.xtx /= sd[:, None] * sd[None, :]
        self.absmax, self.lo, self.hi = self.absmax / s, self.lo / s, self.hi / s
        self.abssum = self.abssum / s.double()
        self.samples = [x / s for x in self.samples]
