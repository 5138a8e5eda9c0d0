"""In-memory routing trace: the one structure profiling writes and placement, caching and the
simulator read. (On-disk format: ``routing/trace_io.py``.)

Token order is execution order: requests one after another; within a request, prompt tokens
(prefill) then generated tokens (decode). ``layers`` indexes MoE layers only (dense layers of
models like DeepSeek with first_k_dense_replace are not in the trace).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RoutingTrace:
    experts: np.ndarray  # [T, L, k] int16: selected expert ids per token and MoE layer
    num_experts: int
    offsets: np.ndarray  # [R + 1] int64: token boundaries of requests (offsets[0] = 0, offsets[-1] = T)
    weights: np.ndarray | None = None  # [T, L, k] float32 router weights of the selected experts
    decode: np.ndarray | None = None  # [T] bool: True for generated (decode) tokens, False for prompt
    # Prefetch guesses: at MoE layer l, the NEXT layer's router scored on layer l's hidden state,
    # as a ranking of experts (best first): [T, L, G] int16; row L-1 is unused (-1).
    guesses: np.ndarray | None = None
    meta: dict = field(default_factory=dict)  # model name, layer ids, source text, version, ...

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_requests(self) -> int:
        return len(self.offsets) - 1

    def request(self, r: int) -> "RoutingTrace":
        return self.slice_tokens(int(self.offsets[r]), int(self.offsets[r + 1]))

    def slice_tokens(self, start: int, stop: int) -> "RoutingTrace":
        def cut(a):
            return None if a is None else a[start:stop]

        return RoutingTrace(self.experts[start:stop], self.num_experts, np.array([0, stop - start]),
                            cut(self.weights), cut(self.decode), cut(self.guesses), dict(self.meta))

    def select_requests(self, ids) -> "RoutingTrace":
        """A trace of only the given requests (for held-out splits by request)."""
        parts = [self.request(int(r)) for r in ids]
        return concat_traces(parts) if parts else self.slice_tokens(0, 0)


def concat_traces(parts: list[RoutingTrace]) -> RoutingTrace:
    """One trace of the parts' requests, in order (each part keeps its request boundaries)."""
    first = parts[0]
    starts = np.cumsum([0] + [p.num_tokens for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts)]).astype(np.int64)

    def cat(name):
        arrs = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrs) else np.concatenate(arrs)

    return RoutingTrace(np.concatenate([p.experts for p in parts]), first.num_experts, offsets,
                        cat("weights"), cat("decode"), cat("guesses"), dict(first.meta))
