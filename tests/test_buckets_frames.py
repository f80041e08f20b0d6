"""Pure data rules: bucket tables, clip-to-bucket fit, frame indices and jitter, captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wan_assets.core.data.buckets import (
    Bucket,
    BucketError,
    bucket_sizes,
    choose_bucket,
    crop_loss,
    resize_plan,
)
from wan_assets.core.data.captions import CaptionError, apply_trigger, read_caption, require_caption
from wan_assets.core.data.frames import FrameSampling, FrameSamplingError, plan_frames


def test_bucket_table_for_262144_pixels() -> None:
    # Hand-computed: W = floor(sqrt(P*a)), H = floor(sqrt(P/a)), each floored to a multiple of 16.
    assert bucket_sizes(262144) == [
        (512, 512),
        (672, 384),
        (384, 672),
        (576, 432),
        (432, 576),
        (640, 400),
        (400, 640),
    ]


def test_bucket_table_shrinks_until_under_budget() -> None:
    for budget in (4096, 50_000, 262144, 480 * 832, 1_000_000):
        for w, h in bucket_sizes(budget):
            assert w * h <= budget and w % 16 == 0 and h % 16 == 0


def test_clip_goes_to_least_lossy_bucket() -> None:
    assert choose_bucket(1920, 1080, 33, 262144) == Bucket(672, 384, 33)
    assert choose_bucket(1080, 1920, 33, 262144) == Bucket(384, 672, 33)
    assert choose_bucket(1440, 1080, 33, 262144) == Bucket(576, 432, 33)
    assert choose_bucket(1000, 1000, 33, 262144) == Bucket(512, 512, 33)
    # The chosen bucket loses no more than any other.
    losses = [crop_loss(1280, 800, w, h) for w, h in bucket_sizes(262144)]
    assert crop_loss(1280, 800, 640, 400) == min(losses) == 0.0


def test_small_clip_is_never_upscaled() -> None:
    bucket = choose_bucket(320, 180, 17, 262144, no_upscale=True)
    assert bucket.width <= 320 and bucket.height <= 180
    # The bucket's aspect (16:9) at the largest multiple-of-16 size inside the clip.
    assert (bucket.width, bucket.height) == (304, 176)
    square = choose_bucket(100, 100, 17, 262144)
    assert (square.width, square.height) == (96, 96)
    # With upscaling allowed the seed's behaviour comes back.
    assert choose_bucket(320, 180, 17, 262144, no_upscale=False) == Bucket(672, 384, 17)
    with pytest.raises(BucketError, match="smaller than the smallest bucket"):
        choose_bucket(12, 40, 17, 262144)


def test_frame_count_is_part_of_the_bucket_key() -> None:
    assert choose_bucket(640, 400, 33, 262144).key != choose_bucket(640, 400, 17, 262144).key
    assert Bucket.from_key("640x400x33") == Bucket(640, 400, 33)


def test_resize_plan_covers_then_centre_crops() -> None:
    scaled_w, scaled_h, left, top = resize_plan(1920, 1080, Bucket(512, 512, 1))
    assert scaled_h == 512 and scaled_w == 910 and left == (910 - 512) // 2 and top == 0


SHRINK = FrameSampling(num_frames=33, shrink_to_frames=True, fps=16)


@pytest.mark.parametrize("num_source", [33, 34, 100, 500])
def test_shrink_spreads_over_whole_clip(num_source: int) -> None:
    plan = plan_frames(num_source, 30.0, SHRINK, seed_key="a", variant=0)
    assert len(plan.indices) == 33 and plan.indices[0] == 0 and plan.indices[-1] == num_source - 1
    assert list(plan.indices) == sorted(plan.indices)


def test_shrink_warns_when_motion_speeds_up() -> None:
    assert plan_frames(40, 16.0, SHRINK, seed_key="a", variant=0).warning is None
    slow = plan_frames(300, 30.0, SHRINK, seed_key="a", variant=0)
    assert slow.speedup > 1.5 and "speeds motion up" in slow.warning


def test_fps_true_sampling_and_too_short_clip() -> None:
    sampling = FrameSampling(num_frames=9, shrink_to_frames=False, fps=15, start_frame=3)
    plan = plan_frames(100, 30.0, sampling, seed_key="a", variant=0)
    assert plan.indices == (3, 5, 7, 9, 11, 13, 15, 17, 19)
    assert abs(plan.speedup - 17 / 18) < 1e-9  # real time: 17 frames at 30 fps shown as 9 at 15
    with pytest.raises(FrameSamplingError, match="clip too short: 10 frames"):
        plan_frames(10, 30.0, sampling, seed_key="a", variant=0)


@pytest.mark.parametrize("jitter", [1, 2, 5])
def test_jitter_is_bounded_ordered_in_range_and_deterministic(jitter: int) -> None:
    sampling = FrameSampling(num_frames=17, shrink_to_frames=True, fps=16, jitter=jitter)
    base = np.rint(np.linspace(0, 59, 17)).astype(int)
    variants = [plan_frames(60, 30.0, sampling, seed_key="clip-sha", variant=v).indices for v in range(6)]
    for indices in variants:
        assert len(indices) == 17 and (len(indices) - 1) % 4 == 0
        assert all(0 <= i < 60 for i in indices) and list(indices) == sorted(indices)
        # Clamping to keep order only ever moves an index towards its neighbour's, never past J.
        assert np.abs(np.array(indices) - base).max() <= jitter
    assert len(set(variants)) > 1, "variants should differ"
    again = [plan_frames(60, 30.0, sampling, seed_key="clip-sha", variant=v).indices for v in range(6)]
    assert again == variants
    other = plan_frames(60, 30.0, sampling, seed_key="other-sha", variant=0).indices
    assert other != variants[0] or other != variants[1]


def test_captions(tmp_path: Path) -> None:
    clip = tmp_path / "a.mp4"
    (tmp_path / "a.txt").write_text("[trigger] a red  circle\n moves", encoding="utf-8")
    assert read_caption(clip, ".txt", trigger="sks", default=None) == "sks a red circle moves"
    assert apply_trigger("a red circle", "sks") == "sks, a red circle"
    assert apply_trigger("[name] spins", "sks") == "sks spins"
    assert apply_trigger("[trigger] spins", None) == "spins"
    missing = tmp_path / "b.mp4"
    assert read_caption(missing, ".txt", trigger=None, default="a clip") == "a clip"
    with pytest.raises(CaptionError, match=r"b\.txt: caption file missing for b\.mp4"):
        read_caption(missing, ".txt", trigger=None, default=None)
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe\xfa bad")
    with pytest.raises(CaptionError, match=r"c\.txt: caption is not UTF-8"):
        read_caption(tmp_path / "c.mp4", ".txt", trigger="sks", default=None)
    (tmp_path / "d.txt").write_text("  \n")
    assert read_caption(tmp_path / "d.mp4", ".txt", trigger=None, default=None) == ""
    with pytest.raises(CaptionError, match="caption is empty"):
        require_caption("", tmp_path / "d.mp4", ".txt")


def test_concurrent_steps_claim_different_gpus(tmp_path: Path, monkeypatch) -> None:
    import threading
    import time

    import torch

    from wan_assets.core.devices import claim_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    held: list = []
    release = threading.Event()

    def step() -> None:
        with claim_device(tmp_path, poll_s=0.01) as device:
            held.append(str(device))
            release.wait(5)

    threads = [threading.Thread(target=step) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(held) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert sorted(held) == ["cuda:0", "cuda:1"], "two steps, two GPUs; the third waits"
    release.set()
    for t in threads:
        t.join(5)
    assert len(held) == 3 and held[2] in ("cuda:0", "cuda:1")
