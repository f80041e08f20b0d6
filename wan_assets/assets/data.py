"""Data assets (docs/architecture.md §4): raw_videos -> captions -> latents (one partition per clip) -> latent_cache.

The three per-clip assets are one multi-asset that runs over a batch of clip partitions (a
partition range, `BackfillPolicy.multi_run`): the config is read and the folders scanned once, the
VAE and text encoder load once and stay loaded for every clip of the batch, and the next clips are
decoded while the encoders work, as `wan-assets cache` does. Each clip still has its own partitions,
lineage and metadata: the batch records one materialization per clip and asset as it finishes.

A bad clip fails alone: it is logged by name with its reason and not materialized; when the batch
is done the step fails listing every bad clip, so the run fails and Dagster marks exactly those
partitions failed (planned in a failed run, never materialized) while the batch's good clips show
materialized. Re-running one clip is materializing its one partition.
"""

import hashlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetSpec,
    BackfillPolicy,
    DataVersion,
    DynamicPartitionsDefinition,
    Failure,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    NULL_EVENT_POINTER,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)

from resources.project import WanProjectResource
from wan_assets.automation import INDEX
from wan_assets.core.config import JobConfig
from wan_assets.core.data.buckets import Bucket
from wan_assets.core.data.cache import (
    CLIP_ERRORS,
    PREFETCH_CLIPS,
    ClipCaption,
    ClipFeed,
    ClipProbe,
    ClipRecord,
    ClipSource,
    EncoderHandle,
    build_index,
    caption_clips,
    finish_clip,
    probe_clip,
)
from wan_assets.core.files import write_json
from wan_assets.metadata import table_metadata

VIDEOS = "videos"  # the clip partitions' name
videos = DynamicPartitionsDefinition(name=VIDEOS)
# Clips per run: large enough that loading the encoders (UMT5-XXL is ~11 GB) is paid rarely, small
# enough that a run finishes in minutes and a crash loses little. WAN_ASSETS_BATCH_CLIPS overrides.
DEFAULT_BATCH_CLIPS = 50
RAW_VIDEOS, CAPTIONS, LATENTS = AssetKey("raw_videos"), AssetKey("captions"), AssetKey("latents")
PER_CLIP_KEYS = (RAW_VIDEOS, CAPTIONS, LATENTS)
CODE_VERSION = "2"
# Logged once by a batch that had to load the models (the scale benchmark counts these lines).
ENCODERS_LOADED = "encoders loaded once for this batch"
CAPTION_CHARS = 300  # a caption's metadata entry is cut here (the event log keeps every one)


def clip_batches(batch_clips: int = DEFAULT_BATCH_CLIPS) -> BackfillPolicy:
    return BackfillPolicy.multi_run(max_partitions_per_run=batch_clips)


@dataclass
class ClipOutcome:
    """What a batch learnt about one clip; `failed` says which asset it failed at, and why."""

    source: ClipSource
    probe: ClipProbe | None = None
    caption: str | None = None
    caption_info: ClipCaption | None = None  # where the caption came from (file, captioner, default)
    record: ClipRecord | None = None
    vae_calls: int = 0
    text_calls: int = 0
    frames_decoded: int = 0
    failed_at: AssetKey | None = None
    reason: str = ""


def record_path(cache_dir: Path, job: JobConfig, partition_key: str) -> Path:
    """Where a clip's latents record lives (the value `latent_cache` reads; plain JSON)."""
    return cache_dir / "records" / job.name / f"{partition_key}.json"


def _without_latents(
    source: ClipSource, caption: ClipCaption | Exception | None, wanted: frozenset[AssetKey]
) -> ClipOutcome:
    """A clip when its latents are not wanted (a subset run): probed, and its caption if wanted."""
    outcome = ClipOutcome(source)
    try:
        outcome.probe = probe_clip(source)
    except CLIP_ERRORS as exc:
        outcome.failed_at, outcome.reason = RAW_VIDEOS, str(exc)
        return outcome
    if CAPTIONS in wanted and caption is not None:
        if isinstance(caption, Exception):
            outcome.failed_at, outcome.reason = CAPTIONS, str(caption)
        else:
            outcome.caption, outcome.caption_info = caption.text, caption
    return outcome


