"""The ai-toolkit job format, parsed once into typed, frozen models.

Users bring their ai-toolkit YAML files (and the `.job_config.json` its web UI writes) as they are.
Every key is understood (a field below, or an alias of one in `aitk_keys.ALIASES`), known from
ai-toolkit and accepted because its value asks for nothing here (listed in one warning), refused
because its value asks for something not built (`aitk_keys.KEYS` says what), or a mistake (an error
that names the key path and the closest valid key). All of a file's problems come in one error.
Nothing downstream reads raw dicts.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from wan_assets.core import aitk_keys
from wan_assets.core.experts import EXPERTS, Expert


class ConfigError(ValueError):
    """User mistakes in a config file, one line each: what, where and how to fix it.

    `problems` are the lines; the message prefixes them with the file and, when there are several,
    their count.
    """

    def __init__(self, problems: str | Sequence[str], source: Path | str | None = None) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        assert self.problems, "a ConfigError needs at least one problem"
        self.source = source
        where = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = where + self.problems[0]
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            message = f"{where}{len(self.problems)} problems:\n{lines}"
        super().__init__(message)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# --- network -------------------------------------------------------------------------------------


class ExitCriteria(_Model):
    loss_improvement_rate_below: float = 0.001
    min_gradient_stability: float = 0.55
    min_loss_r2: float = 0.1
    max_loss_cv: float = 0.5


class PhaseConfig(_Model):
    alpha: float = Field(gt=0)
    min_steps: int = Field(default=500, ge=0)
    exit_criteria: ExitCriteria = ExitCriteria()


class ExitCriteriaOverride(_Model):
    """Per-expert changes to a phase's exit criteria; unset (null) keys keep the shared phase's value."""

    loss_improvement_rate_below: float | None = None
    min_gradient_stability: float | None = None
    min_loss_r2: float | None = None
    max_loss_cv: float | None = None


class PhaseOverride(_Model):
    """Per-expert changes to one named phase; unset fields keep the shared phase's value."""

    alpha: float | None = Field(default=None, gt=0)
    min_steps: int | None = Field(default=None, ge=0)
    exit_criteria: ExitCriteriaOverride | None = None

    def applied_to(self, phase: PhaseConfig) -> PhaseConfig:
        """`phase` with the keys set here replaced; exit criteria merge key by key."""
        update = self.model_dump(exclude_none=True, exclude={"exit_criteria"})
        if self.exit_criteria is not None:
            criteria = self.exit_criteria.model_dump(exclude_none=True)
            update["exit_criteria"] = phase.exit_criteria.model_copy(update=criteria)
        return phase.model_copy(update=update)


class AlphaScheduleConfig(_Model):
    enabled: bool = False
    linear_alpha: float | None = None
    # Ordered: the YAML order is the phase order (dicts keep insertion order).
    conv_alpha_phases: dict[str, PhaseConfig] = Field(default_factory=dict)
    per_expert: dict[Literal["high_noise", "low_noise"], dict[str, PhaseOverride]] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _phases_present(self) -> AlphaScheduleConfig:
        if self.enabled and not self.conv_alpha_phases:
            raise ValueError(
                "alpha_schedule.enabled is true but conv_alpha_phases is empty; add at least one phase"
            )
        for expert, overrides in self.per_expert.items():
            unknown = set(overrides) - set(self.conv_alpha_phases)
            if unknown:
                raise ValueError(
                    f"alpha_schedule.per_expert.{expert} overrides unknown phase(s) {sorted(unknown)}; "
                    f"phases are {list(self.conv_alpha_phases)}"
                )
        return self

    def phases_for(self, expert: Expert) -> list[tuple[str, PhaseConfig]]:
        """The phase list of one expert: the shared phases with that expert's overrides applied."""
        overrides = self.per_expert.get(expert, {})
        phases = []
        for name, phase in self.conv_alpha_phases.items():
            change = overrides.get(name)
            phases.append((name, phase if change is None else change.applied_to(phase)))
        return phases


class NetworkKwargs(_Model):
    only_if_contains: list[str] = Field(default_factory=list)
    ignore_if_contains: list[str] = Field(default_factory=list)


class NetworkConfig(_Model):
    type: Literal["lora", "lokr"] = "lora"
    linear: int = Field(default=16, description="LoRA rank")
    linear_alpha: float = 16.0
    dropout: float = Field(default=0.0, ge=0, lt=1)
    lokr_full_rank: bool = False
    lokr_factor: int = -1
    network_kwargs: NetworkKwargs = NetworkKwargs()
    alpha_schedule: AlphaScheduleConfig = AlphaScheduleConfig()

    @field_validator("linear")
    @classmethod
    def _rank_positive(cls, rank: int) -> int:
        if rank <= 0:
            raise ValueError(f"network.linear (the LoRA rank) must be > 0, got {rank}")
        return rank


# --- save / logging / sample ---------------------------------------------------------------------

DType = Literal["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"]


class SaveConfig(_Model):
    dtype: DType = "bf16"
    save_every: int = Field(default=250, gt=0)
    max_step_saves_to_keep: int = Field(default=4, ge=1)

    def should_save(self, step: int, *, final: bool) -> bool:
        """A checkpoint after `step` optimizer steps: every `save_every`, and at the end."""
        return final or step % self.save_every == 0


class LoggingConfig(_Model):
    log_every: int = Field(default=10, gt=0)


class SamplePrompt(_Model):
    prompt: str
    ctrl_img: str | None = None
    seed: int | None = None


