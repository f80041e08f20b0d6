"""Batches from the latent cache (docs/architecture.md §4/§5): per bucket, shuffled per epoch, resumable by step.

Every random choice here (clip order, cache variant per epoch, caption dropout) is a pure function
of (seed, epoch, position), so a resumed run replays exactly the batches an uninterrupted run
would see, with no RNG state to save. A clip of a dataset with `num_repeats: N` appears N times per
epoch (as ai-toolkit repeats a dataset's file list), each time with its own variant and dropout draw;
each clip drops its caption at its own dataset's `caption_dropout_rate`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wan_assets.core.data.cache import LatentIndex
from wan_assets.core.data.index import clip_of
from wan_assets.core.data.latents import MAX_SEQUENCE_LENGTH, pad_text
from wan_assets.core.seeds import derive_seed


@dataclass(frozen=True)
class Batch:
    bucket: str
    clip_keys: tuple[str, ...]  # sample ids (`<clip key>#<window>@<resolution>`, LatentIndex)
    epoch: int
    latents: torch.Tensor  # [B, 16, F', h, w] normalised VAE latents (x0)
    condition: torch.Tensor  # [B, 20, F', h, w] mask (4) + first-frame latent (16)
    text: torch.Tensor  # [B, 512, D] UMT5 embeddings, zero-padded as the pipeline pads
    dropped: tuple[bool, ...]  # caption dropped -> empty-caption embedding

    @property
    def tokens(self) -> int:
        """Transformer tokens: latent frames x (h/2) x (w/2) per sample (patch 1x2x2)."""
        _, _, frames, h, w = self.latents.shape
        return self.latents.shape[0] * frames * (h // 2) * (w // 2)


class BatchStream:
    """Batch n of the run, for any n: epochs of shuffled same-bucket batches, back to back."""

    def __init__(
        self,
        index: LatentIndex,
        *,
        batch_size: int,
        seed: int,
        caption_dropout: Sequence[float],
        num_repeats: Sequence[int] | None = None,
        split: str = "train",
    ) -> None:
        self.index = index
        self.batch_size = batch_size
        self.seed = seed
        self.caption_dropout = list(caption_dropout)  # per dataset index
        self.num_repeats = list(num_repeats or [1] * len(self.caption_dropout))
        self.buckets = index.buckets(split)
        if not self.buckets:
            raise ValueError(
                f"latent index of {index.job!r} has no {split} clips; run `wan-assets cache` and check its failures"
            )
        self._epoch_cache: tuple[int, list[tuple[str, tuple[str, ...]]]] | None = None

    def epoch_plan(self, epoch: int) -> list[tuple[str, tuple[str, ...]]]:
        """The (bucket, clip keys) batches of one epoch, shuffled with a seed of that epoch."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(derive_seed(self.seed, "epoch", epoch))
        batches = []
        for bucket, clip_keys in sorted(self.buckets.items()):
            keys = [k for k in clip_keys for _ in range(self._repeats(k))]
            rng.shuffle(keys)
            # A short tail batch is kept: with few clips per bucket it is most of the data.
            batches += [
                (bucket, tuple(keys[i : i + self.batch_size])) for i in range(0, len(keys), self.batch_size)
            ]
        rng.shuffle(batches)
        self._epoch_cache = (epoch, batches)
        return batches

    def _repeats(self, key: str) -> int:
        return self.num_repeats[self.index.clips[clip_of(key)].dataset_index]

    def _dropout(self, key: str) -> float:
        return self.caption_dropout[self.index.clips[clip_of(key)].dataset_index]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_plan(0))

    def batch(self, n: int) -> Batch:
        epoch, position = divmod(n, self.batches_per_epoch)
        bucket, keys = self.epoch_plan(epoch)[position]
        latents, conditions, texts, dropped = [], [], [], []
        for slot, key in enumerate(keys):
            # A sample repeated into the same batch draws per slot (slot 0 keeps the draws of old runs).
            tag = (key,) if slot == 0 or key not in keys[:slot] else (key, slot)
            variant = derive_seed(self.seed, "variant", epoch, *tag) % len(self.index.sample(key).variants)
            tensors = self.index.load_variant(key, variant)
            drop = random.Random(derive_seed(self.seed, "dropout", n, *tag)).random() < self._dropout(key)
            latents.append(tensors["latents"])
            conditions.append(tensors["condition"])
            texts.append(pad_text(self.index.load_text(key, empty=drop), MAX_SEQUENCE_LENGTH))
            dropped.append(drop)
        return Batch(
            bucket=bucket,
            clip_keys=keys,
            epoch=epoch,
            latents=torch.stack(latents),
            condition=torch.stack(conditions),
            text=torch.stack(texts),
            dropped=tuple(dropped),
        )
