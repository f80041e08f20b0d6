"""Aspect-ratio buckets (docs/architecture.md §4): the one place where bucket sizes and clip-to-bucket fit are defined.

A bucket is a (width, height, num_frames) triple; clips in one bucket batch together. Sizes come from
`max_pixels_per_frame` P (or each `resolution` r, as P = r*r, one copy of the dataset per r): for each aspect ratio a, W = floor(sqrt(P*a)),
H = floor(sqrt(P/a)), each floored to a multiple of 16, shrunk until W*H <= P. A clip goes to the
bucket that crops away the smallest share of its displayed shape (pixel aspect ratio and rotation
applied) when scaled to cover the bucket, then centre-crops.
With `bucket_no_upscale` a clip smaller than its bucket gets the same aspect at the largest size it
covers without enlargement (the seed README promises this; the seed code upscales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# (width, height) ratios; the order is the tie-break order.
ASPECT_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (16, 9), (9, 16), (4, 3), (3, 4), (16, 10), (10, 16))
MULTIPLE = 16  # VAE 8x spatial x patch 2


class BucketError(ValueError):
    """A clip too small for any bucket without upscaling."""


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int
    num_frames: int

    @property
    def key(self) -> str:
        return f"{self.width}x{self.height}x{self.num_frames}"

    @classmethod
    def from_key(cls, key: str) -> Bucket:
        width, height, frames = (int(v) for v in key.split("x"))
        return cls(width, height, frames)


def _floor16(value: float) -> int:
    return max(MULTIPLE, int(value) // MULTIPLE * MULTIPLE)


def bucket_sizes(max_pixels: int) -> list[tuple[int, int]]:
    """(width, height) per aspect ratio for a pixel budget P, in ASPECT_RATIOS order."""
    sizes = []
    for aw, ah in ASPECT_RATIOS:
        a = aw / ah
        w, h = _floor16(math.sqrt(max_pixels * a)), _floor16(math.sqrt(max_pixels / a))
        while w * h > max_pixels and (w > MULTIPLE or h > MULTIPLE):
            # Shrink the longer side first so the aspect ratio drifts as little as possible.
            if w >= h:
                w -= MULTIPLE
            else:
                h -= MULTIPLE
        sizes.append((w, h))
    return sizes


def crop_loss(src_w: int, src_h: int, dst_w: int, dst_h: int) -> float:
    """Share of the source cropped away when scaled (up or down) to cover dst, then centre-cropped."""
    scale = max(dst_w / src_w, dst_h / src_h)
    return 1.0 - (dst_w * dst_h) / (scale * src_w * scale * src_h)


def choose_bucket(
    src_w: int, src_h: int, num_frames: int, max_pixels: int, *, no_upscale: bool = True
) -> Bucket:
    """The bucket one clip of src_w x src_h goes to."""
    sizes = bucket_sizes(max_pixels)
    w, h = min(sizes, key=lambda s: crop_loss(src_w, src_h, *s))
    if no_upscale and (w > src_w or h > src_h):
        w, h = _fit_inside(src_w, src_h, w / h)
    return Bucket(w, h, num_frames)


def _fit_inside(src_w: int, src_h: int, aspect: float) -> tuple[int, int]:
    """The largest multiple-of-16 size of about this aspect that the clip covers without enlargement."""
    w = min(src_w, src_h * aspect)
    h = w / aspect
    w16, h16 = int(w) // MULTIPLE * MULTIPLE, int(h) // MULTIPLE * MULTIPLE
    if w16 < MULTIPLE or h16 < MULTIPLE:
        raise BucketError(
            f"clip of {src_w}x{src_h} is smaller than the smallest bucket ({MULTIPLE}x{MULTIPLE}) "
            "and bucket_no_upscale is on"
        )
    return w16, h16


def resize_plan(src_w: int, src_h: int, bucket: Bucket) -> tuple[int, int, int, int]:
    """(scaled_w, scaled_h, left, top): scale to cover the bucket, then the centre crop offsets."""
    scale = max(bucket.width / src_w, bucket.height / src_h)
    scaled_w = max(bucket.width, round(src_w * scale))
    scaled_h = max(bucket.height, round(src_h * scale))
    return scaled_w, scaled_h, (scaled_w - bucket.width) // 2, (scaled_h - bucket.height) // 2
