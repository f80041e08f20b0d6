"""How a training run reports progress: the console (tqdm) here, Dagster Pipes in the asset."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Protocol

from tqdm import tqdm

if TYPE_CHECKING:
    from pathlib import Path

    from wan_assets.core.config import JobConfig
    from wan_assets.core.train.alpha_schedule import Transition
    from wan_assets.core.train.loop import TrainResult


class Reporter(Protocol):
    def on_start(self, job: JobConfig, run_id: str, step: int, total: int) -> None: ...
    def on_step(self, record: dict) -> None: ...
    def on_transition(self, transition: Transition) -> None: ...
    def on_checkpoint(self, step: int, files: list[Path]) -> None: ...
    def on_end(self, result: TrainResult) -> None: ...
    def log(self, message: str) -> None: ...


def describe_transition(t: Transition) -> str:
    return (
        f"{t.expert}: phase {t.from_phase} -> {t.to_phase} at step {t.step} "
        f"(alpha {t.from_alpha:g} -> {t.to_alpha:g}{', forced' if t.forced else ''})"
    )


class ConsoleReporter:
    """A progress bar with the latest loss per expert; transitions and checkpoints as lines."""

    def __init__(self) -> None:
        self._bar: tqdm | None = None
        self._last: dict[str, float] = {}

    def on_start(self, job: JobConfig, run_id: str, step: int, total: int) -> None:
        self.log(f"training {job.name} ({', '.join(job.experts)}), run {run_id}, {job.run_dir()}")
        self._bar = tqdm(
            total=total, initial=step, desc="train", file=sys.stderr, mininterval=1.0, dynamic_ncols=True
        )

    def on_step(self, record: dict) -> None:
        if record["loss_ema_10"] is not None:
            self._last[record["expert"]] = record["loss_ema_10"]
        if self._bar is not None:
            self._bar.set_postfix({k.split("_")[0]: f"{v:.4f}" for k, v in self._last.items()}, refresh=False)
            self._bar.update(1)

    def on_transition(self, transition: Transition) -> None:
        self.log(describe_transition(transition))

    def on_checkpoint(self, step: int, files: list[Path]) -> None:
        self.log(f"checkpoint at step {step}: {files[-1].parent}")

    def on_end(self, result: TrainResult) -> None:
        if self._bar is not None:
            self._bar.close()
        for path in result.final_loras.values():
            self.log(f"final LoRA: {path}")

    def log(self, message: str) -> None:
        (self._bar.write if self._bar is not None else print)(message, file=sys.stderr)


class QuietReporter:
    """For ranks other than 0 under torchrun: rank 0 alone reports."""

    def on_start(self, job: JobConfig, run_id: str, step: int, total: int) -> None:
        pass

    def on_step(self, record: dict) -> None:
        pass

    def on_transition(self, transition: Transition) -> None:
        pass

    def on_checkpoint(self, step: int, files: list[Path]) -> None:
        pass

    def on_end(self, result: TrainResult) -> None:
        pass

    def log(self, message: str) -> None:
        pass
