"""Synthetic clips and the PyAV helpers: what is written is what is read back, bad inputs are named."""

from __future__ import annotations

import pickle
from pathlib import Path

import av
import numpy as np
import pytest

from wan_assets.core.data.synthetic import (
    BAD_CAPTION_BYTES,
    BAD_INPUT_KINDS,
    SAMPLE_CLIPS,
    TRIGGER_TOKEN,
    SampleClip,
    render_frames,
    write_bad_inputs,
    write_sample_videos,
)
from wan_assets.core.data.video_io import CLIP_EXTENSIONS, VideoError, probe_video, read_frames, write_video

# Mean absolute error per pixel between drawn and decoded frames: H.264 at crf 18 plus the RGB ->
# yuv420p round trip (chroma halved at shape edges) stays near 2; one frame of motion costs more.
CODEC_TOLERANCE = 4.0


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


def _clip(name: str) -> SampleClip:
    return next(clip for clip in SAMPLE_CLIPS if clip.name == name)


def _decoded_tree(root: Path) -> dict[str, np.ndarray]:
    """Every file under `root`: a clip as its decoded frames, any other file as its bytes."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".mp4":
            out[str(path.relative_to(root))] = read_frames(path, list(range(probe_video(path).num_frames)))
        else:
            out[str(path.relative_to(root))] = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_sample_set_mixes_orientations_lengths_fps_and_captions(clips_dir: Path) -> None:
    paths = sorted(clips_dir.rglob("*.mp4"))
    assert len(paths) >= 8
    assert {path.suffix for path in clips_dir.rglob("*") if path.is_file()} == {
        ".mp4",
        ".txt",
    }  # no temp files
    assert any(path.parent != clips_dir for path in paths), "no clip in a subfolder"
    assert all(path.suffix in CLIP_EXTENSIONS for path in paths)

    probes = [probe_video(path) for path in paths]
    orientations = {
        "landscape" if p.width > p.height else "portrait" if p.width < p.height else "square" for p in probes
    }
    assert orientations == {"landscape", "portrait", "square"}
    assert len({p.fps for p in probes}) >= 4
    assert len({p.num_frames for p in probes}) >= 5
    for probe in probes:
        assert probe.width % 16 == 0 and probe.height % 16 == 0 and min(probe.width, probe.height) >= 64
        assert probe.path.stat().st_size < 32_000  # tiny: a CPU model trains on these

    captions = [path.with_suffix(".txt").read_bytes().decode("utf-8") for path in paths]
    assert any(caption.startswith(TRIGGER_TOKEN) for caption in captions)
    assert any(TRIGGER_TOKEN not in caption for caption in captions)


def test_captions_say_what_is_drawn(clips_dir: Path) -> None:
    assert (clips_dir / "circle_right.txt").read_text(encoding="utf-8") == (
        "[trigger] a red circle moves to the right on a dark blue background"
    )
    assert (clips_dir / "more" / "square_circle.txt").read_text(encoding="utf-8") == (
        "[trigger] a red square spins and a blue circle moves to the right on a black background"
    )
    assert _clip("square_grows").caption == "[trigger] an orange square grows on a dark blue background"


@pytest.mark.parametrize("clip", SAMPLE_CLIPS, ids=lambda clip: clip.name)
def test_probe_matches_what_was_written(clips_dir: Path, clip: SampleClip) -> None:
    probe = probe_video(clips_dir / f"{clip.name}.mp4")
    assert (probe.width, probe.height) == (clip.width, clip.height)
    assert probe.fps == clip.fps
    assert probe.num_frames == clip.num_frames
    assert probe.duration_s == pytest.approx(clip.num_frames / clip.fps, abs=2e-3)
    assert probe.codec == "h264"
    assert probe.rotation_deg == 0


def test_probe_full_decode_counts_every_frame(clips_dir: Path) -> None:
    clip = _clip("more/triangle_circle")
    assert probe_video(clips_dir / f"{clip.name}.mp4", full_decode=True).num_frames == clip.num_frames


def test_same_seed_same_bytes_other_seed_other_pixels(tmp_path: Path) -> None:
    # The second set is written after the first, in the same process: the encoder's output must not
    # depend on what it encoded before (x264's macroblock tree did, in PyAV 18.1; video_io.py).
    paths = write_sample_videos(tmp_path / "a", seed=3)
    assert paths == sorted(paths) and len(paths) == len(SAMPLE_CLIPS)
    write_sample_videos(tmp_path / "b", seed=3)
    write_sample_videos(tmp_path / "c", seed=4)
    files = [_tree_bytes(tmp_path / name) for name in "abc"]
    assert files[0].keys() == files[1].keys() == files[2].keys()
    assert [n for n in files[0] if files[0][n] != files[1][n]] == []
    contents = [_decoded_tree(tmp_path / name) for name in "ac"]
    changed = {name for name, value in contents[0].items() if not np.array_equal(value, contents[1][name])}
    assert changed and all(name.endswith(".mp4") for name in changed)  # captions do not depend on the seed


@pytest.mark.parametrize("name", ["circle_right", "triangle_spins", "more/triangle_circle"])
def test_read_frames_returns_the_requested_frames(clips_dir: Path, name: str) -> None:
    clip = _clip(name)
    drawn_fhwc = render_frames(clip)
    indices = [0, 8, 8, 3, clip.num_frames - 1, 0]
    frames_fhwc = read_frames(clips_dir / f"{clip.name}.mp4", indices)

    assert frames_fhwc.shape == (len(indices), clip.height, clip.width, 3)
    assert frames_fhwc.dtype == np.uint8
    np.testing.assert_array_equal(frames_fhwc[1], frames_fhwc[2])
    np.testing.assert_array_equal(frames_fhwc[0], frames_fhwc[5])
    for frame_hwc, index in zip(frames_fhwc, indices, strict=True):
        assert _mean_abs_error(frame_hwc, drawn_fhwc[index]) < CODEC_TOLERANCE
        mean_rgb_error = np.abs(frame_hwc.mean(axis=(0, 1)) - drawn_fhwc[index].mean(axis=(0, 1)))
        assert mean_rgb_error.max() < 3.0, mean_rgb_error
        # Each decoded frame is closest to the frame drawn at its own index, not a neighbour.
        errors = [_mean_abs_error(frame_hwc, drawn) for drawn in drawn_fhwc]
        assert int(np.argmin(errors)) == index


def test_read_frames_stops_at_the_last_requested_frame(tmp_path: Path) -> None:
    """Damage near the end of a clip does not matter when only early frames are asked for."""
    clip = _clip("square_down")
    path = write_video(tmp_path / "tail_damaged.mp4", render_frames(clip), clip.fps)
    data = bytearray(path.read_bytes())
    moov_start = data.index(b"moov") - 4  # our mp4s end with the index box, after the media data
    junk_start = moov_start - (moov_start - data.index(b"mdat")) // 4
    data[junk_start:moov_start] = bytes((i * 151 + 7) % 256 for i in range(moov_start - junk_start))
    path.write_bytes(bytes(data))

    assert read_frames(path, [0, 10, 5]).shape == (3, clip.height, clip.width, 3)
    with pytest.raises(VideoError, match=r"tail_damaged\.mp4: decode failed"):
        read_frames(path, [clip.num_frames - 1])
    with pytest.raises(VideoError, match="decode failed"):
        probe_video(path, full_decode=True)


def test_read_frames_rejects_bad_indices(bad_inputs: dict[str, Path]) -> None:
    path = bad_inputs["too_short"]
    with pytest.raises(
        VideoError, match=r"too_short\.mp4: frame 16 requested but the clip has only 5 frames"
    ):
        read_frames(path, list(range(17)))
    with pytest.raises(ValueError, match=">= 0"):
        read_frames(path, [0, -1])
    with pytest.raises(ValueError, match="no frame indices"):
        read_frames(path, [])


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("corrupt", "decode failed"), ("empty", "empty file"), ("not_video", "not a video")],
)
def test_unreadable_inputs_raise_video_error_naming_the_file(
    bad_inputs: dict[str, Path], kind: str, reason: str
) -> None:
    path = bad_inputs[kind]
    assert path.with_suffix(".txt").read_text(encoding="utf-8")  # the caption is fine, the video is not
    for read in (probe_video, lambda p: read_frames(p, [0])):
        with pytest.raises(VideoError) as caught:
            read(path)
        assert str(path) in str(caught.value) and reason in str(caught.value)
        assert caught.value.path == path


def test_too_short_clip_is_valid_but_has_five_frames(bad_inputs: dict[str, Path]) -> None:
    probe = probe_video(bad_inputs["too_short"])
    assert probe.num_frames == 5
    assert bad_inputs["too_short"].with_suffix(".txt").read_text(encoding="utf-8")


def test_caption_cases_are_written_as_specified(bad_inputs: dict[str, Path]) -> None:
    assert set(bad_inputs) == set(BAD_INPUT_KINDS)
    for kind in ("bad_caption", "no_caption"):
        assert probe_video(bad_inputs[kind]).num_frames == 17  # the video itself is fine
    bad_caption = bad_inputs["bad_caption"].with_suffix(".txt")
    assert bad_caption.read_bytes() == BAD_CAPTION_BYTES
    with pytest.raises(UnicodeDecodeError):
        bad_caption.read_text(encoding="utf-8")
    assert not bad_inputs["no_caption"].with_suffix(".txt").exists()
    assert bad_inputs["empty"].stat().st_size == 0


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match=r"nowhere\.mp4: file not found"):
        probe_video(tmp_path / "nowhere.mp4")


def test_video_error_survives_pickling(tmp_path: Path) -> None:
    error = pickle.loads(pickle.dumps(VideoError(tmp_path / "x.mp4", "empty file")))
    assert (error.path, error.reason, str(error)) == (
        tmp_path / "x.mp4",
        "empty file",
        f"{tmp_path}/x.mp4: empty file",
    )


def test_rotated_phone_clip_reads_upright(tmp_path: Path) -> None:
    """Phones store portrait video as landscape frames plus a display rotation."""
    stored_hwc = np.zeros((64, 96, 3), dtype=np.uint8)
    stored_hwc[:32, :48], stored_hwc[:32, 48:] = (255, 0, 0), (0, 255, 0)
    stored_hwc[32:, :48], stored_hwc[32:, 48:] = (0, 0, 255), (255, 255, 255)
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise, as PyAV reads it back
        for _ in range(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored_hwc, format="rgb24")))
        container.mux(stream.encode(None))

    probe = probe_video(path)
    assert (probe.width, probe.height, probe.rotation_deg) == (64, 96, 90)
    upright_hwc = read_frames(path, [1])[0]
    assert upright_hwc.shape == (96, 64, 3)
    assert _mean_abs_error(upright_hwc, np.rot90(stored_hwc)) < CODEC_TOLERANCE
    assert tuple(upright_hwc[-8, 8]) == pytest.approx((255, 0, 0), abs=12)  # top-left went bottom-left


def test_write_video_is_atomic_and_checks_its_input(tmp_path: Path) -> None:
    frames_fhwc = np.full((5, 64, 96, 3), 200, dtype=np.uint8)
    path = write_video(tmp_path / "out" / "gen.mp4", frames_fhwc, 12.5)
    assert [p.name for p in path.parent.iterdir()] == ["gen.mp4"]  # no temp file left behind
    assert probe_video(path).fps == 12.5
    with pytest.raises(ValueError, match="even width and height"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 65, 96, 3), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match="uint8 F x H x W x 3"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 64, 96, 3), dtype=np.float32), 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