class SampleConfig(_Model):
    sample_every: int = Field(default=250, gt=0)
    sample_start_step: int = Field(default=0, ge=0)
    width: int = 480
    height: int = 320
    num_frames: int = 41
    fps: int = 16
    samples: list[SamplePrompt] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)
    neg: str = ""
    seed: int = 42
    # ai-toolkit's default: every prompt samples with `seed`; true gives prompt i the seed `seed + i`.
    walk_seed: bool = False
    guidance_scale: float = 4.0
    sample_steps: int = Field(default=25, gt=0)

    def all_prompts(self) -> list[SamplePrompt]:
        return [*self.samples, *(SamplePrompt(prompt=p) for p in self.prompts)]

    def should_sample(self, step: int, *, final: bool) -> bool:
        """Samples after `step` optimizer steps: every `sample_every` from `sample_start_step` on, and
        at the end (the samples before training, step 0, are `TrainConfig.samples_first`'s)."""
        due = step > 0 and step >= self.sample_start_step and step % self.sample_every == 0
        return bool(self.all_prompts()) and (final or due)

    def prompt_seed(self, index: int, prompt: SamplePrompt) -> int:
        """A prompt's own seed, else `seed` (+ its index with `walk_seed`), as ai-toolkit seeds samples."""
        if prompt.seed is not None:
            return prompt.seed
        return self.seed + index if self.walk_seed else self.seed


# --- datasets --------------------------------------------------------------------------------------


class DatasetConfig(_Model):
    folder_path: Path
    caption_ext: str = ".txt"
    caption_dropout_rate: float = Field(default=0.05, ge=0, le=1)
    default_caption: str | None = None
    # A list trains one copy of the dataset per resolution, as ai-toolkit does.
    resolution: list[int] = Field(default_factory=lambda: [512])
    max_pixels_per_frame: int | None = Field(default=None, gt=0)
    bucket_no_upscale: bool = True
    num_frames: int = 33
    shrink_video_to_frames: bool = True
    fps: float = Field(default=16.0, gt=0)
    start_frame: int = Field(default=0, ge=0)
    temporal_jitter: int = Field(default=0, ge=0)
    cache_variants: int | None = Field(default=None, ge=1)
    # Several windows per clip, as musubi-tuner's video datasets cut them (frames.py).
    frame_extraction: Literal["head", "chunk", "slide", "uniform", "full"] | None = None
    target_frames: list[int] | None = None
    frame_stride: int = Field(default=1, ge=1)
    frame_sample: int = Field(default=1, ge=1)
    max_frames: int = Field(default=129, ge=1)
    # ai-toolkit: the whole clip at `fps`, rounded down to 4k+1 frames.
    auto_frame_count: bool = False
    trim_auto_frame_count_tail: bool = True
    do_i2v: bool = True
    # Held out of this dataset's clips (each dataset keeps its own share).
    validation_split: float = Field(default=0.0, ge=0, lt=1)
    # A clip without a caption file gets one from the `captioner` section's model (a caption file
    # always wins); `write_auto_captions` also writes it next to the clip, never over a file.
    auto_caption: bool = False
    write_auto_captions: bool = False
    # Each clip of this dataset appears this many times per epoch (ai-toolkit's dataset repeats).
    num_repeats: int = Field(default=1, ge=1)

    @field_validator("caption_ext")
    @classmethod
    def _dotted(cls, ext: str) -> str:
        return ext if ext.startswith(".") else f".{ext}"

    @field_validator("resolution", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) else value

    @field_validator("resolution")
    @classmethod
    def _resolutions(cls, values: list[int]) -> list[int]:
        if not values or min(values) < 16:
            raise ValueError(f"resolution must list sizes of at least 16 pixels, got {values}")
        return values

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, n: int) -> int:
        _check_frame_count("num_frames", n)
        return n

    @field_validator("target_frames")
    @classmethod
    def _counts_four_k_plus_one(cls, counts: list[int] | None) -> list[int] | None:
        if counts is not None:
            if not counts:
                raise ValueError("target_frames is empty; list frame counts (4k+1) or leave it out")
            for n in counts:
                _check_frame_count("target_frames", n)
        return counts

    @model_validator(mode="after")
    def _i2v_only(self) -> DatasetConfig:
        if not self.do_i2v:
            raise ValueError("do_i2v: false is not supported; this project trains Wan 2.2 image-to-video")
        return self

    @model_validator(mode="after")
    def _one_way_to_cut(self) -> DatasetConfig:
        explicit_shrink = "shrink_video_to_frames" in self.model_fields_set and self.shrink_video_to_frames
        if self.frame_extraction and self.auto_frame_count:
            raise ValueError(
                "frame_extraction and auto_frame_count both choose the windows of a clip; keep one"
            )
        if self.frame_extraction and explicit_shrink:
            raise ValueError(
                f"frame_extraction: {self.frame_extraction} cuts windows at the dataset fps, "
                "shrink_video_to_frames: true squeezes the whole clip into one; keep one of them"
            )
        return self

    @property
    def pixel_budgets(self) -> list[tuple[str, int]]:
        """(label, pixels per frame) per copy of the dataset: `max_pixels_per_frame` alone when set,
        else one per `resolution` entry (each squared)."""
        if self.max_pixels_per_frame is not None:
            return [(f"{self.max_pixels_per_frame}px", self.max_pixels_per_frame)]
        return [(str(r), r * r) for r in sorted(set(self.resolution))]

    @model_validator(mode="after")
    def _one_fallback_caption(self) -> DatasetConfig:
        if self.auto_caption and self.default_caption is not None:
            raise ValueError(
                "default_caption and auto_caption both say what a clip without a caption file gets; keep one"
            )
        if self.write_auto_captions and not self.auto_caption:
            raise ValueError(
                "write_auto_captions needs auto_caption: true (it writes the generated captions)"
            )
        return self

    @property
    def num_cache_variants(self) -> int:
        """Jitter is made cacheable by caching a few deterministic variants per clip."""
        if self.cache_variants is not None:
            return self.cache_variants
        return 4 if self.temporal_jitter > 0 else 1


