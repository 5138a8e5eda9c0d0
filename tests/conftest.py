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
    from haqmoe.models.loading import load_model

    return load_model("smollm2-135m", progress=False)
