"""The latent index (docs/architecture.md §4): clips -> samples (windows x resolutions) -> cached variants.

What training reads, as plain records: a clip's record lists its samples, each with its bucket and
the content-addressed latent files of its jitter variants. `wan_assets.core.data.cache` builds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from wan_assets.core.data.buckets import Bucket
from wan_assets.core.data.latents import content_key

INDEX_VERSION = 2  # 2: samples (windows x resolutions) per clip; 1: one bucket per clip


@dataclass(frozen=True)
class VariantRecord:
    key: str
    file: str  # relative to the cache folder
    indices: tuple[int, ...]


@dataclass(frozen=True)
class SampleRecord:
    """One training sample of a clip: a window of its frames at one resolution, with the window's
    cached jitter variants (training draws one per epoch)."""

    name: str  # "<window>@<resolution>", unique within the clip
    window: str
    resolution: str  # the `resolution` entry ("512") or the pixel budget ("4096px")
    bucket: str
    start_s: float
    speedup: float
    variants: tuple[VariantRecord, ...]

    @classmethod
    def from_json(cls, data: dict) -> SampleRecord:
        variants = tuple(VariantRecord(v["key"], v["file"], tuple(v["indices"])) for v in data["variants"])
        return cls(**{**data, "variants": variants})


@dataclass(frozen=True)
class ClipRecord:
    """What the cache holds for one clip: the training index is built from these alone."""

    key: str
    path: str
    sha256: str
    caption: str
    samples: tuple[SampleRecord, ...]
    text_key: str
    text_file: str
    empty_text_file: str
    warning: str | None = None
    dataset_index: int = 0  # which of the job's datasets the clip is from (its dropout, repeats, split)

    @property
    def data_version(self) -> str:
        samples = [[s.name, [v.key for v in s.variants]] for s in self.samples]
        return content_key(samples=samples, text=self.text_key)

    @property
    def variant_files(self) -> list[str]:
        return [v.file for s in self.samples for v in s.variants]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ClipRecord:
        if "samples" not in data:
            data = _record_v1(data)
        samples = tuple(SampleRecord.from_json(s) for s in data["samples"])
        return cls(**{**data, "samples": samples})


def _record_v1(data: dict) -> dict:
    """A record as `latents` partitions stored it before windows and resolutions (one bucket, its
    variants): one sample, so the latent cache keeps such clips until they are materialized again."""
    frames = Bucket.from_key(data["bucket"]).num_frames
    sample = {
        "name": f"v1-{frames:03d}@v1",
        "window": f"v1-{frames:03d}",
        "resolution": "v1",
        "bucket": data["bucket"],
        "start_s": 0.0,
        "speedup": data.get("speedup", 1.0),
        "variants": data["variants"],
    }
    rest = {k: v for k, v in data.items() if k not in ("bucket", "variants", "speedup")}
    return {**rest, "samples": [sample]}


def sample_id(clip_key: str, sample_name: str) -> str:
    """A sample's key in the index: clip keys never hold `#` (partition_key replaces it)."""
    return f"{clip_key}#{sample_name}"


def clip_of(sample: str) -> str:
    return sample.split("#", 1)[0]


@dataclass(frozen=True)
class LatentIndex:
    """Clips and their samples (windows x resolutions). Training and validation address samples by
    `sample_id` (`<clip key>#<window>@<resolution>`); the train / held-out split is per clip, so
    the windows of one clip never sit on both sides."""

    job: str
    cache_dir: Path
    clips: dict[str, ClipRecord]
    splits: dict[str, str]  # clip key -> "train" | "val"

    def samples(self, split: str = "train") -> dict[str, SampleRecord]:
        """sample id -> sample, for the clips of one split, sorted."""
        return {
            sample_id(key, s.name): s
            for key, record in sorted(self.clips.items())
            if self.splits[key] == split
            for s in record.samples
        }

    def buckets(self, split: str = "train") -> dict[str, list[str]]:
        """bucket key -> the sample ids in it."""
        out: dict[str, list[str]] = {}
        for sid, sample in self.samples(split).items():
            out.setdefault(sample.bucket, []).append(sid)
        return out

    def sample(self, sid: str) -> SampleRecord:
        clip, name = sid.split("#", 1)
        return next(s for s in self.clips[clip].samples if s.name == name)

    def load_variant(self, sid: str, variant: int) -> dict[str, torch.Tensor]:
        sample = self.sample(sid)
        chosen = sample.variants[variant % len(sample.variants)]
        return load_file(str(self.cache_dir / chosen.file))

    def load_text(self, sid: str, *, empty: bool = False) -> torch.Tensor:
        """The caption embedding of the sample's clip (a clip key works too)."""
        record = self.clips[clip_of(sid)]
        return load_file(str(self.cache_dir / (record.empty_text_file if empty else record.text_file)))[
            "text_embeds"
        ]

    def identity(self) -> str:
        """The one identity of what training on this index sees: each clip's content key (its
        samples' latent variants, which address the clip's bytes, frame indices, bucket and VAE, and
        its caption's text embedding) and its split. Paths, warnings and the index file's layout do
        not count. It is `latent_cache`'s Dagster data version and the `index_hash` a checkpoint
        resumes on.
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
        """One row per (bucket, split): clips, samples, frames, bytes; for metadata and the CLI."""
        rows: dict[tuple[str, str], dict] = {}
        clips: dict[tuple[str, str], set[str]] = {}
        for key, record in self.clips.items():
            split = self.splits[key]
            for sample in record.samples:
                group = (sample.bucket, split)
                row = rows.setdefault(
                    group, {"bucket": sample.bucket, "split": split, "clips": 0, "samples": 0, "bytes": 0}
                )
                clips.setdefault(group, set()).add(key)
                row["clips"] = len(clips[group])
                row["samples"] += 1
                row["frames"] = Bucket.from_key(sample.bucket).num_frames
                row["bytes"] += sum((self.cache_dir / v.file).stat().st_size for v in sample.variants)
        return [rows[k] for k in sorted(rows)]