def _check_frame_count(key: str, n: int) -> None:
    if n < 1 or (n - 1) % 4:
        lower, upper = max(1, (n - 1) // 4 * 4 + 1), ((n - 1) // 4 + 1) * 4 + 1
        raise ValueError(
            f"{key} must be 4k+1 (the Wan VAE compresses time 4x), got {n}; use {lower} or {upper}"
        )


# --- train / model ---------------------------------------------------------------------------------


class OptimizerParams(_Model):
    """Union of the optimizer parameters ai-toolkit accepts; each optimizer reads its own."""

    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float | None = Field(default=None, gt=0)  # None: each optimizer's default (eps_or)
    # automagic
    lr_bump: float = 1e-6
    min_lr: float = 1e-7
    max_lr: float = 1e-3
    beta2: float = 0.999
    clip_threshold: float = 1.0
    high_noise_lr: float | None = None
    high_noise_lr_bump: float | None = None
    high_noise_min_lr: float | None = None
    high_noise_max_lr: float | None = None
    low_noise_lr: float | None = None
    low_noise_lr_bump: float | None = None
    low_noise_min_lr: float | None = None
    low_noise_max_lr: float | None = None
    # prodigy (prodigyopt.Prodigy's own defaults)
    beta3: float | None = None
    d0: float = Field(default=1e-6, gt=0)
    d_coef: float = Field(default=1.0, gt=0)
    growth_rate: float = Field(default=float("inf"), gt=0)
    use_bias_correction: bool = False
    safeguard_warmup: bool = False
    decouple: bool = True
    slice_p: int = Field(default=1, ge=1)

    def eps_or(self, default: float) -> float:
        return default if self.eps is None else self.eps

    def for_expert(self, expert: str, name: str, default: float) -> float:
        """`high_noise_<name>` / `low_noise_<name>` when set, else the shared value."""
        value = getattr(self, f"{expert}_{name}", None)
        return default if value is None else value


LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "step"]


class LRSchedulerParams(_Model):
    """torch's scheduler arguments as ai-toolkit passes them (toolkit/scheduler.py); each schedule
    reads its own. `total_iters` / `T_max` / `T_0` default to `train.steps`, as there."""

    total_iters: int | None = Field(default=None, gt=0)
    # ai-toolkit overwrites these two with total_iters; accepted only to say so (TrainConfig).
    T_max: int | None = Field(default=None, gt=0)
    T_0: int | None = Field(default=None, gt=0)
    T_mult: int = Field(default=1, ge=1)
    eta_min: float = Field(default=0.0, ge=0)
    factor: float = Field(default=1.0, gt=0)
    start_factor: float = Field(default=1.0 / 3, gt=0)
    end_factor: float = Field(default=1.0, ge=0)
    num_warmup_steps: int = Field(default=1000, ge=0)
    step_size: int | None = Field(default=None, gt=0)
    gamma: float = Field(default=0.1, gt=0)
    last_epoch: Literal[-1] = -1

    def changed(self) -> set[str]:
        """Parameters set away from their defaults (a dumped config.yaml lists every one)."""
        fields = type(self).model_fields
        return {k for k in self.model_fields_set if getattr(self, k) != fields[k].default} - {"last_epoch"}


# The lr_scheduler_params each schedule reads (ai-toolkit hands them to torch, which refuses others).
SCHEDULE_READS: dict[str, frozenset[str]] = {
    "constant": frozenset({"factor", "total_iters"}),
    "constant_with_warmup": frozenset({"num_warmup_steps"}),
    "linear": frozenset({"start_factor", "end_factor", "total_iters"}),
    "cosine": frozenset({"total_iters", "eta_min"}),
    "cosine_with_restarts": frozenset({"total_iters", "T_mult", "eta_min"}),
    "step": frozenset({"step_size", "gamma"}),
}


class EMAConfig(_Model):
    """An exponential moving average of the LoRA weights (ai-toolkit's ema_config), updated after
    every optimizer step; the averaged weights are exported and evaluated beside the raw ones."""

    use_ema: bool = False
    ema_decay: float = Field(default=0.999, ge=0, le=1)


