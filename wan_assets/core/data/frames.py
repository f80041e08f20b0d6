"""Which source frames a clip contributes (docs/architecture.md §4): shrink vs fps-true sampling and temporal jitter.

Jitter is made cacheable: each clip gets `cache_variants` deterministic index sets (seeded by the
clip's content hash and the variant number), one of which training draws per epoch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SPEEDUP_WARN = 1.5


class FrameSamplingError(ValueError):
    """The clip cannot give the requested frames (too short for fps-true sampling)."""


@dataclass(frozen=True)
class FrameSampling:
    num_frames: int
    shrink_to_frames: bool
    fps: float
    start_frame: int = 0
    jitter: int = 0


@dataclass(frozen=True)
class FramePlan:
    indices: tuple[int, ...]
    speedup: float
    warning: str | None = None


def plan_frames(
    num_source: int, source_fps: float, sampling: FrameSampling, *, seed_key: str, variant: int
) -> FramePlan:
    """Source frame indices (in range, non-decreasing, num_frames long) for one clip variant."""
    if num_source < 1:
        raise FrameSamplingError("clip has no frames")
    if sampling.shrink_to_frames:
        base = np.linspace(0, num_source - 1, sampling.num_frames)
    else:
        base = _fps_true(num_source, source_fps, sampling)
    indices = np.rint(base).astype(np.int64)
    if sampling.jitter > 0:
        indices = _jitter(indices, sampling.jitter, num_source, seed_key, variant)
    # Playback at the dataset fps versus real time: > 1 means motion plays faster than filmed.
    span_s = (int(indices[-1]) - int(indices[0]) + 1) / source_fps
    speedup = span_s / (sampling.num_frames / sampling.fps)
    warning = None
    if sampling.shrink_to_frames and speedup > SPEEDUP_WARN:
        warning = (
            f"shrink_video_to_frames speeds motion up {speedup:.1f}x ({num_source} frames at "
            f"{source_fps:g} fps squeezed into {sampling.num_frames} at {sampling.fps:g} fps); "
            "consider shrink_video_to_frames: false or more num_frames"
        )
    return FramePlan(tuple(int(i) for i in indices), speedup, warning)


def _fps_true(num_source: int, source_fps: float, sampling: FrameSampling) -> np.ndarray:
    step = source_fps / sampling.fps
    base = sampling.start_frame + np.arange(sampling.num_frames) * step
    needed = int(np.rint(base[-1])) + 1
    if needed > num_source:
        raise FrameSamplingError(
            f"clip too short: {num_source} frames at {source_fps:g} fps, but {sampling.num_frames} frames "
            f"at {sampling.fps:g} fps from frame {sampling.start_frame} need {needed}; "
            "use shrink_video_to_frames: true, fewer num_frames or a lower fps"
        )
    return base


def _jitter(indices: np.ndarray, jitter: int, num_source: int, seed_key: str, variant: int) -> np.ndarray:
    digest = hashlib.sha256(f"{seed_key}:{variant}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    moved = np.clip(indices + rng.integers(-jitter, jitter + 1, size=indices.shape), 0, num_source - 1)
    # Independent offsets can cross; keep time running forwards.
    return np.maximum.accumulate(moved)
