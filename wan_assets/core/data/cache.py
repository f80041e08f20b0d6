"""The latent cache (docs/architecture.md §4): clips -> probed -> captioned -> encoded -> one bucket index.

Each stage is one function that the Dagster assets (one partition per clip) and `wan-assets cache`
call alike. Files are content-addressed, so unchanged inputs cost no encoding and keep their key;
a bad clip fails alone with a message naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from wan_assets.core.config import DatasetConfig, JobConfig, ModelConfig
from wan_assets.core.data.buckets import Bucket, BucketError, choose_bucket
from wan_assets.core.data.captioner import (
    CaptionerHandle,
    CaptionRequest,
    GeneratedCaption,
    generated_captions,
)
from wan_assets.core.data.captions import (
    CaptionError,
    caption_path,
    read_caption,
    require_caption,
)
from wan_assets.core.data.frames import FrameSampling, FrameSamplingError, jittered, plan_windows
from wan_assets.core.data.index import (
    INDEX_VERSION,
    ClipRecord,
    LatentIndex,
    SampleRecord,
    VariantRecord,
)
from wan_assets.core.data.latents import ClipEncoder, component_identity, content_key, frames_to_bucket
from wan_assets.core.data.video_io import (
    CLIP_EXTENSIONS,
    DecodeStats,
    Timeline,
    VideoError,
    iter_frames,
    probe_video,
    read_timeline,
)
from wan_assets.core.devices import pick_device
from wan_assets.core.files import create_text, write_json, write_safetensors

# Clips decoded ahead while the encoders work (each holds its bucketed frames in RAM).
PREFETCH_CLIPS = 2
# Errors that mean "this clip cannot be used" (its partition fails; the others go on).
CLIP_ERRORS: tuple[type[Exception], ...] = (VideoError, CaptionError, FrameSamplingError, BucketError)
_UNSAFE = re.compile(r"[^A-Za-z0-9._/\-]")


@dataclass(frozen=True)
class ClipSource:
    key: str  # the Dagster partition key: stable, readable, from the relative path
    path: Path
    dataset_index: int


@dataclass(frozen=True)
class ClipProbe:
    path: str
    sha256: str
    bytes: int
    fps: float
    num_frames: int
    duration_s: float
    width: int  # displayed: pixel aspect ratio and rotation applied
    height: int
    codec: str
    pixel_aspect: float = 1.0


# --- discovery and probing --------------------------------------------------------------------------


def discover_clips(job: JobConfig) -> list[ClipSource]:
    """Every clip under every dataset folder (recursive), sorted by partition key."""
    many = len(job.process.datasets) > 1
    found: dict[str, ClipSource] = {}
    for i, dataset in enumerate(job.process.datasets):
        for path in sorted(dataset.folder_path.rglob("*")):
            if path.suffix.lower() not in CLIP_EXTENSIONS or path.name.startswith(".") or not path.is_file():
                continue
            rel = path.relative_to(dataset.folder_path).as_posix()
            key = partition_key(f"d{i}/{rel}" if many else rel)
            found[key] = ClipSource(key, path, i)
    return [found[k] for k in sorted(found)]


def partition_key(rel_path: str) -> str:
    """Readable and stable; characters Dagster keys cannot hold become `_` plus a short hash."""
    safe = _UNSAFE.sub("_", rel_path)
    if safe != rel_path:
        safe += "~" + hashlib.sha256(rel_path.encode()).hexdigest()[:6]
    return safe


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def probe_clip(source: ClipSource) -> ClipProbe:
    probe = probe_video(source.path)
    return ClipProbe(
        path=str(source.path),
        sha256=file_sha256(source.path),
        bytes=source.path.stat().st_size,
        fps=probe.fps,
        num_frames=probe.num_frames,
        duration_s=probe.duration_s,
        width=probe.width,
        height=probe.height,
        codec=probe.codec,
        pixel_aspect=probe.pixel_aspect,
    )


def caption_clip(source: ClipSource, job: JobConfig, generated: GeneratedCaption | None = None) -> str:
    dataset = job.process.datasets[source.dataset_index]
    return read_caption(
        source.path,
        dataset.caption_ext,
        trigger=job.process.trigger_word,
        default=dataset.default_caption,
        generated=generated.text if generated is not None else None,
    )


# --- captions a local model writes (docs/architecture.md §4) ---------------------------------------


@dataclass(frozen=True)
class ClipCaption:
    """The caption a clip trains with and where it came from."""

    text: str
    origin: Literal["file", "generated", "default"]  # the user's file always comes first
    generated: GeneratedCaption | None = None
    sidecar: str | None = None  # the caption file this run wrote (write_auto_captions)


def captioner_for(job: JobConfig, device: torch.device | None = None) -> CaptionerHandle | None:
    """The captioner when a dataset auto-captions (nothing loads until a clip needs it)."""
    config = job.process.captioner
    if config is None or not any(d.auto_caption for d in job.process.datasets):
        return None
    return CaptionerHandle(config, job.process.trigger_word, device)


def caption_clips(
    sources: Iterable[ClipSource],
    job: JobConfig,
    cache_dir: Path,
    captioner: CaptionerHandle | None,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict[str, ClipCaption | Exception]:
    """Each clip's caption by partition key; a clip that cannot have one gets its error instead.

    A caption file always wins. A clip without one in a dataset with `auto_caption` gets the
    captioner's caption, generated in batches only for clips whose key (bytes, model, prompt,
    settings) is not in the cache yet; `write_auto_captions` writes it next to the clip when
    nothing is there, so the user can edit it (the edit then wins).
    """
    sources = list(sources)
    datasets = job.process.datasets
    wanted = [
        s
        for s in sources
        if datasets[s.dataset_index].auto_caption
        and not caption_path(s.path, datasets[s.dataset_index].caption_ext).is_file()
    ]
    found: dict[str, GeneratedCaption | Exception] = {}
    requests = []
    for source in wanted:
        try:
            probe = probe_clip(source)
        except CLIP_ERRORS as exc:
            found[source.key] = exc
            continue
        requests.append(CaptionRequest(source.key, source.path, probe.sha256, probe.num_frames))
    if requests:
        assert captioner is not None, "a dataset auto-captions: pass captioner_for(job)"
        found |= generated_captions(requests, captioner, cache_dir, progress)
    return {s.key: _clip_caption(s, job, found.get(s.key)) for s in sources}


def _clip_caption(
    source: ClipSource, job: JobConfig, found: GeneratedCaption | Exception | None
) -> ClipCaption | Exception:
    if isinstance(found, Exception):
        return found
    dataset = job.process.datasets[source.dataset_index]
    path = caption_path(source.path, dataset.caption_ext)
    try:
        if found is None or path.is_file():  # the user's file (also one written meanwhile), or the default
            return ClipCaption(caption_clip(source, job), "file" if path.is_file() else "default")
        if not found.text:
            raise CaptionError(
                f"{path}: the captioner ({found.model_path}) wrote an empty caption; write a caption file"
            )
        text = caption_clip(source, job, found)
    except CaptionError as exc:
        return exc
    written = dataset.write_auto_captions and create_text(path, text)
    return ClipCaption(text, "generated", found, str(path) if written else None)


# --- encoding ---------------------------------------------------------------------------------------


@dataclass
class EncoderHandle:
    """Loads the VAE and text encoder on first use, so a fully cached clip never loads a model."""

    source: str | ModelConfig  # a model root, or a run's `model` config with per-part files
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    vae_dtype: torch.dtype = torch.float32
    text_dtype: torch.dtype = torch.float32
    _encoder: ClipEncoder | None = None
    _identity: dict[str, str] | None = None

    @classmethod
    def create(cls, source: str | ModelConfig, device: str = "auto") -> EncoderHandle:
        """bf16 encoders on CUDA (as diffusers runs Wan), fp32 on CPU."""
        dev = pick_device(device)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        return cls(source, device=dev, vae_dtype=dtype, text_dtype=dtype)

    def get(self) -> ClipEncoder:
        if self._encoder is None:
            from wan_assets.core.model.loading import load_wan_model

            parts = load_wan_model(
                self.source,
                dtype=self.text_dtype,
                vae_dtype=self.vae_dtype,
                device=self.device,
                load_experts=(),
            )
            assert parts.text_encoder is not None and parts.tokenizer is not None, "loaded by default"
            self._encoder = ClipEncoder(parts.vae, parts.text_encoder, parts.tokenizer, self.device)
        return self._encoder

    @property
    def loaded(self) -> bool:
        """Whether the models are in memory: a batch that reuses this handle loads them once."""
        return self._encoder is not None

    @property
    def num_vae_calls(self) -> int:
        return self._encoder.num_vae_calls if self._encoder is not None else 0

    @property
    def num_text_calls(self) -> int:
        return self._encoder.num_text_calls if self._encoder is not None else 0

    def identity(self) -> dict[str, str]:
        """Encoder identities for the content keys (no model load needed)."""
        if self._identity is None:
            from wan_assets.core.model.sources import WanSources

            sources = WanSources.of(self.source)
            ids = {}
            for part in ("vae", "text_encoder", "tokenizer"):
                root, subfolder = sources.location(part)
                local = Path(root) / subfolder
                ids[part] = component_identity(root, subfolder) if local.exists() else f"{root}/{subfolder}"
                if part in sources.files:  # its config comes from the root
                    ids[f"{part}_config"] = f"{sources.layout(part)}:{sources.root(part)}"
            self._identity = {**ids, "vae_dtype": str(self.vae_dtype), "text_dtype": str(self.text_dtype)}
        return self._identity


def sampling_for(dataset: DatasetConfig) -> FrameSampling:
    return FrameSampling(
        num_frames=dataset.num_frames,
        shrink_to_frames=dataset.shrink_video_to_frames and dataset.frame_extraction is None,
        fps=dataset.fps,
        start_frame=dataset.start_frame,
        jitter=dataset.temporal_jitter,
        target_frames=tuple(dataset.target_frames or ()),
        extraction=dataset.frame_extraction,
        frame_stride=dataset.frame_stride,
        frame_sample=dataset.frame_sample,
        max_frames=dataset.max_frames,
        auto_frame_count=dataset.auto_frame_count,
        trim_auto_frame_count_tail=dataset.trim_auto_frame_count_tail,
    )


@dataclass(frozen=True)
class ClipPlan:
    """A clip's samples decided (windows x resolutions, each with its bucket and variants) before
    any frame is decoded; `todo` are the variants whose latent files are not cached yet."""

    source: ClipSource
    probe: ClipProbe
    caption: str
    timeline: Timeline
    samples: tuple[SampleRecord, ...]
    todo: tuple[tuple[VariantRecord, Bucket], ...]
    warning: str | None


def plan_clip(
    source: ClipSource,
    probe: ClipProbe,
    caption: str,
    job: JobConfig,
    encoder: EncoderHandle,
    cache_dir: Path,
) -> ClipPlan:
    """Windows from the clip's timeline, a bucket per window and resolution from its displayed shape,
    the jitter variants and their content keys (CPU only, safe in a worker thread)."""
    dataset = job.process.datasets[source.dataset_index]
    caption = require_caption(caption, source.path, dataset.caption_ext)
    timeline = read_timeline(source.path)
    try:
        windows = plan_windows(timeline, sampling_for(dataset))
        buckets = {
            (window.name, label): choose_bucket(
                probe.width, probe.height, window.num_frames, pixels, no_upscale=dataset.bucket_no_upscale
            )
            for window in windows.windows
            for label, pixels in dataset.pixel_budgets
        }
    except (BucketError, FrameSamplingError) as exc:
        raise type(exc)(f"{source.path}: {exc}") from None
    identity = encoder.identity()
    # Anamorphic frames are stretched to their displayed shape: that shape is part of the bytes.
    shape = {} if probe.pixel_aspect == 1.0 else {"display": f"{probe.width}x{probe.height}"}
    samples, todo, queued = [], [], set()
    for window in windows.windows:
        indices = [
            jittered(window, timeline.num_frames, dataset.temporal_jitter, seed_key=probe.sha256, variant=v)
            for v in range(dataset.num_cache_variants)
        ]
        for label, _ in dataset.pixel_budgets:
            bucket = buckets[(window.name, label)]
            variants = []
            for chosen in indices:
                key = content_key(
                    clip=probe.sha256,
                    indices=chosen,
                    bucket=bucket.key,
                    vae=identity["vae"],
                    dtype=identity["vae_dtype"],
                    **shape,
                )
                variant = VariantRecord(key, f"latents/{key[:2]}/{key}.safetensors", chosen)
                variants.append(variant)
                if key not in queued and not (cache_dir / variant.file).is_file():
                    queued.add(key)
                    todo.append((variant, bucket))
            samples.append(
                SampleRecord(
                    name=f"{window.name}@{label}",
                    window=window.name,
                    resolution=label,
                    bucket=bucket.key,
                    start_s=round(window.start_s, 3),
                    speedup=round(window.speedup, 3),
                    variants=tuple(variants),
                )
            )
    notes = [*windows.warnings, *dict.fromkeys(w.warning for w in windows.windows if w.warning)]
    warning = "; ".join(n for n in notes if n) or None
    return ClipPlan(source, probe, caption, timeline, tuple(samples), tuple(todo), warning)


def bucketed_videos(plan: ClipPlan, stats: DecodeStats | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(variant key, [3, F, H, W] in [-1, 1]) for every variant still to encode, decoding the frames
    they need in one pass over the clip (seeking past the stretches none needs). A frame is
    resized once per bucket and kept only until the last variant that needs it is out."""
    if not plan.todo:
        return
    display = (plan.probe.width, plan.probe.height) if plan.probe.pixel_aspect != 1.0 else None
    # (last frame, first frame, variant, bucket), in the order their last frames decode.
    pending = sorted(
        ((max(v.indices), min(v.indices), v, b) for v, b in plan.todo),
        key=lambda item: (item[0], item[2].key),
    )
    needed = {i for _, _, variant, _ in pending for i in variant.indices}
    resized: dict[tuple[int, str], torch.Tensor] = {}
    frames: dict[int, np.ndarray] = {}
    for index, frame_hwc in iter_frames(plan.source.path, needed, plan.timeline, stats):
        frames[index] = frame_hwc
        while pending and pending[0][0] <= index:
            _, _, variant, bucket = pending.pop(0)
            parts = []
            for i in variant.indices:
                if (i, bucket.key) not in resized:
                    resized[(i, bucket.key)] = frames_to_bucket(frames[i][None], bucket, display)
                parts.append(resized[(i, bucket.key)])
            yield variant.key, torch.cat(parts, dim=1)
        if pending:
            # Frames before every pending variant's first frame are not needed again.
            first = min(item[1] for item in pending)
            for i in [i for i in frames if i < first]:
                del frames[i]
            for k in [k for k in resized if k[0] < first]:
                del resized[k]
    assert not pending, "iter_frames yields every needed index"


