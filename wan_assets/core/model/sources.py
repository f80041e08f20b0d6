"""Where each part of the Wan 2.2 I2V-A14B model comes from (docs/architecture.md §3.1).

`model.name_or_path` is a diffusers folder or hub id, or the official release folder
(`high_noise_model/`, `low_noise_model/`, `models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth`,
`google/umt5-xxl/`). `model.extras_name_or_path` (ai-toolkit's key) is where the VAE, text encoder,
tokenizer and scheduler come from when not from name_or_path. Each of the four weight-holding parts
can be replaced by a file or folder of its own (`model.high_noise_path`, `model.low_noise_path`,
`model.vae_path`, `model.te_name_or_path`), e.g. ComfyUI's single files; their configs then come
from the root they replace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5Config

from wan_assets.core.config import ModelConfig
from wan_assets.core.model.weights import (
    Part,
    WeightsError,
    check_state,
    expected_state,
    official_transformer_config,
    read_state_dict,
    t5_config_from_weights,
    to_diffusers_names,
    vae_config_from_weights,
)

Component = Literal["high_noise", "low_noise", "vae", "text_encoder"]
COMPONENTS: tuple[Component, ...] = ("high_noise", "low_noise", "vae", "text_encoder")
Layout = Literal["diffusers", "official"]

FILE_KEYS: dict[Component, str] = {
    "high_noise": "model.high_noise_path",
    "low_noise": "model.low_noise_path",
    "vae": "model.vae_path",
    "text_encoder": "model.te_name_or_path",
}
DIFFUSERS_SUBFOLDERS: dict[str, str] = {
    "high_noise": "transformer",
    "low_noise": "transformer_2",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "scheduler": "scheduler",
}
# The official Wan2.2-I2V-A14B release, as `huggingface-cli download Wan-AI/Wan2.2-I2V-A14B` writes it.
OFFICIAL_PATHS: dict[str, str] = {
    "high_noise": "high_noise_model",
    "low_noise": "low_noise_model",
    "vae": "Wan2.1_VAE.pth",
    "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
    "tokenizer": "google/umt5-xxl",
}
PARTS: dict[Component, Part] = {
    "high_noise": "transformer",
    "low_noise": "transformer",
    "vae": "vae",
    "text_encoder": "text_encoder",
}


@dataclass(frozen=True)
class WanSources:
    """The resolved sources of one model: roots (local paths absolute) and per-component files."""

    name_or_path: str
    extras_name_or_path: str
    files: dict[Component, Path] = field(default_factory=dict)

    @classmethod
    def of(cls, source: ModelConfig | WanSources | str | Path) -> WanSources:
        if isinstance(source, WanSources):
            return source
        if not isinstance(source, ModelConfig):
            name = resolve_name(source)
            return cls(name, name)
        name = resolve_name(source.name_or_path)
        extras = resolve_name(source.extras_name_or_path) if source.extras_name_or_path else name
        given: dict[Component, str | None] = {
            "high_noise": source.high_noise_path,
            "low_noise": source.low_noise_path,
            "vae": source.vae_path,
            "text_encoder": source.te_name_or_path,
        }
        files = {c: Path(p).expanduser().resolve() for c, p in given.items() if p is not None}
        return cls(name, extras, files)

    def root(self, part: str) -> str:
        """The root a part comes from when it has no file of its own: experts from name_or_path."""
        return self.name_or_path if part in ("high_noise", "low_noise") else self.extras_name_or_path

    def root_key(self, part: str) -> str:
        if part in ("high_noise", "low_noise") or self.extras_name_or_path == self.name_or_path:
            return "model.name_or_path"
        return "model.extras_name_or_path"

    def layout(self, part: str) -> Layout:
        return root_layout(self.root(part))

    def location(self, part: str) -> tuple[str, str]:
        """(root or file, subfolder) of a part's files: what its cache identity hashes."""
        if part in self.files:
            return str(self.files[part]), ""  # type: ignore[index]
        root = self.root(part)
        if self.layout(part) == "official":
            return root, OFFICIAL_PATHS[part]
        return root, DIFFUSERS_SUBFOLDERS[part]

    def from_diffusers_folder(self, component: Component) -> bool:
        """Whether `from_pretrained` loads it (no file of its own, root in the diffusers layout)."""
        return component not in self.files and self.layout(component) == "diffusers"

    def weights_path(self, component: Component) -> Path:
        if component in self.files:
            return self.files[component]
        return Path(self.root(component)) / OFFICIAL_PATHS[component]

    def where(self, component: Component) -> str:
        """`<config key>: <path>`, the prefix of every message about this component."""
        key = FILE_KEYS[component] if component in self.files else self.root_key(component)
        return f"{key}: {self.weights_path(component)}"

    def describe(self) -> str:
        extra = [f"{FILE_KEYS[c]}={p}" for c, p in self.files.items()]
        return ", ".join([self.name_or_path, *extra])


