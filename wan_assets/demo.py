"""`wan-assets demo`: the whole graph on the embedded tiny model and the synthetic clips, in-process,
recorded in the workdir's Dagster instance so `wan-assets ui` shows the same runs afterwards.

It runs what the daemon would: the new-clip sensor's tick, its batch runs of the per-clip assets,
then the index, training, evaluation and metrics. It prints one progress line per run, not
Dagster's event stream (that is in the instance, for the UI).
"""

import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AddDynamicPartitionsRequest,
    AssetsDefinition,
    BetaWarning,
    DagsterInstance,
    DeleteDynamicPartitionsRequest,
    ExecuteInProcessResult,
    PreviewWarning,
    SensorResult,
    build_sensor_context,
    materialize,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from resources.project import WanProjectResource
from wan_assets.core.workdir import TINY_CONFIG, Workdir

# Dagster's own console logger only speaks up for what would stop the demo anyway; every event is
# still stored in the instance and shown by `wan-assets ui`.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


@dataclass
class DemoResult:
    workdir: Path
    job: object
    failed_clips: dict[str, str] = field(default_factory=dict)  # partition key -> reason
    failed_step: str | None = None  # "<assets>: <reason>" when a whole-graph step failed


def sync_partitions(instance: DagsterInstance, project: WanProjectResource) -> list[list[str]]:
    """One tick of the new-clip sensor, applied: the clip partitions match the dataset folders.
    Returns the clip batches it requests (consecutive partition keys)."""
    from wan_assets.sensors import new_clips_sensor, requested_keys

    context = build_sensor_context(instance=instance, resources={"project": project})
    result = new_clips_sensor(context)
    assert isinstance(result, SensorResult), "the sensor returns one SensorResult"
    for request in result.dynamic_partitions_requests or ():
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        elif isinstance(request, DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    order = list(instance.get_dynamic_partitions("videos"))
    return [requested_keys(r, order) for r in result.run_requests or ()]


def materialize_batch(
    assets: list[AssetsDefinition], keys: list[str], resources: dict, instance: DagsterInstance
) -> tuple[ExecuteInProcessResult, dict[str, str]]:
    """One run of the per-clip assets over the consecutive clips `keys`; the bad clips and reasons."""
    tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    result = materialize(
        assets, tags=tags, resources=resources, instance=instance, raise_on_error=False, run_config=QUIET
    )
    failed: dict[str, str] = {}
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        clips = data.user_failure_data.metadata.get("failed_clips") if data.user_failure_data else None
        if clips is not None:
            failed.update(clips.value)  # type: ignore[arg-type]
        else:  # the batch itself broke (not one clip): every clip of it failed for that reason
            failed.update(dict.fromkeys(keys, data.error.message.strip() if data.error else "step failed"))
    return result, failed


def run_demo(
    workdir: Path | None = None, config: Path = TINY_CONFIG, say: Callable[[str], None] = print
) -> DemoResult:
    """Materialize every asset, reporting progress through `say`. Failed clips do not stop the rest;
    a failed whole-graph step (index, training, evaluation, metrics) stops the ones after it."""
    from wan_assets.definitions import ASSETS, resources
    from wan_assets.ui import write_instance_config

    warnings.filterwarnings("ignore", category=BetaWarning)
    warnings.filterwarnings("ignore", category=PreviewWarning)
    wd = Workdir.open(workdir)
    wd.ensure_default_clips(config)
    wd.ensure_tiny_model()
    os.environ["WAN_ASSETS_HOME"] = str(wd.root)
    os.environ["DAGSTER_HOME"] = str(wd.dagster_home)
    write_instance_config(wd.dagster_home)
    project = WanProjectResource(config_path=str(config), workdir=str(wd.root))
    all_resources = {**resources(), "project": project}
    out = DemoResult(wd.root, project.job())
    per_clip = [a for a in ASSETS if a.partitions_def is not None]
    rest = [a for a in ASSETS if a.partitions_def is None]
    with DagsterInstance.get() as instance:
        runs = sync_partitions(instance, project)
        say(
            f"clips: {len(instance.get_dynamic_partitions('videos'))} in the dataset, {sum(map(len, runs))} new or changed"
        )
        for i, keys in enumerate(runs, 1):
            began = time.perf_counter()
            _, failed = materialize_batch(per_clip, keys, all_resources, instance)
            out.failed_clips.update(failed)
            say(
                f"  batch {i}/{len(runs)}: {len(keys) - len(failed)} of {len(keys)} clips cached"
                + (f", {len(failed)} failed" if failed else "")
                + f" ({time.perf_counter() - began:.1f}s)"
            )
        for stage in rest:
            names = ", ".join(k.to_user_string() for k in stage.keys)
            began = time.perf_counter()
            say(f"{names} ...")
            result = materialize(
                [*per_clip, *rest],
                selection=list(stage.keys),
                resources=all_resources,
                instance=instance,
                raise_on_error=False,
                run_config=QUIET,
            )
            if not result.success:
                reasons = [
                    (e.step_failure_data.error.message if e.step_failure_data.error else "").strip()
                    for e in result.get_step_failure_events()
                ]
                out.failed_step = f"{names}: {'; '.join(reasons) or 'run failed'}"
                break
            say(f"  done ({time.perf_counter() - began:.1f}s)")
    return out


def print_demo(out: DemoResult) -> int:
    """The demo's summary; the exit status: 1 when a clip or a step failed (each named with why)."""
    from wan_assets.core.metrics.report import summary

    job = out.job
    print(f"\nworkdir:      {out.workdir}")
    print(f"clips:        {job.process.datasets[0].folder_path}")  # type: ignore[attr-defined]
    print(f"model:        {job.process.model.name_or_path}")  # type: ignore[attr-defined]
    print(f"latent cache: {out.workdir / 'cache'}")
    print(f"run:          {job.run_dir()}")  # type: ignore[attr-defined]
    print(f"metrics:      {out.workdir / 'metrics.duckdb'}")
    database = out.workdir / "metrics.duckdb"
    if database.exists():
        print("\n" + summary(database))
    for key, reason in out.failed_clips.items():
        print(f"error: clip {key} failed: {reason}", file=sys.stderr)
    if out.failed_step:
        print(f"error: {out.failed_step}", file=sys.stderr)
    if out.failed_clips or out.failed_step:
        print("see `wan-assets ui` for the runs' full logs", file=sys.stderr)
        return 1
    return 0
