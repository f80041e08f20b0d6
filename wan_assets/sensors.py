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
from wan_assets.assets.data import VIDEOS
from wan_assets.core.data.captions import caption_path

PER_CLIP_ASSETS = [AssetKey("raw_videos"), AssetKey("captions"), AssetKey("latents")]


def _stamp(path, caption) -> list[int]:
    """(size, mtime) of the clip and of its caption: an edited caption re-runs the clip too."""
    stat = path.stat()
    cap = caption.stat() if caption.is_file() else None
    return [stat.st_size, stat.st_mtime_ns, cap.st_size if cap else -1, cap.st_mtime_ns if cap else -1]


@sensor(
    name="new_clips_sensor",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition per new clip, re-runs changed clips and removes deleted ones",
    asset_selection=PER_CLIP_ASSETS,
)
def new_clips_sensor(context: SensorEvaluationContext, project: WanProjectResource) -> SensorResult:
    previous: dict[str, list[int]] = json.loads(context.cursor) if context.cursor else {}
    job = project.job()
    current = {
        s.key: _stamp(s.path, caption_path(s.path, job.process.datasets[s.dataset_index].caption_ext))
        for s in project.clips()
    }
    known = set(context.instance.get_dynamic_partitions(VIDEOS))
    added = sorted(set(current) - known)
    removed = sorted(known - set(current))
    changed = sorted(k for k in current if k in known and previous.get(k) not in (None, current[k]))
    requests = [
        RunRequest(run_key=f"{key}:{':'.join(map(str, current[key]))}", partition_key=key)
        for key in [*added, *changed]
    ]
    partition_requests: list[AddDynamicPartitionsRequest | DeleteDynamicPartitionsRequest] = []
    if added:
        partition_requests.append(AddDynamicPartitionsRequest(VIDEOS, added))
    if removed:
        partition_requests.append(DeleteDynamicPartitionsRequest(VIDEOS, removed))
    if added or removed or changed:
        context.log.info(f"clips: {len(added)} new, {len(changed)} changed, {len(removed)} removed")
    return SensorResult(
        run_requests=requests, dynamic_partitions_requests=partition_requests, cursor=json.dumps(current)
    )
