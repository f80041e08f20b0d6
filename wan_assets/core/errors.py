"""Errors that are the user's to fix; the CLI prints them as one line (no traceback)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change. Checkpoints stay valid."""


class MetricsDbError(RuntimeError):
    """The metrics database cannot be read or written (missing, busy, or a bad query)."""
