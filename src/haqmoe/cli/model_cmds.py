"""Model-building commands: ``moefy`` (a dense model's FFN carved into experts)."""

from __future__ import annotations

from .common import app  # noqa: F401  (commands register on the shared app)
