"""The one loader for Wan 2.2 I2V-A14B models (tiny or real), from the weights users have.

Diffusers layout (docs/architecture.md §3): `transformer/` = high-noise expert, `transformer_2/` =
low-noise expert, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`, `model_index.json` (which holds
boundary_ratio); loaded by `from_pretrained`. The official release folder and per-part files
(ComfyUI's single files, fp8_scaled included) come in through model/sources.py and model/weights.py
(§3.1) and end as the same modules.
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
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanTransformer3DModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import AutoTokenizer, PreTrainedTokenizerBase, UMT5EncoderModel

from wan_assets.core.config import ModelConfig
from wan_assets.core.experts import (
    EXPERT_SUBFOLDERS,
    EXPERTS,
    I2V_BOUNDARY_RATIO,
    Expert,
    boundary_timestep,
    check_expert,
)
from wan_assets.core.model.sources import (
    COMPONENTS,
    DIFFUSERS_SUBFOLDERS,
    FILE_KEYS,
    OFFICIAL_PATHS,
    WanSources,
    check_component,
    component_weights,
    is_local,
    resolve_name,
    root_layout,
)
from wan_assets.core.model.tiny import SCHEDULER
from wan_assets.core.model.weights import WeightsError, build_text_encoder, build_transformer, build_vae

PIPELINE_CLASS = "WanImageToVideoPipeline"
# The official release has no scheduler config: Wan 2.2 I2V-A14B samples with UniPC, flow shift 5.0.
OFFICIAL_SCHEDULER = ("diffusers", "UniPCMultistepScheduler")

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
    source: str | Path | ModelConfig | WanSources,
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

    `source` is a diffusers folder / hub id / official release folder, or a run's `model` config with
    per-part files (model/sources.py). `dtype` applies to the experts and the text encoder; the VAE
    gets `vae_dtype` (float32 by default, as diffusers' Wan examples run it). LoRA adapters added
    later are the only trainable parameters. `training=True` refuses attention backends that cannot
    run backward. Experts not named in `load_experts` (and the text encoder / VAE when switched off)
    are None in the result.
    """
    dispatcher_backend = resolve_attention_backend(attention_backend, training=training)
    experts = tuple(dict.fromkeys(check_expert(e) for e in load_experts))
    sources = WanSources.of(source)
    index = model_index(sources)
    _require_roots(
        sources, (*experts, *(["text_encoder"] if load_text_encoder else []), *(["vae"] if load_vae else []))
    )
    transformers = {e: _load_expert(sources, e, dtype, device, dispatcher_backend) for e in experts}
    return WanComponents(
        name_or_path=sources.describe(),
        boundary_ratio=float(index["boundary_ratio"]),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        scheduler=_load_scheduler(sources, index),
        tokenizer=_load_tokenizer(sources) if load_text_encoder else None,
        text_encoder=_load_text_encoder(sources, dtype, device) if load_text_encoder else None,
        vae=_load_vae(sources, vae_dtype, device) if load_vae else None,
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
    name_or_path = resolve_name(name_or_path)
    if is_local(name_or_path):
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


def model_index(sources: WanSources) -> dict[str, Any]:
    """model_index.json of the extras root; the official release's values (wan/configs) for its layout."""
    root = sources.extras_name_or_path
    if root_layout(root) == "official":
        return {
            "boundary_ratio": I2V_BOUNDARY_RATIO,
            "expand_timesteps": False,
            "scheduler": OFFICIAL_SCHEDULER,
        }
    return read_model_index(root)


def source_problems(source: str | Path | ModelConfig | WanSources) -> list[str]:
    """What `load_wan_model` would refuse for the whole model, one line per problem, naming the
    config key and path (before any work; part files are checked by their keys and shapes)."""
    sources = WanSources.of(source)
    problems = []
    for key, root in {sources.root_key(c): sources.root(c) for c in ("high_noise", "scheduler")}.items():
        try:
            if root_layout(root) == "diffusers":
                read_model_index(root)
        except (FileNotFoundError, ValueError) as exc:
            problems.append(f"{key}: {exc}")
    if problems:
        return problems
    try:
        _require_roots(sources, COMPONENTS)
    except FileNotFoundError as exc:
        return [str(exc)]  # part files take their configs from the roots
    for component in COMPONENTS:
        if sources.from_diffusers_folder(component):
            continue  # from_pretrained checks its own folders
        try:
            check_component(sources, component)
        except (WeightsError, OSError) as exc:
            problems.append(str(exc))
    return problems


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


_PART_ORDER = ("scheduler", "high_noise", "low_noise", "tokenizer", "text_encoder", "vae")


def _require_roots(sources: WanSources, components: Iterable[str]) -> None:
    """Every folder or file the requested parts need from their roots, and their own files.

    A diffusers root keeps the config of a part that has its own file, so it still needs that part's
    subfolder; an official root does not. Hub repos report missing files through diffusers.
    """
    wanted = {*components, "scheduler", *(["tokenizer"] if "text_encoder" in components else [])}
    for root in dict.fromkeys((sources.name_or_path, sources.extras_name_or_path)):
        parts = [p for p in _PART_ORDER if p in wanted and sources.root(p) == root]
        if parts:
            _require_parts(sources, root, sources.root_key(parts[-1]), parts)
    for component, path in sources.files.items():
        if component in wanted and not path.exists():
            raise FileNotFoundError(f"{FILE_KEYS[component]}: {path} does not exist")


def _require_parts(sources: WanSources, root: str, key: str, parts: list[str]) -> None:
    if not is_local(root):
        return
    path = Path(root)
    if root_layout(root) == "official":
        needed = [OFFICIAL_PATHS[p] for p in parts if p != "scheduler" and p not in sources.files]
        missing = [n for n in needed if not (path / n).exists()]
        if missing:
            raise FileNotFoundError(
                f"{key}: model folder {path} (the official Wan 2.2 release layout) lacks "
                f"{', '.join(missing)}; give the missing parts their own files "
                f"({', '.join(FILE_KEYS.values())}) or download them"
            )
        return
    if not path.is_dir():
        raise FileNotFoundError(f"{key}: model folder {path} does not exist")
    missing = [DIFFUSERS_SUBFOLDERS[p] for p in parts if not (path / DIFFUSERS_SUBFOLDERS[p]).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{key}: model folder {path} lacks {', '.join(f'{s}/' for s in missing)}; a Wan 2.2 I2V-A14B "
            "folder needs transformer/ (high noise), transformer_2/ (low noise), vae/, text_encoder/, "
            "tokenizer/ and scheduler/"
        )


def _load_scheduler(sources: WanSources, index: dict[str, Any]) -> SchedulerMixin:
    root = sources.extras_name_or_path
    if root_layout(root) == "official":
        return UniPCMultistepScheduler(**SCHEDULER)
    # The class comes from model_index.json, as DiffusionPipeline.from_pretrained does it.
    library, class_name = index.get("scheduler", ("diffusers", "UniPCMultistepScheduler"))
    scheduler_cls: Any = getattr(diffusers, class_name, None) if library == "diffusers" else None
    if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, SchedulerMixin)):
        raise ValueError(
            f"model {root!r}: model_index.json names an unknown scheduler {library}.{class_name}"
        )
    # diffusers reads as Any to mypy (pyproject), so the issubclass check above narrows only to `type`.
    return scheduler_cls.from_pretrained(root, subfolder="scheduler")  # type: ignore[attr-defined]


