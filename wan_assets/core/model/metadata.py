"""What an exported LoRA says about itself (docs/architecture.md §5.1): the conventions LoRA tools read.

- `modelspec.*`: Stability's model spec 1.0 (sai_model_spec), as kohya's sd-scripts and musubi-tuner
  write it: architecture `<base>/lora`, implementation, title, date, resolution, trigger phrase,
  timestep range (the expert's window).
- kohya `ss_*` keys that apply to a Wan expert LoRA: base model, network module / dim / alpha / args,
  steps, resolution, frames, datasets, learning rate, optimizer, seed, and hashes of the data (the
  latent index) and of the embedded config.
- `wan_assets.*`: what only this project knows (expert, trained alpha, the public config).

The embedded config is the run's config with every local path and every `${VAR}` value replaced:
a file posted publicly shows the keys as written (`${DATA}/clips`) or a neutral placeholder
(`<datasets[0].folder_path>`), never the machine's paths or the environment's values.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from wan_assets.core.config import MODEL_FILE_KEYS, JobConfig, ProcessConfig, dump_config

ARCHITECTURE = "wan2.2-i2v-14b"  # modelspec id of Wan 2.2 I2V-A14B (musubi writes "wan2.1" for every Wan)
IMPLEMENTATION = "https://github.com/Wan-Video/Wan2.2"
BASE_MODEL_VERSION = "wan22_14b_i2v"  # ai-toolkit's arch name
# Module names LoRA tools know: kohya's LoRA, LyCORIS's wrapper (algo in ss_network_args).
NETWORK_MODULES = {"lora": "networks.lora", "lokr": "lycoris.kohya"}
LOKR_NOTE = (
    "LoKr (LyCORIS) adapter: loads in ComfyUI (LoraLoaderModelOnly) and LyCORIS. diffusers' "
    "load_lora_weights reads LoRA files only; in diffusers use "
    "wan_assets.core.model.lora.load_adapter_file(pipe.transformer, path)."
)
_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/])")


@dataclass(frozen=True)
class LoraFacts:
    """What the trainer knows about one exported file beyond the config."""

    expert: str
    step: int
    alpha: float  # the alpha the file's `.alpha` tensors carry (scale = alpha / dim)
    trained_alpha: float  # the alpha in force in training (differs for full-rank LoKr, see lora.py)
    timestep_range: tuple[int, int]  # the expert's window
    dataset_hash: str  # LatentIndex.identity() of the data trained on
    resolution: int  # side of the square with the largest per-frame pixel budget of the datasets


def lora_metadata(job: JobConfig, facts: LoraFacts) -> dict[str, str]:
    """The safetensors metadata of one exported expert LoRA (all values strings)."""
    process, network, train = job.process, job.process.network, job.process.train
    config = public_config(job)
    resolution = facts.resolution
    frames = max(d.num_frames for d in process.datasets)
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURE}/lora",
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": f"{job.name} ({facts.expert.replace('_', ' ')} expert)",
        "modelspec.date": datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.timestep_range": f"{facts.timestep_range[0]},{facts.timestep_range[1]}",
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_sd_model_name": public_model_name(process.model.name_or_path),
        "ss_output_name": job.name,
        "ss_network_module": NETWORK_MODULES[network.type],
        "ss_network_dim": str(network.linear),
        "ss_network_alpha": _number(facts.alpha),
        "ss_network_dropout": _number(network.dropout),
        "ss_steps": str(facts.step),
        "ss_max_train_steps": str(train.steps),
        "ss_learning_rate": _number(train.lr),
        "ss_optimizer": train.optimizer,
        "ss_seed": str(train.seed),
        "ss_mixed_precision": train.dtype,
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation),
        "ss_timestep_sampling": train.timestep_type,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_frames": str(frames),
        "ss_datasets": json.dumps([_dataset(d) for d in process.datasets]),
        "ss_dataset_hash": facts.dataset_hash,
        "ss_config_hash": hashlib.sha256(config.encode()).hexdigest(),
        "wan_assets.expert": facts.expert,
        "wan_assets.trained_alpha": _number(facts.trained_alpha),
        "wan_assets.config": config,
    }
    if network.type == "lokr":
        args = {
            "algo": "lokr",
            "factor": str(network.lokr_factor),
            "full_matrix": str(network.lokr_full_rank),
        }
        metadata["ss_network_args"] = json.dumps(args)
        metadata["modelspec.description"] = LOKR_NOTE
    if process.trigger_word:
        metadata["modelspec.trigger_phrase"] = process.trigger_word
        metadata["modelspec.usage_hint"] = f"Use the trigger phrase {process.trigger_word!r} in the prompt."
    return metadata


def public_config(job: JobConfig) -> str:
    """The run's config as YAML for a shared file: `${VAR}` values written back as the variables, local
    paths replaced by `<key>` placeholders; hub ids and everything else as they are."""
    data = yaml.safe_load(dump_config(job))
    process = data["config"]["process"][0]
    templates = job.templates
    for path, template in templates.items():
        root, _, rest = path.partition(".") if path.startswith("meta.") else ("", "", path)
        _set(data.get("meta", {}) if root == "meta" else process, rest, template)
    for key, value in _path_fields(process):
        if isinstance(value, str) and _ABSOLUTE.match(value):
            _set(process, key, f"<{key}>")
    values = _variable_values(templates)
    return yaml.safe_dump(_scrub(data, values), sort_keys=False)


def public_model_name(name_or_path: str) -> str:
    """A hub id as it is; a local folder by its name only."""
    return Path(name_or_path).name if _ABSOLUTE.match(name_or_path) else name_or_path


def _path_fields(process: dict[str, Any]) -> list[tuple[str, Any]]:
    fields: list[tuple[str, Any]] = [("training_folder", process.get("training_folder"))]
    fields += [
        (f"datasets[{i}].folder_path", d.get("folder_path")) for i, d in enumerate(process["datasets"])
    ]
    fields.append(("validation.folder_path", (process.get("validation") or {}).get("folder_path")))
    model = process["model"]
    fields += [
        (f"model.{k}", model.get(k)) for k in ("name_or_path", "extras_name_or_path", *MODEL_FILE_KEYS)
    ]
    samples = (process.get("sample") or {}).get("samples") or []
    fields += [(f"sample.samples[{i}].ctrl_img", s.get("ctrl_img")) for i, s in enumerate(samples)]
    return fields


def _aliases(model: type[BaseModel] = ProcessConfig) -> dict[str, str]:
    """ai-toolkit spellings of fields (`gradient_accumulation_steps`) -> the names the dump uses."""
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        if info.alias:
            out[info.alias] = name
        stack = [info.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                out |= _aliases(annotation)
            stack += list(typing.get_args(annotation))
    return out


def _set(tree: dict[str, Any], path: str, value: str) -> None:
    """Set `a.b[0].c` in nested dicts/lists, keys written under an alias included."""
    aliases = _aliases()
    parts = [aliases.get(p, p) for p in re.split(r"\.|(\[\d+\])", path) if p]
    node: Any = tree
    for part in parts[:-1]:
        node = (
            node[int(part[1:-1])]
            if part.startswith("[")
            else node.get(part)
            if isinstance(node, dict)
            else None
        )
        if node is None:
            return
    last = parts[-1]
    if last.startswith("[") and isinstance(node, list):
        node[int(last[1:-1])] = value
    elif isinstance(node, dict) and last in node:
        node[last] = value


def _variable_values(templates: dict[str, str]) -> dict[str, str]:
    """Environment values that were substituted (value -> `${VAR}`), longest first."""
    import os

    names = {m for t in templates.values() for m in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", t)}
    values = {os.environ[n]: f"${{{n}}}" for n in names if len(os.environ.get(n, "")) >= 3}
    return dict(sorted(values.items(), key=lambda kv: -len(kv[0])))


def _scrub(value: Any, values: dict[str, str]) -> Any:
    """Any variable value left (a key written under an alias) back to its variable; any other absolute
    path to a placeholder."""
    if isinstance(value, dict):
        return {k: _scrub(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, values) for v in value]
    if isinstance(value, str):
        for secret, variable in values.items():
            value = value.replace(secret, variable)
        return "<path>" if _ABSOLUTE.match(value) else value
    return value


def _dataset(dataset: Any) -> dict[str, Any]:
    return {
        "resolution": dataset.resolution,
        "max_pixels_per_frame": dataset.max_pixels_per_frame,
        "num_frames": dataset.num_frames,
        "fps": dataset.fps,
        "caption_ext": dataset.caption_ext,
        "caption_dropout_rate": dataset.caption_dropout_rate,
    }


def _number(value: float) -> str:
    return f"{value:g}"
