"""The latent cache (docs/architecture.md §4): clips -> probed -> captioned -> encoded -> one bucket index.

Each stage is one function that the Dagster assets (one partition per clip) and `wan-assets cache`
call alike. Files are content-addressed, so unchanged inputs cost no encoding and keep their key;
a bad clip fails alone with a message naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from wan_assets.core.config import DatasetConfig, JobConfig, ModelConfig
from wan_assets.core.data.buckets import Bucket, BucketError, choose_bucket, pixel_budget
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
from wan_assets.core.data.frames import FrameSampling, FrameSamplingError, plan_frames
from wan_assets.core.data.latents import ClipEncoder, component_identity, content_key, frames_to_bucket
from wan_assets.core.data.video_io import CLIP_EXTENSIONS, VideoError, probe_video, read_frames
from wan_assets.core.devices import pick_device
from wan_assets.core.files import create_text, write_json, write_safetensors

INDEX_VERSION = 1
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
    width: int
    height: int
    codec: str


@dataclass(frozen=True)
class VariantRecord:
    key: str
    file: str  # relative to the cache folder
    indices: tuple[int, ...]


@dataclass(frozen=True)
class ClipRecord:
    """What the cache holds for one clip: the training index is built from these alone."""

    key: str
    path: str
    sha256: str
    caption: str
    bucket: str
    variants: tuple[VariantRecord, ...]
    text_key: str
    text_file: str
    empty_text_file: str
    speedup: float
    warning: str | None = None
    dataset_index: int = 0  # which of the job's datasets the clip is from (its dropout, repeats, split)

    @property
    def data_version(self) -> str:
        return content_key(variants=[v.key for v in self.variants], text=self.text_key)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ClipRecord:
        variants = tuple(VariantRecord(v["key"], v["file"], tuple(v["indices"])) for v in data["variants"])
        return cls(**{**data, "variants": variants})


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


def bucket_for(probe: ClipProbe, dataset: DatasetConfig) -> Bucket:
    budget = pixel_budget(dataset.max_pixels_per_frame, dataset.resolution)
    return choose_bucket(
        probe.width, probe.height, dataset.num_frames, budget, no_upscale=dataset.bucket_no_upscale
    )


def sampling_for(dataset: DatasetConfig) -> FrameSampling:
    return FrameSampling(
        num_frames=dataset.num_frames,
        shrink_to_frames=dataset.shrink_video_to_frames,
        fps=dataset.fps,
        start_frame=dataset.start_frame,
        jitter=dataset.temporal_jitter,
    )


@dataclass(frozen=True)
class PreparedClip:
    """A clip's CPU work done: where each variant goes, and the bucketed frames still to encode."""

    source: ClipSource
    probe: ClipProbe
    caption: str
    bucket: Bucket
    variants: tuple[VariantRecord, ...]
    videos: dict[str, torch.Tensor]  # variant key -> [3, F, H, W] in [-1, 1], for uncached files only
    warning: str | None
    speedup: float


def prepare_clip(
    source: ClipSource,
    probe: ClipProbe,
    caption: str,
    job: JobConfig,
    encoder: EncoderHandle,
    cache_dir: Path,
) -> PreparedClip:
    """Bucket, frame plans and decoded, bucketed frames of the variants not cached yet (CPU only,
    safe in a worker thread: it never touches the models)."""
    dataset = job.process.datasets[source.dataset_index]
    caption = require_caption(caption, source.path, dataset.caption_ext)
    try:
        bucket = bucket_for(probe, dataset)
        plans = [
            plan_frames(probe.num_frames, probe.fps, sampling_for(dataset), seed_key=probe.sha256, variant=v)
            for v in range(dataset.num_cache_variants)
        ]
    except (BucketError, FrameSamplingError) as exc:
        raise type(exc)(f"{source.path}: {exc}") from None
    identity = encoder.identity()
    variants, videos, warning, speedup = [], {}, None, 1.0
    for plan in plans:
        warning, speedup = warning or plan.warning, plan.speedup
        key = content_key(
            clip=probe.sha256,
            indices=plan.indices,
            bucket=bucket.key,
            vae=identity["vae"],
            dtype=identity["vae_dtype"],
        )
        rel = f"latents/{key[:2]}/{key}.safetensors"
        if not (cache_dir / rel).is_file() and key not in videos:
            videos[key] = frames_to_bucket(read_frames(source.path, plan.indices), bucket)
        variants.append(VariantRecord(key, rel, plan.indices))
    return PreparedClip(source, probe, caption, bucket, tuple(variants), videos, warning, speedup)


def finish_clip(prepared: PreparedClip, encoder: EncoderHandle, cache_dir: Path) -> ClipRecord:
    """The encoders' part: VAE latents of the decoded variants, text embeddings; the clip's record."""
    source, bucket = prepared.source, prepared.bucket
    for variant in prepared.variants:
        video = prepared.videos.get(variant.key)
        if video is not None and not (cache_dir / variant.file).is_file():
            tensors = encoder.get().encode_video(video)
            write_safetensors(cache_dir / variant.file, tensors, {"clip": source.key, "bucket": bucket.key})
    text_key, text_rel = ensure_text(prepared.caption, encoder, cache_dir)
    _, empty_rel = ensure_text("", encoder, cache_dir)
    return ClipRecord(
        key=source.key,
        path=str(source.path),
        sha256=prepared.probe.sha256,
        caption=prepared.caption,
        bucket=bucket.key,
        variants=prepared.variants,
        text_key=text_key,
        text_file=text_rel,
        empty_text_file=empty_rel,
        speedup=round(prepared.speedup, 3),
        warning=prepared.warning,
        dataset_index=source.dataset_index,
    )


