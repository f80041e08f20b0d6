"""Real footage (docs/architecture.md §4): frames by presentation time, the displayed shape, seeking,
several windows and resolutions per clip, and the inputs that must be refused. Every clip is made
here with PyAV, tiny, with the property under test (VFR timestamps, pixel aspect, rotation, GOP)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from wan_assets.core.config import parse_config
from wan_assets.core.data.batches import BatchStream
from wan_assets.core.data.cache import (
    ClipSource,
    EncoderHandle,
    bucketed_videos,
    cache_dataset,
    plan_clip,
    probe_clip,
)
from wan_assets.core.data.captions import read_caption
from wan_assets.core.data.frames import FrameSampling, plan_windows
from wan_assets.core.data.video_io import (
    DecodeStats,
    VideoError,
    iter_frames,
    probe_video,
    read_frames,
    read_timeline,
)

from .test_cache import data_config

LEVELS_PER_S = 120  # a frame's grey level is its time: 1/30 s apart -> 4 levels apart


def write_clip(
    path: Path,
    frames_fhwc: np.ndarray,
    ticks: list[int] | None = None,
    *,
    rate: int = 30,
    sar: Fraction | None = None,
    rotation: int = 0,
    gop: int | None = None,
) -> Path:
    """H.264 mp4; frame n is shown at ticks[n] / rate seconds (default n / rate)."""
    _, height, width, _ = frames_fhwc.shape
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options={"g": str(gop)} if gop else {})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        if rotation:
            stream.set_display_rotation(rotation)
        for n, frame_hwc in enumerate(frames_fhwc):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame_hwc), format="rgb24")
            frame.pts, frame.time_base = (ticks[n] if ticks else n), Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def time_coded(ticks: list[int], rate: int = 30) -> np.ndarray:
    """Flat frames whose grey level encodes when they are shown."""
    levels = [round(LEVELS_PER_S * t / rate) for t in ticks]
    return np.stack([np.full((32, 48, 3), level, dtype=np.uint8) for level in levels])


def test_vfr_and_cfr_clips_of_the_same_motion_give_the_same_frames(tmp_path: Path) -> None:
    # 1.6 s of motion: filmed at 30 fps; and as a phone records it, 30 fps for 1 s then 10 fps.
    cfr_ticks = list(range(49))
    vfr_ticks = list(range(30)) + list(range(30, 49, 3))
    cfr = write_clip(tmp_path / "cfr.mp4", time_coded(cfr_ticks), cfr_ticks)
    vfr = write_clip(tmp_path / "vfr.mp4", time_coded(vfr_ticks), vfr_ticks)
    timelines = {name: read_timeline(path) for name, path in (("cfr", cfr), ("vfr", vfr))}
    assert timelines["vfr"].num_frames == 37 and timelines["vfr"].times_s[-1] == pytest.approx(1.6)
    samplings = [
        FrameSampling(num_frames=9, shrink_to_frames=True, fps=16),  # the seed's default
        FrameSampling(num_frames=9, shrink_to_frames=False, fps=5),  # fps-true
        FrameSampling(num_frames=5, shrink_to_frames=False, fps=5, extraction="slide", frame_stride=2),
    ]
    for sampling in samplings:
        plans = {name: plan_windows(t, sampling).windows for name, t in timelines.items()}
        assert [w.name for w in plans["cfr"]] == [w.name for w in plans["vfr"]]
        for a, b in zip(plans["cfr"], plans["vfr"], strict=True):
            shown = {name: timelines[name].times_s[list(w.indices)] for name, w in (("cfr", a), ("vfr", b))}
            np.testing.assert_allclose(shown["cfr"], shown["vfr"], atol=1e-6)
            assert a.speedup == pytest.approx(b.speedup, rel=0.05)  # real time, not average fps
            pixels = {
                name: [f.mean() for _, f in iter_frames(path, w.indices, timelines[name])]
                for name, path, w in (("cfr", cfr, a), ("vfr", vfr, b))
            }
            np.testing.assert_allclose(pixels["cfr"], pixels["vfr"], atol=1.5)
    # By frame number (the seed) the VFR clip's 4th of 9 spread frames would be frame 14 (0.47 s)
    # where the motion is at 0.6 s.
    (window,) = plan_windows(timelines["vfr"], samplings[0]).windows
    assert window.indices[3] == 18 and timelines["vfr"].times_s[18] == pytest.approx(0.6)


def test_seeking_decodes_about_the_frames_asked_for(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 32, 48, 3), dtype=np.uint8)
    path = write_clip(tmp_path / "long.mp4", noise, gop=10)
    timeline = read_timeline(path)
    assert len(timeline.keyframes) >= 30
    stats = DecodeStats()
    picked = dict(iter_frames(path, [295, 5, 150, 151], timeline, stats))
    assert sorted(picked) == [5, 150, 151, 295]
    assert stats.seeks == 3 and stats.frames_decoded <= 3 * 10 + 6, stats
    sequential = read_frames(path, [5, 150, 151, 295])
    for got, want in zip((picked[i] for i in (5, 150, 151, 295)), sequential, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.fixture
def tiny_job(tmp_path: Path, tiny_model_dir: Path):
    def make(folder: Path, **dataset):
        raw = data_config(folder, tiny_model_dir, **dataset)
        raw["config"]["process"][0]["datasets"][0].pop("max_pixels_per_frame", None)
        return parse_config(raw, workdir=tmp_path).job

    return make


def plan_of(path: Path, job, model: Path, tmp_path: Path):
    source = ClipSource(path.name, path, 0)
    return plan_clip(source, probe_clip(source), "a clip", job, EncoderHandle(str(model)), tmp_path / "cache")


def test_anamorphic_clip_goes_to_the_bucket_of_its_displayed_shape(
    tmp_path: Path, tiny_job, tiny_model_dir: Path
) -> None:
    """HDV-like: 72x54 stored (4:3) at a pixel aspect of 4:3 is shown 96x54 (16:9)."""
    frames = np.zeros((9, 54, 72, 3), dtype=np.uint8)
    frames[:, 15:39, 27:45] = 255  # 18x24 stored pixels: a square of 24x24 as shown
    (tmp_path / "clips").mkdir()
    path = write_clip(tmp_path / "clips" / "hdv.mp4", frames, sar=Fraction(4, 3))
    probe = probe_video(path)
    assert (probe.width, probe.height, probe.pixel_aspect) == (96, 54, pytest.approx(4 / 3))
    job = tiny_job(path.parent, resolution=[64], num_frames=9, temporal_jitter=0, cache_variants=1)
    plan = plan_of(path, job, tiny_model_dir, tmp_path)
    (sample,) = plan.samples
    assert sample.bucket == "80x48x9"  # 16:9; the stored shape would pick 4:3 (64x48)
    ((_, video),) = list(bucketed_videos(plan))
    white_rows, white_cols = np.nonzero(video[0, 4].numpy() > 0)
    height, width = np.ptp(white_rows) + 1, np.ptp(white_cols) + 1
    assert abs(height - width) <= 2, (height, width)  # shown square, not squeezed (20 x 27 stored)


def test_rotated_phone_clip_goes_to_a_portrait_bucket(tmp_path: Path, tiny_job, tiny_model_dir: Path) -> None:
    (tmp_path / "clips").mkdir()
    frames = np.zeros((9, 64, 96, 3), dtype=np.uint8)
    frames[:, :, :48] = 255  # left half white as stored: the bottom half once turned upright
    path = write_clip(tmp_path / "clips" / "phone.mp4", frames, rotation=90)
    job = tiny_job(path.parent, resolution=[64], num_frames=9, temporal_jitter=0, cache_variants=1)
    plan = plan_of(path, job, tiny_model_dir, tmp_path)
    (sample,) = plan.samples
    width, height, _ = (int(v) for v in sample.bucket.split("x"))
    assert height > width
    ((_, video),) = list(bucketed_videos(plan))
    assert tuple(video.shape) == (3, 9, height, width)
    assert video[0, 0, -4].mean() > 0.9 and video[0, 0, 3].mean() < -0.9


def test_windows_and_resolutions_are_samples_decoded_once(tmp_path: Path, tiny_job) -> None:
    """A 24-frame clip, slide windows of 5 and 9 frames every 8, at two resolutions: each window
    x resolution is its own cached, trained sample; the clip is decoded once for all of them."""
    folder = tmp_path / "clips"
    folder.mkdir()
    ticks = list(range(24))
    frames = np.stack([np.full((32, 32, 3), 40 + 8 * n, dtype=np.uint8) for n in ticks])
    write_clip(folder / "long.mp4", frames, ticks, rate=16)
    (folder / "long.txt").write_text("a grey fade")
    job = tiny_job(
        folder,
        resolution=[16, 32],
        fps=16,
        shrink_video_to_frames=False,
        frame_extraction="slide",
        target_frames=[5, 9],
        frame_stride=8,
        temporal_jitter=0,
        cache_variants=1,
    )
    encoder = EncoderHandle(job.process.model.name_or_path)
    report = cache_dataset(job, tmp_path / "cache", encoder)
    assert not report.failures, report.failures
    (record,) = report.index.clips.values()
    windows = sorted({s.window for s in record.samples})
    assert windows == [
        "slide00000-005",
        "slide00000-009",
        "slide00008-005",
        "slide00008-009",
        "slide00016-005",
    ]
    assert len(record.samples) == 5 * 2
    assert {s.bucket for s in record.samples} == {"16x16x5", "16x16x9", "32x32x5", "32x32x9"}
    sample = next(s for s in record.samples if s.name == "slide00008-009@32")
    assert sample.variants[0].indices == tuple(range(8, 17)) and sample.start_s == 0.5
    # One pass over frames 0..20 (the last window ends there) for all 10 samples.
    assert report.decode.frames_decoded == 21
    assert encoder.num_vae_calls == 10 * 2  # latents + first-frame condition per sample
    stream = BatchStream(report.index, batch_size=1, seed=0, caption_dropout=[0.0])
    assert stream.batches_per_epoch == 10
    seen = {stream.batch(n).clip_keys[0] for n in range(10)}
    assert seen == {f"long.mp4#{s.name}" for s in record.samples}  # every sample once an epoch
    again = EncoderHandle(job.process.model.name_or_path)
    second = cache_dataset(job, tmp_path / "cache", again)
    assert (again.num_vae_calls, second.decode.frames_decoded) == (0, 0)
    assert second.index.identity() == report.index.identity()


def test_still_image_and_single_frame_are_refused(tmp_path: Path) -> None:
    still = tmp_path / "photo.mp4"
    Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(still, format="PNG")
    with pytest.raises(VideoError, match=r"photo\.mp4: a still image \(png\), not a video"):
        probe_video(still)
    one = write_clip(tmp_path / "one.mp4", np.zeros((1, 32, 48, 3), dtype=np.uint8))
    with pytest.raises(VideoError, match=r"one\.mp4: a single frame, not a video"):
        probe_video(one)


def test_caption_byte_order_mark_is_not_caption_text(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("\ufeffa red circle".encode())
    assert read_caption(tmp_path / "a.mp4", ".txt", trigger="sks", default=None) == "sks, a red circle"


def test_window_keys_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    from wan_assets.core.config import ConfigError

    def dataset(**keys):
        raw = data_config(tmp_path, tmp_path / "model", **keys)
        return parse_config(raw, workdir=tmp_path).job.process.datasets[0]

    assert dataset(resolution=768, max_pixels_per_frame=None).pixel_budgets == [("768", 768 * 768)]
    assert dataset(resolution=[1024, 512], max_pixels_per_frame=None).pixel_budgets == [
        ("512", 512 * 512),
        ("1024", 1024 * 1024),
    ]
    windows = dataset(frame_extraction="chunk", target_frames=[17, 33], shrink_video_to_frames=False)
    assert windows.target_frames == [17, 33]
    with pytest.raises(ConfigError, match=r"target_frames must be 4k\+1.*got 24; use 21 or 25"):
        dataset(frame_extraction="head", target_frames=[24], shrink_video_to_frames=False)
    with pytest.raises(ConfigError, match="frame_extraction: slide cuts windows at the dataset fps"):
        dataset(frame_extraction="slide", shrink_video_to_frames=True)
    with pytest.raises(ConfigError, match="frame_extraction and auto_frame_count"):
        dataset(frame_extraction="full", auto_frame_count=True)