def process_clips(
    sources: list[ClipSource],
    captions: dict[str, ClipCaption | Exception],
    job: JobConfig,
    encoder: EncoderHandle,
    cache_dir: Path,
    wanted: frozenset[AssetKey],
    prefetch: int = PREFETCH_CLIPS,
) -> Iterator[ClipOutcome]:
    """Each clip's outcome in order, as it finishes. As in `wan-assets cache` (`ClipFeed`),
    `prefetch` clips are probed, planned and decoded ahead in threads, each variant handed over as
    it is ready, while the encoders (one handle for the whole batch) work on the current one.
    `captions`: the batch's captions by clip (`caption_clips`), when captions or latents are wanted."""
    if LATENTS not in wanted:
        for source in sources:
            yield _without_latents(source, captions.get(source.key), wanted)
        return
    queue = iter(sources)
    with ThreadPoolExecutor(max_workers=max(prefetch, 1), thread_name_prefix="decode") as pool:
        pending: deque[ClipFeed] = deque()

        def submit_next() -> None:
            source = next(queue, None)
            if source is not None:
                pending.append(ClipFeed(source, captions[source.key], job, encoder, cache_dir, pool))

        for _ in range(max(prefetch, 1)):
            submit_next()
        while pending:
            feed = pending.popleft()
            submit_next()
            outcome = ClipOutcome(feed.source)
            caption = captions[feed.source.key]
            vae, text = encoder.num_vae_calls, encoder.num_text_calls
            try:
                outcome.record = finish_clip(feed.plan(), feed.videos(), encoder, cache_dir)
            except CLIP_ERRORS as exc:
                outcome.reason = str(exc)
                if feed.probe is None:
                    outcome.failed_at = RAW_VIDEOS
                elif isinstance(caption, Exception):
                    outcome.failed_at = CAPTIONS
                else:
                    outcome.failed_at = LATENTS
            finally:
                feed.close()
            outcome.probe = feed.probe
            if not isinstance(caption, Exception):
                outcome.caption, outcome.caption_info = caption.text, caption
            outcome.vae_calls = encoder.num_vae_calls - vae
            outcome.text_calls = encoder.num_text_calls - text
            outcome.frames_decoded = feed.stats.frames_decoded
            yield outcome


def _materialization(
    key: AssetKey, partition: str, version: str, inputs: dict[AssetKey, str], metadata: dict
) -> AssetMaterialization:
    """One clip's materialization, with the data-version provenance Dagster's own outputs carry."""
    tags = {
        CODE_VERSION_TAG: CODE_VERSION,
        DATA_VERSION_TAG: version,
        DATA_VERSION_IS_USER_PROVIDED_TAG: "true",
    }
    for dep, dep_version in inputs.items():
        tags[get_input_data_version_tag(dep)] = dep_version
        tags[get_input_event_pointer_tag(dep)] = NULL_EVENT_POINTER
    return AssetMaterialization(asset_key=key, partition=partition, metadata=metadata, tags=tags)


def raw_videos_metadata(probe: ClipProbe) -> dict:
    return {
        "path": MetadataValue.path(probe.path),
        "sha256": probe.sha256,
        "bytes": probe.bytes,
        "fps": round(probe.fps, 3),
        "num_frames": probe.num_frames,
        "duration_s": round(probe.duration_s, 3),
        "width": probe.width,
        "height": probe.height,
        "codec": probe.codec,
        "pixel_aspect": round(probe.pixel_aspect, 4),
    }


def captions_metadata(caption: str, info: ClipCaption | None = None) -> dict:
    shown = caption if len(caption) <= CAPTION_CHARS else caption[:CAPTION_CHARS] + "..."
    metadata: dict = {"caption": shown, "words": len(caption.split())}
    if info is not None:
        metadata["origin"] = info.origin
        if info.generated is not None:  # the captioner's model, prompt, settings and record
            metadata |= info.generated.metadata()
        if info.sidecar is not None:
            metadata["sidecar_written"] = MetadataValue.path(info.sidecar)
    return metadata


