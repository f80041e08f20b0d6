"""Sample videos through `WanImageToVideoPipeline` with both experts' current LoRAs (docs/architecture.md §5, §6).

The pipeline is the stock diffusers one, so what a sample shows is what users get at inference.
First frames come from `ctrl_img` when it is set, else from a held-out clip of the latent cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from wan_assets.core.config import JobConfig, ModelConfig, SampleConfig
from wan_assets.core.data.cache import LatentIndex
from wan_assets.core.data.captions import apply_trigger
from wan_assets.core.data.video_io import read_frames, write_video
from wan_assets.core.model.loading import WanComponents, load_wan_model
from wan_assets.core.precision import autocast_forward


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


def load_sampling_extras(model: ModelConfig, trained: tuple[str, ...], dtype: torch.dtype) -> WanComponents:
    """VAE, text encoder and the untrained expert (if any), kept on the CPU between samples."""
    untrained = tuple(e for e in ("high_noise", "low_noise") if e not in trained)
    return load_wan_model(model, dtype=dtype, device="cpu", load_experts=untrained)


@contextmanager
def on_device(pipe: WanImageToVideoPipeline, device: torch.device, *, take_turns: bool = False):
    """The pipeline's models on `device` while inside, then back where they were, in train/eval mode
    as they were.

    `take_turns` (training that offloads the inactive expert): the text encoder and the two experts
    share the device one at a time, each moved in by a pre-forward hook when the pipeline calls it,
    so sampling needs no more memory than training's one expert. The VAE (small) stays.
    """
    turns = [pipe.text_encoder, pipe.transformer, pipe.transformer_2]
    modules = [pipe.vae, *turns]
    homes = [next(m.parameters()).device for m in modules]
    training = [m.training for m in modules]
    hooks = []
    for m in modules:
        m.eval()
        # Taking turns, the text encoder (called first) starts on the device too: the pipeline puts
        # its inputs where its first model is when the call begins.
        if not take_turns or m in (pipe.vae, pipe.text_encoder):
            m.to(device)
    if take_turns:

        def take_turn(module, args):
            for other in turns:
                if other is not module:
                    other.to("cpu")
            module.to(device)

        hooks = [m.register_forward_pre_hook(take_turn) for m in turns]
    try:
        yield pipe
    finally:
        for hook in hooks:
            hook.remove()
        for m, home, was_training in zip(modules, homes, training, strict=True):
            m.to(home).train(was_training)
        if device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass
class TrainingSampler:
    """Sample videos during training (`sample:` of the job), with the experts being trained.

    It owns its own "when" (`due`) and loads what training does not hold (VAE, text encoder, an
    untrained expert) on its first use. Sampling leaves the training state as it was: the models'
    devices and modes, the adapters' weights and scales, and the global RNG (every draw here comes
    from its own generator); training reseeds its own draws every step.
    """

    job: JobConfig
    index: LatentIndex  # held-out first frames when a prompt has no ctrl_img
    out_dir: Path
    device: torch.device
    dtype: torch.dtype
    take_turns: bool = False  # see on_device
    extras: WanComponents | None = None

    def due(self, step: int, *, final: bool) -> bool:
        sample = self.job.process.sample
        return sample is not None and sample.should_sample(step, final=final)

    def write(self, experts: dict[str, torch.nn.Module], step: int) -> list[Path]:
        """One mp4 per prompt at `step`, `<step:09d>_<i>.mp4` under `out_dir`."""
        sample = self.job.process.sample
        assert sample is not None
        if self.extras is None:
            self.extras = load_sampling_extras(self.job.process.model, tuple(experts), self.dtype)
        pipe = sampling_pipeline(experts, self.extras)
        pipe.set_progress_bar_config(disable=True)
        fallback = first_frame(self.index)
        written = []
        with (
            on_device(pipe, self.device, take_turns=self.take_turns),
            autocast_forward(experts.values(), self.device, self.dtype),
        ):
            for i, prompt in enumerate(sample.all_prompts()):
                image = load_image(prompt.ctrl_img, fallback)
                text = apply_trigger(prompt.prompt, self.job.process.trigger_word)
                seed = prompt.seed if prompt.seed is not None else sample.seed + i
                frames = generate(pipe, image, text, sample, seed)
                written.append(write_video(self.out_dir / f"{step:09d}_{i}.mp4", frames, sample.fps))
        return written
