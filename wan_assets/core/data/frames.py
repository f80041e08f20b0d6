"""Which source frames a clip contributes (docs/architecture.md §4): windows in presentation time, then jitter.

Everything works on the clip's Timeline (when each frame is shown), never on frame numbers, so a
variable-frame-rate clip gives the frames its motion shows. A clip gives one or more windows:

- the seed's modes (`frame_extraction` unset): `shrink_video_to_frames: true` spreads each count of
  `target_frames` (default `[num_frames]`) over the whole clip; `false` takes each count at the
  dataset `fps` from `start_frame`;
- musubi-tuner's `frame_extraction` modes, on the clip sampled at `fps` from `start_frame` (its
  "slots"): `head` (the first N), `chunk` (back-to-back N), `slide` (every `frame_stride` slots),
  `uniform` (`frame_sample` starts spread evenly), `full` (all slots, at most `max_frames`,
  rounded down to 4k+1);
- ai-toolkit's `auto_frame_count`: the whole clip at `fps`, rounded down to 4k+1 (`full` without a
  cap); with `trim_auto_frame_count_tail: false`, that count spread over the whole clip.

Jitter is made cacheable: each window gets `cache_variants` deterministic index sets (seeded by the
clip's content hash, the window and the variant number), one of which training draws per epoch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from wan_assets.core.data.video_io import Timeline

SPEEDUP_WARN = 1.5
VAE_TEMPORAL = 4  # frame counts are 4k+1
Extraction = Literal["head", "chunk", "slide", "uniform", "full"]


class FrameSamplingError(ValueError):
    """The clip cannot give the requested frames (too short for any window)."""


@dataclass(frozen=True)
class FrameSampling:
    num_frames: int
    shrink_to_frames: bool
    fps: float
    start_frame: int = 0
    jitter: int = 0
    target_frames: tuple[int, ...] = ()  # frame counts; empty = (num_frames,)
    extraction: Extraction | None = None
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int | None = 129
    auto_frame_count: bool = False
    trim_auto_frame_count_tail: bool = True

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.target_frames))) or (self.num_frames,)


@dataclass(frozen=True)
class Window:
    """One stretch of a clip that trains as its own sample (before jitter)."""

    name: str  # unique within the clip, stable: "<mode><start slot>-<frames>" or "shrink-<frames>"
    indices: tuple[int, ...]  # source frames, in presentation order
    start_s: float
    speedup: float  # motion speed when played at the dataset fps: > 1 faster than filmed
    warning: str | None = None

    @property
    def num_frames(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class WindowPlan:
    windows: tuple[Window, ...]
    warnings: tuple[str, ...]  # about the clip as a whole (counts that did not fit)


def plan_windows(timeline: Timeline, sampling: FrameSampling) -> WindowPlan:
    """Every window one clip gives under `sampling`; FrameSamplingError when it gives none."""
    if timeline.num_frames < 1:
        raise FrameSamplingError("clip has no frames")
    if sampling.auto_frame_count:
        return _auto_frame_count(timeline, sampling)
    if sampling.extraction is None and sampling.shrink_to_frames:
        fitting = [c for c in sampling.counts if c <= timeline.num_frames] or [max(sampling.counts)]
        windows = [_spread(timeline, count, sampling.fps) for count in fitting]  # raises when none fits
        left_out = [c for c in sampling.counts if c not in fitting]
        notes = (
            f"too short for target_frames {left_out} ({timeline.num_frames} frames): no window of those lengths",
        )
        return WindowPlan(tuple(windows), notes if left_out else ())
    slots = _slots(timeline, sampling)
    mode = sampling.extraction or "fps"
    windows, skipped = [], []
    for count, starts in _starts(len(slots), sampling).items():
        if not starts:
            skipped.append(count)
        for start in starts:
            indices = tuple(int(i) for i in slots[start : start + count])
            windows.append(_window(f"{mode}{start:05d}-{count:03d}", indices, timeline, sampling.fps))
    if not windows:
        raise FrameSamplingError(_too_short(timeline, sampling, len(slots)))
    warnings: tuple[str, ...] = ()
    if skipped:
        warnings = (
            f"too short for target_frames {skipped} ({len(slots)} frames at {sampling.fps:g} fps): "
            "no window of those lengths",
        )
    return WindowPlan(tuple(windows), warnings)


def jittered(window: Window, num_source: int, jitter: int, *, seed_key: str, variant: int) -> tuple[int, ...]:
    """The window's indices with an independent offset in [-jitter, jitter] each, in range and in
    order. Where the window has distinct frames (the clip has enough) the result has distinct
    frames too; where it repeats frames already (a clip shorter than the window, frames a
    variable-frame-rate clip holds), order is kept and the repeats stay."""
    base = np.asarray(window.indices, dtype=np.int64)
    if jitter <= 0:
        return window.indices
    digest = hashlib.sha256(f"{seed_key}:{window.name}:{variant}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    moved = base + rng.integers(-jitter, jitter + 1, size=base.shape)
    if np.all(np.diff(base) > 0):
        # Each index stays above the one before and leaves room for the ones after: still within
        # [-jitter, jitter] of its base index, because the base indices are distinct.
        room_after = len(base) - 1 - np.arange(len(base))
        out = np.empty_like(base)
        previous = -1
        for k, (value, ceiling) in enumerate(zip(moved, num_source - 1 - room_after, strict=True)):
            previous = out[k] = min(max(int(value), previous + 1), int(ceiling))
        return tuple(int(i) for i in out)
    return tuple(int(i) for i in np.maximum.accumulate(np.clip(moved, 0, num_source - 1)))


def speedup_of(timeline: Timeline, indices: tuple[int, ...], fps: float) -> float:
    """Real time from the first frame to the last over the time they take to play at `fps` (both
    from presentation times, not an average frame rate): > 1 means motion plays faster than filmed."""
    if len(indices) < 2:
        return 1.0
    span_s = float(timeline.times_s[indices[-1]] - timeline.times_s[indices[0]])
    return span_s / ((len(indices) - 1) / fps)


# --- the modes --------------------------------------------------------------------------------------


def _spread(timeline: Timeline, count: int, fps: float) -> Window:
    """`count` frames spread evenly in time from the first frame to the last (the seed's shrink)."""
    if timeline.num_frames < count:
        # Spreading would show frames twice ([0, 0, 1, 2, 2, 2, 3, 4, 4]): slow motion, frozen frames.
        fits = max(1, (timeline.num_frames - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1)
        raise FrameSamplingError(
            f"clip too short: {timeline.num_frames} frames, fewer than the {count} shrink_video_to_frames "
            f"spreads over it ({count - timeline.num_frames} would repeat); use num_frames: {fits}, or "
            "auto_frame_count / frame_extraction: full to train each clip at the length it has"
        )
    times = np.linspace(timeline.times_s[0], timeline.times_s[-1], count)
    indices = tuple(int(i) for i in _nearest(timeline, times))
    window = _window(f"shrink-{count:03d}", indices, timeline, fps)
    if window.speedup > SPEEDUP_WARN:
        warning = (
            f"shrink_video_to_frames speeds motion up {window.speedup:.1f}x ({timeline.end_s:.2f} s "
            f"squeezed into {count} frames at {fps:g} fps); consider shrink_video_to_frames: false, "
            "frame_extraction or more num_frames"
        )
    else:
        return window
    return Window(window.name, window.indices, window.start_s, window.speedup, warning)


def _auto_frame_count(timeline: Timeline, sampling: FrameSampling) -> WindowPlan:
    """ai-toolkit's auto_frame_count: as many frames as the clip lasts at fps, 4k+1."""
    available = int(timeline.end_s * sampling.fps + 1e-6)
    if sampling.trim_auto_frame_count_tail:
        slots = _slots(timeline, sampling)  # from start_frame: never more than the clip still has
        count = max(0, min(available, len(slots)) - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1
        slots = slots[:count]
        return WindowPlan(
            (_window(f"auto00000-{count:03d}", tuple(int(i) for i in slots), timeline, sampling.fps),), ()
        )
    count = max(1, available // VAE_TEMPORAL * VAE_TEMPORAL + 1)
    return WindowPlan((_spread(timeline, count, sampling.fps),), ())


def _slots(timeline: Timeline, sampling: FrameSampling) -> np.ndarray:
    """The source frame shown at each 1/fps step from `start_frame` while the clip lasts."""
    if sampling.start_frame >= timeline.num_frames:
        raise FrameSamplingError(
            f"clip too short: start_frame {sampling.start_frame} but the clip has {timeline.num_frames} frames"
        )
    t0 = float(timeline.times_s[sampling.start_frame])
    num_slots = int(np.ceil((timeline.end_s - t0) * sampling.fps - 1e-6))
    return _nearest(timeline, t0 + np.arange(max(num_slots, 0)) / sampling.fps)


def _starts(num_slots: int, sampling: FrameSampling) -> dict[int, list[int]]:
    """Window start slots per frame count, as musubi-tuner cuts them (a repeated start once)."""
    mode = sampling.extraction or "head"
    if mode == "full":  # one window of every slot, capped and rounded down to 4k+1
        count = min(num_slots, sampling.max_frames or num_slots)
        count = (count - 1) // VAE_TEMPORAL * VAE_TEMPORAL + 1 if count >= 1 else 0
        return {count: [0]} if count else {min(sampling.counts): []}
    out: dict[int, list[int]] = {}
    for count in sampling.counts:
        if count > num_slots:
            out[count] = []
        elif mode == "head":
            out[count] = [0]
        elif mode == "chunk":
            out[count] = list(range(0, num_slots - count + 1, count))
        elif mode == "slide":
            out[count] = list(range(0, num_slots - count + 1, sampling.frame_stride))
        else:  # uniform
            spread = np.linspace(0, num_slots - count, sampling.frame_sample).astype(int)
            out[count] = sorted({int(s) for s in spread})
    return out


def _nearest(timeline: Timeline, times_s: np.ndarray) -> np.ndarray:
    """The frame nearest in time to each of `times_s`. Positions are interpolated between frame
    times and rounded as np.rint does, so a constant-rate clip gives the seed's frame indices."""
    n = timeline.num_frames
    if n == 1:
        return np.zeros(len(times_s), dtype=np.int64)
    positions = np.interp(times_s, timeline.times_s, np.arange(n, dtype=np.float64))
    beyond = times_s > timeline.times_s[-1]
    last_step = timeline.frame_duration_s(n - 1) or float(timeline.times_s[-1] - timeline.times_s[-2])
    positions[beyond] = n - 1 + (times_s[beyond] - timeline.times_s[-1]) / last_step
    # Rounded first so that float noise (29.97 fps steps) cannot tip an exact .5 either way.
    return np.clip(np.rint(np.round(positions, 6)), 0, n - 1).astype(np.int64)


def _window(name: str, indices: tuple[int, ...], timeline: Timeline, fps: float) -> Window:
    start_s = float(timeline.times_s[indices[0]])
    warning = None
    distinct = len(set(indices))
    if distinct < len(indices) and not name.startswith("shrink"):
        warning = (
            f"window {name} shows {distinct} distinct frames in {len(indices)}: the clip holds frames "
            f"longer than 1/{fps:g} s (a lower or variable frame rate), so frames repeat"
        )
    return Window(name, indices, start_s, speedup_of(timeline, indices, fps), warning)


def _too_short(timeline: Timeline, sampling: FrameSampling, num_slots: int) -> str:
    counts = list(sampling.counts)
    return (
        f"clip too short: {timeline.num_frames} frames ({timeline.end_s:.2f} s) give {num_slots} frames at "
        f"{sampling.fps:g} fps from frame {sampling.start_frame}, fewer than target_frames {counts}; "
        "use shrink_video_to_frames: true, fewer num_frames, a lower fps or frame_extraction: full"
    )
