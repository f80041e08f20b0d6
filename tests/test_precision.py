"""The production path on the tiny model: training dtype x samples x final save x resume.

Real runs train in bf16 with samples every few hundred steps; these tests run that path (and the
shipped recipes' speed and memory options that run on a CPU) for a few steps each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wan_assets.core.config import parse_config
from wan_assets.core.data.video_io import probe_video, read_frames
from wan_assets.core.speed import options as speed_options
from wan_assets.core.train.loop import train
from wan_assets.core.train.metrics_log import read_lines

from .conftest import tiny_job_raw

# The options of the shipped recipes that a CPU can run (fp8 compute needs an fp8 GPU: bench/gpu_e2e).
MODES: dict[str, dict] = {
    "eager": {"gradient_checkpointing": False},
    "checkpointing": {"gradient_checkpointing": True},
    "selective_compile": {"gradient_checkpointing": "selective", "compile": True},
    "activation_offload": {"gradient_checkpointing": True, "activation_offload": True},
    "int8_weights": {"gradient_checkpointing": True, "_quantize": "qint8"},
    "fp8_weights_24gb": {
        "gradient_checkpointing": True,
        "optimizer": "adamw8bit",
        "offload_inactive_expert": True,
        "_quantize": "qfloat8",
    },
}


def run_raw(clips: Path, model: Path, out: Path, *, dtype: str, sample_every: int | None, **train) -> dict:
    """The tiny config in `dtype`, with samples every `sample_every` steps (None: no `sample:`)."""
    qtype = train.pop("_quantize", None)
    raw = tiny_job_raw(clips, model, dtype=dtype, **train)
    process = raw["config"]["process"][0]
    process["training_folder"] = str(out)
    process["save"].update(dtype=dtype, save_every=3)
    if qtype is not None:
        process["model"].update(quantize=True, qtype=qtype)
    if sample_every is None:
        process["sample"] = None
    else:
        process["sample"].update(sample_every=sample_every, sample_steps=2)
    return raw


def losses(run_dir: Path) -> list[tuple[int, str, float]]:
    return [
        (line["step"], line["expert"], line["loss"])
        for line in read_lines(run_dir / "metrics_tiny_i2v_lora.jsonl")
    ]


def loras(run_dir: Path) -> dict[str, torch.Tensor]:
    return {
        f"{expert}/{key}": value
        for expert in ("high_noise", "low_noise")
        for key, value in load_file(str(run_dir / f"tiny_i2v_lora_{expert}.safetensors")).items()
    }


@pytest.mark.parametrize("mode", list(MODES))
def test_bf16_run_with_samples_writes_samples_and_final_loras(
    mode: str, tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path, monkeypatch
) -> None:
    monkeypatch.setattr(speed_options, "COMPILE_BACKEND", "aot_eager")  # the same graph capture, no C++ build
    raw = run_raw(clips_dir, tiny_model_dir, tmp_path, dtype="bf16", sample_every=3, steps=6, **MODES[mode])
    job = parse_config(raw, workdir=tiny_cache).job
    result = train(job, tiny_cache / "cache")

    run_dir = result.files.root
    # The base model before the first step (ai-toolkit samples it unless skip_first_sample), then
    # every sample_every steps and at the end.
    assert [p.name for p in result.samples] == ["000000000_0.mp4", "000000003_0.mp4", "000000006_0.mp4"]
    sample = job.process.sample
    for path in result.samples:
        info = probe_video(path)
        assert (info.num_frames, info.width, info.height) == (sample.num_frames, sample.width, sample.height)
        frames = read_frames(path, list(range(info.num_frames)))
        assert frames.std() > 1.0, "a sample of one flat colour: the pipeline produced nothing"
    weights = {k: v for k, v in loras(run_dir).items() if ".lora_" in k}
    assert weights and all(
        v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all() for v in weights.values()
    )
    assert all(np.isfinite(loss) for _, _, loss in losses(run_dir))
    assert result.files.complete_steps(job.experts) == [3, 6]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_sampling_leaves_the_training_state_as_it_was(
    dtype: str, tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    common = dict(dtype=dtype, steps=8, switch_boundary_every=2, gradient_checkpointing=True)
    plain = parse_config(
        run_raw(clips_dir, tiny_model_dir, tmp_path / "plain", sample_every=None, **common),
        workdir=tiny_cache,
    ).job
    sampled = parse_config(
        run_raw(clips_dir, tiny_model_dir, tmp_path / "sampled", sample_every=2, **common), workdir=tiny_cache
    ).job
    a = train(plain, tiny_cache / "cache")
    b = train(sampled, tiny_cache / "cache")
    assert [p.name for p in b.samples] == [f"00000000{n}_0.mp4" for n in (0, 2, 4, 6, 8)] and not a.samples
    assert losses(b.files.root) == losses(a.files.root)
    ours, theirs = loras(b.files.root), loras(a.files.root)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_resumed_run_with_samples_reproduces_the_uninterrupted_one(
    dtype: str, tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    common = dict(dtype=dtype, steps=9, switch_boundary_every=2, gradient_checkpointing=True, sample_every=4)
    whole = parse_config(
        run_raw(clips_dir, tiny_model_dir, tmp_path / "whole", **common), workdir=tiny_cache
    ).job
    cut = parse_config(run_raw(clips_dir, tiny_model_dir, tmp_path / "cut", **common), workdir=tiny_cache).job
    reference = train(whole, tiny_cache / "cache")
    first = train(cut, tiny_cache / "cache", stop_after=5)  # checkpoint at 3, samples at 0 and 4
    assert not first.final_loras and [p.name for p in first.samples] == ["000000000_0.mp4", "000000004_0.mp4"]
    second = train(cut, tiny_cache / "cache", resume_run=True)  # back to step 3
    assert [p.name for p in second.samples] == ["000000004_0.mp4", "000000008_0.mp4", "000000009_0.mp4"]
    assert losses(second.files.root) == losses(reference.files.root)
    ours, theirs = loras(second.files.root), loras(reference.files.root)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