def resolve_name(name_or_path: str | Path) -> str:
    """Local paths become absolute (diffusers does not expand "~"); hub ids stay as given."""
    name = str(name_or_path)
    return str(Path(name).expanduser().resolve()) if is_local(name) else name


def is_local(name: str) -> bool:
    # A hub id is exactly "owner/name" and not an existing path; anything else is a local folder.
    if Path(name).expanduser().exists():
        return True
    return name.startswith(("/", ".", "~")) or name.count("/") != 1 or "\\" in name


def root_layout(root: str) -> Layout:
    """`official` for a local folder of the Wan release (expert shard folders, no model_index.json)."""
    path = Path(root)
    if not is_local(root) or (path / "model_index.json").is_file():
        return "diffusers"
    experts = (OFFICIAL_PATHS["high_noise"], OFFICIAL_PATHS["low_noise"])
    return "official" if any((path / e).is_dir() for e in experts) else "diffusers"


# --- one component from its weights ------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentWeights:
    """A component's state dict in diffusers / transformers names, with the config it loads into."""

    component: Component
    where: str
    config: dict[str, Any] | UMT5Config
    state: dict[str, torch.Tensor]


def component_weights(
    sources: WanSources, component: Component, *, meta: bool = False, dtype: torch.dtype = torch.float32
) -> ComponentWeights:
    """Read (or, `meta`, only look at) a component that from_pretrained cannot load; WeightsError if
    it is not that component or does not fit its config. fp8_scaled weights come out in `dtype`."""
    where = sources.where(component)
    path = sources.weights_path(component)
    try:
        state = to_diffusers_names(read_state_dict(path, meta=meta), PARTS[component], where, dtype)
    except WeightsError as exc:
        message = str(exc)
        raise WeightsError(message if message.startswith(where) else f"{where}: {message}") from None
    return ComponentWeights(component, where, _config(sources, component, state), state)


def check_component(sources: WanSources, component: Component) -> None:
    """The keys and shapes of a component's file against its config, reading no weights."""
    weights = component_weights(sources, component, meta=True)
    expected = expected_state(PARTS[component], weights.config)
    state = weights.state
    if component == "text_encoder":
        state = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    check_state(expected, state, weights.where)


def _config(sources: WanSources, component: Component, state: dict[str, torch.Tensor]) -> Any:
    part = PARTS[component]
    root = sources.root(component)
    if sources.layout(component) == "diffusers":
        subfolder = DIFFUSERS_SUBFOLDERS[component]
        if part == "text_encoder":
            return UMT5Config.from_pretrained(root, subfolder=subfolder)
        cls = WanTransformer3DModel if part == "transformer" else AutoencoderKLWan
        return dict(cls.load_config(root, subfolder=subfolder))
    if part == "transformer":
        official = _official_expert_config(sources, component)
        return official_transformer_config(official, state)
    if part == "vae":
        return vae_config_from_weights(state)
    return t5_config_from_weights(state)


def _official_expert_config(sources: WanSources, component: Component) -> dict[str, Any]:
    own = sources.files.get(component)
    candidates = [own / "config.json"] if own is not None and own.is_dir() else []
    candidates.append(Path(sources.root(component)) / OFFICIAL_PATHS[component] / "config.json")
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    raise WeightsError(
        f"{sources.where(component)}: no config.json of the expert in the official layout "
        f"(looked at {', '.join(str(p) for p in candidates)})"
    )
