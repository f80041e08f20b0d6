"""Deterministic synthetic clips with captions: the demo data set and the test fixtures.

Each clip is a flat background with one or two flat shapes that move, grow, shrink or spin, and
its caption says exactly that, so a tiny model trained on CPU has something learnable to fit.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wan_assets.core.data.video_io import write_video
from wan_assets.core.files import atomic_output

COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "orange": (245, 140, 30),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
    "black": (10, 10, 10),
    "grey": (128, 128, 128),
    "dark blue": (20, 30, 90),
    "dark green": (20, 70, 35),
}
SHAPE_KINDS = ("circle", "square", "triangle")
MOTION_PHRASES = {
    "right": "moves to the right",
    "left": "moves to the left",
    "up": "moves up",
    "down": "moves down",
    "grows": "grows",
    "shrinks": "shrinks",
    "spins": "spins",
}
TRIGGER_TOKEN = "[trigger]"


@dataclass(frozen=True)
class MovingShape:
    colour: str  # a key of COLOURS_RGB
    kind: str  # one of SHAPE_KINDS
    motion: str  # a key of MOTION_PHRASES

    @property
    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.kind} {MOTION_PHRASES[self.motion]}"


@dataclass(frozen=True)
class SampleClip:
    name: str  # path relative to the output folder, without extension
    shapes: tuple[MovingShape, ...]
    background: str
    width: int
    height: int
    num_frames: int
    fps: int
    trigger: bool  # whether the caption starts with [trigger]

    @property
    def caption(self) -> str:
        text = " and ".join(shape.phrase for shape in self.shapes) + f" on a {self.background} background"
        return f"{TRIGGER_TOKEN} {text}" if self.trigger else text


def _clip(
    name: str, shapes: str, background: str, size: str, num_frames: int, fps: int, trigger: bool
) -> SampleClip:
    """One table row as a SampleClip."""
    width, height = (int(side) for side in size.split("x"))
    parsed = tuple(MovingShape(*spec.split()) for spec in shapes.split(" + "))
    # The table is ours, so a bad row is a bug here, not a user mistake.
    assert width % 16 == 0 and height % 16 == 0 and min(width, height) >= 64, size
    assert background in COLOURS_RGB, background
    for shape in parsed:
        assert shape.colour in COLOURS_RGB and shape.kind in SHAPE_KINDS and shape.motion in MOTION_PHRASES
        assert (shape.kind, shape.motion) != ("circle", "spins"), "a spinning circle looks still"
    return SampleClip(name, parsed, background, width, height, num_frames, fps, trigger)


# Landscape, portrait and square; 17..49 frames; 8..24 fps; two clips one folder down (recursion).
# Shapes are "colour kind motion", two of them joined by " + ".
# fmt: off
_CLIP_TABLE = (
    # name                   shapes                                  background    size     frames fps trigger
    ("circle_right",         "red circle right",                     "dark blue",  "160x96",  17,  8, True),
    ("square_left",          "yellow square left",                   "black",      "192x112", 25, 12, False),
    ("triangle_up",          "green triangle up",                    "grey",       "96x160",  33, 16, True),
    ("circle_down",          "white circle down",                    "dark green", "96x160",  21, 24, False),
    ("square_grows",         "orange square grows",                  "dark blue",  "128x128", 29, 12, True),
    ("circle_shrinks",       "cyan circle shrinks",                  "black",      "128x128", 17, 16, False),
    ("triangle_spins",       "purple triangle spins",                "white",      "160x96",  41, 24, True),
    ("square_down",          "blue square down",                     "grey",       "128x128", 45,  8, False),
    ("more/square_circle",   "red square spins + blue circle right", "black",      "192x112", 49, 16, True),
    ("more/triangle_circle", "red triangle left + green circle up",  "dark blue",  "96x160",  37, 12, False),
)
# fmt: on
SAMPLE_CLIPS: tuple[SampleClip, ...] = tuple(_clip(*row) for row in _CLIP_TABLE)

# Bad inputs are built from one small valid clip; its frame count is what training normally asks.
_BAD_BASE = _clip("bad_base", "red circle right", "black", "64x64", 17, 8, False)
_TOO_SHORT = _clip("too_short", "red circle right", "black", "64x64", 5, 8, False)
BAD_INPUT_KINDS = ("corrupt", "empty", "not_video", "too_short", "bad_caption", "no_caption")
BAD_CAPTION_BYTES = b"\xff\xfe\xfa bad"


def write_sample_videos(out_dir: Path, *, seed: int = 0) -> list[Path]:
    """Write every clip of SAMPLE_CLIPS as `<name>.mp4` plus a UTF-8 `<name>.txt` caption under
    `out_dir`. The same seed gives byte-identical files. Returns the clip paths, sorted."""
    out_dir = Path(out_dir)
    paths = [_write_clip(out_dir / f"{clip.name}.mp4", clip, seed=seed) for clip in SAMPLE_CLIPS]
    return sorted(paths)


def write_bad_inputs(out_dir: Path) -> dict[str, Path]:
    """Write one file per BAD_INPUT_KINDS entry as `<kind>.mp4` under `out_dir`, each with a valid
    caption unless the case is about captions. Keys are the kinds, values the video paths."""
    out_dir = Path(out_dir)
    paths = {kind: out_dir / f"{kind}.mp4" for kind in BAD_INPUT_KINDS}
    for kind in ("corrupt", "bad_caption", "no_caption"):
        _write_clip(paths[kind], _BAD_BASE)
    _corrupt_media_data(paths["corrupt"])
    _write_bytes(paths["empty"], b"")
    _write_bytes(paths["not_video"], b"this is text, not a video\n")
    _write_clip(paths["too_short"], _TOO_SHORT)
    _write_bytes(paths["bad_caption"].with_suffix(".txt"), BAD_CAPTION_BYTES)
    paths["no_caption"].with_suffix(".txt").unlink()
    for kind in ("empty", "not_video"):
        _write_bytes(paths[kind].with_suffix(".txt"), _BAD_BASE.caption.encode("utf-8"))
    return paths


def render_frames(clip: SampleClip, *, seed: int = 0) -> np.ndarray:
    """The clip's frames, uint8 F x H x W x 3 RGB. The seed moves start positions and angles a
    little, so different seeds give different but equally captioned clips."""
    rng = np.random.default_rng([seed, zlib.crc32(clip.name.encode())])
    frames_fhwc = np.empty((clip.num_frames, clip.height, clip.width, 3), dtype=np.uint8)
    frames_fhwc[:] = COLOURS_RGB[clip.background]
    yy, xx = np.mgrid[0 : clip.height, 0 : clip.width].astype(np.float32)
    for shape, region in zip(clip.shapes, _regions(clip), strict=True):
        offset, angle0 = rng.uniform(-0.5, 0.5), rng.uniform(0.0, 2 * math.pi)
        for index in range(clip.num_frames):
            t = index / (clip.num_frames - 1)
            cx, cy, radius, angle = _pose(shape.motion, region, t, offset, angle0)
            mask_hw = _shape_mask(shape.kind, xx - cx, yy - cy, radius, angle)
            frames_fhwc[index][mask_hw] = COLOURS_RGB[shape.colour]
    return frames_fhwc


def _write_clip(video_path: Path, clip: SampleClip, *, seed: int = 0) -> Path:
    write_video(video_path, render_frames(clip, seed=seed), clip.fps)
    _write_bytes(video_path.with_suffix(".txt"), clip.caption.encode("utf-8"))
    return video_path


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp_path:
        tmp_path.write_bytes(data)


def _regions(clip: SampleClip) -> list[tuple[float, float, float, float]]:
    """(x0, y0, w, h) per shape: the whole frame, or two halves along the longer side so two
    shapes never overlap."""
    if len(clip.shapes) == 1:
        return [(0.0, 0.0, clip.width, clip.height)]
    if clip.width >= clip.height:
        half = clip.width / 2
        return [(0.0, 0.0, half, clip.height), (half, 0.0, half, clip.height)]
    half = clip.height / 2
    return [(0.0, 0.0, clip.width, half), (0.0, half, clip.width, half)]


def _pose(
    motion: str, region: tuple[float, float, float, float], t: float, offset: float, angle0: float
) -> tuple[float, float, float, float]:
    """Centre, radius and angle of a shape at time t in [0, 1]; moving shapes cross their region
    edge to edge, `offset` in [-0.5, 0.5] shifts them sideways."""
    x0, y0, w, h = region
    radius = min(w, h) / 4
    cx, cy = x0 + w / 2, y0 + h / 2
    reach_x, reach_y = w / 2 - radius - 2, h / 2 - radius - 2  # centre to edge, shape fully inside
    sweep = 2 * t - 1  # -1 -> +1
    angle = angle0
    if motion in ("right", "left"):
        cx += reach_x * (sweep if motion == "right" else -sweep)
        cy += reach_y * offset
    elif motion in ("down", "up"):
        cy += reach_y * (sweep if motion == "down" else -sweep)  # image rows grow downwards
        cx += reach_x * offset
    elif motion == "grows":
        radius *= 0.4 + 0.8 * t
    elif motion == "shrinks":
        radius *= 1.2 - 0.8 * t
    else:  # spins: half a turn over the clip
        angle += math.pi * t
    return cx, cy, radius, angle


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Pixels inside the shape; dx, dy are offsets from its centre, radius its circumradius-ish size."""
    if kind == "circle":
        return dx**2 + dy**2 <= radius**2
    if kind == "square":
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        half_side = 0.8 * radius
        return (np.abs(u) <= half_side) & (np.abs(v) <= half_side)
    # Equilateral triangle: inside all three edges, whose outward normals are 120 degrees apart
    # and lie radius/2 (the inradius) from the centre.
    inside = np.ones(dx.shape, dtype=bool)
    for k in range(3):
        normal = angle + math.pi / 2 + 2 * math.pi * k / 3
        inside &= dx * math.cos(normal) + dy * math.sin(normal) <= radius / 2
    return inside


def _corrupt_media_data(path: Path) -> None:
    """Overwrite the first three quarters of the mp4's media data (the `mdat` box, which sits between
    the header and the index) with junk: the file still opens, but its frames cannot be decoded."""
    data = bytearray(path.read_bytes())
    start, size = _find_box(data, b"mdat")
    payload_start, payload_size = start + 8, size - 8
    num_junk = payload_size * 3 // 4
    data[payload_start : payload_start + num_junk] = bytes((i * 151 + 7) % 256 for i in range(num_junk))
    _write_bytes(path, bytes(data))


def _find_box(data: bytearray, box_type: bytes) -> tuple[int, int]:
    """Offset and size of a top-level mp4 box (32-bit sizes only: we wrote the file ourselves)."""
    offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        assert size >= 8, f"unexpected mp4 box size {size} at {offset}"
        if data[offset + 4 : offset + 8] == box_type:
            return offset, size
        offset += size
    raise AssertionError(f"no {box_type!r} box in the mp4 we just wrote")
