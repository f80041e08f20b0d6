"""The files of a training run (docs/architecture.md §5.1), in the seed's layout under `<training_folder>/<name>`.

A checkpoint at step k (k optimizer steps done) is the LoRA of each trained expert, the alpha
scheduler JSON and `_state.pt`; `_state.pt` is written last, so a checkpoint counts as complete
only when it exists. Every file is written atomically. One trainer at a time holds the folder
(`claim`): an flock on `.trainer.lock`, which the kernel releases however the holder ends.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from wan_assets.core.config import JobConfig
from wan_assets.core.errors import TrainingError
from wan_assets.core.files import atomic_output, is_temp_name

LOCK_NAME = ".trainer.lock"
# What torch.load and json raise on a truncated or garbled file (measured: EOFError when empty,
# RuntimeError "failed finding central directory", OSError EINVAL, UnpicklingError, JSONDecodeError).
UNREADABLE_FILE_ERRORS = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    state: dict[str, Any]  # `_state.pt`
    scheduler: dict[str, Any]  # `_alpha_scheduler.json`


@dataclass(frozen=True)
class RunFiles:
    root: Path
    name: str
    ema: bool = False  # `train.ema_config.use_ema`: each checkpoint also has the averaged LoRAs

    @classmethod
    def of(cls, job: JobConfig) -> RunFiles:
        return cls(job.run_dir(), job.name, job.process.train.ema_config.use_ema)

    @property
    def metrics(self) -> Path:
        return self.root / f"metrics_{self.name}.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        """`data.json`: the latent index the run trains on and its clip and sample counts."""
        return self.root / "data.json"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def lora(self, expert: str, step: int | None = None, *, ema: bool = False) -> Path:
        """`<name>_<step:09d>_<expert>.safetensors`, or the final `<name>_<expert>.safetensors`;
        the EMA weights' files end in `_<expert>_ema.safetensors`."""
        middle = "" if step is None else f"_{step:09d}"
        return self.root / f"{self.name}{middle}_{expert}{'_ema' if ema else ''}.safetensors"

    def alpha_scheduler(self, step: int) -> Path:
        return self.root / f"{self.name}_{step:09d}_alpha_scheduler.json"

    def state(self, step: int) -> Path:
        return self.root / f"{self.name}_{step:09d}_state.pt"

    def checkpoint_files(self, step: int, experts: tuple[str, ...]) -> list[Path]:
        loras = [self.lora(e, step) for e in experts]
        if self.ema:
            loras += [self.lora(e, step, ema=True) for e in experts]
        return [*loras, self.alpha_scheduler(step), self.state(step)]

    def steps_with(self, suffix: str) -> list[int]:
        """Steps that have a `<name>_<step:09d>_<suffix>` file, oldest first."""
        pattern = re.compile(re.escape(self.name) + r"_(\d{9})_" + re.escape(suffix))
        matches = (pattern.fullmatch(p.name) for p in self.root.glob(f"{self.name}_*_{suffix}"))
        return sorted(int(m.group(1)) for m in matches if m)

    def complete_steps(self, experts: tuple[str, ...]) -> list[int]:
        """Steps with every file of a checkpoint present, oldest first."""
        return [
            s
            for s in self.steps_with("state.pt")
            if all(p.is_file() for p in self.checkpoint_files(s, experts))
        ]

    def newest_loadable(self, experts: tuple[str, ...], skipped: Callable[[str], None]) -> Checkpoint | None:
        """The newest complete checkpoint whose state and scheduler files load; `skipped` hears of
        each newer one that does not (a file truncated by a crash of the disk, not of the trainer:
        every file is renamed into place only once written)."""
        for step in reversed(self.complete_steps(experts)):
            try:
                state = load_state(self.state(step))
                scheduler = json.loads(self.alpha_scheduler(step).read_text(encoding="utf-8"))
            except UNREADABLE_FILE_ERRORS as exc:
                reason = " ".join(str(exc).split())[:200] or type(exc).__name__
                skipped(f"checkpoint at step {step} does not load, skipped: {reason}")
                continue
            return Checkpoint(step, state, scheduler)
        return None

    def move_aside(self, archive: Path) -> None:
        """Move the run's files into `archive` (restart on new data); the lock stays, still held."""
        archive.mkdir(parents=True)
        for path in self.root.iterdir():
            if path.name != LOCK_NAME:
                shutil.move(path, archive / path.name)

    def remove_stale_temp_files(self) -> list[Path]:
        """Half-written `.<name>.<uuid>.tmp` files of saves that were killed. Only the lock holder
        calls this, so no live writer's temp file goes."""
        stale = [
            p
            for folder in (self.root, self.samples)
            if folder.is_dir()
            for p in folder.iterdir()
            if is_temp_name(p.name) and p.is_file()
        ]
        for path in stale:
            path.unlink()
        return stale

    def newest_alpha_scheduler(self) -> Path | None:
        """The newest scheduler state: it carries the whole transition history up to its step."""
        steps = self.steps_with("alpha_scheduler.json")
        return self.alpha_scheduler(steps[-1]) if steps else None

    def config_hash(self) -> str | None:
        if not self.config.is_file():
            return None
        return hashlib.sha256(self.config.read_bytes()).hexdigest()[:16]

    def prune(self, experts: tuple[str, ...], keep: int) -> list[int]:
        """Retention (`save.max_step_saves_to_keep`): delete all but the newest `keep` checkpoints."""
        old = self.complete_steps(experts)[:-keep] if keep > 0 else []
        for step in old:
            # The state file goes first: a half-pruned checkpoint must not look complete.
            for path in reversed(self.checkpoint_files(step, experts)):
                path.unlink(missing_ok=True)
        return old


@contextmanager
def claim(files: RunFiles) -> Iterator[None]:
    """Hold the run folder for one trainer until the block ends (however it ends).

    The flock is the lock; the PID and host written into the file are only for the message a
    second trainer gets. A lock file left by a dead trainer holds no flock, so it is taken over.
    """
    files.root.mkdir(parents=True, exist_ok=True)
    path = files.root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(
                f"{files.root} is in use by another trainer ({_lock_holder(path)}); wait for it to end "
                "or stop it, or change config.name for a separate run"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        files.remove_stale_temp_files()
        yield
    finally:
        os.close(fd)  # releases the flock


def _lock_holder(path: Path) -> str:
    pid, _, host = path.read_text(encoding="utf-8").strip().partition(" ")
    return f"PID {pid} on {host}" if pid else "PID unknown"


def save_state(path: Path, state: dict) -> Path:
    with atomic_output(path) as tmp, tmp.open("wb") as handle:
        sink = _KeepWriteError(handle)
        try:
            torch.save(state, sink)  # type: ignore[arg-type]  # any object with write/flush works
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None  # the real cause (a full disk: ENOSPC), not torch's restatement
            raise
    return path


class _KeepWriteError:
    """A file for torch.save that keeps the OSError of a failed write: torch reports it only as
    "unexpected pos" (a RuntimeError without errno)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def load_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
