"""Which torch device a ``--device`` option names, checked once for every command that takes one."""

from __future__ import annotations

import torch

from .errors import HaqmoeError


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto``: CUDA where torch sees it, else the CPU; ``cpu``; ``cuda`` or ``cuda:N``, refused
    with the reason where torch sees no CUDA device."""
    if requested not in ("auto", "cpu") and not requested.startswith("cuda"):
        raise HaqmoeError(f"unknown device '{requested}' (auto | cpu | cuda)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise HaqmoeError(f"--device {requested}, but torch {torch.__version__} sees no CUDA device")
    try:
        return torch.device(requested)
    except RuntimeError as exc:
        raise HaqmoeError(f"bad device '{requested}': {exc}") from exc
