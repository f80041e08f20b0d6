"""Wan 2.2 A14B expert routing: which expert owns which timesteps (docs/architecture.md §3).

This is the one place the split is defined; training, caching, validation and sampling import it.
"""

from __future__ import annotations

from typing import Literal

Expert = Literal["high_noise", "low_noise"]

# Order matters: `transformer/` holds the high-noise expert, `transformer_2/` the low-noise one.
EXPERTS: tuple[Expert, ...] = ("high_noise", "low_noise")
EXPERT_SUBFOLDERS: dict[Expert, str] = {"high_noise": "transformer", "low_noise": "transformer_2"}

NUM_TRAIN_TIMESTEPS = 1000
# Wan 2.2 I2V-A14B ships boundary_ratio 0.9 in its model_index.json (T2V-A14B: 0.875). Only the tiny
# model builder writes this constant; loaders read the ratio from the model's own config.
I2V_BOUNDARY_RATIO = 0.9


def boundary_timestep(ratio: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
    """Timestep at which the pipeline hands over from the high-noise to the low-noise expert."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"boundary ratio must be in (0, 1), got {ratio}")
    # Same product as WanImageToVideoPipeline computes, so routing here and there agree.
    return ratio * num_train_timesteps


def check_expert(expert: str) -> Expert:
    """Return `expert` typed as an Expert, or raise a clear error naming the valid ones."""
    if expert not in EXPERTS:
        raise ValueError(f"unknown expert {expert!r}; expected one of {', '.join(EXPERTS)}")
    return expert  # type: ignore[return-value]


def expert_for_timestep(t: float, boundary: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Expert:
    """t in (boundary, T] -> high_noise, t in [0, boundary] -> low_noise."""
    if not 0.0 <= t <= num_train_timesteps:
        raise ValueError(f"timestep {t} is outside [0, {num_train_timesteps}]")
    return "high_noise" if t > boundary else "low_noise"


def timestep_window(
    expert: str, boundary: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[float, float]:
    """(lo, hi) of the timesteps an expert owns: high_noise (lo, hi], low_noise [lo, hi]."""
    if check_expert(expert) == "high_noise":
        return boundary, float(num_train_timesteps)
    return 0.0, boundary
