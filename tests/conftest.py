"""Shared fixtures. Tiny random models are cheap; the embedded SmolLM2 is loaded once per session."""

from __future__ import annotations

import pytest
import torch
from transformers.utils import logging as hf_logging

from haqmoe.models.tiny import TINY_CONFIGS, tiny_model

torch.set_num_threads(min(2, torch.get_num_threads()))
hf_logging.disable_progress_bar()  # keep captured stderr to what haqmoe itself prints

FAMILIES = sorted(TINY_CONFIGS)
MOE_FAMILIES = [f for f in FAMILIES if f not in ("llama", "opt")]


@pytest.fixture(params=FAMILIES)
def tiny(request):
    return request.param, tiny_model(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids oversubscription stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm2():
    from haqmoe.sources import load_model

    return load_model("smollm2-135m", progress=False)


@pytest.fixture(params=["kernel", "int_mm"])
def int8_path(request, monkeypatch):
    """Run a test on both CPU int8 paths: our fused kernel (skipped where it cannot run: no AVX512-VNNI
    or no compiler) and quantize_tokens + torch._int_mm (the kernel switched off)."""
    from haqmoe.exec import int8
    from haqmoe.exec.kernels import w8a8_op

    if request.param == "int_mm":
        monkeypatch.setattr(int8, "w8a8_op", lambda: None)
    elif w8a8_op() is None:
        pytest.skip("the fused int8 CPU kernel cannot run here")
    return request.param