def finish_clip(
    plan: ClipPlan, videos: Iterable[tuple[str, torch.Tensor]], encoder: EncoderHandle, cache_dir: Path
) -> ClipRecord:
    """The encoders' part: VAE latents of each decoded variant as it comes, text embeddings; the
    clip's record."""
    files = {variant.key: (variant.file, bucket) for variant, bucket in plan.todo}
    for key, video in videos:
        file, bucket = files[key]
        tensors = encoder.get().encode_video(video)
        write_safetensors(cache_dir / file, tensors, {"clip": plan.source.key, "bucket": bucket.key})
    text_key, text_rel = ensure_text(plan.caption, encoder, cache_dir)
    _, empty_rel = ensure_text("", encoder, cache_dir)
    return ClipRecord(
        key=plan.source.key,
        path=str(plan.source.path),
        sha256=plan.probe.sha256,
        caption=plan.caption,
        samples=plan.samples,
        text_key=text_key,
        text_file=text_rel,
        empty_text_file=empty_rel,
        warning=plan.warning,
        dataset_index=plan.source.dataset_index,
    )


def encode_clip(
    source: ClipSource,
    probe: ClipProbe,
    caption: str,
    job: JobConfig,
    encoder: EncoderHandle,
    cache_dir: Path,
    stats: DecodeStats | None = None,
) -> ClipRecord:
    """Encode what is not cached yet for one clip; return its record."""
    plan = plan_clip(source, probe, caption, job, encoder, cache_dir)
    return finish_clip(plan, bucketed_videos(plan, stats), encoder, cache_dir)


