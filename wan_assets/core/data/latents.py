"""Encoding one clip for training (docs/architecture.md §4): VAE latents, the I2V condition and text embeddings.

Everything is built exactly as `WanImageToVideoPipeline` builds it at inference, so a LoRA trained
on these tensors sees at training time what it will see when sampling:
- `latents` [16, F', H/8, W/8]: VAE mode of the sampled frames, normalised with latents_mean/std;
- `condition` [20, F', H/8, W/8]: mask (4 channels, latent frame 0 all ones, rest zeros) followed by
  the normalised VAE latent of [first frame, zeros x (F-1)];
- text embeddings [L, D]: UMT5 last hidden state over the L real tokens (the pipeline zero-pads to
  512; padding is restored at batch time, which keeps the cache files small).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.pipelines.wan.pipeline_wan_i2v import prompt_clean
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from wan_assets.core.data.buckets import Bucket, resize_plan

MAX_SEQUENCE_LENGTH = 512  # UMT5 tokens, as the pipeline encodes prompts
VAE_TEMPORAL = 4


def frames_to_bucket(
    frames_fhwc: np.ndarray, bucket: Bucket, display: tuple[int, int] | None = None
) -> torch.Tensor:
    """uint8 F x H x W x 3 -> float [3, F, bucket.height, bucket.width] in [-1, 1]: scaled to cover
    the bucket, centre-cropped. `display` (width, height) is the shape the frames are shown at when
    their pixels are not square (anamorphic footage); one resize takes them there and to the bucket."""
    _, src_h, src_w, _ = frames_fhwc.shape
    shown_w, shown_h = display or (src_w, src_h)
    scaled_w, scaled_h, left, top = resize_plan(shown_w, shown_h, bucket)
    video_fchw = torch.from_numpy(np.ascontiguousarray(frames_fhwc)).permute(0, 3, 1, 2).float()
    if (scaled_w, scaled_h) != (src_w, src_h):
        video_fchw = F.interpolate(video_fchw, size=(scaled_h, scaled_w), mode="bilinear", antialias=True)
    video_fchw = video_fchw[:, :, top : top + bucket.height, left : left + bucket.width]
    video_fchw = (video_fchw / 127.5 - 1.0).clamp(-1.0, 1.0)
    return video_fchw.permute(1, 0, 2, 3).contiguous()


def condition_mask(num_frames: int, latent_h: int, latent_w: int) -> torch.Tensor:
    """[4, F', h, w]: the pipeline's mask; latent frame 0 (first pixel frame x4) ones, the rest zeros."""
    num_latent = (num_frames - 1) // VAE_TEMPORAL + 1
    mask = torch.zeros(VAE_TEMPORAL, num_latent, latent_h, latent_w)
    mask[:, 0] = 1.0
    return mask


@dataclass
class ClipEncoder:
    """The frozen encoders a latent cache needs (no transformer)."""

    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    num_vae_calls: int = 0
    num_text_calls: int = 0

    @torch.no_grad()
    def encode_video(self, video_cfhw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latents and I2V condition of one bucketed clip ([3, F, H, W] in [-1, 1])."""
        num_frames = video_cfhw.shape[1]
        latents = self._vae_encode(video_cfhw)
        first_only = torch.zeros_like(video_cfhw)
        first_only[:, 0] = video_cfhw[:, 0]
        cond_latents = self._vae_encode(first_only)
        mask = condition_mask(num_frames, cond_latents.shape[-2], cond_latents.shape[-1])
        return {"latents": latents, "condition": torch.cat([mask, cond_latents], dim=0)}

    def _vae_encode(self, video_cfhw: torch.Tensor) -> torch.Tensor:
        self.num_vae_calls += 1
        x = video_cfhw.unsqueeze(0).to(self.device, self.vae.dtype)
        latent = self.vae.encode(x).latent_dist.mode()[0].float()
        return normalise_latents(latent, self.vae).cpu()

    @torch.no_grad()
    def encode_text(self, caption: str) -> torch.Tensor:
        """[L, D] UMT5 embedding of the caption's real tokens, as the pipeline computes it."""
        self.num_text_calls += 1
        tokens = self.tokenizer(
            [prompt_clean(caption)],
            padding="max_length",
            max_length=MAX_SEQUENCE_LENGTH,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        seq_len = int(tokens.attention_mask.gt(0).sum())
        hidden = self.text_encoder(
            tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        ).last_hidden_state
        return hidden[0, :seq_len].float().cpu()


def normalise_latents(latent_czhw: torch.Tensor, vae: AutoencoderKLWan) -> torch.Tensor:
    mean = torch.tensor(vae.config.latents_mean, dtype=latent_czhw.dtype).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=latent_czhw.dtype).view(-1, 1, 1, 1)
    return (latent_czhw - mean.to(latent_czhw.device)) / std.to(latent_czhw.device)


def pad_text(embeds_ld: torch.Tensor, length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """[L, D] -> [length, D] zero-padded, exactly the pipeline's prompt_embeds layout."""
    out = embeds_ld.new_zeros(length, embeds_ld.shape[-1])
    out[: embeds_ld.shape[0]] = embeds_ld[:length]
    return out


def component_identity(model_path: str | Path, subfolder: str) -> str:
    """A content hash of one model component (config plus a fingerprint of its weight files), in a
    folder or, with `subfolder` "", one single file (ComfyUI's, the official `.pth`).

    Hashing whole 10 GB weight files on every run would cost minutes; size plus the first and last
    MiB of each file changes whenever the weights do in practice.
    """
    folder = Path(model_path) / subfolder
    digest = hashlib.sha256(str(subfolder).encode())
    files = [folder] if folder.is_file() else sorted(folder.rglob("*"))
    for path in files:
        if not path.is_file():
            continue
        digest.update(path.name.encode() if path == folder else path.relative_to(folder).as_posix().encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), 2)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def content_key(**parts: object) -> str:
    """The content address of a cache file: a hash of everything that determines its bytes."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
