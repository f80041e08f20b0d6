"""Sample videos through `WanImageToVideoPipeline` with both experts' current LoRAs (DESIGN 5, 6).

The pipeline is the stock diffusers one, so what a sample shows is what users get at inference.
First frames come from `ctrl_img` when it is set, else from a held-out clip of the latent cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from wan_assets.core.captions import apply_trigger
from wan_assets.core.config import SampleConfig
from wan_assets.core.model import WanComponents, load_wan_model
from wan_assets.core.video_io import read_frames, write_video

if TYPE_CHECKING:
    from wan_assets.core.cache import LatentIndex
    from wan_assets.core.train import TrainParts


def first_frame(index: LatentIndex) -> Image.Image:
    """The first frame of the first held-out clip (or the first clip when none is held out)."""
    keys = sorted(index.clips)
    held_out = [k for k in keys if index.splits[k] == "val"] or keys
    frame = read_frames(index.clips[held_out[0]].path, [0])[0]
    return Image.fromarray(frame)


def load_image(path: str | None, fallback: Image.Image) -> Image.Image:
    """`ctrl_img` when one is set (a missing file is an error, never silently the fallback)."""
    if path is None:
        return fallback
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"sample ctrl_img {path} does not exist; `wan-assets check` lists such problems"
        )
    return Image.open(path).convert("RGB")


@torch.no_grad()
def generate(
    pipe: WanImageToVideoPipeline, image: Image.Image, prompt: str, sample: SampleConfig, seed: int
) -> np.ndarray:
    """uint8 frames F x H x W x 3 of one sample."""
    frames = pipe(
        image=image,
        prompt=prompt,
        negative_prompt=sample.neg,
        height=sample.height,
        width=sample.width,
        num_frames=sample.num_frames,
        num_inference_steps=sample.sample_steps,
        guidance_scale=sample.guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames[0]
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def sampling_pipeline(experts: dict[str, torch.nn.Module], extra: WanComponents) -> WanImageToVideoPipeline:
    """A pipeline over the trained experts plus the parts training does not hold (VAE, text encoder,
    and the base weights of an expert that is not being trained)."""
    return WanImageToVideoPipeline(
        tokenizer=extra.tokenizer,
        text_encoder=extra.text_encoder,
        vae=extra.vae,
        scheduler=extra.scheduler,
        transformer=experts.get("high_noise", extra.transformer_high),
        transformer_2=experts.get("low_noise", extra.transformer_low),
        boundary_ratio=extra.boundary_ratio,
    )


def load_sampling_extras(model_path: str, trained: tuple[str, ...], dtype: torch.dtype) -> WanComponents:
    """VAE, text encoder and the untrained expert (if any), kept on the CPU between samples."""
    untrained = tuple(e for e in ("high_noise", "low_noise") if e not in trained)
    return load_wan_model(model_path, dtype=dtype, device="cpu", load_experts=untrained)


@contextmanager
def on_device(pipe: WanImageToVideoPipeline, device: torch.device):
    modules = [pipe.text_encoder, pipe.vae, pipe.transformer, pipe.transformer_2]
    homes = [next(m.parameters()).device for m in modules]
    training = [m.training for m in modules]
    for m in modules:
        m.to(device).eval()
    try:
        yield pipe
    finally:
        for m, home, was_training in zip(modules, homes, training, strict=True):
            m.to(home).train(was_training)


def write_training_samples(parts: TrainParts, step: int) -> list[Path]:
    job = parts.job
    sample = job.process.sample
    assert sample is not None
    if parts.sampling_extras is None:
        parts.sampling_extras = load_sampling_extras(
            job.process.model.name_or_path, job.experts, parts.compute_dtype
        )
    experts = {e: parts.model.expert(e) for e in job.experts}
    pipe = sampling_pipeline(experts, parts.sampling_extras)
    pipe.set_progress_bar_config(disable=True)
    fallback = first_frame(parts.stream.index)
    written = []
    with on_device(pipe, parts.device):
        for i, prompt in enumerate(sample.all_prompts()):
            image = load_image(prompt.ctrl_img, fallback)
            text = apply_trigger(prompt.prompt, job.process.trigger_word)
            seed = prompt.seed if prompt.seed is not None else sample.seed + i
            frames = generate(pipe, image, text, sample, seed)
            written.append(write_video(parts.files.samples / f"{step:09d}_{i}.mp4", frames, sample.fps))
    return written
