"""The latent cache without Dagster: exact I2V conditioning, content addressing, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import WanImageToVideoPipeline

from wan_assets.cli import main
from wan_assets.core.config import parse_config
from wan_assets.core.data.buckets import Bucket
from wan_assets.core.data.cache import EncoderHandle, cache_dataset, load_index
from wan_assets.core.data.index import sample_id
from wan_assets.core.data.latents import ClipEncoder, frames_to_bucket, pad_text
from wan_assets.core.data.synthetic import write_bad_inputs
from wan_assets.core.model.loading import load_wan_model

from .conftest import CONFIGS

BAD = {"corrupt", "empty", "not_video", "too_short", "bad_caption", "no_caption"}


def data_config(folder: Path, model: Path, **dataset) -> dict:
    raw = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    process = raw["config"]["process"][0]
    process["model"]["name_or_path"] = str(model)
    process["datasets"][0].update({"folder_path": str(folder), **dataset})
    return raw


@pytest.fixture
def dataset(tmp_path: Path, clips_dir: Path) -> Path:
    folder = tmp_path / "clips"
    shutil.copytree(clips_dir, folder)
    write_bad_inputs(folder / "bad")
    return folder


@pytest.fixture
def job(dataset: Path, tiny_model_dir: Path, tmp_path: Path):
    # fps-true sampling so that the 5-frame clip is too short (shrinking would stretch it).
    raw = data_config(dataset, tiny_model_dir, shrink_video_to_frames=False, fps=12, num_frames=9)
    return parse_config(raw, workdir=tmp_path).job


def test_bad_clips_fail_alone_with_named_reasons(job, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    report = cache_dataset(job, cache, EncoderHandle(job.process.model.name_or_path))
    failed = {Path(p).stem: reason for p, reason in report.failures.items()}
    assert set(failed) == BAD
    for kind, reason in failed.items():
        assert f"{kind}." in reason, reason  # the message names the file
    assert "empty file" in failed["empty"]
    assert "not a video" in failed["not_video"]
    assert "decode failed" in failed["corrupt"]
    assert "clip too short" in failed["too_short"]
    assert "not UTF-8" in failed["bad_caption"]
    assert "caption file missing" in failed["no_caption"]
    assert len(report.index.clips) == 10 and not any(k.startswith("bad/") for k in report.index.clips)
    index = load_index(cache / "index" / f"{job.name}.json")
    assert set(index.clips) == set(report.index.clips)
    assert set(index.splits.values()) == {"train", "val"}
    record = next(iter(index.clips.values()))
    (sample,) = record.samples  # one window (shrink), one resolution (max_pixels_per_frame)
    assert len(sample.variants) == 2 and sample.variants[0].indices != sample.variants[1].indices
    tensors = index.load_variant(sample_id(record.key, sample.name), 0)
    bucket = Bucket.from_key(sample.bucket)
    latent_shape = (16, (bucket.num_frames - 1) // 4 + 1, bucket.height // 8, bucket.width // 8)
    assert tuple(tensors["latents"].shape) == latent_shape
    assert tuple(tensors["condition"].shape) == (20, *latent_shape[1:])
    assert torch.isfinite(tensors["latents"]).all()


def test_unchanged_inputs_encode_nothing_and_one_caption_reencodes_one_text(job, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = cache_dataset(job, cache, EncoderHandle(job.process.model.name_or_path))
    files_before = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}

    again = EncoderHandle(job.process.model.name_or_path)
    second = cache_dataset(job, cache, again)
    assert (again.num_vae_calls, again.num_text_calls) == (0, 0)
    assert again._encoder is None, "nothing to encode must not even load the encoders"
    assert {k: r.data_version for k, r in second.index.clips.items()} == {
        k: r.data_version for k, r in first.index.clips.items()
    }
    assert {p: p.stat().st_mtime_ns for p in files_before} == files_before

    changed = next(iter(first.index.clips.values()))
    Path(changed.path).with_suffix(".txt").write_text("a black square rests on a white floor")
    third_handle = EncoderHandle(job.process.model.name_or_path)
    third = cache_dataset(job, cache, third_handle)
    assert (third_handle.num_vae_calls, third_handle.num_text_calls) == (0, 1)
    diff = {k for k, r in third.index.clips.items() if r.data_version != first.index.clips[k].data_version}
    assert diff == {changed.key}
    assert third.index.clips[changed.key].samples == changed.samples


def test_condition_latent_and_mask_equal_the_pipeline(tiny_model_dir: Path) -> None:
    parts = load_wan_model(tiny_model_dir, load_experts=())
    encoder = ClipEncoder(parts.vae, parts.text_encoder, parts.tokenizer, torch.device("cpu"))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(9, 60, 90, 3), dtype=np.uint8)
    bucket = Bucket(64, 48, 9)
    video = frames_to_bucket(frames, bucket)
    ours = encoder.encode_video(video)["condition"]

    pipe = WanImageToVideoPipeline.from_pretrained(tiny_model_dir)
    image = video[:, 0].unsqueeze(0)  # the first frame exactly as the cache saw it, [1, 3, H, W]
    _, theirs = pipe.prepare_latents(
        image,
        1,
        16,
        bucket.height,
        bucket.width,
        bucket.num_frames,
        torch.float32,
        torch.device("cpu"),
        generator=torch.Generator().manual_seed(0),
    )
    assert ours.shape == theirs[0].shape
    assert (ours[:4] == theirs[0, :4]).all(), "mask differs"
    assert (ours - theirs[0]).abs().max().item() <= 1e-5


def test_text_embedding_equals_the_pipeline(tiny_model_dir: Path) -> None:
    parts = load_wan_model(tiny_model_dir, load_experts=())
    encoder = ClipEncoder(parts.vae, parts.text_encoder, parts.tokenizer, torch.device("cpu"))
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_model_dir)
    for caption in ("sks a red circle moves to the right", ""):
        # __call__ encodes with max_sequence_length=512 (encode_prompt alone defaults to 226).
        theirs, _ = pipe.encode_prompt(
            caption, do_classifier_free_guidance=False, max_sequence_length=512, device=torch.device("cpu")
        )
        ours = pad_text(encoder.encode_text(caption))
        assert (ours - theirs[0]).abs().max().item() <= 1e-6


def test_cache_command_lists_failures_and_exits_1(
    dataset: Path, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "job.yaml"
    raw = data_config(dataset, tiny_model_dir, shrink_video_to_frames=False, fps=12, num_frames=9)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["cache", str(config), "--workdir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "6 clip(s) failed" in err
    for kind in BAD:
        assert f"{kind}.mp4" in err or f"{kind}.txt" in err
    assert "index:" in out and "(10 clips, 10 samples;" in out
    # The good clips are cached: removing the bad ones makes the same command succeed, encoding nothing new.
    shutil.rmtree(dataset / "bad")
    assert main(["cache", str(config), "--workdir", str(tmp_path)]) == 0


def test_index_identity_is_its_content_not_its_file(tiny_cache: Path, tmp_path: Path) -> None:
    import json

    (source,) = (tiny_cache / "cache" / "index").glob("*.json")
    index = load_index(source)
    data = json.loads(source.read_text())
    # The same content written another way (clips and keys in reverse order, other indentation)
    # and with what training never reads changed (a clip's path, a warning) is the same identity.
    clips = {k: dict(reversed(c.items())) for k, c in reversed(data["clips"].items())}
    first = next(iter(clips))
    clips[first] |= {"path": "moved/" + clips[first]["path"], "warning": "a note"}
    rewritten = tmp_path / "cache" / "index" / source.name
    rewritten.parent.mkdir(parents=True)
    rewritten.write_text(json.dumps({**data, "clips": clips}, indent=4))
    assert rewritten.read_bytes() != source.read_bytes()
    assert load_index(rewritten).identity() == index.identity()
    # What training sees changes it: a clip moved to the other split, or another caption embedding.
    split = clips[first]["split"]
    clips[first]["split"] = "val" if split == "train" else "train"
    rewritten.write_text(json.dumps({**data, "clips": clips}))
    assert load_index(rewritten).identity() != index.identity()
    clips[first] |= {"split": split, "text_key": "0" * 64}
    rewritten.write_text(json.dumps({**data, "clips": clips}))
    assert load_index(rewritten).identity() != index.identity()


# --- per dataset: its own validation split, caption dropout and repeats ------------------------------


def _two_datasets(tiny_cache: Path, tmp_path: Path, tiny_model_dir: Path, first: dict, second: dict):
    """The tiny cache's clips split over two datasets (alternately), with their own settings."""
    import dataclasses

    from wan_assets.core.data.cache import build_index

    (source,) = (tiny_cache / "cache" / "index").glob("*.json")
    records = [
        dataclasses.replace(r, dataset_index=i % 2) for i, r in enumerate(load_index(source).clips.values())
    ]
    raw = data_config(tmp_path, tiny_model_dir, **first)
    raw["config"]["process"][0]["datasets"].append({**raw["config"]["process"][0]["datasets"][0], **second})
    job = parse_config(raw, workdir=tmp_path).job
    # The index file goes to tmp_path; its clips' latents stay where the tiny cache wrote them.
    index = build_index(job, records, tmp_path)
    return dataclasses.replace(index, cache_dir=tiny_cache / "cache")


