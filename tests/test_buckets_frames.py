"""Pure data rules: bucket tables, clip-to-bucket fit, frame indices and jitter, captions."""

from __future__ import annotations

import itertools
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
from wan_assets.core.data.frames import FrameSampling, FrameSamplingError, Window, jittered, plan_windows
from wan_assets.core.data.video_io import Timeline


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
    # HDV: 1440x1080 stored at a pixel aspect of 4:3 is shown (and probed) as 1920x1080.
    assert choose_bucket(round(1440 * 4 / 3), 1080, 33, 262144) == Bucket(672, 384, 33)
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


def one_window(num_source: int, source_fps: float, sampling: FrameSampling) -> Window:
    (window,) = plan_windows(Timeline.constant(num_source, source_fps), sampling).windows
    return window


@pytest.mark.parametrize("num_source", [33, 34, 100, 500])
def test_shrink_spreads_over_whole_clip(num_source: int) -> None:
    window = one_window(num_source, 30.0, SHRINK)
    assert len(window.indices) == 33 and window.indices[0] == 0 and window.indices[-1] == num_source - 1
    # Constant frame rate: the seed's frame indices, so caches made before keep their keys.
    assert window.indices == tuple(np.rint(np.linspace(0, num_source - 1, 33)).astype(int))


def test_shrink_warns_when_motion_speeds_up_and_refuses_a_clip_shorter_than_asked() -> None:
    assert one_window(40, 16.0, SHRINK).warning is None
    fast = one_window(300, 30.0, SHRINK)
    assert fast.speedup > 1.5 and "speeds motion up" in fast.warning
    # Spreading 5 frames over 9 would repeat 4 of them ([0, 0, 1, 2, 2, 2, 3, 4, 4]): refused, with the fix.
    short = FrameSampling(num_frames=9, shrink_to_frames=True, fps=16)
    with pytest.raises(FrameSamplingError, match=r"clip too short: 5 frames.*4 would repeat.*num_frames: 5"):
        plan_windows(Timeline.constant(5, 30.0), short)


def test_fps_true_sampling_and_too_short_clip() -> None:
    sampling = FrameSampling(num_frames=9, shrink_to_frames=False, fps=15, start_frame=3)
    window = one_window(100, 30.0, sampling)
    assert window.indices == (3, 5, 7, 9, 11, 13, 15, 17, 19)
    assert abs(window.speedup - 1) < 1e-9  # real time: 16 frames at 30 fps shown as 8 steps at 15
    assert one_window(20, 30.0, sampling).indices[-1] == 19  # exactly long enough
    with pytest.raises(FrameSamplingError, match="clip too short: 10 frames"):
        plan_windows(Timeline.constant(10, 30.0), sampling)


@pytest.mark.parametrize("jitter", [1, 2, 5])
def test_jitter_is_bounded_ordered_distinct_in_range_and_deterministic(jitter: int) -> None:
    sampling = FrameSampling(num_frames=17, shrink_to_frames=True, fps=16, jitter=jitter)
    window = one_window(60, 30.0, sampling)
    base = np.array(window.indices)
    variants = [jittered(window, 60, jitter, seed_key="clip-sha", variant=v) for v in range(6)]
    for indices in variants:
        assert len(indices) == 17 and all(0 <= i < 60 for i in indices)
        # Strictly increasing: the clip has the frames, so no frame is shown twice.
        assert all(b > a for a, b in itertools.pairwise(indices))
        assert np.abs(np.array(indices) - base).max() <= jitter
    assert len(set(variants)) > 1, "variants should differ"
    again = [jittered(window, 60, jitter, seed_key="clip-sha", variant=v) for v in range(6)]
    assert again == variants
    assert jittered(window, 60, jitter, seed_key="other-sha", variant=0) not in variants[:1]


