"""The ai-toolkit job format, parsed once into typed, frozen models.

Users bring their ai-toolkit YAML files as they are. Every key is either understood (a field below),
known from ai-toolkit but without effect here (listed in one warning), or a mistake (an error that
names the key path and the closest valid key). Nothing downstream reads raw dicts.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

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
    # Keys ai-toolkit accepts here that change nothing in this project (listed in one warning).
    INERT: ClassVar[frozenset[str]] = frozenset()


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
    INERT = frozenset({"conv_alpha", "log_every"})
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
    INERT = frozenset({"conv", "conv_alpha", "transformer_only", "network_threshold"})
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
    INERT = frozenset({"push_to_hub", "hf_repo_id", "hf_private", "save_format"})
    dtype: DType = "bf16"
    save_every: int = Field(default=250, gt=0)
    max_step_saves_to_keep: int = Field(default=4, ge=1)

    def should_save(self, step: int, *, final: bool) -> bool:
        """A checkpoint after `step` optimizer steps: every `save_every`, and at the end."""
        return final or step % self.save_every == 0


class LoggingConfig(_Model):
    INERT = frozenset({"use_wandb", "verbose", "project_name", "run_name"})
    log_every: int = Field(default=10, gt=0)


class SamplePrompt(_Model):
    INERT = frozenset({"network_multiplier"})
    prompt: str
    ctrl_img: str | None = None
    seed: int | None = None


class SampleConfig(_Model):
    INERT = frozenset({"sampler", "walk_seed", "format", "refiner_start_at", "network_multiplier"})
    sample_every: int = Field(default=250, gt=0)
    width: int = 480
    height: int = 320
    num_frames: int = 41
    fps: int = 16
    samples: list[SamplePrompt] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)
    neg: str = ""
    seed: int = 42
    guidance_scale: float = 4.0
    sample_steps: int = Field(default=25, gt=0)

    def all_prompts(self) -> list[SamplePrompt]:
        return [*self.samples, *(SamplePrompt(prompt=p) for p in self.prompts)]

    def should_sample(self, step: int, *, final: bool) -> bool:
        """Samples after `step` optimizer steps: every `sample_every`, and at the end."""
        return bool(self.all_prompts()) and (final or step % self.sample_every == 0)


# --- datasets --------------------------------------------------------------------------------------


class DatasetConfig(_Model):
    INERT = frozenset(
        {
            "shuffle_tokens",
            "cache_latents_to_disk",
            "cache_latents",
            "token_dropout_rate",
            "keep_tokens",
            "is_reg",
            "network_weight",
            "flip_x",
            "flip_y",
            "random_scale",
            "random_crop",
            "square_crop",
            "scale",
            "control_path",
            "buckets",
            "bucket_tolerance",
        }
    )
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
    validation_split: float = Field(default=0.0, ge=0, lt=1)
    # A clip without a caption file gets one from the `captioner` section's model (a caption file
    # always wins); `write_auto_captions` also writes it next to the clip, never over a file.
    auto_caption: bool = False
    write_auto_captions: bool = False

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
    eps: float = 1e-8
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

    def for_expert(self, expert: str, name: str, default: float) -> float:
        """`high_noise_<name>` / `low_noise_<name>` when set, else the shared value."""
        value = getattr(self, f"{expert}_{name}", None)
        return default if value is None else value


class TrainConfig(_Model):
    INERT = frozenset(
        {
            "train_unet",
            "cache_text_embeddings",
            "unload_text_encoder",
            "skip_first_sample",
            "disable_sampling",
            "xformers",
            "linear_timesteps",
            "content_or_style",
            "noise_offset",
            "loss_type",
            "ema_config",
            "lr_scheduler",
            "lr_scheduler_params",
            "bypass_guidance_embedding",
            "timestep_bias",
            "do_cfg",
            "force_first_sample",
            "standardize_images",
            "standardize_latents",
        }
    )
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
    optimizer: Literal["adamw", "adamw8bit", "automagic"] = "adamw8bit"
    lr: float = Field(default=1e-4, gt=0)
    optimizer_params: OptimizerParams = OptimizerParams()
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


class ModelKwargs(_Model):
    train_high_noise: bool = True
    train_low_noise: bool = True


class ModelConfig(_Model):
    INERT = frozenset(
        {
            "quantize_te",
            "qtype_te",
            "assistant_lora_path",
            "inference_lora_path",
            "is_flux",
            "is_v3",
        }
    )
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
    # weight-only, qint8/int8 -> int8 weight-only, uint4/int4 -> int4 weight-only (CUDA only). The
    # seed's "uint4|<accuracy recovery adapter>" form is accepted; the adapter part is not applied.
    quantize: bool = False
    qtype: str = "qfloat8"
    low_vram: bool = False
    model_kwargs: ModelKwargs = ModelKwargs()

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


def offloads_inactive_expert(train: TrainConfig, model: ModelConfig) -> bool:
    """Whether the expert not training waits in CPU memory (`train.offload_inactive_expert` or the
    seed's `model.low_vram`)."""
    return train.offload_inactive_expert or model.low_vram


class ProcessConfig(_Model):
    INERT = frozenset({"device", "performance_log_every", "print_every", "low_vram"})
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
    inert: list[str] = []
    process_raw = _strip_inert(process_raw, ProcessConfig, "", inert)
    try:
        process = ProcessConfig.model_validate(process_raw)
    except ValidationError as exc:
        raise ConfigError([*problems, *_describe(exc, ProcessConfig)], source=source) from None
    job = JobConfig(name=name, process=process, meta=meta, source=source)
    job._templates.update(templates)
    base = Path(workdir) if workdir is not None else default_workdir()
    job = _resolve_paths(job, base, problems)
    if problems:
        raise ConfigError(problems, source=source)
    warnings = []
    if inert:
        warnings.append("keys known from ai-toolkit that have no effect here: " + ", ".join(inert))
    return LoadedConfig(job=job, warnings=tuple(warnings))


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


def _strip_inert(raw: Any, model: type[BaseModel], prefix: str, found: list[str]) -> Any:
    """Remove keys that ai-toolkit knows but that do nothing here, recording their paths."""
    if not isinstance(raw, dict):
        return raw
    inert_keys: frozenset[str] = getattr(model, "INERT", frozenset())
    fields = model.model_fields
    out = {}
    for key, value in raw.items():
        if key in inert_keys and key not in fields:
            found.append(prefix + key)
            continue
        field = fields.get(key) or _by_alias(fields, key)
        sub = _submodel(field.annotation) if field is not None else None
        if sub is not None and isinstance(value, list):
            value = [_strip_inert(v, sub, f"{prefix}{key}[{i}].", found) for i, v in enumerate(value)]
        elif sub is not None:
            value = _strip_inert(value, sub, f"{prefix}{key}.", found)
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
        return path, f"unknown key{_suggest(key, choices)}"
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


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(sorted(choices))}"


def _resolve_paths(job: JobConfig, base: Path, problems: list[str]) -> JobConfig:
    """Relative paths are relative to the workdir (docs/architecture.md §8); dataset and validation folders must exist."""
    datasets = []
    for i, ds in enumerate(job.process.datasets):
        folder = _under(base, ds.folder_path)
        if not folder.is_dir():
            problems.append(
                f"datasets[{i}].folder_path: folder {folder} does not exist; "
                "point it at a folder of video clips with caption files"
            )
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


def dump_config(job: JobConfig) -> str:
    """The resolved config as YAML in the ai-toolkit job layout (written as `config.yaml` of a run)."""
    process = job.process.model_dump(mode="json", by_alias=False)
    data = {"job": "extension", "config": {"name": job.name, "process": [process]}}
    if job.meta:
        data["meta"] = job.meta
    return yaml.safe_dump(data, sort_keys=False)
