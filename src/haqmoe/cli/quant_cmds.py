"""HAQ quantization commands: compare (quantize methods live in main.py until moved here)."""

from __future__ import annotations

from .common import app, emit, state  # noqa: F401