class TrainConfig(_Model):
    batch_size: int = Field(default=1, ge=1)
    steps: int = Field(default=2000, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1, alias="gradient_accumulation_steps")
    train_text_encoder: bool = False
    # true = recompute whole blocks; "selective" = keep the cheap-to-store, costly-to-recompute
    # activations (attention outputs) and recompute the rest; false = keep everything.
    gradient_checkpointing: bool | Literal["selective"] = True
    noise_scheduler: Literal["flowmatch"] = "flowmatch"
    timestep_type: Literal["uniform", "linear", "sigmoid", "shift"] = "sigmoid"
    timestep_shift: float = Field(default=3.0, gt=0)
    optimizer: Literal["adamw", "adamw8bit", "automagic", "prodigy"] = "adamw8bit"
    lr: float = Field(default=1e-4, gt=0)
    optimizer_params: OptimizerParams = OptimizerParams()
    lr_scheduler: LRScheduler = "constant"
    lr_scheduler_params: LRSchedulerParams = LRSchedulerParams()
    ema_config: EMAConfig = EMAConfig()
    # Samples before the first step (ai-toolkit samples the base model unless skip_first_sample),
    # on a resumed run too with force_first_sample; disable_sampling turns every sample off.
    skip_first_sample: bool = False
    force_first_sample: bool = False
    disable_sampling: bool = False
    max_grad_norm: float = Field(default=1.0, ge=0)
    dtype: DType = "bf16"
    switch_boundary_every: int = Field(default=1, ge=1)
    attention_backend: str = "sdpa"
    seed: int = 42
    offload_inactive_expert: bool = False
    # Speed: torch.compile the transformer blocks; fp8 (torchao float8 rowwise) matmuls for the
    # frozen base linears (needs a GPU with fp8 tensor cores, e.g. H100).
    compile: bool = False
    fp8_compute: bool = False
    # Memory: keep saved activations (checkpoint inputs) in pinned CPU memory between forward and
    # backward.
    activation_offload: bool = False

    @field_validator("train_text_encoder")
    @classmethod
    def _no_te_training(cls, value: bool) -> bool:
        if value:
            raise ValueError("train_text_encoder: true is not supported; text embeddings are cached")
        return value

    @model_validator(mode="after")
    def _schedule_acts(self) -> TrainConfig:
        if self.optimizer == "automagic" and self.lr_scheduler != "constant":
            raise ValueError(
                f"lr_scheduler {self.lr_scheduler!r} would not act on automagic, which moves its own "
                "per-element learning rates by lr_bump; use lr_scheduler: constant (or another optimizer)"
            )
        if self.lr_scheduler == "step" and self.lr_scheduler_params.step_size is None:
            raise ValueError("lr_scheduler step needs lr_scheduler_params.step_size (steps per decay)")
        changed = self.lr_scheduler_params.changed()
        overwritten = sorted(changed & {"T_max", "T_0"})
        if overwritten:
            raise ValueError(
                f"lr_scheduler_params {', '.join(overwritten)}: ai-toolkit replaces it with total_iters "
                "(train.steps unless set), so the schedule would not be what it says; set total_iters instead"
            )
        unread = sorted(changed - SCHEDULE_READS[self.lr_scheduler])
        if unread:
            raise ValueError(
                f"lr_scheduler_params {', '.join(unread)} not read by lr_scheduler {self.lr_scheduler!r} "
                f"(it reads {', '.join(sorted(SCHEDULE_READS[self.lr_scheduler]))}); remove them or pick "
                "the schedule they belong to (num_warmup_steps / lr_warmup_steps: constant_with_warmup)"
            )
        return self

    @property
    def start_lr(self) -> float:
        """The learning rate the optimizer starts from: prodigy takes an lr below 0.1 as 1.0, as
        ai-toolkit does (its lr multiplies prodigy's own step-size estimate)."""
        return 1.0 if self.optimizer == "prodigy" and self.lr < 0.1 else self.lr

    def samples_first(self, *, resumed: bool) -> bool:
        """Whether to sample before the first step of this call (ai-toolkit's baseline samples)."""
        if self.disable_sampling or self.skip_first_sample:
            return False
        return self.force_first_sample or not resumed


class ModelKwargs(_Model):
    train_high_noise: bool = True
    train_low_noise: bool = True


class ModelConfig(_Model):
    name_or_path: str
    arch: Literal["wan22_14b_i2v"] = "wan22_14b_i2v"
    # Where the parts come from (model/sources.py, docs/architecture.md §3.1). ai-toolkit's keys:
    # extras_name_or_path (VAE, text encoder, tokenizer, scheduler; default name_or_path), vae_path,
    # te_name_or_path (also read as text_encoder_path). This project's: one file or shard folder per
    # expert. A file replaces that part of its root; its config still comes from the root.
    extras_name_or_path: str | None = None
    high_noise_path: str | None = None
    low_noise_path: str | None = None
    vae_path: str | None = None
    te_name_or_path: str | None = Field(default=None, alias="text_encoder_path")
    # Weight-only quantization of the frozen experts (memory mode): qfloat8/float8 -> torchao fp8
    # weight-only, qint8/int8 -> int8 weight-only, uint4/int4 -> uint4 with a scale per 64 weights.
    # ai-toolkit's "uint4|<accuracy recovery adapter>" is split into both keys; the adapter is not
    # applied (load_config warns).
    quantize: bool = False
    qtype: str = "qfloat8"
    accuracy_recovery_adapter: str | None = None
    low_vram: bool = False
    model_kwargs: ModelKwargs = ModelKwargs()

    @field_validator("arch", mode="before")
    @classmethod
    def _wan22_i2v(cls, arch: Any) -> Any:
        if arch is None or arch == "wan22_14b_i2v":
            return "wan22_14b_i2v"
        what = _OTHER_ARCHS.get(arch, "not Wan 2.2 image-to-video")
        raise ValueError(
            f"{arch!r} is {what}. This project trains Wan 2.2 I2V-A14B LoRAs only: two experts split at "
            "timestep 900, each taking 36 input channels (the noisy latent, a mask and the first "
            "frame's latent), so a LoRA of another Wan model would not load into it. Set arch: "
            "wan22_14b_i2v and name_or_path to an I2V-A14B model (ai-toolkit/Wan2.2-I2V-A14B-Diffusers-bf16)"
        )

    @model_validator(mode="before")
    @classmethod
    def _split_adapter(cls, raw: Any) -> Any:
        """`qtype: "uint4|repo/adapter.safetensors"` -> qtype uint4 + accuracy_recovery_adapter."""
        qtype = raw.get("qtype") if isinstance(raw, dict) else None
        if isinstance(qtype, str) and "|" in qtype:
            kind, _, adapter = qtype.partition("|")
            raw = {**raw, "qtype": kind.strip(), "accuracy_recovery_adapter": adapter.strip() or None}
        return raw

    @model_validator(mode="after")
    def _adapter_is_int4s(self) -> ModelConfig:
        int4 = self.qtype.strip().lower() in ("uint4", "int4", "qint4")
        if self.quantize and self.accuracy_recovery_adapter and not int4:
            raise ValueError(
                f"model.accuracy_recovery_adapter {self.accuracy_recovery_adapter!r} corrects ai-toolkit's "
                f"uint4 weights; with qtype {self.qtype!r} it would not be applied here; remove it"
            )
        return self

    @model_validator(mode="after")
    def _one_expert(self) -> ModelConfig:
        if not (self.model_kwargs.train_high_noise or self.model_kwargs.train_low_noise):
            raise ValueError(
                "model.model_kwargs trains no expert: set train_high_noise and/or train_low_noise to true"
            )
        return self

    @property
    def experts(self) -> tuple[str, ...]:
        """The experts this run trains, in the order they alternate (high noise first, as the seed)."""
        kw = self.model_kwargs
        return tuple(
            e for e, on in zip(EXPERTS, (kw.train_high_noise, kw.train_low_noise), strict=True) if on
        )


