"""Captions for clips without one, from the tiny Qwen2.5-VL captioner: cached, batched, never over a
user's file, and a user's caption always wins."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from dagster import DagsterInstance, instance_for_test, materialize
from transformers import Qwen2_5_VLForConditionalGeneration

from resources.project import WanProjectResource
from wan_assets.assets.data import captions, latents, raw_videos, videos
from wan_assets.cli import main
from wan_assets.core.config import ConfigError, parse_config
from wan_assets.core.data.cache import (
    EncoderHandle,
    cache_dataset,
    caption_clips,
    captioner_for,
    discover_clips,
)
from wan_assets.core.data.captioner import CaptionerHandle, caption_frame_indices
from wan_assets.core.data.captions import CaptionError, read_caption
from wan_assets.core.data.latents import component_identity
from wan_assets.core.data.video_io import VideoError
from wan_assets.core.model.tiny_captioner import build_tiny_captioner

from .conftest import tiny_job_raw

# The clips of the synthetic set whose caption files the tests delete: the captioner writes theirs.
UNCAPTIONED = ("circle_down", "square_grows", "more/square_circle")
USER_EDIT = "a hand-written caption of a square that grows"


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_captioner(tmp_path_factory.mktemp("captioner") / "qwen25-vl-tiny")


@pytest.fixture
def dataset(tmp_path: Path, clips_dir: Path) -> Path:
    """The synthetic clips with some caption files removed, and a broken clip with none."""
    folder = tmp_path / "clips"
    shutil.copytree(clips_dir, folder)
    for name in UNCAPTIONED:
        (folder / f"{name}.txt").unlink()
    (folder / "broken.mp4").write_bytes(b"")
    return folder


def caption_raw(dataset: Path, model: Path, captioner: Path, out: Path, **captioner_keys) -> dict:
    """The tiny CPU config (bf16, trigger `sks`) auto-captioning with the tiny captioner.

    Short captions keep the tests fast; batches of 2 make three uncaptioned clips two batches."""
    raw = tiny_job_raw(dataset, model, steps=4)
    process = raw["config"]["process"][0]
    process["datasets"][0]["auto_caption"] = True
    process["captioner"] = {"name_or_path": str(captioner), "max_new_tokens": 12, "batch_size": 2}
    process["captioner"].update(captioner_keys)
    process.update(training_folder=str(out / "runs"), sample=None)
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Counts:
    """Model loads and generate calls of every CaptionerHandle, however it was made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loads = self.generates = 0
        load, generate = CaptionerHandle._load, CaptionerHandle.generate

        def counted_load(handle):
            before = handle.num_loads
            out = load(handle)
            self.loads += handle.num_loads - before
            return out

        def counted_generate(handle, frames):
            self.generates += 1
            return generate(handle, frames)

        monkeypatch.setattr(CaptionerHandle, "_load", counted_load)
        monkeypatch.setattr(CaptionerHandle, "generate", counted_generate)


def test_tiny_captioner_is_the_real_family_built_offline(tiny_captioner_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_captioner_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    again = build_tiny_captioner(tmp_path / "again")
    assert component_identity(again, "") == component_identity(tiny_captioner_dir, "")  # seeded, offline
    with pytest.raises(FileExistsError, match="not an earlier tiny captioner build"):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "weights.bin").write_bytes(b"x")
        build_tiny_captioner(tmp_path / "mine")
    assert caption_frame_indices(81, 8) == [5, 15, 25, 35, 45, 55, 65, 75]
    assert caption_frame_indices(3, 8) == [0, 1, 2]


def test_a_caption_file_wins_over_a_generated_caption_which_wins_over_the_default(tmp_path: Path) -> None:
    clip = tmp_path / "a.mp4"
    assert (
        read_caption(clip, ".txt", trigger="sks", default="a clip", generated="a red [trigger]")
        == "a red sks"
    )
    assert (
        read_caption(clip, ".txt", trigger="sks", default="a clip", generated="a red ball")
        == "sks, a red ball"
    )
    assert read_caption(clip, ".txt", trigger=None, default="a clip") == "a clip"
    (tmp_path / "a.txt").write_text("mine")
    assert read_caption(clip, ".txt", trigger=None, default="a clip", generated="a red ball") == "mine"


