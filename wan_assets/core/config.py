"""The ai-toolkit job format, parsed once into typed, frozen models.

Users bring their ai-toolkit YAML files as they are. Every key is either understood (a field below),
known from ai-toolkit but without effect here (listed in one warning), or a mistake (an error that
names the key path and the closest valid key). Nothing downstream reads raw dicts.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wan_assets.core.experts import EXPERTS


class ConfigError(ValueError):
    """A user mistake in a config file: the message says what, where and how to fix it."""


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

    def phases_for(self, expert: str) -> list[tuple[str, PhaseConfig]]:
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
    resolution: list[int] = Field(default_factory=lambda: [512])
    max_pixels_per_frame: int | None = Field(default=None, gt=0)
    bucket_no_upscale: bool = True
    num_frames: int = 33
    shrink_video_to_frames: bool = True
    fps: float = Field(default=16.0, gt=0)
    start_frame: int = Field(default=0, ge=0)
    temporal_jitter: int = Field(default=0, ge=0)
    cache_variants: int | None = Field(default=None, ge=1)
    do_i2v: bool = True
    validation_split: float = Field(default=0.0, ge=0, lt=1)

    @field_validator("caption_ext")
    @classmethod
    def _dotted(cls, ext: str) -> str:
        return ext if ext.startswith(".") else f".{ext}"

    @field_validator("num_frames")
    @classmethod
    def _four_k_plus_one(cls, n: int) -> int:
        if n < 1 or (n - 1) % 4:
            lower, upper = max(1, (n - 1) // 4 * 4 + 1), ((n - 1) // 4 + 1) * 4 + 1
            raise ValueError(
                f"num_frames must be 4k+1 (the Wan VAE compresses time 4x), got {n}; use {lower} or {upper}"
            )
        return n

    @model_validator(mode="after")
    def _i2v_only(self) -> DatasetConfig:
        if not self.do_i2v:
            raise ValueError("do_i2v: false is not supported; this project trains Wan 2.2 image-to-video")
        return self

    @property
    def num_cache_variants(self) -> int:
        """Jitter is made cacheable by caching a few deterministic variants per clip."""
        if self.cache_variants is not None:
            return self.cache_variants
        return 4 if self.temporal_jitter > 0 else 1


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


class EmaConfig(_Model):
    use_ema: bool = False
    ema_decay: float = 0.99


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
            "extras_name_or_path",
            "assistant_lora_path",
            "inference_lora_path",
            "is_flux",
            "is_v3",
        }
    )
    name_or_path: str
    arch: Literal["wan22_14b_i2v"] = "wan22_14b_i2v"
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
    """Held-out evaluation (DESIGN 6): fixed timestep quantiles inside each expert's window."""

    folder_path: Path | None = None
    timestep_quantiles: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    seed: int = 1234
    num_samples: int = Field(default=1, ge=0)


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


class JobConfig(_Model):
    """A whole job file: `job: extension`, `config.name`, one process, optional `meta`."""

    name: str
    process: ProcessConfig
    meta: dict[str, Any] = Field(default_factory=dict)
    source: Path | None = None

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


