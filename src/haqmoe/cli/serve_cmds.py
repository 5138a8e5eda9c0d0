"""Serving commands: serve, export."""

from __future__ import annotations

from .common import app, emit, state  # noqa: F401
