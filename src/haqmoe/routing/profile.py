"""Record routing traces by hooking every MoE router of a model during plain forward passes.

In transformers 5.x each router module returns ``(router_logits, top_k_weights, top_k_index)``,
so a forward hook on it sees exactly the experts the block will run: the trace IS the model's own
routing, not a re-implementation of it. The same hook scores the NEXT MoE layer's router on this
layer's router input, which is what a prefetcher could compute one layer early (``guesses``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..data.text import eval_windows, load_text, tokenize
from ..errors import HaqmoeError
from .guess import guess_topk, guess_weight
from .trace import RoutingTrace
from .trace_io import TraceHeader, TraceWriter


@dataclass
class ProfileConfig:
    text: str = "wikitext2:valid"
    seqlen: int = 512  # tokens per request (one window = one request)
    max_requests: int | None = 16
    guess_width: int = 4  # how many next-layer experts to keep in the prefetch ranking (0: none)
    chunk_requests: int = 4  # requests per chunk file (the resume granularity)
    new_tokens: int = 0  # greedy decode steps recorded after each window (0: the windows' routing only)


class RouterRecorder:
    """Forward hooks on all MoE routers; ``take()`` returns the [T, L, k] arrays of the last forward.
    Guesses at layer i rank layer i + ``distance``'s experts (1: the next layer, what the trace records
    for prefetch; more: lookahead, for measuring its recall)."""

    def __init__(self, model: torch.nn.Module, adapter, guess_width: int = 0, distance: int = 1):
        blocks = [b for b in adapter.blocks(model) if adapter.is_moe_block(b)]
        self.routers = [adapter.router(b) for b in blocks]
        if not self.routers:
            raise HaqmoeError("model has no MoE layers to profile (a dense model has no routing)")
        norms = [adapter.router_norm(b) for b in blocks]
        self.distance = distance
        self._guess_w = [guess_weight(self.routers[i + distance], norms[i], norms[i + distance]) if guess_width
                         else None for i in range(len(blocks) - distance)]
        first = self.routers[0]
        self.num_experts = int(getattr(first, "num_experts", first.weight.shape[0]))
        self.guess_width = min(guess_width, self.num_experts)
        self._idx: list = [None] * len(self.routers)
        self._w: list = [None] * len(self.routers)
        self._g: list = [None] * len(self.routers)
        self._handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def hook(module, inputs, output):
            if not (isinstance(output, tuple) and len(output) == 3):
                raise HaqmoeError(f"router {type(module).__name__} does not return (logits, weights, index)")
            self._w[i] = output[1].detach().float().reshape(-1, output[1].shape[-1]).cpu()
            self._idx[i] = output[2].detach().reshape(-1, output[2].shape[-1]).cpu()
            if self.guess_width and i + self.distance < len(self.routers):
                self._g[i] = guess_topk(inputs[0], self._guess_w[i], self.routers[i + self.distance],
                                        self.guess_width).cpu()
        return hook

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if any(x is None for x in self._idx):
            raise HaqmoeError("not every MoE router ran during the forward pass")
        experts = torch.stack(self._idx, dim=1).numpy().astype(np.int16)
        weights = torch.stack(self._w, dim=1).numpy().astype(np.float32)
        guesses = None
        if self.guess_width:
            t = experts.shape[0]
            g = [x if x is not None else torch.full((t, self.guess_width), -1) for x in self._g]
            guesses = torch.stack(g, dim=1).numpy().astype(np.int16)
        self._idx = [None] * len(self.routers)
        self._w = [None] * len(self.routers)
        self._g = [None] * len(self.routers)
        return experts, weights, guesses

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def trace_windows(model: torch.nn.Module, adapter, windows: torch.Tensor, guess_width: int = 0,
                  progress: bool = False, new_tokens: int = 0, distance: int = 1) -> RoutingTrace:
    """In-memory trace of ``windows`` [R, n] (one request per window), one forward each; with
    ``new_tokens`` > 0 each window is a prompt followed by that many greedy decode steps on the KV
    cache, flagged ``decode``: the routing a serving engine sees, which caches and prefetch live on
    (a window's own routing says little about what its continuation uses). Generation does not stop at
    an end-of-sequence token: every request gets ``new_tokens``. ``distance``: how many layers ahead
    the guesses look (RouterRecorder)."""
    rec = RouterRecorder(model, adapter, guess_width, distance)
    parts_e, parts_w, parts_g = [], [], []

    def take() -> None:
        e, wt, g = rec.take()
        parts_e.append(e), parts_w.append(wt), parts_g.append(g)

    try:
        for w in tqdm(windows, desc="profile", disable=not progress):
            out = model(w.unsqueeze(0), use_cache=new_tokens > 0)
            take()
            for _ in range(new_tokens):
                token = out.logits[:, -1:].argmax(dim=-1)
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                take()
    finally:
        rec.close()
    n, R = windows.shape[1], windows.shape[0]
    lengths = [n + new_tokens] * R
    decode = np.tile(np.arange(n + new_tokens) >= n, R)
    return RoutingTrace(np.concatenate(parts_e), rec.num_experts, np.concatenate([[0], np.cumsum(lengths)]),
                        np.concatenate(parts_w), decode, np.concatenate(parts_g) if guess_width else None)


def _identity(cfg: ProfileConfig) -> dict:
    """The settings a resume must match; ``new_tokens`` only when used, so traces profiled before
    generation was recorded stay resumable."""
    return {k: v for k, v in asdict(cfg).items() if k != "new_tokens" or v}


@torch.no_grad()
def profile_to_disk(lm, cfg: ProfileConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                    progress: bool = True) -> Path:
    """Profile ``lm`` (a LoadedModel) on ``cfg.text`` and stream the trace to ``out``, resumably."""
    windows = eval_windows(tokenize(lm.tokenizer, load_text(cfg.text)), cfg.seqlen, cfg.max_requests)
    rec = RouterRecorder(lm.model, lm.adapter, cfg.guess_width)
    top_k = int(getattr(rec.routers[0], "top_k", 0) or lm.model.config.num_experts_per_tok)
    rec.close()
    header = TraceHeader(len(rec.routers), rec.num_experts, top_k, rec.guess_width, True, True,
                         {"model": lm.name, "config": _identity(cfg), "model_type": lm.model.config.model_type})
    writer = TraceWriter(out, header, resume=resume, overwrite=overwrite)
    todo = list(range(writer.done_requests, windows.shape[0]))
    bar = tqdm(total=windows.shape[0], initial=writer.done_requests, desc="profile", disable=not progress)
    for c0 in range(0, len(todo), cfg.chunk_requests):
        ids = todo[c0: c0 + cfg.chunk_requests]
        part = trace_windows(lm.model, lm.adapter, windows[ids], cfg.guess_width, new_tokens=cfg.new_tokens)
        writer.append_trace(part)
        bar.update(len(ids))
    bar.close()
    return writer.finish()