def test_jitter_never_repeats_a_frame_at_81_to_33() -> None:
    """The case the seed got wrong: 81 source frames spread over 33 with jitter 1 repeated a frame in
    most variants; with distinct frames available none may repeat."""
    window = one_window(81, 16.0, FrameSampling(num_frames=33, shrink_to_frames=True, fps=16, jitter=1))
    for variant in range(200):
        indices = jittered(window, 81, 1, seed_key="sha", variant=variant)
        assert len(set(indices)) == 33 and list(indices) == sorted(indices)


def test_windows_per_mode_match_musubi_tuner() -> None:
    """musubi-tuner's documented 40-frame example (docs/dataset_config.md, frame_extraction)."""
    timeline = Timeline.constant(40, 16.0)

    def starts(mode: str, **kw) -> list[str]:
        sampling = FrameSampling(33, False, 16, extraction=mode, target_frames=(1, 13, 25), **kw)
        return [w.name for w in plan_windows(timeline, sampling).windows]

    assert starts("head") == ["head00000-001", "head00000-013", "head00000-025"]
    chunk = starts("chunk")
    assert len(chunk) == 40 + 3 + 1 and chunk[-4:] == [
        "chunk00000-013",
        "chunk00013-013",
        "chunk00026-013",
        "chunk00000-025",
    ]
    assert starts("slide", frame_stride=10) == [
        *(f"slide{s:05d}-001" for s in (0, 10, 20, 30)),
        *(f"slide{s:05d}-013" for s in (0, 10, 20)),
        *(f"slide{s:05d}-025" for s in (0, 10)),
    ]
    assert starts("uniform", frame_sample=4) == [
        *(f"uniform{s:05d}-001" for s in (0, 13, 26, 39)),
        *(f"uniform{s:05d}-013" for s in (0, 9, 18, 27)),
        *(f"uniform{s:05d}-025" for s in (0, 5, 10, 15)),
    ]
    assert starts("full", max_frames=45) == ["full00000-037"]  # 40 rounded down to 4k+1
    assert starts("full", max_frames=20) == ["full00000-017"]
    # Each window is a stretch of consecutive frames (the clip runs at the dataset fps here).
    (window,) = plan_windows(timeline, FrameSampling(13, False, 16, extraction="head")).windows
    assert window.indices == tuple(range(13))


def test_windows_at_the_dataset_fps_and_lengths_that_do_not_fit() -> None:
    # 3 s at 30 fps sampled at 16 fps: 48 slots, every other source frame or so.
    timeline = Timeline.constant(90, 30.0)
    plan = plan_windows(timeline, FrameSampling(17, False, 16, extraction="chunk", target_frames=(17, 49)))
    assert [w.name for w in plan.windows] == ["chunk00000-017", "chunk00017-017"]
    assert plan.windows[1].indices[0] == round(17 * 30 / 16)
    assert all(abs(w.speedup - 1) < 0.1 for w in plan.windows)
    assert "target_frames [49]" in plan.warnings[0]
    with pytest.raises(FrameSamplingError, match="fewer than target_frames"):
        plan_windows(timeline, FrameSampling(49, False, 16, extraction="head"))


def test_auto_frame_count_takes_the_whole_clip_at_fps() -> None:
    # ai-toolkit's arithmetic: 3 s at 16 fps = 48 frames; trimmed: (48 - 1) // 4 * 4 + 1 = 45 from
    # the start at real speed; untrimmed: 48 // 4 * 4 + 1 = 49, spread over the whole clip.
    timeline = Timeline.constant(90, 30.0)
    (window,) = plan_windows(timeline, FrameSampling(9, True, 16, auto_frame_count=True)).windows
    assert window.num_frames == 45 and window.indices[0] == 0 and abs(window.speedup - 1) < 0.05
    spread = FrameSampling(9, True, 16, auto_frame_count=True, trim_auto_frame_count_tail=False)
    (window,) = plan_windows(timeline, spread).windows
    assert window.num_frames == 49 and window.indices[-1] == 89


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
