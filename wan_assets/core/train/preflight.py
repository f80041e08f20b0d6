"""What `cache` and `train` would refuse on this machine, checked before any work (docs/architecture.md §8).

`load_config` checks the file; these checks need the machine: the model folder, the attention
backend's package, quantization and fp8 on this device, the sample images and the dataset clips.
`wan-assets check`, `cache` and `train` run them all, so a bad config never fails after caching.
Each check asks the function that would refuse later, so the rule and its message live in one place.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from wan_assets.core.config import ConfigError, JobConfig
from wan_assets.core.devices import pick_device
from wan_assets.core.precision import dtype_problem


def preflight(
    job: JobConfig, *, buildable_model: Path | None = None, device: torch.device | None = None
) -> list[str]:
    """Every problem `cache` / `train` would hit with `job` here, one line each (empty: ready).

    `buildable_model` is a model folder that is built on first use (the workdir's tiny model), so
    its absence is no problem. `device` is where training runs (default: what `train` picks).
    """
    device = device or pick_device()
    return [
        *model_problems(job, buildable_model=buildable_model),
        *_backend_problems(job),
        *_device_problems(job, device),
        *_optimizer_problems(job),
        *_sample_problems(job),
        *_dataset_problems(job),
        *captioner_problems(job),
    ]


def model_problems(job: JobConfig, *, buildable_model: Path | None = None) -> list[str]:
    """Every part of the model can be loaded from where the config says: the roots (diffusers folder,
    hub repo or official release folder) and each part's own file, by its keys and shapes."""
    from wan_assets.core.model.loading import source_problems

    model = job.process.model
    if buildable_model is not None and Path(model.name_or_path) == buildable_model:
        return []
    return source_problems(model)


def caption_preflight(job: JobConfig, *, buildable_model: Path | None = None) -> list[str]:
    """What `wan-assets caption` needs (no Wan model): clips in each dataset folder, a captioner."""
    return [*_dataset_problems(job), *captioner_problems(job)]


def captioner_problems(job: JobConfig) -> list[str]:
    """The captioner folder holds a model it can run, when a dataset auto-captions."""
    from wan_assets.core.data.captioner import check_captioner_folder

    config = job.process.captioner
    if config is None or not any(d.auto_caption for d in job.process.datasets):
        return []
    try:
        check_captioner_folder(config.name_or_path)
    except (FileNotFoundError, ValueError) as exc:
        return [f"captioner.name_or_path: {exc}"]
    return []


def _backend_problems(job: JobConfig) -> list[str]:
    from wan_assets.core.model.loading import resolve_attention_backend

    try:
        resolve_attention_backend(job.process.train.attention_backend, training=True)
    except ValueError as exc:
        return [f"train.attention_backend: {exc}"]
    return []


# Training options `speed.options.check_options` judges per device, and whether the probe for one keeps the
# model's quantization (fp8 compute must agree with the stored qtype).
_DEVICE_OPTIONS = {"fp8_compute": True, "compile": False, "activation_offload": False}


def _device_problems(job: JobConfig, device: torch.device) -> list[str]:
    """Quantization, fp8 compute, compile and offload on `device`, as `speed.options.check_options` decides.

    check_options stops at the first option it refuses; asking once per option (the others off)
    names them all, in its own words.
    """
    from wan_assets.core.speed.options import check_options

    train, model = job.process.train, job.process.model
    off = dict.fromkeys(_DEVICE_OPTIONS, False)
    probes = [(train.model_copy(update=off), model)]  # quantization alone
    for option, keeps_quantization in _DEVICE_OPTIONS.items():
        if getattr(train, option):
            probe_model = model if keeps_quantization else model.model_copy(update={"quantize": False})
            probes.append((train.model_copy(update={**off, option: True}), probe_model))
    problems = []
    for probe_train, probe_model in probes:
        try:
            check_options(probe_train, probe_model, device)
        except ValueError as exc:
            problems.append(str(exc))
    dtype = dtype_problem(train.dtype, device)
    if dtype is not None:
        problems.append(dtype)
    return list(dict.fromkeys(problems))


def _optimizer_problems(job: JobConfig) -> list[str]:
    from wan_assets.core.train.optim import check_optimizer

    try:
        check_optimizer(job.process.train, job.experts)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _sample_problems(job: JobConfig) -> list[str]:
    """Each `ctrl_img` is an image file (config resolution made the paths absolute)."""
    from PIL import Image, UnidentifiedImageError

    sample = job.process.sample
    problems = []
    for i, prompt in enumerate(sample.samples if sample is not None else []):
        if prompt.ctrl_img is None:
            continue
        where = f"sample.samples[{i}].ctrl_img"
        path = Path(prompt.ctrl_img)
        if not path.is_file():
            problems.append(f"{where}: {path} does not exist; point it at the first frame to sample from")
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError) as exc:
            problems.append(f"{where}: {path} is not an image that can be read ({exc})")
    return problems


def _dataset_problems(job: JobConfig) -> list[str]:
    """Every dataset folder holds clips: an empty one would train on nothing."""
    from wan_assets.core.data.cache import discover_clips
    from wan_assets.core.data.video_io import CLIP_EXTENSIONS

    found = Counter(source.dataset_index for source in discover_clips(job))
    extensions = " ".join(sorted(CLIP_EXTENSIONS))
    return [
        f"datasets[{i}].folder_path: {dataset.folder_path} has no video clips ({extensions}); add clips "
        "with caption files (`wan-assets sample-videos DIR` writes synthetic ones)"
        for i, dataset in enumerate(job.process.datasets)
        if not found[i]
    ]
