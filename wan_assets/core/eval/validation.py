"""Validation loss on held-out clips (docs/architecture.md §6): comparable across checkpoints and runs.

Each expert is scored at fixed timestep quantiles inside its own window with fixed noise per
(clip, quantile), the full caption and cache variant 0, so the same weights always give the same
numbers and a lower number means a better model, not a luckier draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import WanTransformer3DModel

from wan_assets.core.data.cache import LatentIndex
from wan_assets.core.data.latents import pad_text
from wan_assets.core.precision import autocast
from wan_assets.core.seeds import derive_seed
from wan_assets.core.train.flow import flow_loss, noisy_input


@dataclass(frozen=True)
class ValidationResult:
    expert: str
    by_quantile: dict[float, float]  # quantile -> mean loss over held-out clips
    num_clips: int

    @property
    def mean(self) -> float:
        return sum(self.by_quantile.values()) / len(self.by_quantile)


def quantile_timestep(window: tuple[float, float], q: float) -> float:
    lo, hi = window
    return lo + q * (hi - lo)


@torch.no_grad()
def validation_loss(
    model: WanTransformer3DModel,
    index: LatentIndex,
    expert: str,
    window: tuple[float, float],
    quantiles: list[float],
    *,
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    split: str = "val",
) -> ValidationResult:
    keys = list(index.samples(split))  # every window and resolution of the held-out clips
    if not keys:
        raise ValueError(f"latent index of {index.job!r} has no {split} clips; set validation_split > 0")
    was_training = model.training
    model.eval()
    totals = {q: 0.0 for q in quantiles}
    for key in keys:
        tensors = index.load_variant(key, 0)
        x0 = tensors["latents"].unsqueeze(0)
        condition = tensors["condition"].unsqueeze(0).to(device, dtype)
        text = pad_text(index.load_text(key)).unsqueeze(0).to(device, dtype)
        for q in quantiles:
            t = torch.tensor([quantile_timestep(window, q)])
            noise_gen = torch.Generator().manual_seed(derive_seed(seed, "val", key, q))
            noise = torch.randn(x0.shape, generator=noise_gen)
            x_t, target = noisy_input(x0, noise, t)
            hidden = torch.cat([x_t.to(device, dtype), condition], dim=1)
            with autocast(device, dtype):  # as the training step runs the expert
                pred = model(
                    hidden_states=hidden, timestep=t.to(device), encoder_hidden_states=text, return_dict=False
                )[0]
            totals[q] += flow_loss(pred, target.to(device)).item()
    model.train(was_training)
    return ValidationResult(expert, {q: v / len(keys) for q, v in totals.items()}, len(keys))
