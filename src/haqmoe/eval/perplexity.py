"""Perplexity by the standard protocol: mean token NLL over non-overlapping windows."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..errors import HaqmoeError


@dataclass
class PplResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    tokens: int  # tokens fed to the model (windows x seqlen)
    predicted: int  # tokens scored (windows x (seqlen - 1))
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Summed NLL of each row of ``windows`` [b, T] (next-token prediction, fp64 accumulate)."""
    device = next(model.parameters()).device
    x = windows.to(device)
    logits = model(input_ids=x, use_cache=False).logits
    if not torch.isfinite(logits).all():
        raise HaqmoeError("the model produced NaN/Inf logits (corrupt or badly quantized weights)")
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="none")
    return nll.view(x.shape[0], -1).double().sum(dim=1).cpu()


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity") -> PplResult:
    n, seqlen = windows.shape
    if seqlen < 2:
        raise HaqmoeError("windows must hold at least 2 tokens")
    vocab = model.get_input_embeddings().num_embeddings
    if int(windows.max()) >= vocab or int(windows.min()) < 0:
        raise HaqmoeError(f"token ids out of the model's vocabulary range [0, {vocab})")
    start = time.perf_counter()
    total = 0.0
    with tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False) as bar:
        for i in range(0, n, batch_size):
            total += float(window_nll(model, windows[i: i + batch_size]).sum())
            bar.update(min(batch_size, n - i))
            bar.set_postfix(ppl=f"{math.exp(total / ((i + min(batch_size, n - i)) * (seqlen - 1))):.3f}")
    predicted = n * (seqlen - 1)
    nll = total / predicted
    return PplResult(math.exp(nll), nll, n, n * seqlen, predicted, time.perf_counter() - start)
