"""The one loader for Wan 2.2 I2V-A14B models in the diffusers layout (tiny or real, folder or hub id).

Layout (docs/architecture.md §3): `transformer/` = high-noise expert, `transformer_2/` = low-noise expert,
`vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json` (which holds boundary_ratio).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import torch
from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from wan_assets.core.experts import (
    EXPERT_SUBFOLDERS,
    EXPERTS,
    Expert,
    boundary_timestep,
    check_expert,
)

PIPELINE_CLASS = "WanImageToVideoPipeline"

M = TypeVar("M", bound=torch.nn.Module)

# User-facing backend name -> diffusers attention-dispatcher backend (AttentionBackendName value).
ATTENTION_BACKENDS: dict[str, str] = {
    "sdpa": "native",  # torch scaled_dot_product_attention, picks its own kernel
    "native": "native",
    "cudnn": "_native_cudnn",  # sdpa forced onto the cuDNN kernel (fast on H100)
    "flash": "flash",  # flash-attn 2 package
    "sage": "sage",  # sageattention package, forward only
}
# Backends whose kernels have no backward pass: fine for sampling, useless for training.
INFERENCE_ONLY_BACKENDS = frozenset({"sage"})
# Backends that need an extra package, and the module that proves it is usable.
BACKEND_PACKAGES: dict[str, str] = {"flash": "flash_attn", "sage": "sageattention"}


@dataclass(frozen=True)
class WanComponents:
    """The parts of a Wan 2.2 I2V-A14B model; parts not requested at load time are None."""

    name_or_path: str
    boundary_ratio: float  # from model_index.json: I2V 0.9, i.e. boundary timestep 900
    expand_timesteps: bool
    scheduler: SchedulerMixin
    tokenizer: PreTrainedTokenizerBase | None
    text_encoder: UMT5EncoderModel | None
    vae: AutoencoderKLWan | None
    transformer_high: WanTransformer3DModel | None  # `transformer/`, t in (boundary, 1000]
    transformer_low: WanTransformer3DModel | None  # `transformer_2/`, t in [0, boundary]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def boundary_timestep(self) -> float:
        return boundary_timestep(self.boundary_ratio, self.num_train_timesteps)

    @property
    def loaded_experts(self) -> tuple[Expert, ...]:
        return tuple(e for e in EXPERTS if self._expert_or_none(e) is not None)

    def expert(self, name: str) -> WanTransformer3DModel:
        """The transformer of expert `name`; a clear error if it was not loaded."""
        model = self._expert_or_none(check_expert(name))
        if model is None:
            raise ValueError(
                f"expert {name!r} was not loaded from {self.name_or_path}; pass it in load_experts"
            )
        return model

    def build_pipeline(self) -> WanImageToVideoPipeline:
        """A WanImageToVideoPipeline over these components (needs both experts, text encoder and VAE)."""
        missing = [name for name, part in self._pipeline_parts().items() if part is None]
        if missing:
            raise ValueError(
                f"cannot build a WanImageToVideoPipeline from {self.name_or_path}: {', '.join(missing)} "
                "not loaded; load them with load_wan_model(..., load_experts=EXPERTS, "
                "load_text_encoder=True, load_vae=True)"
            )
        return WanImageToVideoPipeline(
            **self._pipeline_parts(),
            scheduler=self.scheduler,
            boundary_ratio=self.boundary_ratio,
            expand_timesteps=self.expand_timesteps,
        )

    def _expert_or_none(self, expert: Expert) -> WanTransformer3DModel | None:
        return self.transformer_high if expert == "high_noise" else self.transformer_low

    def _pipeline_parts(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer,
            "text_encoder": self.text_encoder,
            "vae": self.vae,
            "transformer": self.transformer_high,
            "transformer_2": self.transformer_low,
        }


def load_wan_model(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention_backend: str = "sdpa",
    training: bool = False,
    load_experts: Iterable[str] = EXPERTS,
    load_text_encoder: bool = True,
    load_vae: bool = True,
    vae_dtype: torch.dtype = torch.float32,
) -> WanComponents:
    """Load the requested parts of a Wan 2.2 I2V-A14B model, frozen (requires_grad off), in eval mode.

    `dtype` applies to the experts and the text encoder; the VAE gets `vae_dtype` (float32 by default,
    as diffusers' Wan examples run it). LoRA adapters added later are the only trainable parameters.
    `training=True` refuses attention backends that cannot run backward. Experts not named in
    `load_experts` (and the text encoder / VAE when switched off) are None in the result.
    """
    dispatcher_backend = resolve_attention_backend(attention_backend, training=training)
    experts = tuple(dict.fromkeys(check_expert(e) for e in load_experts))
    name = _resolve_name(name_or_path)
    index = read_model_index(name)
    _require_subfolders(name, _needed_subfolders(experts, load_text_encoder, load_vae))
    transformers = {e: _load_expert(name, e, dtype, device, dispatcher_backend) for e in experts}
    return WanComponents(
        name_or_path=name,
        boundary_ratio=float(index["boundary_ratio"]),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        scheduler=_load_scheduler(name, index),
        tokenizer=AutoTokenizer.from_pretrained(name, subfolder="tokenizer") if load_text_encoder else None,
        text_encoder=_load_text_encoder(name, dtype, device) if load_text_encoder else None,
        vae=_load_vae(name, vae_dtype, device) if load_vae else None,
        transformer_high=transformers.get("high_noise"),
        transformer_low=transformers.get("low_noise"),
    )


def resolve_attention_backend(name: str, *, training: bool) -> str:
    """Map a user backend name to diffusers' dispatcher name, or raise one clear error."""
    key = name.strip().lower()
    if key not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; valid backends: {', '.join(sorted(ATTENTION_BACKENDS))}"
        )
    if training and key in INFERENCE_ONLY_BACKENDS:
        raise ValueError(
            f"attention backend {name!r} is inference-only: its kernels have no backward pass, so it "
            "cannot train; use 'sdpa' (or 'flash') for training and keep 'sage' for sampling"
        )
    package = BACKEND_PACKAGES.get(key)
    if package is not None and not _importable(package):
        raise ValueError(
            f"attention backend {name!r} needs the {package!r} package, which cannot be imported here; "
            f"install it (pip install {package.replace('_', '-')}) or use attention_backend 'sdpa'"
        )
    return ATTENTION_BACKENDS[key]


