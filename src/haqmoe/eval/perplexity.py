"""Perplexity by the standard protocol: mean token NLL over non-overlapping windows."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import HaqmoeError
from ..io import atomic_write_text


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


def _windows_key(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.contiguous().numpy().tobytes() + str(tuple(windows.shape)).encode()).hexdigest()[:32]


def _resume_nll(progress_file: Path | None, key: str) -> tuple[list[float], float]:
    """Per-window NLL sums and seconds of an interrupted evaluation of the same windows."""
    if progress_file is None or not progress_file.is_file():
        return [], 0.0
    try:
        state = json.loads(progress_file.read_text())
    except ValueError as exc:
        raise HaqmoeError(f"{progress_file} is corrupt ({exc}): delete it to start the evaluation over") from exc
    if state.get("windows") != key:
        raise HaqmoeError(f"{progress_file} is the progress of other windows: delete it to start over")
    return [float(x) for x in state["nll"]], float(state["seconds"])


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity", progress_file: Path | None = None) -> PplResult:
    """``progress_file``: record each window's NLL there and, when it exists, continue after the
    windows it holds (same windows only): a full-test-set evaluation of a MoE is ~20 min of CPU and
    a kill must not cost all of it. The caller ties the file to one model."""
    n, seqlen = windows.shape
    if seqlen < 2:
        raise HaqmoeError("windows must hold at least 2 tokens")
    vocab = model.get_input_embeddings().num_embeddings
    if int(windows.max()) >= vocab or int(windows.min()) < 0:
        raise HaqmoeError(f"token ids out of the model's vocabulary range [0, {vocab})")
    key = _windows_key(windows) if progress_file is not None else ""  # hashing only when resumable
    nll, before = _resume_nll(progress_file, key)
    start = time.perf_counter()
    with tqdm(total=n, initial=len(nll), desc=desc, unit="win", disable=not progress, leave=False) as bar:
        for i in range(len(nll), n, batch_size):
            nll.extend(float(x) for x in window_nll(model, windows[i: i + batch_size]))
            bar.update(len(nll) - i)
            bar.set_postfix(ppl=f"{math.exp(math.fsum(nll) / (len(nll) * (seqlen - 1))):.3f}")
            if progress_file is not None:
                atomic_write_text(progress_file, json.dumps(
                    {"windows": key, "nll": nll, "seconds": before + time.perf_counter() - start}))
    predicted = n * (seqlen - 1)
    mean = math.fsum(nll) / predicted
    return PplResult(math.exp(mean), mean, n, n * seqlen, predicted, before + time.perf_counter() - start)