def test_each_dataset_holds_out_its_own_share(tiny_cache: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    index = _two_datasets(
        tiny_cache, tmp_path, tiny_model_dir, {"validation_split": 0.0}, {"validation_split": 0.5}
    )
    held_out = {index.clips[k].dataset_index for k, split in index.splits.items() if split == "val"}
    assert held_out == {1}  # the max() over datasets once held out dataset 0's clips too


def test_repeats_and_caption_dropout_are_per_dataset(
    tiny_cache: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from wan_assets.core.data.batches import BatchStream
    from wan_assets.core.data.index import clip_of

    index = _two_datasets(
        tiny_cache, tmp_path, tiny_model_dir, {"validation_split": 0.0}, {"validation_split": 0.0}
    )
    stream = BatchStream(index, batch_size=1, seed=3, caption_dropout=[0.0, 1.0], num_repeats=[1, 3])
    seen = [clip_of(sid) for _, sids in stream.epoch_plan(0) for sid in sids]
    for key, record in index.clips.items():
        assert seen.count(key) == (3 if record.dataset_index == 1 else 1), key
    for n in range(stream.batches_per_epoch):
        batch = stream.batch(n)
        for key, dropped in zip(batch.clip_keys, batch.dropped, strict=True):
            assert dropped == (index.clips[clip_of(key)].dataset_index == 1)  # rate 1.0 vs 0.0, never pooled
