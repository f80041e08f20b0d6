"""The new-clip sensor: a clip dropped into a dataset folder flows through without anyone clicking.

The cursor maps each partition key to the file's (size, mtime_ns). New keys become partitions; new
and changed clips are requested in batches: each run covers a range of consecutive clip partitions
(at most `batch_clips`, the per-clip assets' backfill policy), so 1000 new clips are 20 runs of 50,
not 1000 runs, and the encoders load once per run. A deleted file's partition is removed, so the
next latent index no longer lists it.
"""

import hashlib
import json

from dagster import (
    AddDynamicPartitionsRequest,
    AssetSelection,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    in_process_executor,
    sensor,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from resources.project import WanProjectResource
from wan_assets.assets.data import DEFAULT_BATCH_CLIPS, PER_CLIP_KEYS, VIDEOS
from wan_assets.core.data.captions import caption_path

PER_CLIP_ASSETS = list(PER_CLIP_KEYS)

# The sensor's batch runs execute in the run's own process: one batch is one step, so a step
# subprocess would only load Python, torch and the code location a second time per run.
clip_batches_job = define_asset_job(
    "clip_batches",
    selection=AssetSelection.assets(*PER_CLIP_KEYS),
    executor_def=in_process_executor,
    description="raw_videos, captions and latents of a batch of clips (the new-clip sensor's runs)",
)


def _stamp(path, caption) -> list[int]:
    """(size, mtime) of the clip and of its caption: an edited caption re-runs the clip too."""
    stat = path.stat()
    cap = caption.stat() if caption.is_file() else None
    return [stat.st_size, stat.st_mtime_ns, cap.st_size if cap else -1, cap.st_mtime_ns if cap else -1]


def batches(order: list[str], wanted: set[str], batch_clips: int) -> list[list[str]]:
    """The wanted keys as runs of consecutive partitions (in the partitions' order), each at most
    `batch_clips` long: a range run covers exactly the clips it should, no unchanged neighbour."""
    groups: list[list[str]] = []
    current: list[str] = []
    for key in order:
        if key in wanted and len(current) < batch_clips:
            current.append(key)
            continue
        if current:
            groups.append(current)
        current = [key] if key in wanted else []
    if current:
        groups.append(current)
    return groups


def batch_request(keys: list[str], stamps: dict[str, list[int]]) -> RunRequest:
    """One run for these consecutive clip partitions; its run key changes when any of their files do."""
    digest = hashlib.sha256(json.dumps([[k, stamps[k]] for k in keys]).encode()).hexdigest()[:16]
    if len(keys) == 1:
        return RunRequest(run_key=f"{keys[0]}:{digest}", partition_key=keys[0])
    return RunRequest(
        run_key=f"{keys[0]}..{keys[-1]}:{digest}",
        tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
    )


def requested_keys(request: RunRequest, order: list[str]) -> list[str]:
    """The clip partitions a request of this sensor runs (`order`: the partitions' order)."""
    if request.partition_key is not None:
        return [request.partition_key]
    start, end = request.tags[ASSET_PARTITION_RANGE_START_TAG], request.tags[ASSET_PARTITION_RANGE_END_TAG]
    return order[order.index(start) : order.index(end) + 1]


def new_clips_sensor_for(batch_clips: int = DEFAULT_BATCH_CLIPS) -> SensorDefinition:
    @sensor(
        name="new_clips_sensor",
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description=f"Adds a partition per new clip, runs new and changed clips in batches of up to "
        f"{batch_clips}, removes deleted ones",
        job=clip_batches_job,
    )
    def new_clips_sensor(context: SensorEvaluationContext, project: WanProjectResource) -> SensorResult:
        previous: dict[str, list[int]] = json.loads(context.cursor) if context.cursor else {}
        job = project.job()
        current = {
            s.key: _stamp(s.path, caption_path(s.path, job.process.datasets[s.dataset_index].caption_ext))
            for s in project.clips()
        }
        known_order = context.instance.get_dynamic_partitions(VIDEOS)
        known = set(known_order)
        added = sorted(set(current) - known)
        removed = sorted(known - set(current))
        changed = sorted(k for k in current if k in known and previous.get(k) not in (None, current[k]))
        # Added partitions go after the known ones, in this order: that is the order ranges resolve in.
        order = [k for k in known_order if k in current] + added
        requests = [batch_request(keys, current) for keys in batches(order, {*added, *changed}, batch_clips)]
        partition_requests: list[AddDynamicPartitionsRequest | DeleteDynamicPartitionsRequest] = []
        if added:
            partition_requests.append(AddDynamicPartitionsRequest(VIDEOS, added))
        if removed:
            partition_requests.append(DeleteDynamicPartitionsRequest(VIDEOS, removed))
        if added or removed or changed:
            context.log.info(
                f"clips: {len(added)} new, {len(changed)} changed, {len(removed)} removed; "
                f"{len(requests)} run(s) of up to {batch_clips} clips"
            )
        return SensorResult(
            run_requests=requests, dynamic_partitions_requests=partition_requests, cursor=json.dumps(current)
        )

    return new_clips_sensor


new_clips_sensor = new_clips_sensor_for()
