"""Reading and writing video clips with PyAV: probe, the frames' presentation times, decode selected
frames (seeking to the keyframe before each needed stretch), write H.264 mp4."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from wan_assets.core.files import atomic_output

CLIP_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
# FFmpeg's demuxers of single pictures: a PNG or JPEG renamed .mp4 opens as one of these.
_IMAGE_DEMUXERS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe", "gif_pipe")

# Visually lossless for x264; generated samples are small, so quality wins over bytes.
_CRF = 18
# Bit-exact muxing drops the FFmpeg version tag and one encoder thread keeps the output independent
# of the core count. x264's macroblock tree (its rate control's look-ahead) is off: in PyAV 18.1's
# libx264 its assembly made other bytes, and now and then other pixels, for the same frames,
# depending on what the process had encoded before (tests/test_synthetic.py); at CRF 18 it only
# saves bits.
_ENCODER_OPTIONS = {"crf": str(_CRF), "threads": "1", "x264-params": "mbtree=0"}
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
    """What a clip is, as the data pipeline sees it. Width and height are the displayed size: the
    stored width times the pixel aspect ratio (SAR: HDV 1440x1080 at 4:3 shows 1920x1080), then
    the container's rotation. read_frames returns the stored pixels, upright; frames_to_bucket
    scales them to the displayed shape."""

    path: Path
    fps: float
    num_frames: int
    duration_s: float
    width: int
    height: int
    codec: str
    rotation_deg: int = 0  # counter-clockwise rotation applied to decoded frames
    pixel_aspect: float = 1.0  # sample aspect ratio (width of a stored pixel over its height)


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
        pixel_aspect = _pixel_aspect(stream)
        _refuse_still(container, stream, path, num_frames)
    width, height = round(first_frame.width * pixel_aspect), first_frame.height
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
        pixel_aspect=pixel_aspect,
    )


@dataclass(frozen=True, eq=False)
class Timeline:
    """When each frame of a clip is shown: presentation times in seconds from the first frame
    (ascending, index = presentation order = decode output order), when the last one stops showing,
    and which frames are keyframes (where decoding can start). Read from the packets, no decoding."""

    times_s: np.ndarray  # [N] float64
    end_s: float
    keyframes: tuple[int, ...]  # presentation indices, ascending; 0 when the clip can be decoded at all
    pts: tuple[int, ...] = ()  # stream time_base ticks per frame (for seeking); empty for a made-up timeline

    @property
    def num_frames(self) -> int:
        return len(self.times_s)

    @classmethod
    def constant(cls, num_frames: int, fps: float) -> Timeline:
        """A constant-frame-rate timeline (every frame a keyframe), for planning without a file."""
        times = np.arange(num_frames, dtype=np.float64) / fps
        return cls(times, num_frames / fps, tuple(range(num_frames)))

    def frame_duration_s(self, index: int) -> float:
        """How long frame `index` is shown."""
        following = self.times_s[index + 1] if index + 1 < self.num_frames else self.end_s
        return float(following - self.times_s[index])


def read_timeline(path: Path | str) -> Timeline:
    """The clip's Timeline from its packets (a demux pass: reads the file, decodes nothing)."""
    path = Path(path)
    _check_file(path)
    stamps: list[tuple[int, bool, int]] = []  # (pts, keyframe, duration) per packet with a picture
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        fps = _frame_rate(stream, path)
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream marker
                stamp = packet.pts if packet.pts is not None else packet.dts
                stamps.append((-1 if stamp is None else stamp, packet.is_keyframe, packet.duration or 0))
        except av.FFmpegError as error:
            raise VideoError(path, f"demux failed after {len(stamps)} packets: {error}") from error
        time_base = float(stream.time_base) if stream.time_base else 1.0 / fps
    if not stamps:
        raise VideoError(path, "zero frames")
    if any(stamp < 0 for stamp, _, _ in stamps):
        # No timestamps (some raw AVI): frame n is shown at n / fps, and decoding counts frames.
        times = np.arange(len(stamps), dtype=np.float64) / fps
        return Timeline(times, len(stamps) / fps, (0,))
    stamps.sort()
    ticks = np.array([stamp for stamp, _, _ in stamps], dtype=np.int64)
    times = (ticks - ticks[0]) * time_base
    last_duration = stamps[-1][2] * time_base or (times[-1] / (len(times) - 1) if len(times) > 1 else 1 / fps)
    # Frames before the first keyframe (an open GOP) decode from the start of the stream.
    keys = tuple(sorted({0, *(i for i, (_, key, _) in enumerate(stamps) if key)}))
    return Timeline(times, float(times[-1] + last_duration), keys, tuple(int(t) for t in ticks))


