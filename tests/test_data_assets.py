"""The data assets through Dagster: per-clip partitions, named failures, data versions, the sensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    DeleteDynamicPartitionsRequest,
    build_sensor_context,
    instance_for_test,
    materialize,
)

from resources.project import WanProjectResource
from wan_assets.assets.data import captions, latent_cache, latents, raw_videos, videos
from wan_assets.core.data.synthetic import write_bad_inputs, write_sample_videos
from wan_assets.core.train.loop import TrainState, build_parts, save_checkpoint
from wan_assets.sensors import new_clips_sensor

from .test_cache import BAD, data_config

PER_CLIP = [raw_videos, captions, latents]
ALL = [*PER_CLIP, latent_cache]


@pytest.fixture
def project(tmp_path: Path, clips_dir: Path, tiny_model_dir: Path) -> WanProjectResource:
    folder = tmp_path / "clips"
    shutil.copytree(clips_dir, folder)
    write_bad_inputs(folder / "bad")
    config = tmp_path / "job.yaml"
    raw = data_config(folder, tiny_model_dir, shrink_video_to_frames=False, fps=12, num_frames=9)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return WanProjectResource(config_path=str(config), workdir=str(tmp_path / "work"))


@pytest.fixture
def instance():
    with instance_for_test() as inst:
        yield inst


def tick(instance: DagsterInstance, project: WanProjectResource, cursor: str | None = None):
    context = build_sensor_context(instance=instance, resources={"project": project}, cursor=cursor)
    result = new_clips_sensor(context)
    for request in result.dynamic_partitions_requests:
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return result


def run_clip(instance: DagsterInstance, project: WanProjectResource, key: str):
    return materialize(
        PER_CLIP,
        partition_key=key,
        resources={"project": project},
        instance=instance,
        raise_on_error=False,
    )


def test_graph_materializes_good_clips_and_names_bad_ones(instance, project) -> None:
    result = tick(instance, project)
    keys = instance.get_dynamic_partitions(videos.name)
    assert len(keys) == 16 and len(result.run_requests) == 16
    failures = {}
    for key in keys:
        run = run_clip(instance, project, key)
        if not run.success:
            failures[key] = " ".join(e.step_failure_data.error.message for e in run.get_step_failure_events())
    assert {Path(k).stem for k in failures} == BAD
    for key, message in failures.items():
        assert Path(key).stem in message, message
    index = materialize(ALL, selection=[latent_cache], resources={"project": project}, instance=instance)
    meta = index.asset_materializations_for_node("latent_cache")[0].metadata
    assert meta["clips"].value == 10
    assert meta["train_clips"].value + meta["val_clips"].value == 10
    rows = meta["buckets"].value.records
    assert sum(r.data["clips"] for r in rows) == 10
    # The data version Dagster tracks is the identity a checkpoint resumes on: one identity.
    mat = index.asset_materializations_for_node("latent_cache")[0]
    parts = build_parts(project.job(), project.root().cache, torch.device("cpu"))
    assert mat.tags["dagster/data_version"] == parts.index_hash == parts.stream.index.identity()
    parts.files.root.mkdir(parents=True, exist_ok=True)
    save_checkpoint(parts, TrainState(run_id="t"))
    assert torch.load(parts.files.state(0), weights_only=False)["index_hash"] == parts.index_hash

    # Nothing changed: the re-run encodes nothing and keeps every data version.
    key = "circle_right.mp4"
    before = _latest(instance, key)
    again = run_clip(instance, project, key)
    mat = again.asset_materializations_for_node("latents")[0]
    assert mat.metadata["vae_calls"].value == 0 and mat.metadata["text_encoder_calls"].value == 0
    assert mat.metadata["frames_decoded"].value == 0
    # The partition lists its samples: one window (9 frames at 12 fps) at one pixel budget.
    (sample,) = mat.metadata["samples"].value.records
    assert sample.data["sample"] == "fps00000-009@4096px" and sample.data["frames"] == 9
    assert _latest(instance, key) == before


def _latest(instance: DagsterInstance, key: str) -> str:
    from dagster import AssetKey

    event = instance.get_latest_materialization_event(AssetKey("latents"))
    records = instance.fetch_materializations(AssetKey("latents"), limit=50).records
    versions = [
        r.asset_materialization.tags.get("dagster/data_version") for r in records if r.partition_key == key
    ]
    assert event is not None and versions
    return versions[0]


def test_sensor_adds_new_clips_and_removes_deleted_ones(instance, project, tmp_path: Path) -> None:
    first = tick(instance, project)
    assert len(first.run_requests) == 16
    idle = tick(instance, project, cursor=first.cursor)
    assert idle.run_requests == [] and idle.dynamic_partitions_requests == []

    new_dir = tmp_path / "new"
    write_sample_videos(new_dir)
    shutil.copy(new_dir / "circle_right.mp4", tmp_path / "clips" / "dropped_in.mp4")
    shutil.copy(new_dir / "circle_right.txt", tmp_path / "clips" / "dropped_in.txt")
    (tmp_path / "clips" / "square_left.mp4").unlink()
    result = tick(instance, project, cursor=idle.cursor)
    assert [r.partition_key for r in result.run_requests] == ["dropped_in.mp4"]
    adds = [r for r in result.dynamic_partitions_requests if isinstance(r, AddDynamicPartitionsRequest)]
    deletes = [r for r in result.dynamic_partitions_requests if isinstance(r, DeleteDynamicPartitionsRequest)]
    assert list(adds[0].partition_keys) == ["dropped_in.mp4"]
    assert list(deletes[0].partition_keys) == ["square_left.mp4"]
    keys = instance.get_dynamic_partitions(videos.name)
    assert "dropped_in.mp4" in keys and "square_left.mp4" not in keys

    # A changed file (new bytes) is re-run without being re-added.
    shutil.copy(new_dir / "triangle_up.mp4", tmp_path / "clips" / "dropped_in.mp4")
    changed = tick(instance, project, cursor=result.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["dropped_in.mp4"]
    assert changed.dynamic_partitions_requests == []