class ValidationConfig(_Model):
    """Held-out evaluation (docs/architecture.md §6): fixed timestep quantiles inside each expert's window."""

    folder_path: Path | None = None
    timestep_quantiles: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seed: int = 1234
    num_samples: int = Field(default=1, ge=0)


# What the captioner is asked by default: a training caption for a video model, in one paragraph.
DEFAULT_CAPTION_PROMPT = (
    "The images are frames of one video clip, in order. Write a caption for training a text-to-video "
    "model: one paragraph that describes the main subject and its appearance, what moves and how, the "
    "camera movement, the setting and the lighting. Describe the video, not the frames."
)


class CaptionerConfig(_Model):
    """A local vision-language model (Qwen2.5-VL) that captions clips without a caption file
    (docs/architecture.md §4). `[trigger]` in the prompt becomes the trigger word; the caption it
    writes then gets the trigger handling a caption file gets."""

    name_or_path: str
    device: str = "auto"
    dtype: DType = "bf16"
    prompt: str = DEFAULT_CAPTION_PROMPT
    frames_per_clip: int = Field(default=8, ge=1)
    max_pixels: int = Field(default=360 * 640, ge=28 * 28, description="pixels per frame the model sees")
    max_new_tokens: int = Field(default=160, ge=1)
    batch_size: int = Field(default=4, ge=1)


_OTHER_ARCHS = {
    "wan21": "Wan 2.1 text-to-video (one transformer, 16 input channels)",
    "wan21_i2v": "Wan 2.1 image-to-video (one transformer with a CLIP image encoder)",
    "wan22_14b": "Wan 2.2 text-to-video A14B (two experts split at timestep 875, 16 input channels)",
    "wan22_5b": "Wan 2.2 TI2V-5B (one transformer, a 48-channel VAE)",
}


def offloads_inactive_expert(train: TrainConfig, model: ModelConfig) -> bool:
    """Whether the expert not training waits in CPU memory (`train.offload_inactive_expert` or the
    seed's `model.low_vram`)."""
    return train.offload_inactive_expert or model.low_vram


class ProcessConfig(_Model):
    type: Literal["diffusion_trainer", "sd_trainer", "ui_trainer"] = "diffusion_trainer"
    training_folder: Path = Path("output")
    trigger_word: str | None = None
    network: NetworkConfig = NetworkConfig()
    save: SaveConfig = SaveConfig()
    datasets: list[DatasetConfig] = Field(min_length=1)
    train: TrainConfig = TrainConfig()
    model: ModelConfig
    sample: SampleConfig | None = None
    logging: LoggingConfig = LoggingConfig()
    validation: ValidationConfig = ValidationConfig()
    captioner: CaptionerConfig | None = None

    @model_validator(mode="after")
    def _captioner_when_asked(self) -> ProcessConfig:
        asking = [i for i, d in enumerate(self.datasets) if d.auto_caption]
        if asking and self.captioner is None:
            raise ValueError(
                f"datasets[{asking[0]}].auto_caption needs a `captioner` section "
                "(captioner.name_or_path: a local Qwen2.5-VL folder)"
            )
        if self.captioner is not None and "[trigger]" in self.captioner.prompt and not self.trigger_word:
            raise ValueError(
                "captioner.prompt uses [trigger] but trigger_word is not set; set it or drop [trigger]"
            )
        return self


class JobConfig(_Model):
    """A whole job file: `job: extension`, `config.name`, one process, optional `meta`."""

    name: str
    process: ProcessConfig
    meta: dict[str, Any] = Field(default_factory=dict)
    source: Path | None = None
    # Key path -> the string as written, for every value that had `${VAR}` substituted; shared files
    # (exported LoRAs) show these instead of the machine's values (model/metadata.py).
    _templates: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def templates(self) -> dict[str, str]:
        return dict(self._templates)

    @property
    def experts(self) -> tuple[str, ...]:
        return self.process.model.experts

    def run_dir(self) -> Path:
        return self.process.training_folder / self.name