def read_model_index(name_or_path: str | Path) -> dict[str, Any]:
    """model_index.json of a local folder or hub repo, checked to be a two-expert Wan 2.2 I2V model."""
    name_or_path = _resolve_name(name_or_path)
    if _is_local(name_or_path):
        _require_model_index(Path(name_or_path))
    try:
        index = dict(WanImageToVideoPipeline.load_config(name_or_path))
    except OSError as err:  # hub id that is unreachable or does not exist
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local folder nor a reachable Hugging Face Hub repo "
            f"with a model_index.json ({err.__class__.__name__}); check the path or the network"
        ) from None
    _check_index(name_or_path, index)
    return index


def check_model_layout(name_or_path: str | Path) -> None:
    """Raise the error `load_wan_model` would for a model it cannot load whole (before any work)."""
    name = _resolve_name(name_or_path)
    read_model_index(name)
    _require_subfolders(name, _needed_subfolders(EXPERTS, text_encoder=True, vae=True))


def _require_model_index(root: Path) -> None:
    expected = (
        "expected a Wan 2.2 I2V-A14B folder in the diffusers layout "
        "(the tiny one: `wan-assets tiny-model DIR`)"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {root} does not exist; {expected}")
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"model folder {root} has no model_index.json; {expected}")


def _check_index(name_or_path: str, index: dict[str, Any]) -> None:
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(
            f"model {name_or_path!r} is a {index.get('_class_name')!r}, expected {PIPELINE_CLASS!r} "
            "(Wan 2.2 I2V-A14B in the diffusers layout)"
        )
    if index.get("boundary_ratio") is None:
        raise ValueError(
            f"model {name_or_path!r} has no boundary_ratio in model_index.json: it is a one-expert "
            "Wan model, not the two-expert Wan 2.2 I2V-A14B this project trains"
        )