def ensure_text(caption: str, encoder: EncoderHandle, cache_dir: Path) -> tuple[str, str]:
    identity = encoder.identity()
    key = content_key(
        caption=caption, te=identity["text_encoder"], tok=identity["tokenizer"], dtype=identity["text_dtype"]
    )
    rel = f"text/{key[:2]}/{key}.safetensors"
    if not (cache_dir / rel).is_file():
        write_safetensors(cache_dir / rel, {"text_embeds": encoder.get().encode_text(caption)})
    return key, rel


# --- the index file -------------------------------------------------------------------------------


def index_path(cache_dir: Path, job: JobConfig) -> Path:
    return cache_dir / "index" / f"{job.name}.json"


def assign_splits(keys: Iterable[str], validation_split: float) -> dict[str, str]:
    """Held-out clips by a hash of the clip key: stable as clips come and go."""
    keys = sorted(keys)
    score = {k: int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for k in keys}
    splits = {k: "val" if score[k] < validation_split else "train" for k in keys}
    if validation_split > 0 and len(keys) >= 2 and "val" not in splits.values():
        splits[min(keys, key=score.__getitem__)] = "val"
    if splits and "train" not in splits.values():
        splits[max(keys, key=score.__getitem__)] = "train"
    return splits


def build_index(job: JobConfig, records: Iterable[ClipRecord], cache_dir: Path) -> LatentIndex:
    by_key = {r.key: r for r in records}
    splits: dict[str, str] = {}
    for i, dataset in enumerate(job.process.datasets):  # each dataset holds out its own share
        keys = [k for k, r in by_key.items() if r.dataset_index == i]
        splits |= assign_splits(keys, dataset.validation_split)
    index = LatentIndex(job.name, cache_dir, by_key, splits)
    write_json(index_path(cache_dir, job), index.to_json())
    return index