class LoadedConfig(BaseModel):
    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    job: JobConfig
    warnings: tuple[str, ...] = ()


# --- loading ---------------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOP_KEYS = ["job", "config", "meta"]
_CONFIG_KEYS = ["name", "process"]


def load_config(path: str | Path, workdir: str | Path | None = None) -> LoadedConfig:
    """Read, substitute, validate and resolve one job file. Raises ConfigError for user mistakes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(["config file not found"], source=path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid YAML: {_yaml_error(exc)}"], source=path) from None
    return parse_config(raw, source=path, workdir=workdir)


def _yaml_error(exc: Exception) -> str:
    """PyYAML's multi-line message as one line: where, and what it expected."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return " ".join(str(exc).split())
    context = getattr(exc, "context", None)
    problem = getattr(exc, "problem", None)  # set wherever problem_mark is (yaml.MarkedYAMLError)
    what = f"{problem} ({context})" if context else problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}"


def parse_config(raw: Any, *, source: Path | None = None, workdir: str | Path | None = None) -> LoadedConfig:
    """Every mistake of the file is collected and raised together, one line each."""
    problems: list[str] = []
    unwrapped = _unwrap_job(raw, problems)
    if unwrapped is None:
        raise ConfigError(problems, source=source)
    process_raw, name, meta = unwrapped
    templates: dict[str, str] = {}
    process_raw = _substitute(process_raw, name, problems, templates=templates)
    meta = _substitute(meta, name, problems, "meta", templates=templates)
    base = Path(workdir) if workdir is not None else default_workdir()
    inert: list[str] = []
    if isinstance(process_raw, dict):
        process_raw = aitk_keys.apply_aliases(process_raw, problems)
    process_raw = _sort_keys(process_raw, ProcessConfig, "", "", inert, problems)
    try:
        process = ProcessConfig.model_validate(process_raw)
    except ValidationError as exc:
        folders = _raw_folder_problems(process_raw, base)
        raise ConfigError([*problems, *_describe(exc, ProcessConfig), *folders], source=source) from None
    job = JobConfig(name=name, process=process, meta=meta, source=source)
    job._templates.update(templates)
    job = _resolve_paths(job, base, problems)
    if problems:
        raise ConfigError(problems, source=source)
    warnings = []
    if inert:
        warnings.append("keys known from ai-toolkit that have no effect here: " + ", ".join(inert))
    return LoadedConfig(job=job, warnings=(*warnings, *_value_warnings(job.process)))


def _value_warnings(process: ProcessConfig) -> list[str]:
    """Values that train, but not as their words alone say (each says what happens instead)."""
    train, warnings = process.train, []
    model = process.model
    adapter = model.accuracy_recovery_adapter
    if adapter and not model.quantize:
        warnings.append(
            f"model.accuracy_recovery_adapter {adapter!r} is not applied: model.quantize is false, so the "
            "experts train on their full-precision weights (as in ai-toolkit)"
        )
    elif adapter:
        # ai-toolkit downloads the adapter and adds it to the uint4 base; that part is not built.
        warnings.append(
            f"model.qtype {model.qtype!r}: the accuracy recovery adapter {adapter!r} is not applied here, so "
            "the experts train on plain uint4 weights, with more quantization error than ai-toolkit's "
            "uint4 + adapter; qtype qint8 or qfloat8 keeps more precision for twice the memory"
        )
    if train.start_lr != train.lr:
        warnings.append(
            f"train.lr {train.lr} with optimizer prodigy trains at lr 1.0, as ai-toolkit does: prodigy's "
            "lr multiplies its own step-size estimate (set lr >= 0.1 to choose it)"
        )
    return warnings


def _unwrap_job(raw: Any, problems: list[str]) -> tuple[dict, str, dict] | None:
    """The one process mapping, the job name and `meta`; None when the layout is too broken to go on."""
    if not isinstance(raw, dict):
        problems.append("expected a mapping with `job:` and `config:` at the top")
        return None
    for key in sorted(set(raw) - set(_TOP_KEYS), key=str):
        problems.append(f"{key}: unknown key{_suggest(str(key), _TOP_KEYS)}")
    if raw.get("job", "extension") != "extension":
        problems.append(f"job: only `extension` jobs are supported, got {raw.get('job')!r}")
    meta = raw.get("meta") or {}
    if not isinstance(meta, dict):
        problems.append(f"meta: expected a mapping, got {type(meta).__name__}")
        meta = {}
    config = raw.get("config")
    if not isinstance(config, dict) or "name" not in config or "process" not in config:
        problems.append("config: needs `name` and a `process` list")
        return None
    for key in sorted(set(config) - set(_CONFIG_KEYS), key=str):
        problems.append(f"config.{key}: unknown key{_suggest(str(key), _CONFIG_KEYS)}")
    processes = config["process"]
    if not isinstance(processes, list) or len(processes) != 1 or not isinstance(processes[0], dict):
        problems.append("config.process: expected exactly one process (a list with one mapping)")
        return None
    return processes[0], str(config["name"]), dict(meta)


