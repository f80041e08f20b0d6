"""Which accelerator a piece of work runs on.

Per-clip latent encoding runs as many Dagster steps at once as the `gpu` pool allows (one per GPU);
each step claims a GPU nobody else holds, through an exclusive lock file per device, so N steps on
an N-GPU machine spread over all of them instead of piling onto cuda:0.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextmanager
def claim_device(lock_dir: Path, name: str = "auto", *, poll_s: float = 0.2) -> Iterator[torch.device]:
    """A free GPU for the duration of the block (waiting while all are taken); else `pick_device`."""
    count = torch.cuda.device_count() if name == "auto" else 0
    if count <= 1:
        yield pick_device(name)
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            fd = os.open(lock_dir / f"cuda{index}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield torch.device("cuda", index)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            return
        time.sleep(poll_s)
