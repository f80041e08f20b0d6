"""Reading and writing video clips with PyAV: probe, decode selected frames, write H.264 mp4."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from wan_assets.core.files import atomic_output

CLIP_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")

# Visually lossless for x264; generated samples are small, so quality wins over bytes.
_CRF = 18
# Bit-exact muxing drops the FFmpeg version tag and one encoder thread keeps the output independent
# of the core count; still, some libx264 builds (PyAV 18.1's) give other bytes for the same frames
# from one run to the next, so what is promised is the decoded pixels, not the bytes.
_ENCODER_OPTIONS = {"crf": str(_CRF), "threads": "1"}
_MUXER_OPTIONS = {"fflags": "+bitexact"}


class VideoError(ValueError):
    """A clip that cannot be used; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type[VideoError], tuple[Path, str]]:
        # Keeps the two-argument constructor working across process boundaries (pickling).
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class VideoProbe:
    """What a clip is, as the data pipeline sees it. Width and height are the displayed size
    (after the container's rotation), i.e. the shape read_frames returns."""

    path: Path
    fps: float
    num_frames: int
    duration_s: float
    width: int
    height: int
    codec: str
    rotation_deg: int = 0  # counter-clockwise rotation applied to decoded frames


def probe_video(path: Path | str, *, full_decode: bool = False) -> VideoProbe:
    """Describe a clip. Always decodes the first frame, so a clip that opens but cannot be decoded
    fails here rather than later. The frame count comes from the container when it has one; with
    `full_decode` (or when the container has none) every frame is decoded and counted, which also
    catches damage past the first frame."""
    path = Path(path)
    _check_file(path)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        fps = _frame_rate(stream, path)
        declared_frames = stream.frames
        count_all = full_decode or declared_frames <= 0
        first_frame, num_decoded = _decode_first_and_count(container, stream, path, count_all=count_all)
        num_frames = num_decoded if count_all else declared_frames
        duration_s = _duration_s(container, stream, num_frames, fps)
        rotation_deg = _rotation_deg(first_frame)
    width, height = first_frame.width, first_frame.height
    if rotation_deg % 180:
        width, height = height, width
    return VideoProbe(
        path=path,
        fps=fps,
        num_frames=num_frames,
        duration_s=duration_s,
        width=width,
        height=height,
        codec=stream.codec_context.name,
        rotation_deg=rotation_deg,
    )


def read_frames(path: Path | str, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at `indices` (any order, repeats allowed) as uint8 RGB, F x H x W x 3,
    upright. Decoding stops at the largest index and only the requested frames are kept, so a long
    clip never sits in memory whole."""
    path = Path(path)
    if len(indices) == 0:
        raise ValueError(f"{path}: no frame indices requested")
    if min(indices) < 0:
        raise ValueError(f"{path}: frame indices must be >= 0, got {min(indices)}")
    _check_file(path)
    wanted, last = set(indices), max(indices)
    found: dict[int, np.ndarray] = {}
    num_decoded = 0
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"  # frame threads: real clips are large, the order is unchanged
        try:
            for frame in container.decode(stream):
                if num_decoded in wanted:
                    found[num_decoded] = _to_rgb_upright(frame)
                num_decoded += 1
                if num_decoded > last:
                    break
        except av.FFmpegError as error:
            raise VideoError(path, f"decode failed after {num_decoded} good frames: {error}") from error
    if num_decoded == 0:
        raise VideoError(path, "zero frames")
    if last not in found:
        raise VideoError(path, f"frame {last} requested but the clip has only {num_decoded} frames")
    return np.stack([found[index] for index in indices])


def write_video(path: Path | str, frames_fhwc: np.ndarray, fps: float | Fraction) -> Path:
    """Write uint8 RGB frames (F x H x W x 3, H and W even) as an H.264 yuv420p mp4, atomically.
    The same frames and fps always decode to the same pixels."""
    path = Path(path)
    _check_frames(frames_fhwc)
    _, height, width, _ = frames_fhwc.shape
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    with (
        atomic_output(path) as tmp_path,
        av.open(str(tmp_path), "w", format="mp4", options=_MUXER_OPTIONS) as container,
    ):
        stream = container.add_stream("libx264", rate=rate, options=_ENCODER_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, frame_hwc in enumerate(frames_fhwc):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_hwc), format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate  # constant frame rate, one tick a frame
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the encoder's delayed (B-)frames
    return path


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise VideoError(path, "file not found")
    if path.stat().st_size == 0:
        raise VideoError(path, "empty file")


@contextmanager
def _open_input(path: Path) -> Iterator[av.container.InputContainer]:
    try:
        container = av.open(str(path), "r")
    except av.FFmpegError as error:
        raise VideoError(path, f"not a video / no video stream ({error.strerror})") from error
    with container:
        yield container


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video:
        raise VideoError(path, "not a video / no video stream")
    return container.streams.video[0]


def _frame_rate(stream: av.VideoStream, path: Path) -> float:
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VideoError(path, "no frame rate in the container")
    return float(rate)


def _decode_first_and_count(
    container: av.container.InputContainer, stream: av.VideoStream, path: Path, *, count_all: bool
) -> tuple[av.VideoFrame, int]:
    """Return the first decoded frame and how many frames were decoded (1 unless `count_all`)."""
    first_frame: av.VideoFrame | None = None
    num_decoded = 0
    try:
        for frame in container.decode(stream):
            if first_frame is None:
                first_frame = frame
            num_decoded += 1
            if not count_all:
                break
    except av.FFmpegError as error:
        raise VideoError(path, f"decode failed after {num_decoded} good frames: {error}") from error
    if first_frame is None:
        raise VideoError(path, "zero frames")
    return first_frame, num_decoded


def _duration_s(
    container: av.container.InputContainer, stream: av.VideoStream, num_frames: int, fps: float
) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return num_frames / fps


def _rotation_deg(frame: av.VideoFrame) -> int:
    # Phones store portrait clips as landscape frames plus a display matrix; PyAV reports its
    # counter-clockwise angle. Only quarter turns occur in practice.
    return round(frame.rotation / 90) * 90 % 360


def _to_rgb_upright(frame: av.VideoFrame) -> np.ndarray:
    rgb_hwc = frame.to_ndarray(format="rgb24")
    quarter_turns = _rotation_deg(frame) // 90
    # np.rot90 turns counter-clockwise, the same sense as frame.rotation.
    return np.ascontiguousarray(np.rot90(rgb_hwc, k=quarter_turns)) if quarter_turns else rgb_hwc


def _check_frames(frames_fhwc: np.ndarray) -> None:
    if frames_fhwc.dtype != np.uint8 or frames_fhwc.ndim != 4 or frames_fhwc.shape[-1] != 3:
        raise ValueError(
            f"frames must be uint8 F x H x W x 3, got {frames_fhwc.dtype} {tuple(frames_fhwc.shape)}"
        )
    num_frames, height, width, _ = frames_fhwc.shape
    if num_frames == 0:
        raise ValueError("frames must hold at least one frame")
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even width and height, got {width}x{height}")
