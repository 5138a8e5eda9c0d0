"""Runtime commands: run, bench-runtime, simulate, cache-eval."""

from __future__ import annotations

from .common import app, emit, state  # noqa: F401