def _needed_subfolders(experts: tuple[Expert, ...], text_encoder: bool, vae: bool) -> list[str]:
    folders = ["scheduler", *(EXPERT_SUBFOLDERS[e] for e in experts)]
    if text_encoder:
        folders += ["tokenizer", "text_encoder"]
    if vae:
        folders.append("vae")
    return folders


def _require_subfolders(name_or_path: str, subfolders: list[str]) -> None:
    # Only checkable for local folders; hub repos report missing files through diffusers.
    if not _is_local(name_or_path):
        return
    root = Path(name_or_path).expanduser()
    missing = [s for s in subfolders if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model folder {root} lacks {', '.join(f'{s}/' for s in missing)}; a Wan 2.2 I2V-A14B "
            "folder needs transformer/ (high noise), transformer_2/ (low noise), vae/, text_encoder/, "
            "tokenizer/ and scheduler/"
        )


def _load_scheduler(name: str, index: dict[str, Any]) -> SchedulerMixin:
    # The class comes from model_index.json, as DiffusionPipeline.from_pretrained does it.
    library, class_name = index.get("scheduler", ("diffusers", "UniPCMultistepScheduler"))
    scheduler_cls: Any = getattr(diffusers, class_name, None) if library == "diffusers" else None
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
        raise ValueError(
            f"model {name!r}: model_index.json names an unknown scheduler {library}.{class_name}"
        )
    # diffusers reads as Any to mypy (pyproject), so the issubclass check above narrows only to `type`.
    return scheduler_cls.from_pretrained(name, subfolder="scheduler")  # type: ignore[attr-defined]


def _load_expert(
    name: str, expert: Expert, dtype: torch.dtype, device: str | torch.device, attention_backend: str
) -> WanTransformer3DModel:
    model = WanTransformer3DModel.from_pretrained(
        name, subfolder=EXPERT_SUBFOLDERS[expert], torch_dtype=dtype
    )
    _set_attention_backend(model, attention_backend)
    return _frozen(model, device)


def _load_text_encoder(name: str, dtype: torch.dtype, device: str | torch.device) -> UMT5EncoderModel:
    return _frozen(UMT5EncoderModel.from_pretrained(name, subfolder="text_encoder", dtype=dtype), device)


def _load_vae(name: str, dtype: torch.dtype, device: str | torch.device) -> AutoencoderKLWan:
    return _frozen(AutoencoderKLWan.from_pretrained(name, subfolder="vae", torch_dtype=dtype), device)


def _set_attention_backend(model: WanTransformer3DModel, backend: str) -> None:
    # diffusers logs "experimental feature" on every call; the choice here is deliberate, so keep the
    # log for things that need attention.
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        model.set_attention_backend(backend)
    finally:
        log.setLevel(level)


def _frozen(model: M, device: str | torch.device) -> M:
    model.requires_grad_(False)
    return model.to(device).eval()


def _resolve_name(name_or_path: str | Path) -> str:
    # Local folders become absolute paths (diffusers does not expand "~"); hub ids stay as given.
    name = str(name_or_path)
    return str(Path(name).expanduser().resolve()) if _is_local(name) else name


def _is_local(name: str) -> bool:
    # A hub id is exactly "owner/name" and not an existing path; anything else is a local folder.
    if Path(name).expanduser().exists():
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or "\\" in name


def _importable(module: str) -> bool:
    # A package can be installed yet fail to import (CUDA/ABI mismatch); only a real import proves it.
    try:
        importlib.import_module(module)
    except (ImportError, OSError, RuntimeError):
        return False
    return True