def latents_metadata(outcome: ClipOutcome) -> dict:
    """The clip's samples (windows x resolutions), each with its bucket, frames and variants."""
    record = outcome.record
    assert record is not None
    samples = [
        {
            "sample": s.name,
            "bucket": s.bucket,
            "start_s": round(s.start_s, 3),
            "frames": Bucket.from_key(s.bucket).num_frames,
            "variants": len(s.variants),
            "speedup": round(s.speedup, 3),
        }
        for s in record.samples
    ]
    return {
        "samples": table_metadata(samples),
        "num_samples": len(record.samples),
        "bucket": ", ".join(sorted({s.bucket for s in record.samples})),
        "frame_indices": MetadataValue.json(
            {s.name: [list(v.indices) for v in s.variants] for s in record.samples}
        ),
        "frames_decoded": outcome.frames_decoded,
        "vae_calls": outcome.vae_calls,
        "text_encoder_calls": outcome.text_calls,
        "files": MetadataValue.json([*sorted(set(record.variant_files)), record.text_file]),
        **({"warning": record.warning} if record.warning else {}),
    }


def _failure_notes(outcome: ClipOutcome, wanted: frozenset[AssetKey]) -> Iterator[AssetObservation]:
    """Why a clip failed, on each wanted asset it did not reach: its partition's page shows the
    reason (the instance keeps no per-partition failure event of its own)."""
    assert outcome.failed_at is not None
    for key in PER_CLIP_KEYS[PER_CLIP_KEYS.index(outcome.failed_at) :]:
        if key in wanted:
            yield AssetObservation(
                asset_key=key,
                partition=outcome.source.key,
                description=f"failed: {outcome.reason}",
                metadata={"error": outcome.reason, "failed_at": outcome.failed_at.to_user_string()},
            )