def _substitute(
    value: Any, name: str, problems: list[str], path: str = "", *, templates: dict[str, str]
) -> Any:
    """`[name]` -> the job name and `${VAR}` -> the environment, in every string, as ai-toolkit does;
    `templates` records the strings that named a variable, as written."""
    if isinstance(value, str):
        if _ENV.search(value):
            templates[path] = value

        def env(match: re.Match) -> str:
            var = match.group(1)
            if var not in os.environ:
                problems.append(f"{path}: environment variable {var} is not set (used as ${{{var}}})")
                return match.group(0)
            return os.environ[var]

        return _ENV.sub(env, value.replace("[name]", name))
    if isinstance(value, dict):
        return {
            k: _substitute(v, name, problems, f"{path}.{k}" if path else str(k), templates=templates)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _substitute(v, name, problems, f"{path}[{i}]", templates=templates) for i, v in enumerate(value)
        ]
    return value


def _sort_keys(
    raw: Any, model: type[BaseModel], where: str, section: str, inert: list[str], problems: list[str]
) -> Any:
    """Take out the keys of `aitk_keys.KEYS`: their paths go to `inert` when the value asks for
    nothing, their refusals to `problems` otherwise. Fields, and typos (validation names those),
    stay. `where` is the path as the user reads it (`datasets[1].`), `section` the table's
    (`datasets[]`)."""
    if not isinstance(raw, dict):
        return raw
    fields = model.model_fields
    out = {}
    for key, value in raw.items():
        field = fields.get(key) or _by_alias(fields, key)
        if field is None:
            row = aitk_keys.lookup(section, str(key))
            if row is not None:
                if row.inert(value):
                    inert.append(f"{where}{key}")
                else:
                    problems.append(row.refusal(f"{where}{key}", value))
                continue
        sub = _submodel(field.annotation) if field is not None else None
        inner = f"{section}.{key}" if section else str(key)
        container = _container(field.annotation) if field is not None else None
        if sub is not None and container is not None and container[0] == "list" and isinstance(value, list):
            value = [
                _sort_keys(v, sub, f"{where}{key}[{i}].", f"{inner}[]", inert, problems)
                for i, v in enumerate(value)
            ]
        elif sub is not None and container is None:
            value = _sort_keys(value, sub, f"{where}{key}.", inner, inert, problems)
        out[key] = value
    return out


