"""The training engine on the tiny model: exact resume after SIGKILL, export parity, alpha phases,
routing, failure handling, and that it learns."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import WanImageToVideoPipeline
from PIL import Image
from safetensors.torch import load_file

from wan_assets.core.config import parse_config
from wan_assets.core.errors import TrainingError
from wan_assets.core.eval.validation import validation_loss
from wan_assets.core.experts import timestep_window
from wan_assets.core.model.lora import TRAINED_ADAPTER, lora_scale, set_lora_scale
from wan_assets.core.train.loop import TrainState, build_parts, save_final, train, train_step
from wan_assets.core.train.metrics_log import read_lines
from wan_assets.core.train.run_files import RunFiles

from .conftest import CONFIGS, tiny_job_raw

# Loose exit criteria: a phase ends as soon as 100 losses are in and the loss is not rising.
LOOSE = {
    "loss_improvement_rate_below": 10.0,
    "min_gradient_stability": 0.0,
    "min_loss_r2": -1.0,
    "max_loss_cv": 100.0,
}


def job_raw(clips: Path, model: Path, out: Path, *, name: str = "tiny_i2v_lora", **train) -> dict:
    raw = tiny_job_raw(clips, model, **train)
    process = raw["config"]["process"][0]
    raw["config"]["name"] = name
    process["training_folder"] = str(out)
    process["sample"] = None
    return raw


def with_phases(raw: dict, min_steps: int = 0) -> dict:
    phases = raw["config"]["process"][0]["network"]["alpha_schedule"]["conv_alpha_phases"]
    phases["foundation"].update(min_steps=min_steps, exit_criteria=LOOSE)
    return raw


def run_cli(config: Path, workdir: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "wan_assets.cli", "train", str(config), "--workdir", str(workdir), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(path: Path) -> list[tuple[int, str, float | None]]:
    return [(line["step"], line["expert"], line["loss"]) for line in read_lines(path)]


def lora_tensors(files: RunFiles, experts, *, ema: bool = False) -> dict[str, torch.Tensor]:
    return {f"{e}/{k}": v for e in experts for k, v in load_file(str(files.lora(e, ema=ema))).items()}


def test_exact_resume_after_sigkill(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    # A cosine schedule and EMA weights: both must continue exactly where the checkpoint left them.
    common = dict(
        steps=230,
        gradient_accumulation=2,
        switch_boundary_every=3,
        lr_scheduler="cosine",
        ema_config={"use_ema": True, "ema_decay": 0.9},
    )
    reference_raw = with_phases(job_raw(clips_dir, tiny_model_dir, tmp_path / "ref", **common))
    reference_raw["config"]["process"][0]["save"] = {
        "dtype": "fp32",
        "save_every": 10,
        "max_step_saves_to_keep": 2,
    }
    ref_job = parse_config(reference_raw, workdir=tiny_cache).job
    ref = train(ref_job, tiny_cache / "cache")
    assert len(ref.transitions) == 2, "both experts should change phase before the kill point"
    assert all(t.step < 215 for t in ref.transitions)

    killed_raw = json.loads(json.dumps(reference_raw))
    killed_raw["config"]["process"][0]["training_folder"] = str(tmp_path / "killed")
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(killed_raw, sort_keys=False))
    files = RunFiles(tmp_path / "killed" / "tiny_i2v_lora", "tiny_i2v_lora", ema=True)
    proc = run_cli(config, tiny_cache)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if files.metrics.exists() and len(read_lines(files.metrics)) >= 215:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_lines(files.metrics))
    assert 215 <= killed_at < 230
    checkpoint = files.complete_steps(ref_job.experts)[-1]
    assert checkpoint <= killed_at

    resumed = run_cli(config, tiny_cache, "--resume")
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert f"resumed tiny_i2v_lora at step {checkpoint}" in out
    assert losses(files.metrics) == losses(ref.files.metrics)
    for ema in (False, True):
        ours = lora_tensors(files, ref_job.experts, ema=ema)
        theirs = lora_tensors(ref.files, ref_job.experts, ema=ema)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (ema, key)
    lrs = [line["lr_0"] for line in read_lines(files.metrics)]
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] < 1e-5  # the cosine ran its course
    # Retention kept two checkpoints; the JSONL has exactly one line per step.
    assert len(files.complete_steps(ref_job.experts)) == 2
    assert [line["step"] for line in read_lines(files.metrics)] == list(range(230))


def test_run_files_routing_and_jsonl(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    raw = job_raw(
        clips_dir, tiny_model_dir, tmp_path, steps=24, switch_boundary_every=5, timestep_type="shift"
    )
    raw["config"]["process"][0]["save"] = {"dtype": "bf16", "save_every": 8, "max_step_saves_to_keep": 2}
    job = parse_config(raw, workdir=tiny_cache).job
    result = train(job, tiny_cache / "cache")
    files = result.files
    names = sorted(p.name for p in files.root.iterdir())
    assert "config.yaml" in names and "metrics_tiny_i2v_lora.jsonl" in names
    assert "tiny_i2v_lora_high_noise.safetensors" in names and "tiny_i2v_lora_low_noise.safetensors" in names
    assert files.complete_steps(job.experts) == [16, 24]  # step 8 pruned
    assert not (files.root / "tiny_i2v_lora_000000008_state.pt").exists()
    lines = read_lines(files.metrics)
    assert len(lines) == 24
    boundary = 900.0
    for line in lines:
        lo, hi = timestep_window(line["expert"], boundary)
        assert lo < line["timestep"] <= hi or (line["expert"] == "low_noise" and lo <= line["timestep"] <= hi)
        assert line["expert"] == ("high_noise" if (line["step"] // 5) % 2 == 0 else "low_noise")
    text = files.metrics.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert {"lr_0", "lr_1", "loss_ema_50", "gradient_stability_avg", "conv_alpha", "phase"} <= set(lines[-1])
    tensors = load_file(str(files.lora("low_noise", 24)))
    assert tensors["diffusion_model.blocks.0.self_attn.q.lora_A.weight"].dtype == torch.bfloat16
    assert float(tensors["diffusion_model.blocks.0.self_attn.q.alpha"]) == 4.0


def test_single_expert_leaves_the_other_alone(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    raw = job_raw(clips_dir, tiny_model_dir, tmp_path, steps=6)
    raw["config"]["process"][0]["model"]["model_kwargs"] = {
        "train_high_noise": False,
        "train_low_noise": True,
    }
    job = parse_config(raw, workdir=tiny_cache).job
    before = (tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    result = train(job, tiny_cache / "cache")
    assert not list(result.files.root.glob("*high_noise*"))
    lines = read_lines(result.files.metrics)
    assert {line["expert"] for line in lines} == {"low_noise"}
    assert all(0 <= line["timestep"] <= 900 for line in lines)
    assert "learning_rate" in lines[0] and "lr_1" not in lines[0]
    assert (tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def _outputs(model, generator_seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(generator_seed)
    hidden = torch.randn(1, 36, 3, 8, 8, generator=g)
    text = torch.randn(1, 20, 32, generator=g)
    with torch.no_grad():
        return model(
            hidden_states=hidden,
            timestep=torch.tensor([950.0]),
            encoder_hidden_states=text,
            return_dict=False,
        )[0]


def test_forced_transition_and_export_parity(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    # fp32: the export is compared with diffusers' loader to 1e-5, below bf16's resolution.
    raw = job_raw(clips_dir, tiny_model_dir, tmp_path, steps=20, switch_boundary_every=2, dtype="fp32")
    raw["config"]["process"][0]["save"]["dtype"] = "fp32"
    job = parse_config(raw, workdir=tiny_cache).job
    parts = build_parts(job, tiny_cache / "cache", torch.device("cpu"))
    state = TrainState(run_id="test")
    for step in range(8):
        train_step(parts, state, step)
    high = parts.model.expert("high_noise")
    rank = job.process.network.linear
    assert lora_scale(high, TRAINED_ADAPTER) == 4 / rank
    high.eval()
    before = _outputs(high)

    transition = parts.scheduler.force_transition(8, "high_noise")
    set_lora_scale(high, parts.scheduler.alpha("high_noise"), TRAINED_ADAPTER)
    assert (transition.from_alpha, transition.to_alpha) == (4.0, 8.0)
    assert lora_scale(high, TRAINED_ADAPTER) == 8 / rank
    assert {c.name for c in transition.criteria} >= {"min_steps", "loss_samples", "loss_r2", "loss_cv"}
    after = _outputs(high)
    assert not torch.allclose(before, after)
    # As predicted: scale 8/r equals scale 4/r with every lora_B doubled.
    with torch.no_grad():
        for name, p in high.named_parameters():
            if "lora_B" in name:
                p.mul_(2.0)
        set_lora_scale(high, 4.0, TRAINED_ADAPTER)
        assert torch.allclose(_outputs(high), after, atol=1e-6)
        for name, p in high.named_parameters():
            if "lora_B" in name:
                p.div_(2.0)
        set_lora_scale(high, 8.0, TRAINED_ADAPTER)
    assert parts.scheduler.alpha("low_noise") == 4.0, "the other expert keeps its own phase"

    finals = save_final(parts)
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(finals["high_noise"]), adapter_name="trained")
    pipe.load_lora_weights(str(finals["low_noise"]), adapter_name="trained", load_into_transformer_2=True)
    low = parts.model.expert("low_noise").eval()
    for ours, theirs in ((high, pipe.transformer), (low, pipe.transformer_2)):
        diff = (_outputs(ours) - _outputs(theirs.eval())).abs().max().item()
        assert diff <= 1e-5, diff


def test_nonfinite_loss_skips_and_oom_gives_up(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path, monkeypatch, caplog
) -> None:
    raw = job_raw(clips_dir, tiny_model_dir, tmp_path, steps=10)
    job = parse_config(raw, workdir=tiny_cache).job
    parts = build_parts(job, tiny_cache / "cache", torch.device("cpu"))
    state = TrainState(run_id="test")
    params_before = [p.detach().clone() for p in parts.params["high_noise"]]
    real_batch = parts.stream.batch

    def poisoned(n):
        batch = real_batch(n)
        batch.latents[:] = float("nan")
        return batch

    monkeypatch.setattr(parts.stream, "batch", poisoned)
    result = train_step(parts, state, 0)
    assert result.skipped == "nonfinite_loss" and result.loss is None
    assert all(torch.equal(a, b) for a, b in zip(params_before, parts.params["high_noise"], strict=True))
    monkeypatch.setattr(parts.stream, "batch", real_batch)

    import wan_assets.core.train.loop as train_module

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(train_module, "forward_loss", oom)
    with caplog.at_level("WARNING", logger="wan_assets.core.train.loop"):
        assert train_step(parts, state, 1).skipped == "oom"
    assert "step 1 (high_noise, bucket " in caplog.text and "simulated" in caplog.text  # what, where
    assert train_step(parts, state, 2).skipped == "oom"
    with pytest.raises(TrainingError, match="out of memory 3 times in a row"):
        train_step(parts, state, 3)


def test_finite_loss_with_nonfinite_gradient_is_not_applied(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path, caplog
) -> None:
    """bf16 backward can overflow under a finite loss; applying that step made every LoRA weight NaN."""
    job = parse_config(job_raw(clips_dir, tiny_model_dir, tmp_path, steps=10), workdir=tiny_cache).job
    parts = build_parts(job, tiny_cache / "cache", torch.device("cpu"))
    state = TrainState(run_id="test")
    params = parts.params["high_noise"]
    before = [p.detach().clone() for p in params]
    overflow = params[0].register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with caplog.at_level("WARNING", logger="wan_assets.core.train.loop"):
        result = train_step(parts, state, 0)
    overflow.remove()
    assert result.skipped == "nonfinite_grad" and result.loss is None and result.grad_norm is None
    assert "step 0 (high_noise, bucket " in caplog.text and "gradient norm is inf" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True)), "nothing applied"
    assert all(p.grad is None for p in params)
    assert parts.scheduler.metrics("high_noise")["loss_samples"] == 0, "statistics untouched"
    # The next step trains as usual from the untouched weights.
    result = train_step(parts, state, 1)
    assert result.skipped is None and math.isfinite(result.loss) and math.isfinite(result.grad_norm)
    assert all(torch.isfinite(p).all() for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_existing_run_needs_resume(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    job = parse_config(job_raw(clips_dir, tiny_model_dir, tmp_path, steps=2), workdir=tiny_cache).job
    train(job, tiny_cache / "cache")
    with pytest.raises(TrainingError, match="pass --resume"):
        train(job, tiny_cache / "cache")


def test_seed_example_config_trains_on_the_tiny_model(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    raw = yaml.safe_load((CONFIGS / "i2v_lora_alpha_scheduling.yaml").read_text())
    process = raw["config"]["process"][0]
    process["model"].update(name_or_path=str(tiny_model_dir))
    process["training_folder"] = str(tmp_path)
    process["datasets"][0].update(folder_path=str(clips_dir), num_frames=9, max_pixels_per_frame=4096, fps=4)
    process["train"].update(steps=4, attention_backend="sdpa", dtype="fp32")
    process["save"]["save_every"] = 2
    process["sample"].update(width=64, height=64, num_frames=5, sample_steps=2, sample_every=4)
    # The seed's ctrl_img is a file next to the workdir; a missing one is an error (sampling.py).
    first_frame = tmp_path / "first_frame.png"
    Image.new("RGB", (64, 64), (90, 120, 200)).save(first_frame)
    process["sample"]["samples"][0]["ctrl_img"] = str(first_frame)
    process["network"]["linear"] = 4
    job = parse_config(raw, workdir=tiny_cache).job
    from wan_assets.core.data.cache import EncoderHandle, cache_dataset

    cache = tmp_path / "cache"
    assert not cache_dataset(job, cache, EncoderHandle(str(tiny_model_dir))).failures
    result = train(job, cache)
    lines = read_lines(result.files.metrics)
    assert len(lines) == 4 and all(line["loss"] is not None for line in lines)
    assert lines[0]["conv_alpha"] == 8.0 and lines[0]["lora_scale"] == 8.0 / 4
    # ai-toolkit's baseline samples before the first step, then sample_every / the end.
    assert [p.name for p in result.samples] == ["000000000_0.mp4", "000000004_0.mp4"]


def test_flash_backend_without_flash_attn_is_a_clear_error(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    raw = job_raw(clips_dir, tiny_model_dir, tmp_path, steps=2, attention_backend="flash")
    job = parse_config(raw, workdir=tiny_cache).job
    with pytest.raises(ValueError, match="flash_attn"):
        build_parts(job, tiny_cache / "cache", torch.device("cpu"))


def test_it_learns(tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path) -> None:
    raw = job_raw(clips_dir, tiny_model_dir, tmp_path, steps=300)
    job = parse_config(raw, workdir=tiny_cache).job
    parts = build_parts(job, tiny_cache / "cache", torch.device("cpu"))
    index = parts.stream.index
    quantiles = [0.1, 0.5, 0.9]

    def held_out() -> dict[str, float]:
        out = {}
        for expert in job.experts:
            window = timestep_window(expert, parts.model.boundary_timestep)
            model = parts.model.expert(expert)
            out[expert] = validation_loss(
                model,
                index,
                expert,
                window,
                quantiles,
                seed=7,
                device=parts.device,
                dtype=parts.compute_dtype,
            ).mean
        return out

    for expert in job.experts:
        parts.model.expert(expert).disable_adapters()
    base = held_out()
    assert held_out() == base, "validation loss must be deterministic"
    for expert in job.experts:
        parts.model.expert(expert).enable_adapters()
    state = TrainState(run_id="learn")
    for step in range(job.process.train.steps):
        train_step(parts, state, step)
    trained = held_out()
    for expert in job.experts:
        # Measured on this tiny model after 300 steps: 0.71x (high noise) and 0.73x (low noise) the base.
        assert trained[expert] < 0.9 * base[expert], (expert, trained, base)


def test_prodigy_linear_schedule_and_ema_resume_exactly(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    """Prodigy's state (its d estimate), the schedule's step and the EMA weights all travel in the
    checkpoint: stopped at a checkpoint and resumed, the run is the uninterrupted one, bit for bit."""
    train_keys = dict(
        steps=8,
        switch_boundary_every=2,
        optimizer="prodigy",
        lr=1.0,
        lr_scheduler="linear",
        ema_config={"use_ema": True, "ema_decay": 0.8},
    )

    def job(folder: str):
        raw = job_raw(clips_dir, tiny_model_dir, tmp_path / folder, **train_keys)
        raw["config"]["process"][0]["save"] = {"dtype": "fp32", "save_every": 4, "max_step_saves_to_keep": 3}
        return parse_config(raw, workdir=tiny_cache).job

    ref = train(job("ref"), tiny_cache / "cache")
    train(job("split"), tiny_cache / "cache", stop_after=4)
    split = train(job("split"), tiny_cache / "cache", resume_run=True)
    assert losses(split.files.metrics) == losses(ref.files.metrics)
    ref_lines = read_lines(ref.files.metrics)
    assert [line["lr_0"] for line in read_lines(split.files.metrics)] == [line["lr_0"] for line in ref_lines]
    assert ref_lines[1]["lr_0"] != ref_lines[0]["lr_0"]  # prodigy's d grows and the schedule ramps
    experts = ("high_noise", "low_noise")
    for ema in (False, True):
        ours, theirs = lora_tensors(split.files, experts, ema=ema), lora_tensors(ref.files, experts, ema=ema)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), ema
    raw_w, ema_w = lora_tensors(ref.files, experts), lora_tensors(ref.files, experts, ema=True)
    assert any(not torch.equal(raw_w[k], ema_w[k]) for k in raw_w), "the EMA files hold the average"


def test_ema_checkpoints_are_evaluated_beside_the_raw_ones(
    tmp_path: Path, tiny_cache: Path, clips_dir: Path, tiny_model_dir: Path
) -> None:
    from wan_assets.core.eval.checkpoints import evaluate_run

    raw = job_raw(
        clips_dir, tiny_model_dir, tmp_path, steps=4, ema_config={"use_ema": True, "ema_decay": 0.5}
    )
    process = raw["config"]["process"][0]
    process["save"] = {"dtype": "fp32", "save_every": 2, "max_step_saves_to_keep": 3}
    process["validation"] = {"num_samples": 0, "timestep_quantiles": [0.5]}
    job = parse_config(raw, workdir=tiny_cache).job
    train(job, tiny_cache / "cache")
    report = evaluate_run(job, tiny_cache / "cache", device=torch.device("cpu"))
    ema = [s for s in report.scores if s.ema]
    assert {s.step for s in ema} == {2, 4} and all(s.checkpoint.endswith("_ema.safetensors") for s in ema)
    raw_means, ema_means = report.mean_by_step(), report.mean_by_step(ema=True)
    assert set(raw_means) == {0, 2, 4} and set(ema_means) == {2, 4}
    assert ema_means[4] != raw_means[4]  # other weights, another score
    rows = report.table()
    assert all(row.keys() == rows[0].keys() for row in rows) and "mean_ema_val_loss" in rows[0]