def encode_clip(
    source: ClipSource,
    probe: ClipProbe,
    caption: str,
    job: JobConfig,
    encoder: EncoderHandle,
    cache_dir: Path,
) -> ClipRecord:
    """Encode what is not cached yet for one clip; return its record."""
    return finish_clip(prepare_clip(source, probe, caption, job, encoder, cache_dir), encoder, cache_dir)


def ensure_text(caption: str, encoder: EncoderHandle, cache_dir: Path) -> tuple[str, str]:
    identity = encoder.identity()
    key = content_key(
        caption=caption, te=identity["text_encoder"], tok=identity["tokenizer"], dtype=identity["text_dtype"]
    )
    rel = f"text/{key[:2]}/{key}.safetensors"
    if not (cache_dir / rel).is_file():
        write_safetensors(cache_dir / rel, {"text_embeds": encoder.get().encode_text(caption)})
    return key, rel


# --- the index that training reads ------------------------------------------------------------------


@dataclass(frozen=True)
class LatentIndex:
    job: str
    cache_dir: Path
    clips: dict[str, ClipRecord]
    splits: dict[str, str]  # clip key -> "train" | "val"

    def buckets(self, split: str = "train") -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, record in sorted(self.clips.items()):
            if self.splits[key] == split:
                out.setdefault(record.bucket, []).append(key)
        return out

    def load_variant(self, clip_key: str, variant: int) -> dict[str, torch.Tensor]:
        record = self.clips[clip_key]
        chosen = record.variants[variant % len(record.variants)]
        return load_file(str(self.cache_dir / chosen.file))

    def load_text(self, clip_key: str, *, empty: bool = False) -> torch.Tensor:
        record = self.clips[clip_key]
        return load_file(str(self.cache_dir / (record.empty_text_file if empty else record.text_file)))[
            "text_embeds"
        ]

    def identity(self) -> str:
        """The one identity of what training on this index sees: each clip's content key (its latent
        variants, which address the clip's bytes, frame indices, bucket and VAE, and its caption's
        text embedding) and its split. Paths, warnings and the index file's layout do not count.
        It is `latent_cache`'s Dagster data version and the `index_hash` a checkpoint resumes on.
        """
        clips = {key: record.data_version for key, record in self.clips.items()}
        return content_key(**{**clips, "splits": self.splits})

    def to_json(self) -> dict:
        return {
            "version": INDEX_VERSION,
            "job": self.job,
            "clips": {k: {**r.to_json(), "split": self.splits[k]} for k, r in sorted(self.clips.items())},
        }

    def table(self) -> list[dict]:
        """One row per (bucket, split): clips, frames, bytes; for metadata and the CLI."""
        rows: dict[tuple[str, str], dict] = {}
        for key, record in self.clips.items():
            split = self.splits[key]
            row = rows.setdefault(
                (record.bucket, split), {"bucket": record.bucket, "split": split, "clips": 0, "bytes": 0}
            )
            row["clips"] += 1
            row["frames"] = Bucket.from_key(record.bucket).num_frames
            row["bytes"] += sum((self.cache_dir / v.file).stat().st_size for v in record.variants)
        return [rows[k] for k in sorted(rows)]


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
    files = [v.file for v in record.variants] + [record.text_file, record.empty_text_file]
    return all((cache_dir / f).is_file() for f in files)


# --- the whole cache without Dagster ----------------------------------------------------------------


@dataclass
class CacheReport:
    index: LatentIndex
    failures: dict[str, str]  # clip path -> reason
    warnings: dict[str, str]
    # Clip paths among `failures` that stay in the index with their last good latents.
    kept: list[str] = field(default_factory=list)


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

    While the encoders work on one clip, `prefetch` worker threads probe, read and bucket the next
    clips' frames (PyAV and torch release the GIL there), so decoding stays off the critical path.
    Clips are encoded and reported in the same order as without prefetching: same files, same index.
    Captions come first (`caption_clips`), so a captioner loads once and is freed before encoding.
    """
    records, failures, warnings, kept = [], {}, {}, []
    previous = previous_records(index_path(cache_dir, job))
    sources = discover_clips(job)
    captioner = captioner or captioner_for(job)
    captions = caption_clips(sources, job, cache_dir, captioner, caption_progress)
    if captioner is not None:
        captioner.release()
    clips = iter(progress(sources))
    with ThreadPoolExecutor(max_workers=max(prefetch, 1), thread_name_prefix="decode") as pool:
        pending: deque[tuple[ClipSource, Future]] = deque()

        def submit_next() -> None:
            source = next(clips, None)
            if source is not None:
                caption = captions[source.key]
                pending.append((source, pool.submit(_prepare, source, caption, job, encoder, cache_dir)))

        for _ in range(max(prefetch, 1)):
            submit_next()
        while pending:
            source, future = pending.popleft()
            if prefetch > 0:
                submit_next()
            try:
                record = finish_clip(future.result(), encoder, cache_dir)
            except CLIP_ERRORS as exc:
                failures[str(source.path)] = str(exc)
                if source.key in previous:
                    records.append(previous[source.key])
                    kept.append(str(source.path))
            else:
                records.append(record)
                if record.warning:
                    warnings[str(source.path)] = record.warning
            if prefetch == 0:
                submit_next()
    return CacheReport(build_index(job, records, cache_dir), failures, warnings, kept)


def _prepare(
    source: ClipSource,
    caption: ClipCaption | Exception,
    job: JobConfig,
    encoder: EncoderHandle,
    cache_dir: Path,
) -> PreparedClip:
    probe = probe_clip(source)
    if isinstance(caption, Exception):
        raise caption
    return prepare_clip(source, probe, caption.text, job, encoder, cache_dir)