def _caption_version(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()


def _events(outcome: ClipOutcome, wanted: frozenset[AssetKey]) -> Iterator[AssetMaterialization]:
    """The materializations of one clip: every wanted asset it got through."""
    key, probe = outcome.source.key, outcome.probe
    if probe is None:
        return
    if RAW_VIDEOS in wanted:
        yield _materialization(RAW_VIDEOS, key, probe.sha256, {}, raw_videos_metadata(probe))
    if outcome.caption is None:
        return
    caption_version = _caption_version(outcome.caption)
    if CAPTIONS in wanted:
        yield _materialization(
            CAPTIONS,
            key,
            caption_version,
            {RAW_VIDEOS: probe.sha256},
            captions_metadata(outcome.caption, outcome.caption_info),
        )
    if LATENTS in wanted and outcome.record is not None:
        inputs = {RAW_VIDEOS: probe.sha256, CAPTIONS: caption_version}
        yield _materialization(LATENTS, key, outcome.record.data_version, inputs, latents_metadata(outcome))


@multi_asset(
    name="clip_assets",
    specs=[
        AssetSpec(
            RAW_VIDEOS,
            group_name="data",
            code_version=CODE_VERSION,
            skippable=True,
            description="One video clip under a dataset folder: probed with PyAV (fps, frames, size, "
            "codec), its sha256 the data version, so a re-encoded or replaced file flows downstream "
            "and an untouched one does not.",
        ),
        AssetSpec(
            CAPTIONS,
            deps=[RAW_VIDEOS],
            group_name="data",
            code_version=CODE_VERSION,
            skippable=True,
            description="The clip's sidecar caption (`caption_ext`), with `[trigger]` / `[name]` "
            "replaced by the trigger word (prepended when absent), or `default_caption` when the "
            "file is missing.",
        ),
        AssetSpec(
            LATENTS,
            deps=[RAW_VIDEOS, CAPTIONS],
            group_name="data",
            code_version=CODE_VERSION,
            skippable=True,
            description="The clip's training samples (windows x resolutions, each in its bucket): VAE "
            "latents of each sample's frames (normalised) per cached jitter variant, the I2V "
            "condition (mask + first-frame latent) and UMT5 embeddings of the caption and the empty caption, in "
            "content-addressed safetensors. Unchanged inputs find their files and encode nothing; "
            "the data version stays the same.",
        ),
    ],
    check_specs=[
        AssetCheckSpec(
            "caption_not_empty",
            asset=CAPTIONS,
            description="Every caption of the batch has words: an empty caption teaches nothing, "
            "and its clip's latents fail",
        )
    ],
    partitions_def=videos,
    # No automation conditions: the new-clip sensor requests batches of new and changed clips.
    backfill_policy=clip_batches(),
    can_subset=True,
)
def clip_assets(context: AssetExecutionContext, project: WanProjectResource):
    """raw_videos, captions and latents of a batch of clips, one materialization per clip and asset."""
    wanted = frozenset(context.selected_asset_keys)
    job, cache_dir = project.job(), project.root().cache
    keys = list(context.partition_keys)
    failures: dict[str, str] = {}
    sources = []
    for key in keys:
        try:
            sources.append(project.source(key))
        except FileNotFoundError as exc:
            failures[key] = str(exc)
            context.log.error(str(exc))
    empty: list[str] = []
    done = 0
    captions: dict[str, ClipCaption | Exception] = {}
    if wanted & {CAPTIONS, LATENTS}:
        # The batch's captions first: a captioner (auto_caption) loads once and is freed before
        # the encoders load, as `wan-assets cache` does.
        with project.captioner() as captioner:
            captions = caption_clips(sources, job, cache_dir, captioner)
            if captioner is not None and captioner.num_loads:
                context.log.info(
                    f"captioner loaded once for this batch: {captioner.num_generate_calls} generate call(s)"
                )
    with project.encoder() as encoder:
        for outcome in process_clips(sources, captions, job, encoder, cache_dir, wanted):
            if outcome.record is not None:
                write_json(record_path(cache_dir, job, outcome.source.key), outcome.record.to_json())
                if outcome.record.warning:
                    context.log.warning(f"{outcome.record.path}: {outcome.record.warning}")
            yield from _events(outcome, wanted)
            if outcome.caption is not None and not outcome.caption.strip():
                empty.append(outcome.source.key)
            if outcome.failed_at is not None:
                yield from _failure_notes(outcome, wanted)
                failures[outcome.source.key] = outcome.reason
                context.log.error(
                    f"clip {outcome.source.key} failed at {outcome.failed_at.to_user_string()}: {outcome.reason}"
                )
            else:
                done += 1
        loaded = encoder.loaded
    if context.selected_asset_check_keys:
        yield AssetCheckResult(
            asset_key=CAPTIONS,
            check_name="caption_not_empty",
            passed=not empty,
            severity=AssetCheckSeverity.ERROR,
            metadata={"empty_captions": MetadataValue.json(empty), "clips": len(keys)},
        )
    context.log.info(
        f"{len(keys)} clips: {done} materialized, {len(failures)} failed; "
        + (ENCODERS_LOADED if loaded else "no encoder needed (everything cached)")
    )
    if failures:
        lines = "\n".join(f"  {key}: {reason}" for key, reason in failures.items())
        raise Failure(
            description=f"{len(failures)} of {len(keys)} clips failed (the others are materialized):\n{lines}",
            metadata={"failed_clips": MetadataValue.json(failures)},
            allow_retries=False,
        )


@asset(
    group_name="data",
    deps=[AssetDep(LATENTS, partition_mapping=AllPartitionMapping())],
    automation_condition=INDEX,
    code_version="2",
)
def latent_cache(context: AssetExecutionContext, project: WanProjectResource) -> Output[dict]:
    """The bucket index over every good clip's latents (train / held-out split included): the only
    thing training reads. A clip is in it when its latents partition has been materialized and it
    is still under the dataset folders; one whose latest run failed keeps its last good latents
    (as `wan-assets cache` keeps them); removed clips leave it."""
    job, cache_dir = project.job(), project.root().cache
    current = set(context.instance.get_dynamic_partitions(VIDEOS))
    materialized = context.instance.get_materialized_partitions(LATENTS) & current
    records, missing = [], []
    for key in sorted(materialized):
        path = record_path(cache_dir, job, key)
        if path.is_file():
            records.append(ClipRecord.from_json(_read_json(path)))
        else:
            missing.append(key)
    if missing:
        context.log.warning(
            f"{len(missing)} materialized clip(s) have no latents record under {cache_dir / 'records'} "
            f"(cache cleared?) and are left out; re-materialize them: {', '.join(missing[:10])}"
        )
    index = build_index(job, records, cache_dir)
    rows = index.table()
    num_samples = sum(len(r.samples) for r in records)
    context.log.info(
        f"latent index of {len(records)} clips, {num_samples} samples in {len(rows)} bucket/split groups"
    )
    return Output(
        {"index": str(cache_dir / "index" / f"{job.name}.json"), "clips": len(records)},
        data_version=DataVersion(index.identity()),
        metadata={
            "clips": len(records),
            "samples": num_samples,
            "train_clips": sum(1 for s in index.splits.values() if s == "train"),
            "val_clips": sum(1 for s in index.splits.values() if s == "val"),
            "buckets": table_metadata(rows),
        },
    )


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