def load_index(path: Path) -> LatentIndex:
    data = json.loads(path.read_text())
    if data.get("version") != INDEX_VERSION:
        raise ValueError(
            f"{path}: latent index version {data.get('version')} unsupported; re-run `wan-assets cache`"
        )
    return _index_from_json(data, path)


def _index_from_json(data: dict, path: Path) -> LatentIndex:
    clips = {
        k: ClipRecord.from_json({f: v for f, v in c.items() if f != "split"})
        for k, c in data["clips"].items()
    }
    splits = {k: c["split"] for k, c in data["clips"].items()}
    return LatentIndex(data["job"], path.parent.parent, clips, splits)


def previous_records(path: Path) -> dict[str, ClipRecord]:
    """The clips of the index a new cache run replaces whose latent and text files are all still
    there; nothing when there is no index yet or it is of another version (it is rebuilt whole)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") != INDEX_VERSION:
        return {}
    index = _index_from_json(data, path)
    return {key: record for key, record in index.clips.items() if _files_present(record, index.cache_dir)}


def _files_present(record: ClipRecord, cache_dir: Path) -> bool:
    files = [*record.variant_files, record.text_file, record.empty_text_file]
    return all((cache_dir / f).is_file() for f in files)


# --- the whole cache without Dagster ----------------------------------------------------------------


@dataclass
class CacheReport:
    index: LatentIndex
    failures: dict[str, str]  # clip path -> reason
    warnings: dict[str, str]
    # Clip paths among `failures` that stay in the index with their last good latents.
    kept: list[str] = field(default_factory=list)
    decode: DecodeStats = field(default_factory=DecodeStats)


def cache_dataset(
    job: JobConfig,
    cache_dir: Path,
    encoder: EncoderHandle,
    progress: Callable[[Iterable], Iterable] = iter,
    *,
    prefetch: int = PREFETCH_CLIPS,
    captioner: CaptionerHandle | None = None,
    caption_progress: Callable[[Iterable], Iterable] = iter,
) -> CacheReport:
    """Process every clip; failures are collected, never raised, so one bad clip stops nothing.

    The index never shrinks by accident: a clip that fails this time (a folder unmounted mid-run, a
    file being replaced) keeps its entry from the previous index while its files are there, and is
    reported in `failures` and `kept`. Only a clip no longer in the dataset folders leaves it.

    While the encoders work on one clip, `prefetch` worker threads probe, plan, decode and bucket
    the next clips' frames (PyAV and torch release the GIL there), handing each variant over as it
    is ready, so decoding stays off the critical path and a long clip never sits in memory whole.
    Clips are encoded and reported in the same order as without prefetching: same files, same index.
    Captions come first (`caption_clips`), so a captioner loads once and is freed before encoding.
    """
    records, failures, warnings, kept = [], {}, {}, []
    decode = DecodeStats()
    previous = previous_records(index_path(cache_dir, job))
    sources = discover_clips(job)
    captioner = captioner or captioner_for(job)
    captions = caption_clips(sources, job, cache_dir, captioner, caption_progress)
    if captioner is not None:
        captioner.release()
    clips = iter(progress(sources))
    with ThreadPoolExecutor(max_workers=max(prefetch, 1), thread_name_prefix="decode") as pool:
        pending: deque[ClipFeed] = deque()

        def submit_next() -> None:
            source = next(clips, None)
            if source is not None:
                caption = captions[source.key]
                pending.append(
                    ClipFeed(source, caption, job, encoder, cache_dir, pool if prefetch > 0 else None)
                )

        for _ in range(max(prefetch, 1)):
            submit_next()
        while pending:
            feed = pending.popleft()
            if prefetch > 0:
                submit_next()
            try:
                record = finish_clip(feed.plan(), feed.videos(), encoder, cache_dir)
            except CLIP_ERRORS as exc:
                failures[str(feed.source.path)] = str(exc)
                if feed.source.key in previous:
                    records.append(previous[feed.source.key])
                    kept.append(str(feed.source.path))
            else:
                records.append(record)
                if record.warning:
                    warnings[str(feed.source.path)] = record.warning
            finally:
                feed.close()
            decode.frames_decoded += feed.stats.frames_decoded
            decode.seeks += feed.stats.seeks
            if prefetch == 0:
                submit_next()
    return CacheReport(build_index(job, records, cache_dir), failures, warnings, kept, decode)


_END = object()
_HANDOFF_DEPTH = 2  # bucketed variants a worker may have ready ahead of the encoders


class ClipFeed:
    """One clip's plan, then its bucketed videos one by one: produced in a worker thread and handed
    over a bounded queue (`pool`), or inline without one."""

    def __init__(
        self,
        source: ClipSource,
        caption: ClipCaption | Exception,
        job: JobConfig,
        encoder: EncoderHandle,
        cache_dir: Path,
        pool: ThreadPoolExecutor | None,
    ) -> None:
        self.source = source
        self.stats = DecodeStats()
        self.probe: ClipProbe | None = None  # set once probed (a clip failing later was still read)
        self._args = (caption, job, encoder, cache_dir)
        self._queue: queue.Queue = queue.Queue(maxsize=_HANDOFF_DEPTH)
        self._stop = threading.Event()
        self._plan: ClipPlan | None = None
        self._future = pool.submit(self._produce) if pool is not None else None

    def plan(self) -> ClipPlan:
        if self._future is None:
            self._plan = self._make_plan()
            return self._plan
        return self._take()

    def videos(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._future is None:
            assert self._plan is not None, "plan() first"
            yield from bucketed_videos(self._plan, self.stats)
            return
        while (item := self._take()) is not _END:
            yield item

    def close(self) -> None:
        """Stop the worker (the encoders gave up on this clip) and wait for it."""
        self._stop.set()
        if self._future is not None:
            self._future.result()

    def _make_plan(self) -> ClipPlan:
        caption, job, encoder, cache_dir = self._args
        self.probe = probe_clip(self.source)
        if isinstance(caption, Exception):
            raise caption
        return plan_clip(self.source, self.probe, caption.text, job, encoder, cache_dir)

    def _take(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def _produce(self) -> None:
        try:
            plan = self._make_plan()
            if not self._put(plan):
                return
            for item in bucketed_videos(plan, self.stats):
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the encoding thread, which raises it for this clip
            self._put(exc)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
