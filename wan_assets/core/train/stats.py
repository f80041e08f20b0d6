"""Training statistics of one expert (docs/architecture.md §5, "Statistics per expert").

One `ExpertStats` per expert, fed once per optimizer step of that expert, so the high-noise and
low-noise experts never mix their losses (the seed pooled them). The alpha schedule decides on these
numbers and the metrics JSONL logs them (docs/architecture.md §5.2); the state round-trips through JSON exactly so
a resumed run computes the very same numbers as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np

LOSS_WINDOW = 200  # losses kept for the trend (slope, R^2)
MIN_TREND_SAMPLES = 20  # below this a slope is noise, so it is reported as null
CV_WINDOW = 50  # losses in the coefficient of variation
EMA_SPANS = (10, 50, 100)
STATE_VERSION = 1


@dataclass(frozen=True)
class LossTrend:
    """OLS fit of the loss window against x = 0..n-1."""

    slope: float | None
    r2: float | None


def ema_update(previous: float | None, value: float, span: int) -> float:
    """One step of an EMA with alpha = 2/(span+1); the first value seeds it."""
    if previous is None:
        return value
    alpha = 2.0 / (span + 1)
    return alpha * value + (1.0 - alpha) * previous


def loss_trend(losses: list[float]) -> LossTrend:
    """Slope and R^2 of ordinary least squares; R^2 is null for constant losses (SStot = 0)."""
    n = len(losses)
    if n < MIN_TREND_SAMPLES:
        return LossTrend(slope=None, r2=None)
    # An exact test: a mean-based SStot of equal floats can come out as rounding dust, not 0.
    if min(losses) == max(losses):
        return LossTrend(slope=0.0, r2=None)
    y = np.asarray(losses, dtype=np.float64)
    # Centred x keeps the sums small and the fit well conditioned at any window length.
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    dy = y - y.mean()
    slope = float(x @ dy) / float(x @ x)
    residual = dy - slope * x
    r2 = 1.0 - float(residual @ residual) / float(dy @ dy)
    return LossTrend(slope=slope, r2=r2)


class ExpertStats:
    """Loss window, loss trend, CV and EMAs of loss and gradient stability for one expert."""

    def __init__(self) -> None:
        self._losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self._loss_ema: dict[int, float | None] = dict.fromkeys(EMA_SPANS)
        self._grad_ema: dict[int, float | None] = dict.fromkeys(EMA_SPANS)

    def update(self, loss: float | None, grad_stability: float | None) -> None:
        """Feed one optimizer step; a missing or non-finite value leaves its statistics alone."""
        if loss is not None and math.isfinite(loss):
            value = float(loss)
            self._losses.append(value)
            self._loss_ema = {n: ema_update(v, value, n) for n, v in self._loss_ema.items()}
        # Gradient stability is null on an expert's first step (no previous signs to compare).
        if grad_stability is not None and math.isfinite(grad_stability):
            grad = float(grad_stability)
            self._grad_ema = {n: ema_update(v, grad, n) for n, v in self._grad_ema.items()}

    # --- statistics --------------------------------------------------------------------------

    @property
    def loss_samples(self) -> int:
        return len(self._losses)

    def trend(self) -> LossTrend:
        return loss_trend(list(self._losses))

    @property
    def gradient_stability_avg(self) -> float | None:
        return self._grad_ema[50]

    @property
    def loss_cv(self) -> float | None:
        """Population std of the last 50 losses (all of them while fewer) over the loss EMA50."""
        ema50 = self._loss_ema[50]
        if ema50 is None or ema50 == 0.0:
            return None
        recent = list(islice(reversed(self._losses), CV_WINDOW))
        return float(np.std(np.asarray(recent, dtype=np.float64))) / ema50

    def snapshot(self) -> dict[str, float | int | None]:
        """The statistics under their metrics JSONL names (docs/architecture.md §5.2)."""
        trend = self.trend()
        out: dict[str, float | int | None] = {
            "loss_slope": trend.slope,
            "loss_r2": trend.r2,
            "loss_samples": self.loss_samples,
            "loss_cv": self.loss_cv,
            "gradient_stability_avg": self.gradient_stability_avg,
        }
        out.update({f"loss_ema_{n}": v for n, v in self._loss_ema.items()})
        out.update({f"grad_ema_{n}": v for n, v in self._grad_ema.items()})
        return out

    # --- exact resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state; Python's json writes floats by repr, so they come back bit for bit."""
        state: dict[str, Any] = {"version": STATE_VERSION, "losses": list(self._losses)}
        state.update({f"loss_ema_{n}": v for n, v in self._loss_ema.items()})
        state.update({f"grad_ema_{n}": v for n, v in self._grad_ema.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"expert statistics state has version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        losses = [float(v) for v in state["losses"]]
        if len(losses) > LOSS_WINDOW:
            raise ValueError(f"expert statistics state holds {len(losses)} losses, at most {LOSS_WINDOW}")
        self._losses = deque(losses, maxlen=LOSS_WINDOW)
        self._loss_ema = {n: _optional_float(state[f"loss_ema_{n}"]) for n in EMA_SPANS}
        self._grad_ema = {n: _optional_float(state[f"grad_ema_{n}"]) for n in EMA_SPANS}


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
