"""`wan-assets demo`: the whole graph on the embedded tiny model and the synthetic clips, in-process,
recorded in the workdir's Dagster instance so `wan-assets ui` shows the same runs afterwards."""

import os
from pathlib import Path

from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    DeleteDynamicPartitionsRequest,
    SensorResult,
    build_sensor_context,
    materialize,
)

from resources.project import WanProjectResource
from wan_assets.core.workdir import TINY_CONFIG, Workdir


def sync_partitions(instance: DagsterInstance, project: WanProjectResource) -> list[str]:
    """One tick of the new-clip sensor, applied: the clip partitions match the dataset folders."""
    from wan_assets.sensors import new_clips_sensor

    context = build_sensor_context(instance=instance, resources={"project": project})
    result = new_clips_sensor(context)
    assert isinstance(result, SensorResult), "the sensor returns one SensorResult"
    for request in result.dynamic_partitions_requests or ():
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        elif isinstance(request, DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    return [r.partition_key for r in result.run_requests or () if r.partition_key is not None]


def run_demo(workdir: Path | None = None, config: Path = TINY_CONFIG) -> dict:
    """Materialize every asset; returns where things are. Failed clips are reported, not fatal."""
    from wan_assets.definitions import ASSETS, resources
    from wan_assets.ui import write_instance_config

    wd = Workdir.open(workdir)
    wd.ensure_default_clips(config)
    wd.ensure_tiny_model()
    os.environ["WAN_ASSETS_HOME"] = str(wd.root)
    os.environ["DAGSTER_HOME"] = str(wd.dagster_home)
    write_instance_config(wd.dagster_home)
    project = WanProjectResource(config_path=str(config), workdir=str(wd.root))
    all_resources = {**resources(), "project": project}
    with DagsterInstance.get() as instance:
        sync_partitions(instance, project)
        per_clip = [a for a in ASSETS if a.partitions_def is not None]
        failed = {}
        for key in instance.get_dynamic_partitions("videos"):
            result = materialize(
                per_clip, partition_key=key, resources=all_resources, instance=instance, raise_on_error=False
            )
            if not result.success:
                failed[key] = "; ".join(e.message or "" for e in result.get_step_failure_events())
        rest = [a for a in ASSETS if a.partitions_def is None]
        result = materialize([*per_clip, *rest], selection=rest, resources=all_resources, instance=instance)
        return {"workdir": wd.root, "failed_clips": failed, "run_id": result.run_id, "job": project.job()}
