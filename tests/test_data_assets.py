"""The data assets through Dagster: per-clip partitions, named failures, data versions, the sensor."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    DagsterInstance,
    DeleteDynamicPartitionsRequest,
    build_sensor_context,
    instance_for_test,
    materialize,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from resources.project import WanProjectResource
from wan_assets.assets.data import (
    CAPTIONS,
    ENCODERS_LOADED,
    LATENTS,
    RAW_VIDEOS,
    clip_assets,
    latent_cache,
    videos,
)
from wan_assets.core.data.synthetic import write_bad_inputs, write_sample_videos
from wan_assets.core.train.loop import TrainState, build_parts, save_checkpoint
from wan_assets.sensors import batches, new_clips_sensor, requested_keys

from .test_cache import BAD, data_config

ALL = [clip_assets, latent_cache]


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
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
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


def run_batch(instance: DagsterInstance, project: WanProjectResource, keys: list[str]):
    """One run of the per-clip assets over the consecutive clip partitions `keys`, as the sensor asks."""
    tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    return materialize(
        [clip_assets], tags=tags, resources={"project": project}, instance=instance, raise_on_error=False
    )


def run_clip(instance: DagsterInstance, project: WanProjectResource, key: str):
    return materialize(
        [clip_assets],
        partition_key=key,
        resources={"project": project},
        instance=instance,
        raise_on_error=False,
    )


def _partition_status(instance: DagsterInstance, key: AssetKey) -> tuple[set[str], set[str]]:
    """(materialized, failed) partitions of `key`, as the UI computes them."""
    from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

    value = get_and_update_asset_status_cache_value(instance, key, videos)
    assert value is not None
    done = set(value.deserialize_materialized_partition_subsets(videos).get_partition_keys())
    failed = set(value.deserialize_failed_partition_subsets(videos).get_partition_keys())
    return done, failed


def test_one_batch_fails_its_bad_clips_alone_and_materializes_the_rest(instance, project) -> None:
    result = tick(instance, project)
    keys = instance.get_dynamic_partitions(videos.name)
    assert len(keys) == 16
    # The sensor asks for one batch run over all 16 new clips, not 16 runs.
    assert len(result.run_requests) == 1 and requested_keys(result.run_requests[0], keys) == keys
    run = run_batch(instance, project, keys)
    assert not run.success
    failure = run.get_step_failure_events()[0].step_failure_data
    bad = {k for k in keys if Path(k).stem in BAD}
    assert {Path(k).stem for k in bad} == BAD
    # Every bad clip is named with its reason in the one step failure, and in its own ERROR line.
    assert set(failure.user_failure_data.metadata["failed_clips"].value) == bad
    for key in bad:
        assert key in failure.error.message
    errors = [e.message for e in instance.all_logs(run.run_id) if e.level >= 40 and e.message]
    assert all(any(key in m for m in errors) for key in bad)
    # The good clips of the same batch are materialized, the bad ones' partitions show failed.
    done, failed = _partition_status(instance, LATENTS)
    assert done == set(keys) - bad and failed == bad
    # Each failed partition carries its reason where its page shows it.
    notes = instance.fetch_observations(LATENTS, limit=50).records
    reasons = {r.partition_key: r.asset_observation.metadata["error"].value for r in notes}
    assert set(reasons) == bad and "empty file" in reasons["bad/empty.mp4"]
    _raw_done, raw_failed = _partition_status(instance, RAW_VIDEOS)
    assert raw_failed == {k for k in bad if Path(k).stem in {"corrupt", "empty", "not_video"}}
    # raw_videos' `path` is the clip itself, and the encoders loaded once for the batch.
    mat = instance.fetch_materializations(RAW_VIDEOS, limit=1).records[0].asset_materialization
    assert mat.metadata["path"].value == str(project.source(mat.partition).path)
    logs = [e.message for e in instance.all_logs(run.run_id) if ENCODERS_LOADED in (e.message or "")]
    assert len(logs) == 1

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

    # Re-running one clip is its one partition: nothing changed, so it encodes nothing, keeps its
    # data version, and loads no encoder.
    key = "circle_right.mp4"
    before = _latest(instance, key)
    again = run_clip(instance, project, key)
    assert again.success
    mat = again.asset_materializations_for_node("clip_assets")
    latents_mat = next(m for m in mat if m.asset_key == LATENTS)
    assert (
        latents_mat.metadata["vae_calls"].value == 0 and latents_mat.metadata["text_encoder_calls"].value == 0
    )
    assert latents_mat.metadata["frames_decoded"].value == 0
    # The partition lists its samples: one window (9 frames at 12 fps) at one pixel budget.
    (sample,) = latents_mat.metadata["samples"].value.records
    assert sample.data["sample"] == "fps00000-009@4096px" and sample.data["frames"] == 9
    assert _latest(instance, key) == before
    assert not any(ENCODERS_LOADED in (e.message or "") for e in instance.all_logs(again.run_id))

    # A fixed clip re-run alone turns its partition from failed to materialized.
    fixed = next(k for k in bad if Path(k).stem == "no_caption")
    (Path(project.source(fixed).path).with_suffix(".txt")).write_text("a red circle moves right")
    assert run_clip(instance, project, fixed).success
    done, failed = _partition_status(instance, LATENTS)
    assert fixed in done and fixed not in failed


def test_caption_edit_reruns_only_captions_and_latents(instance, project) -> None:
    tick(instance, project)
    keys = [k for k in instance.get_dynamic_partitions(videos.name) if not k.startswith("bad/")]
    assert run_batch(instance, project, keys).success
    result = materialize(
        [clip_assets],
        selection=[CAPTIONS, LATENTS],
        partition_key=keys[0],
        resources={"project": project},
        instance=instance,
    )
    keys_done = {m.asset_key for m in result.asset_materializations_for_node("clip_assets")}
    assert keys_done == {CAPTIONS, LATENTS}


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
    assert len(first.run_requests) == 1
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


def test_batches_are_consecutive_runs_of_at_most_n() -> None:
    order = [f"c{i:02d}" for i in range(10)]
    wanted = {"c00", "c01", "c02", "c04", "c05", "c06", "c07", "c09"}
    assert batches(order, wanted, 3) == [["c00", "c01", "c02"], ["c04", "c05", "c06"], ["c07"], ["c09"]]
    assert batches(order, set(), 3) == []
    assert sum(map(len, batches(order, set(order), 4))) == 10
