"""Data assets (docs/architecture.md §4): raw_videos -> captions -> latents (one partition per clip) -> latent_cache.

Each body is one call into `wan_assets.core.data.cache` plus metadata. A bad clip fails its own partition
with a message naming the file and the reason; every other clip goes on.
"""

import hashlib
from dataclasses import asdict
from typing import Any

from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    DataVersion,
    DynamicPartitionsDefinition,
    Failure,
    MetadataValue,
    Output,
    asset,
)

from resources.project import WanProjectResource
from wan_assets.automation import INDEX, PER_CLIP
from wan_assets.core.data.buckets import Bucket
from wan_assets.core.data.cache import (
    CLIP_ERRORS,
    ClipProbe,
    ClipRecord,
    build_index,
    caption_clips,
    encode_clip,
    probe_clip,
)
from wan_assets.core.data.video_io import DecodeStats
from wan_assets.metadata import table_metadata

VIDEOS = "videos"  # the clip partitions' name
videos = DynamicPartitionsDefinition(name=VIDEOS)


def _clip_failure(context: AssetExecutionContext, exc: Exception) -> Failure:
    context.log.error(str(exc))
    return Failure(description=str(exc), metadata={"reason": str(exc)}, allow_retries=False)


# No automation condition: the new-clip sensor requests raw_videos for new and changed files.
@asset(partitions_def=videos, group_name="data", code_version="1")
def raw_videos(context: AssetExecutionContext, project: WanProjectResource) -> Output[dict]:
    """One video clip under a dataset folder: probed with PyAV (fps, frames, size, codec), its sha256
    the data version, so a re-encoded or replaced file flows downstream and an untouched one does not."""
    source = project.source(context.partition_key)
    try:
        probe = probe_clip(source)
    except CLIP_ERRORS as exc:
        raise _clip_failure(context, exc) from None
    return Output(
        asdict(probe),
        data_version=DataVersion(probe.sha256),
        metadata={
            "path": MetadataValue.path(probe.path),
            "sha256": probe.sha256,
            "bytes": probe.bytes,
            "fps": probe.fps,
            "num_frames": probe.num_frames,
            "duration_s": round(probe.duration_s, 3),
            "width": probe.width,
            "height": probe.height,
            "codec": probe.codec,
            "pixel_aspect": round(probe.pixel_aspect, 4),
        },
    )


@asset(
    partitions_def=videos,
    group_name="data",
    deps=[raw_videos],
    automation_condition=PER_CLIP,
    code_version="1",
    check_specs=[
        AssetCheckSpec(
            "caption_not_empty",
            asset="captions",
            blocking=True,
            description="The caption has words: an empty caption teaches nothing and blocks its latents",
        )
    ],
)
def captions(context: AssetExecutionContext, project: WanProjectResource):
    """The clip's sidecar caption (`caption_ext`), with `[trigger]` / `[name]` replaced by the trigger
    word (prepended when absent). Without a file: the local captioner's caption when the dataset has
    `auto_caption` (content-addressed in the cache: generated once per clip, model and prompt), else
    `default_caption`. A caption file always wins."""
    source = project.source(context.partition_key)
    with project.captioner() as captioner:
        result = caption_clips([source], project.job(), project.root().cache, captioner)[source.key]
    if isinstance(result, Exception):  # a clip error (unreadable frames, caption file not UTF-8, ...)
        raise _clip_failure(context, result) from None
    caption = result.text
    metadata: dict[str, Any] = {"caption": caption, "words": len(caption.split()), "origin": result.origin}
    if result.generated is not None:
        metadata |= result.generated.metadata()
        metadata["captioner_loads"] = captioner.num_loads if captioner is not None else 0
        metadata["generate_calls"] = captioner.num_generate_calls if captioner is not None else 0
    if result.sidecar is not None:
        metadata["sidecar_written"] = MetadataValue.path(result.sidecar)
    yield Output(
        caption,
        data_version=DataVersion(hashlib.sha256(caption.encode()).hexdigest()),
        metadata=metadata,
    )
    yield AssetCheckResult(
        check_name="caption_not_empty",
        passed=bool(caption.strip()),
        severity=AssetCheckSeverity.ERROR,
        metadata={"caption": caption},
    )


@asset(partitions_def=videos, group_name="data", automation_condition=PER_CLIP, code_version="2")
def latents(
    context: AssetExecutionContext, project: WanProjectResource, raw_videos: dict, captions: str
) -> Output[dict]:
    """The clip's training samples (its windows x resolutions, each in its bucket): VAE latents of
    each sample's frames (normalised) per cached jitter variant, the I2V condition (mask +
    first-frame latent), and UMT5 embeddings of the caption and the empty caption, in
    content-addressed safetensors. Unchanged inputs find their files and encode nothing; the data
    version stays the same. Metadata lists every sample."""
    stats = DecodeStats()
    with project.encoder() as encoder:
        try:
            record = encode_clip(
                project.source(context.partition_key),
                ClipProbe(**raw_videos),
                captions,
                project.job(),
                encoder,
                project.root().cache,
                stats,
            )
        except CLIP_ERRORS as exc:
            raise _clip_failure(context, exc) from None
    if record.warning:
        context.log.warning(f"{record.path}: {record.warning}")
    samples = [
        {
            "sample": s.name,
            "bucket": s.bucket,
            "start_s": s.start_s,
            "frames": Bucket.from_key(s.bucket).num_frames,
            "variants": len(s.variants),
            "speedup": s.speedup,
        }
        for s in record.samples
    ]
    return Output(
        record.to_json(),
        data_version=DataVersion(record.data_version),
        metadata={
            "samples": table_metadata(samples),
            "num_samples": len(record.samples),
            "bucket": ", ".join(sorted({s.bucket for s in record.samples})),
            "frame_indices": MetadataValue.json(
                {s.name: [list(v.indices) for v in s.variants] for s in record.samples}
            ),
            "frames_decoded": stats.frames_decoded,
            "vae_calls": encoder.num_vae_calls,
            "text_encoder_calls": encoder.num_text_calls,
            "files": MetadataValue.json([*sorted(set(record.variant_files)), record.text_file]),
            **({"warning": record.warning} if record.warning else {}),
        },
    )


@asset(
    group_name="data",
    ins={
        "latents": AssetIn(
            partition_mapping=AllPartitionMapping(), metadata={"allow_missing_partitions": True}
        )
    },
    automation_condition=INDEX,
    code_version="1",
)
def latent_cache(
    context: AssetExecutionContext, project: WanProjectResource, latents: dict[str, dict]
) -> Output[dict]:
    """The bucket index over every good clip's latents (train / held-out split included): the only
    thing training reads. Clips whose partitions failed or were removed are not in it."""
    job = project.job()
    records = [ClipRecord.from_json(r) for r in latents.values()]
    index = build_index(job, records, project.root().cache)
    rows = index.table()
    num_samples = sum(len(r.samples) for r in records)
    context.log.info(
        f"latent index of {len(records)} clips, {num_samples} samples in {len(rows)} bucket/split groups"
    )
    return Output(
        {"index": str(project.root().cache / "index" / f"{job.name}.json"), "clips": len(records)},
        data_version=DataVersion(index.identity()),
        metadata={
            "clips": len(records),
            "samples": num_samples,
            "train_clips": sum(1 for s in index.splits.values() if s == "train"),
            "val_clips": sum(1 for s in index.splits.values() if s == "val"),
            "buckets": table_metadata(rows),
        },
    )