@dataclass
class DecodeStats:
    """Decoding work, summed over the calls it is passed to (the cache reports it per clip)."""

    frames_decoded: int = 0
    seeks: int = 0


@dataclass
class _Cursor:
    """Where decoding stands: the presentation index of the last decoded frame (-1: none yet)."""

    position: int = -1
    frames: Iterator[av.VideoFrame] | None = field(default=None, repr=False)


def iter_frames(
    path: Path | str, indices: Iterable[int], timeline: Timeline, stats: DecodeStats | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, uint8 RGB H x W x 3 upright) for each distinct index, ascending. Decoding seeks to
    the keyframe at or before each needed frame whenever that skips frames, so the work is about
    the frames asked for (times the keyframe interval), not the clip's length."""
    path = Path(path)
    wanted = sorted(set(indices))
    if not wanted:
        return
    if wanted[0] < 0 or wanted[-1] >= timeline.num_frames:
        raise ValueError(
            f"{path}: frame indices must be in [0, {timeline.num_frames}), got {wanted[0]}..{wanted[-1]}"
        )
    stats = stats if stats is not None else DecodeStats()
    index_of_pts = {p: i for i, p in enumerate(timeline.pts)}
    keyframes = np.asarray(timeline.keyframes)
    with _open_input(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"  # frame threads: real clips are large, the order is unchanged
        cursor = _Cursor()
        for index in wanted:
            key = int(keyframes[np.searchsorted(keyframes, index, side="right") - 1])
            if cursor.frames is None or (timeline.pts and key > cursor.position + 1):
                _seek(container, stream, timeline, key, cursor, stats)
            yield index, _decode_until(cursor, index, index_of_pts, path, stats)


def _seek(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    timeline: Timeline,
    key: int,
    cursor: _Cursor,
    stats: DecodeStats,
) -> None:
    """Start decoding at keyframe `key` (from the start when the clip has no timestamps)."""
    if timeline.pts:
        # Backward: the demuxer lands on this keyframe or an earlier one, never after it.
        container.seek(timeline.pts[key], stream=stream, backward=True, any_frame=False)
        stats.seeks += 1
        cursor.position = key - 1
    else:
        cursor.position = -1
    cursor.frames = container.decode(stream)


def _decode_until(
    cursor: _Cursor, index: int, index_of_pts: dict[int, int], path: Path, stats: DecodeStats
) -> np.ndarray:
    assert cursor.frames is not None, "seeked first"
    try:
        for frame in cursor.frames:
            stats.frames_decoded += 1
            # Presentation index from the frame's timestamp; a stream without them counts frames.
            if not index_of_pts or frame.pts is None:
                position = cursor.position + 1
            else:
                position = index_of_pts.get(frame.pts, -1)
            if position < 0:
                continue  # a frame the timeline does not list (before the first keyframe)
            cursor.position = position
            if position == index:
                return _to_rgb_upright(frame)
            if position > index:
                break
    except av.FFmpegError as error:
        raise VideoError(path, f"decode failed near frame {cursor.position + 1}: {error}") from error
    raise VideoError(path, f"frame {index} is listed in the container but did not decode")


def read_frames(path: Path | str, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at `indices` (any order, repeats allowed) as uint8 RGB, F x H x W x 3,
    upright, counting frames from the start (no timestamps needed). Decoding stops at the largest
    index and only the requested frames are kept; for frames deep into a long clip, iter_frames
    with the clip's Timeline seeks instead."""
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
    The same frames and fps always give the same bytes."""
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


def _pixel_aspect(stream: av.VideoStream) -> float:
    # The container's value first, then the bitstream's, as FFmpeg's av_guess_sample_aspect_ratio.
    for ratio in (stream.sample_aspect_ratio, stream.codec_context.sample_aspect_ratio):
        if ratio and ratio > 0:
            return float(ratio)
    return 1.0


def _refuse_still(
    container: av.container.InputContainer, stream: av.VideoStream, path: Path, num_frames: int
) -> None:
    """A picture is not a clip: training it as a video would teach a frozen scene."""
    if container.format.name in _IMAGE_DEMUXERS or any(
        name in _IMAGE_DEMUXERS for name in container.format.name.split(",")
    ):
        raise VideoError(
            path,
            f"a still image ({stream.codec_context.name}), not a video; convert it to a clip or remove it "
            "from the dataset folder",
        )
    if num_frames == 1:
        raise VideoError(path, "a single frame, not a video; a clip needs motion to train on")


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