def _load_tokenizer(sources: WanSources) -> PreTrainedTokenizerBase:
    root, subfolder = sources.location("tokenizer")
    if root_layout(root) == "official":
        return AutoTokenizer.from_pretrained(Path(root) / subfolder)
    return AutoTokenizer.from_pretrained(root, subfolder=subfolder)


def _load_expert(
    sources: WanSources,
    expert: Expert,
    dtype: torch.dtype,
    device: str | torch.device,
    attention_backend: str,
) -> WanTransformer3DModel:
    if sources.from_diffusers_folder(expert):
        model = WanTransformer3DModel.from_pretrained(
            sources.name_or_path, subfolder=EXPERT_SUBFOLDERS[expert], torch_dtype=dtype
        )
    else:
        weights = component_weights(sources, expert, dtype=dtype)
        model = build_transformer(weights.config, weights.state, dtype, weights.where)  # type: ignore[arg-type]
    _set_attention_backend(model, attention_backend)
    return _frozen(model, device)


def _load_text_encoder(
    sources: WanSources, dtype: torch.dtype, device: str | torch.device
) -> UMT5EncoderModel:
    if sources.from_diffusers_folder("text_encoder"):
        model = UMT5EncoderModel.from_pretrained(
            sources.extras_name_or_path, subfolder="text_encoder", dtype=dtype
        )
    else:
        weights = component_weights(sources, "text_encoder", dtype=dtype)
        model = build_text_encoder(weights.config, weights.state, dtype, weights.where)  # type: ignore[arg-type]
    return _frozen(model, device)


def _load_vae(sources: WanSources, dtype: torch.dtype, device: str | torch.device) -> AutoencoderKLWan:
    if sources.from_diffusers_folder("vae"):
        model = AutoencoderKLWan.from_pretrained(
            sources.extras_name_or_path, subfolder="vae", torch_dtype=dtype
        )
    else:
        weights = component_weights(sources, "vae", dtype=dtype)
        model = build_vae(weights.config, weights.state, dtype, weights.where)  # type: ignore[arg-type]
    return _frozen(model, device)


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


def _importable(module: str) -> bool:
    # A package can be installed yet fail to import (CUDA/ABI mismatch); only a real import proves it.
    try:
        importlib.import_module(module)
    except (ImportError, OSError, RuntimeError):
        return False
    return True