def test_cache_and_train_caption_the_uncaptioned_once_and_a_user_edit_wins(
    dataset: Path, tiny_model_dir: Path, tiny_captioner_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    config = write_config(
        tmp_path / "job.yaml", caption_raw(dataset, tiny_model_dir, tiny_captioner_dir, tmp_path)
    )
    work = tmp_path / "work"
    counts = Counts(monkeypatch)

    # 1. `wan-assets cache`: every clip is cached, the three without files captioned by the model,
    # in one load and two batches; the broken clip fails alone, by name.
    assert main(["cache", str(config), "--workdir", str(work)]) == 1
    err = capsys.readouterr().err
    assert "1 clip(s) failed" in err and "broken.mp4" in err
    assert (counts.loads, counts.generates) == (1, 2)
    index = json.loads((work / "cache" / "index" / "tiny_i2v_lora.json").read_text())["clips"]
    assert len(index) == 10 and "broken.mp4" not in index
    for name in UNCAPTIONED:
        caption = index[f"{name}.mp4"]["caption"]
        # Gibberish from random weights, but words, with the trigger prepended as for a file.
        assert caption.startswith("sks, ") and len(caption) > len("sks, "), caption
        assert not (dataset / f"{name}.txt").exists(), "a sidecar only when asked"
    records = sorted((work / "cache" / "captions").rglob("*.json"))
    assert len(records) == 3
    record = json.loads(records[0].read_text())
    assert record["model_path"] == str(tiny_captioner_dir) and record["model"] == component_identity(
        tiny_captioner_dir, ""
    )
    assert record["prompt"].startswith("The images are frames of one video clip")
    assert record["settings"]["dtype"] == "torch.bfloat16" and record["settings"]["decoding"] == "greedy"

    # 2. `wan-assets train` a few steps on all ten clips.
    assert main(["train", str(config), "--workdir", str(work)]) == 0
    assert "4 steps" in capsys.readouterr().out

    # 3. Again: nothing to caption, nothing loads, every caption the same.
    (dataset / "broken.mp4").unlink()
    assert main(["cache", str(config), "--workdir", str(work)]) == 0
    assert (counts.loads, counts.generates) == (1, 2)
    again = json.loads((work / "cache" / "index" / "tiny_i2v_lora.json").read_text())["clips"]
    assert {k: c["caption"] for k, c in again.items()} == {k: c["caption"] for k, c in index.items()}

    # 4. The user writes a caption for a clip the model captioned: theirs wins, nothing generates.
    (dataset / "square_grows.txt").write_text(USER_EDIT)
    job = parse_config(yaml.safe_load(config.read_text()), workdir=work).job
    encoder = EncoderHandle(str(tiny_model_dir))
    report = cache_dataset(job, work / "cache", encoder)
    assert report.index.clips["square_grows.mp4"].caption == f"sks, {USER_EDIT}"
    assert (counts.loads, counts.generates) == (1, 2)
    assert (encoder.num_vae_calls, encoder.num_text_calls) == (0, 1)


def test_caption_command_prints_the_table_and_writes_sidecars_when_asked(
    dataset: Path, tiny_model_dir: Path, tiny_captioner_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    (dataset / "broken.mp4").unlink()
    raw = caption_raw(
        dataset, tiny_model_dir, tiny_captioner_dir, tmp_path, prompt="Describe [trigger] in the video."
    )
    config = write_config(tmp_path / "job.yaml", raw)
    user_files = {p: p.read_bytes() for p in dataset.rglob("*.txt")}
    counts = Counts(monkeypatch)

    assert main(["caption", str(config), "--workdir", str(tmp_path / "work")]) == 0
    out, err = capsys.readouterr()
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert len(lines) == 10
    for name in UNCAPTIONED:
        assert f"{name}.mp4" in lines and " generated " in lines[f"{name}.mp4"]
        assert " sks, " in lines[f"{name}.mp4"]
    assert " file " in lines["circle_right.mp4"] and "red circle" in lines["circle_right.mp4"]
    assert "3 caption(s) generated in 2 batch(es)" in err
    assert not any((dataset / f"{name}.txt").exists() for name in UNCAPTIONED)
    record = json.loads(next((tmp_path / "work" / "cache" / "captions").rglob("*.json")).read_text())
    assert record["prompt"] == "Describe sks in the video."  # [trigger] in the prompt is the trigger word

    # --write: the same captions (from the cache: no load) become files; the users' files stay as they were.
    assert main(["caption", str(config), "--workdir", str(tmp_path / "work"), "--write"]) == 0
    out, err = capsys.readouterr()
    assert (counts.loads, counts.generates) == (1, 2)
    assert err.count("wrote ") == 3
    for name in UNCAPTIONED:
        assert (dataset / f"{name}.txt").read_text() in lines[f"{name}.mp4"]
    assert {p: p.read_bytes() for p in user_files} == user_files

    # The user edits a written caption: from now on it is theirs.
    (dataset / "circle_down.txt").write_text(USER_EDIT)
    assert main(["caption", str(config), "--workdir", str(tmp_path / "work"), "--write"]) == 0
    out, err = capsys.readouterr()
    row = next(line for line in out.splitlines() if line.startswith("circle_down.mp4"))
    assert " file " in row and f"sks, {USER_EDIT}" in row and "wrote" not in err


def test_captions_asset_records_model_and_prompt_and_does_no_work_twice(
    dataset: Path, tiny_model_dir: Path, tiny_captioner_dir: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "job.yaml", caption_raw(dataset, tiny_model_dir, tiny_captioner_dir, tmp_path)
    )
    project = WanProjectResource(config_path=str(config), workdir=str(tmp_path / "work"))
    key = "square_grows.mp4"
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(videos.name, [key])

        def run(instance: DagsterInstance, *, with_latents: bool = False):
            result = materialize(
                [raw_videos, captions, latents],
                selection=[raw_videos, captions, latents] if with_latents else [captions],
                partition_key=key,
                resources={"project": project},
                instance=instance,
            )
            mat = result.asset_materializations_for_node("captions")[0]
            if with_latents:  # the latents encode the generated caption
                record = result.asset_materializations_for_node("latents")[0]
                assert record.metadata["text_encoder_calls"].value == 2  # caption and empty caption
                assert result.output_for_node("latents")["caption"] == result.output_for_node("captions")
            return {k: v.value for k, v in mat.metadata.items()}, mat.tags["dagster/data_version"]

        first, version = run(instance, with_latents=True)
        assert first["origin"] == "generated" and first["generated_now"] is True
        assert first["captioner_model"] == str(tiny_captioner_dir)
        assert first["captioner_prompt"].startswith("The images are frames")
        assert (first["captioner_loads"], first["generate_calls"]) == (1, 1)
        assert first["caption"].startswith("sks, ")
        record = tmp_path / "work" / "cache" / first["caption_record"]
        assert json.loads(record.read_text())["text"] in first["caption"]

        second, again = run(instance)
        assert second["generated_now"] is False and (second["captioner_loads"], second["generate_calls"]) == (
            0,
            0,
        )
        assert (second["caption"], again) == (first["caption"], version)

        (dataset / "square_grows.txt").write_text(USER_EDIT)
        third, _ = run(instance)
        assert third["origin"] == "file" and third["caption"] == f"sks, {USER_EDIT}"
        assert "captioner_model" not in third


def test_an_empty_generated_caption_fails_its_clip_alone_and_is_not_generated_again(
    dataset: Path, tiny_model_dir: Path, tiny_captioner_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    job = parse_config(
        caption_raw(dataset, tiny_model_dir, tiny_captioner_dir, tmp_path), workdir=tmp_path
    ).job
    calls = []

    def silent(handle, frames):  # a model that stops at once (greedy: it always would)
        calls.append(len(frames))
        return [""] * len(frames)

    monkeypatch.setattr(CaptionerHandle, "generate", silent)
    sources = discover_clips(job)
    for _ in range(2):
        results = caption_clips(sources, job, tmp_path / "cache", captioner_for(job))
        for name in UNCAPTIONED:
            error = results[f"{name}.mp4"]
            assert isinstance(error, CaptionError) and f"{name}.txt: the captioner" in str(error)
            assert "wrote an empty caption" in str(error)
        assert not isinstance(results["circle_right.mp4"], Exception)
        assert isinstance(results["broken.mp4"], VideoError) and "empty file" in str(results["broken.mp4"])
    assert calls == [2, 1], "generated once, in batches of 2; the second pass found the records"


def test_missing_captioner_folder_is_one_clear_error(
    dataset: Path, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    (dataset / "broken.mp4").unlink()
    raw = caption_raw(dataset, tiny_model_dir, tmp_path / "no-such-model", tmp_path)
    config = write_config(tmp_path / "job.yaml", raw)
    for command in ("check", "caption"):
        assert main([command, str(config), "--workdir", str(tmp_path / "work")]) == 1
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1
            and "captioner.name_or_path: " in err
            and "no-such-model does not exist" in err
        )
    job = parse_config(raw, workdir=tmp_path).job
    with pytest.raises(ConfigError, match="no-such-model does not exist"):
        caption_clips(discover_clips(job), job, tmp_path / "cache", captioner_for(job))


def test_captioner_handle_loads_the_real_class_on_first_need_only(
    tiny_captioner_dir: Path, dataset: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    job = parse_config(
        caption_raw(dataset, tiny_model_dir, tiny_captioner_dir, tmp_path), workdir=tmp_path
    ).job
    handle = captioner_for(job)
    assert handle is not None and handle.num_loads == 0 and handle.dtype == torch.bfloat16
    handle.identity()
    assert handle._model is None, "the content key needs no model"
    model, processor = handle._load()
    assert isinstance(model, Qwen2_5_VLForConditionalGeneration) and model.dtype == torch.bfloat16
    assert processor.tokenizer.padding_side == "left"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.pop("captioner"), r"datasets\[0\]\.auto_caption needs a `captioner` section"),
        (lambda p: p["datasets"][0].update(default_caption="x"), "default_caption and auto_caption both"),
        (
            lambda p: p["datasets"][0].update(auto_caption=False, write_auto_captions=True),
            "write_auto_captions needs auto_caption: true",
        ),
        (
            lambda p: p.update(trigger_word=None) or p["captioner"].update(prompt="Call it [trigger]."),
            "captioner.prompt uses \\[trigger\\] but trigger_word is not set",
        ),
        (lambda p: p["captioner"].update(frames_per_clip=0), r"captioner\.frames_per_clip: Input should be"),
        (lambda p: p["captioner"].update(promt="x"), r"captioner\.promt: unknown key; did you mean prompt\?"),
    ],
)
def test_captioner_config_mistakes(
    dataset, tiny_model_dir, tiny_captioner_dir, tmp_path, edit, message
) -> None:
    raw = copy.deepcopy(caption_raw(dataset, tiny_model_dir, tiny_captioner_dir, tmp_path))
    edit(raw["config"]["process"][0])
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, workdir=tmp_path)
