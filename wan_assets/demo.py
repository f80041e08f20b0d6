"""`wan-assets demo`: the whole graph on the embedded tiny model and the synthetic clips, in-process,
recorded in the workdir's Dagster instance so `wan-assets ui` shows the same runs afterwards.

It runs what the daemon would: the new-clip sensor's tick, its batch runs of the per-clip assets,
then the index, training, evaluation and metrics. It prints one progress line per run, not
Dagster's event stream (that is in the instance, for the UI).
"""

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    BetaWarning,
    DagsterInstance,
    Definitions,
    DeleteDynamicPartitionsRequest,
    ExecuteInProcessResult,
    InitLoggerContext,
    JobDefinition,
    PreviewWarning,
    SensorResult,
    build_sensor_context,
    in_process_executor,
    logger,
)
from dagster._core.log_manager import LOG_RECORD_METADATA_ATTR
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from resources.project import WanProjectResource
from wan_assets.core.workdir import TINY_CONFIG, Workdir


class _StepLines(logging.Filter):
    """What the steps themselves say at INFO and WARNING (training progress, phase transitions,
    a batch's summary), as bare lines; Dagster's own events and the bad clips' ERROR lines (the
    summary lists those) stay in the instance for `wan-assets ui`."""

    def filter(self, record: logging.LogRecord) -> bool:
        meta = getattr(record, LOG_RECORD_METADATA_ATTR, None)
        if not meta or meta.get("dagster_event") is not None or record.levelno >= logging.ERROR:
            return False
        if meta["orig_message"].startswith("[pipes]"):  # Pipes' own handshake, not the trainer's words
            return False
        record.msg, record.args = f"    {meta['orig_message']}", ()
        return True


@logger(
    config_schema=None,
    description="The demo's console: the steps' own progress lines, nothing of Dagster's event stream",
)
def demo_console(_: InitLoggerContext) -> logging.Logger:
    out = logging.getLogger("wan_assets.demo")
    out.setLevel(logging.INFO)
    out.propagate = False
    if not out.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.addFilter(_StepLines())
        out.addHandler(handler)
    return out


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
    # The tick's logger writes its INFO line to its own console handler: the caller reports instead.
    context.log.setLevel(logging.WARNING)
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


# A logger runs only when the run config names it (else Dagster falls back to its own console).
DEMO_LOGGING: dict[str, dict] = {"loggers": {"console": {}}}


def demo_job(assets: list, resources: dict) -> JobDefinition:
    """Every asset in one job whose console is `demo_console` (runs execute in this process)."""
    defs = Definitions(assets=assets, resources=resources, executor=in_process_executor)
    # The implicit asset job keeps Dagster's default loggers whatever Definitions says: swap them here.
    return defs.resolve_implicit_global_asset_job_def().with_logger_defs({"console": demo_console})


def materialize_batch(
    job: JobDefinition, keys: list[str], instance: DagsterInstance
) -> tuple[ExecuteInProcessResult, dict[str, str]]:
    """One run of the per-clip assets over the consecutive clips `keys`; the bad clips and reasons."""
    from wan_assets.assets.data import PER_CLIP_KEYS

    tags = {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}
    result = job.execute_in_process(
        instance=instance,
        tags=tags,
        asset_selection=list(PER_CLIP_KEYS),
        raise_on_error=False,
        run_config=DEMO_LOGGING,
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


def _say(line: str) -> None:
    print(line, flush=True)  # in order with the step lines the demo console writes


def run_demo(
    workdir: Path | None = None, config: Path = TINY_CONFIG, say: Callable[[str], None] = _say
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
    job = demo_job(ASSETS, all_resources)
    stages: list[list[AssetKey]] = [
        list(a.keys) for a in ASSETS if a.partitions_def is None
    ]  # index, training, evaluation, metrics: in graph order
    with DagsterInstance.get() as instance:
        runs = sync_partitions(instance, project)
        say(
            f"clips: {len(instance.get_dynamic_partitions('videos'))} in the dataset, {sum(map(len, runs))} new or changed"
        )
        for i, keys in enumerate(runs, 1):
            began = time.perf_counter()
            _, failed = materialize_batch(job, keys, instance)
            out.failed_clips.update(failed)
            say(
                f"  batch {i}/{len(runs)}: {len(keys) - len(failed)} of {len(keys)} clips cached"
                + (f", {len(failed)} failed" if failed else "")
                + f" ({time.perf_counter() - began:.1f}s)"
            )
        for stage in stages:
            names = ", ".join(k.to_user_string() for k in stage)
            began = time.perf_counter()
            say(f"{names} ...")
            result = job.execute_in_process(
                instance=instance, asset_selection=stage, raise_on_error=False, run_config=DEMO_LOGGING
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
