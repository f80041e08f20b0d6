"""Errors that are the user's to fix; the CLI prints them as one line (no traceback)."""

from __future__ import annotations

import errno
from pathlib import Path


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change. Checkpoints stay valid."""


class MetricsDbError(RuntimeError):
    """The metrics database cannot be read or written (missing, busy, or a bad query)."""


class DiskFullError(OSError):
    """A write ran out of space (ENOSPC). An OSError with errno and filename, so code that handles
    a full disk by errno handles this too; its text says how much space there was and is needed."""

    def __init__(
        self, path: Path, *, free_bytes: int, needed_bytes: int | None = None, written_bytes: int = 0
    ) -> None:
        super().__init__(errno.ENOSPC, "No space left on device", str(path))
        self.free_bytes, self.needed_bytes, self.written_bytes = free_bytes, needed_bytes, written_bytes

    def __str__(self) -> str:
        if self.needed_bytes is not None:
            need = f"it needs {_size(self.needed_bytes)}"
        else:
            need = f"it failed after {_size(self.written_bytes)}"
        return (
            f"disk full while writing {self.filename}: {need} and {_size(self.free_bytes)} is free there; "
            "free some space and run the command again (nothing finished was damaged; "
            "`train --resume` continues from the last checkpoint)"
        )


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} bytes"