def _by_alias(fields: Mapping, key: str):
    return next((f for f in fields.values() if f.alias == key), None)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside `Model`, `Model | None` or `list[Model]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _describe(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """Every validation error as one line: key path, what is wrong, the closest valid key.

    A value that fails each member of a union (`true`/`false` or "selective") gets one line.
    """
    by_path: dict[str, list[str]] = {}
    for err in exc.errors():
        path, message = _describe_one(err, root)
        messages = by_path.setdefault(path, [])
        if message not in messages:
            messages.append(message)
    return [f"{path}: {'; or '.join(m)}" if path else "; ".join(m) for path, m in by_path.items()]


def _describe_one(err: Mapping[str, Any], root: type[BaseModel]) -> tuple[str, str]:
    loc = list(err["loc"])
    if err["type"] == "extra_forbidden":
        keys, parent = _walk(root, loc[:-1])
        fields = parent.model_fields if parent else {}
        key = str(loc[-1])
        path = _format_loc([*keys, key])
        if key in fields:  # given under its name and its ai-toolkit alias
            return path, f"given twice, also as {fields[key].alias}; keep one"
        choices = [*fields, *(f.alias for f in fields.values() if f.alias)]
        section = ".".join("[]" if isinstance(k, int) else str(k) for k in keys).replace(".[]", "[]")
        known = aitk_keys.keys_in(section)  # a typo of an ai-toolkit key names that key
        return path, f"unknown key{_suggest(key, choices, known)}"
    path = _format_loc(_walk(root, loc)[0])
    if err["type"] == "missing":
        return path, "required key is missing"
    return path, err["msg"].removeprefix("Value error, ")


def _walk(root: type[BaseModel], loc: list) -> tuple[list, type[BaseModel] | None]:
    """The user's key path inside a pydantic error location and the model it ends in.

    Locations also name the union member tried (`bool`, `literal['selective']`) and `[key]` for a
    bad dict key; those are not keys of the file and are dropped.
    """
    keys: list = []
    annotation: Any = root
    for part in loc:
        container = _container(annotation)
        if container is not None and (isinstance(part, int) or container[0] == "dict"):
            if part != "[key]":
                keys.append(part)
                annotation = container[1]
            continue
        model = _submodel(annotation)
        field = None
        if model is not None and isinstance(part, str):
            field = model.model_fields.get(part) or _by_alias(model.model_fields, part)
        if field is not None:
            keys.append(part)
            annotation = field.annotation
    return keys, _submodel(annotation)


def _container(annotation: Any) -> tuple[str, Any] | None:
    """("list", item type) or ("dict", value type) for list/tuple/dict annotations (also `| None`)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (list, tuple) and args:
        return "list", args[0]
    if origin is dict and len(args) == 2:
        return "dict", args[1]
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return _container(members[0])
    return None


def _format_loc(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _suggest(key: str, choices: list[str], known: Sequence[str] = ()) -> str:
    """The closest of the fields and the table's ai-toolkit keys, else the list of fields."""
    close = difflib.get_close_matches(key, [*choices, *known], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(sorted(choices))}"


def _resolve_paths(job: JobConfig, base: Path, problems: list[str]) -> JobConfig:
    """Relative paths are relative to the workdir (docs/architecture.md §8); dataset and validation folders must exist."""
    datasets = []
    for i, ds in enumerate(job.process.datasets):
        folder = _under(base, ds.folder_path)
        problems += _missing_dataset_folder(i, folder)
        datasets.append(ds.model_copy(update={"folder_path": folder}))
    validation = job.process.validation
    if validation.folder_path is not None:
        folder = _under(base, validation.folder_path)
        validation = validation.model_copy(update={"folder_path": folder})
        if not folder.is_dir():
            problems.append(f"validation.folder_path: folder {folder} does not exist")
    model = _resolve_model_paths(job.process.model, base)
    captioner = job.process.captioner
    if captioner is not None:  # always a local folder (its content hash is the cache identity)
        captioner = captioner.model_copy(
            update={"name_or_path": str(_under(base, Path(captioner.name_or_path)))}
        )
    process = job.process.model_copy(
        update={
            "datasets": datasets,
            "training_folder": _under(base, job.process.training_folder),
            "validation": validation,
            "model": model,
            "captioner": captioner,
            "sample": _resolve_samples(job.process.sample, base),
        }
    )
    return job.model_copy(update={"process": process})


def _missing_dataset_folder(i: int, folder: Path) -> list[str]:
    if folder.is_dir():
        return []
    return [
        f"datasets[{i}].folder_path: folder {folder} does not exist; "
        "point it at a folder of video clips with caption files"
    ]


def _raw_folder_problems(process_raw: Any, base: Path) -> list[str]:
    """The dataset folders of a file that did not validate, so their problems come in the same report."""
    datasets = process_raw.get("datasets") if isinstance(process_raw, dict) else None
    problems = []
    for i, ds in enumerate(datasets if isinstance(datasets, list) else []):
        folder = ds.get("folder_path") if isinstance(ds, dict) else None
        if isinstance(folder, str) and folder:
            problems += _missing_dataset_folder(i, _under(base, Path(folder)))
    return problems


MODEL_FILE_KEYS = ("high_noise_path", "low_noise_path", "vae_path", "te_name_or_path")


def _resolve_model_paths(model: ModelConfig, base: Path) -> ModelConfig:
    """Roots as `_is_workdir_relative` tells folders from hub ids; part files always local."""
    update: dict[str, str] = {}
    for key in ("name_or_path", "extras_name_or_path"):
        value = getattr(model, key)
        if value is not None and _is_workdir_relative(value, base):
            update[key] = str(_under(base, Path(value)))
    for key in MODEL_FILE_KEYS:
        value = getattr(model, key)
        if value is not None:
            update[key] = str(_under(base, Path(value)))
    return model.model_copy(update=update)


def _resolve_samples(sample: SampleConfig | None, base: Path) -> SampleConfig | None:
    """`ctrl_img` paths resolved like the folders, so sampling reads the file check looked at."""
    if sample is None:
        return None
    samples = [
        s.model_copy(update={"ctrl_img": str(_under(base, Path(s.ctrl_img)))}) if s.ctrl_img else s
        for s in sample.samples
    ]
    return sample.model_copy(update={"samples": samples})


def _under(base: Path, path: Path) -> Path:
    path = path.expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def _is_workdir_relative(name_or_path: str, base: Path) -> bool:
    """`./x`, `a/b/c` or an existing `<workdir>/owner/name` are folders; a bare `owner/name` is a hub id."""
    path = Path(name_or_path)
    if path.is_absolute() or name_or_path.startswith("~"):
        return False
    return name_or_path.startswith(".") or name_or_path.count("/") != 1 or (base / path).exists()


def with_experts(job: JobConfig, experts: tuple[str, ...]) -> JobConfig:
    """The same job training only `experts` (the Dagster subset / `wan-assets train --experts`)."""
    kwargs = ModelKwargs(train_high_noise="high_noise" in experts, train_low_noise="low_noise" in experts)
    model = job.process.model.model_copy(update={"model_kwargs": kwargs})
    return job.model_copy(update={"process": job.process.model_copy(update={"model": model})})


def default_workdir() -> Path:
    """`$WAN_ASSETS_HOME`, else `./.wan_assets` (docs/architecture.md §8)."""
    return Path(os.environ.get("WAN_ASSETS_HOME") or ".wan_assets").resolve()


def field_sections(model: type[BaseModel] = ProcessConfig, section: str = "") -> dict[str, list[str]]:
    """The implemented keys by section (`datasets[]` for the list of datasets), for the README."""
    out: dict[str, list[str]] = {section: []}
    for name, field in model.model_fields.items():
        out[section] += [name] if not field.alias or field.alias == name else [name, field.alias]
        sub, container = _submodel(field.annotation), _container(field.annotation)
        if sub is not None and (container is None or container[0] == "list"):
            inner = f"{section}.{name}" if section else name
            out |= field_sections(sub, inner + ("[]" if container else ""))
    return out


def key_reference() -> str:
    """README.md's table of which ai-toolkit keys do what here (aitk_keys.reference_markdown)."""
    fields = field_sections()
    fields.pop("source", None)
    return aitk_keys.reference_markdown(fields)


def dump_config(job: JobConfig) -> str:
    """The resolved config as YAML in the ai-toolkit job layout (written as `config.yaml` of a run)."""
    process = job.process.model_dump(mode="json", by_alias=False)
    data = {"job": "extension", "config": {"name": job.name, "process": [process]}}
    if job.meta:
        data["meta"] = job.meta
    return yaml.safe_dump(data, sort_keys=False)
