"""The new-clip sensor: a clip dropped into a dataset folder flows through without anyone clicking.

The cursor maps each partition key to the file's (size, mtime_ns). New keys become partitions and a
run request for the per-clip assets; a changed file gets a run request; a deleted file's partition
is removed, so the next latent index no longer lists it.
"""

import json

from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from resources.project import WanProjectResource
from wan_assets.assets.data import videos

PER_CLIP_ASSETS = [AssetKey("raw_videos"), AssetKey("captions"), AssetKey("latents")]


def _stamp(path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


@sensor(
    name="new_clips_sensor",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition per new clip, re-runs changed clips and removes deleted ones",
    asset_selection=PER_CLIP_ASSETS,
)
def new_clips_sensor(context: SensorEvaluationContext, project: WanProjectResource) -> SensorResult:
    previous: dict[str, list[int]] = json.loads(context.cursor) if context.cursor else {}
    current = {source.key: _stamp(source.path) for source in project.clips()}
    known = set(context.instance.get_dynamic_partitions(videos.name))
    added = sorted(set(current) - known)
    removed = sorted(known - set(current))
    changed = sorted(k for k in current if k in known and previous.get(k) not in (None, current[k]))
    requests = [
        RunRequest(run_key=f"{key}:{current[key][0]}:{current[key][1]}", partition_key=key)
        for key in [*added, *changed]
    ]
    partition_requests = []
    if added:
        partition_requests.append(AddDynamicPartitionsRequest(videos.name, added))
    if removed:
        partition_requests.append(DeleteDynamicPartitionsRequest(videos.name, removed))
    if added or removed or changed:
        context.log.info(f"clips: {len(added)} new, {len(changed)} changed, {len(removed)} removed")
    return SensorResult(
        run_requests=requests, dynamic_partitions_requests=partition_requests, cursor=json.dumps(current)
    )