def load_config(path: str | Path, workdir: str | Path | None = None) -> LoadedConfig:
    """Read, substitute, validate and resolve one job file. Raises ConfigError for user mistakes."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(raw, source=path, workdir=workdir)


def parse_config(raw: Any, *, source: Path | None = None, workdir: str | Path | None = None) -> LoadedConfig:
    where = f"{source}: " if source else ""
    process_raw, name, meta = _unwrap_job(raw, where)
    process_raw = _substitute(process_raw, name, where)
    meta = _substitute(meta, name, where)
    inert: list[str] = []
    process_raw = _strip_inert(process_raw, ProcessConfig, "", inert)
    try:
        process = ProcessConfig.model_validate(process_raw)
    except ValidationError as exc:
        raise ConfigError(where + _describe(exc, ProcessConfig)) from None
    job = JobConfig(name=name, process=process, meta=meta, source=source)
    job = _resolve_paths(job, workdir, where)
    warnings = []
    if inert:
        warnings.append("keys known from ai-toolkit that have no effect here: " + ", ".join(inert))
    return LoadedConfig(job=job, warnings=tuple(warnings))


def _unwrap_job(raw: Any, where: str) -> tuple[dict, str, dict]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}expected a mapping with `job:` and `config:` at the top")
    unknown = set(raw) - {"job", "config", "meta"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}{key}: unknown key{_suggest(key, ['job', 'config', 'meta'])}")
    if raw.get("job", "extension") != "extension":
        raise ConfigError(f"{where}job: only `extension` jobs are supported, got {raw.get('job')!r}")
    config = raw.get("config")
    if not isinstance(config, dict) or "name" not in config or "process" not in config:
        raise ConfigError(f"{where}config: needs `name` and a `process` list")
    extra = set(config) - {"name", "process"}
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(f"{where}config.{key}: unknown key{_suggest(key, ['name', 'process'])}")
    processes = config["process"]
    if not isinstance(processes, list) or len(processes) != 1 or not isinstance(processes[0], dict):
        raise ConfigError(f"{where}config.process: expected exactly one process (a list with one mapping)")
    return processes[0], str(config["name"]), dict(raw.get("meta") or {})


def _substitute(value: Any, name: str, where: str) -> Any:
    """`[name]` -> the job name and `${VAR}` -> the environment, in every string, as ai-toolkit does."""
    if isinstance(value, str):

        def env(match: re.Match) -> str:
            var = match.group(1)
            if var not in os.environ:
                raise ConfigError(f"{where}environment variable {var} is not set (used as ${{{var}}})")
            return os.environ[var]

        return _ENV.sub(env, value.replace("[name]", name))
    if isinstance(value, dict):
        return {k: _substitute(v, name, where) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, name, where) for v in value]
    return value


def _strip_inert(raw: Any, model: type[BaseModel], prefix: str, found: list[str]) -> Any:
    """Remove keys that ai-toolkit knows but that do nothing here, recording their paths."""
    if not isinstance(raw, dict):
        return raw
    inert_keys = getattr(model, "INERT", frozenset())
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


def _describe(exc: ValidationError, root: type[BaseModel]) -> str:
    """The first validation error as one line: key path, what is wrong, the closest valid key."""
    err = exc.errors()[0]
    loc = [p for p in err["loc"] if p not in ("function-after",)]
    path = _format_loc(loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        choices = list(parent.model_fields) if parent else []
        return f"{path}: unknown key{_suggest(str(loc[-1]), choices)}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg}" if path else msg


def _format_loc(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(root: type[BaseModel], loc: list) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            # A dict-valued field (phases by name): the key is user data, stay on the value model.
            continue
        model = _submodel(field.annotation)
    return model


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(sorted(choices))}"


def _resolve_paths(job: JobConfig, workdir: str | Path | None, where: str) -> JobConfig:
    """Relative folders are relative to the workdir (DESIGN 8); dataset folders must exist."""
    base = Path(workdir) if workdir is not None else default_workdir()
    datasets = []
    for i, ds in enumerate(job.process.datasets):
        folder = ds.folder_path if ds.folder_path.is_absolute() else base / ds.folder_path
        if not folder.is_dir():
            raise ConfigError(
                f"{where}datasets[{i}].folder_path: folder {folder} does not exist; "
                "point it at a folder of video clips with caption files"
            )
        datasets.append(ds.model_copy(update={"folder_path": folder.resolve()}))
    training_folder = job.process.training_folder
    if not training_folder.is_absolute():
        training_folder = base / training_folder
    validation = job.process.validation
    if validation.folder_path is not None and not validation.folder_path.is_absolute():
        validation = validation.model_copy(update={"folder_path": (base / validation.folder_path).resolve()})
    if validation.folder_path is not None and not validation.folder_path.is_dir():
        raise ConfigError(f"{where}validation.folder_path: folder {validation.folder_path} does not exist")
    model = job.process.model
    if _is_workdir_relative(model.name_or_path, base):
        model = model.model_copy(update={"name_or_path": str((base / model.name_or_path).resolve())})
    process = job.process.model_copy(
        update={
            "datasets": datasets,
            "training_folder": training_folder.resolve(),
            "validation": validation,
            "model": model,
        }
    )
    return job.model_copy(update={"process": process})


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
    """`$WAN_ASSETS_HOME`, else `./.wan_assets` (DESIGN 8)."""
    return Path(os.environ.get("WAN_ASSETS_HOME") or ".wan_assets").resolve()


def dump_config(job: JobConfig) -> str:
    """The resolved config as YAML in the ai-toolkit job layout (written as `config.yaml` of a run)."""
    process = job.process.model_dump(mode="json", by_alias=False)
    data = {"job": "extension", "config": {"name": job.name, "process": [process]}}
    if job.meta:
        data["meta"] = job.meta
    return yaml.safe_dump(data, sort_keys=False)
