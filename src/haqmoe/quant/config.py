"""The quantization configuration: one dataclass that the CLI, the pipeline and checkpoints share."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .quantizer import QuantSpec


@dataclass(frozen=True)
class QuantConfig:
    method: str = "rtn"
    weights: QuantSpec = field(default_factory=lambda: QuantSpec(8, symmetric=False, granularity="channel"))
    acts: QuantSpec | None = field(default_factory=lambda: QuantSpec(8, symmetric=False, granularity="token"))
    quantize_routers: bool = False  # routers decide placement: keep them exact by default

    def as_dict(self) -> dict:
        d = asdict(self)
        d["acts"] = None if self.acts is None else self.acts.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        acts = d.get("acts")
        return cls(method=d.get("method", "rtn"), weights=QuantSpec(**d["weights"]),
                   acts=None if acts is None else QuantSpec(**acts),
                   quantize_routers=bool(d.get("quantize_routers", False)))

    @classmethod
    def w8a8(cls, method: str = "rtn", w_sym: bool = False, a_sym: bool = False, w_bits: int = 8,
             a_bits: int = 8, a_dynamic: bool = True, group_size: int | None = None) -> "QuantConfig":
        w = QuantSpec(w_bits, w_sym, "group" if group_size else "channel", group_size)
        a = QuantSpec(a_bits, a_sym, "token" if a_dynamic else "tensor", dynamic=a_dynamic)
        return cls(method=method, weights=w, acts=a)
