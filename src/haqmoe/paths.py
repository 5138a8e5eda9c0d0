"""Where haqmoe keeps converted models and calibrations, and where development data lives."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """User cache (``$HAQMOE_CACHE`` or ``$XDG_CACHE_HOME/haqmoe`` or ``~/.cache/haqmoe``)."""
    env = os.environ.get("HAQMOE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "haqmoe"


def shared_data_dir() -> Path | None:
    """The development data folder (``$HAQMOE_DATA`` or ``../shared/data`` beside the checkout)."""
    env = os.environ.get("HAQMOE_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return None
