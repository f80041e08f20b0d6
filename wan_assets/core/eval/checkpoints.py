"""Evaluated checkpoints (docs/architecture.md §6): the base model as step 0 and every kept checkpoint, scored by
held-out validation loss per expert, with sample videos and a contact sheet.

Scores use fixed timestep quantiles and noise seeds (`wan_assets.core.eval.validation`), so numbers are
comparable across checkpoints and runs; the best checkpoint is the lowest mean over experts.
A run with EMA (`train.ema_config`) has averaged LoRAs beside the raw ones: they are scored too
(`ema: true` scores), reported beside the raw ones; the best step is chosen among the raw ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from wan_assets.core.config import JobConfig, SampleConfig
from wan_assets.core.data.cache import LatentIndex, index_path, load_index
from wan_assets.core.data.video_io import read_frames, write_video
from wan_assets.core.devices import pick_device
from wan_assets.core.eval.validation import validation_loss
from wan_assets.core.experts import timestep_window
from wan_assets.core.files import atomic_output, write_json
from wan_assets.core.model.loading import load_wan_model
from wan_assets.core.model.lora import TRAINED_ADAPTER, add_lora, load_lora_into
from wan_assets.core.precision import DTYPES
from wan_assets.core.seeds import derive_seed
from wan_assets.core.train.run_files import RunFiles
from wan_assets.core.train.sampling import generate, sampling_pipeline

BASE = "base"


@dataclass(frozen=True)
class CheckpointScore:
    checkpoint: str  # "base" or the expert's LoRA file at that step
    step: int
    expert: str
    quantile: float
    val_loss: float
    ema: bool = False  # the checkpoint's EMA weights (`_ema` files), not its raw ones


@dataclass
class EvaluationReport:
    run_dir: Path
    scores: list[CheckpointScore]
    samples: dict[int, list[Path]] = field(default_factory=dict)  # step -> mp4 files
    contact_sheet: Path | None = None

    def mean_by_step(self, *, ema: bool = False) -> dict[int, float]:
        """Mean validation loss over experts and quantiles, per checkpoint step (0 = base); with
        `ema`, of the checkpoints' EMA weights (the base has none)."""
        out: dict[int, list[float]] = {}
        for s in self.scores:
            if s.ema == ema:
                out.setdefault(s.step, []).append(s.val_loss)
        return {step: sum(v) / len(v) for step, v in sorted(out.items())}

    def table(self) -> list[dict]:
        rows: dict[int, dict] = {}
        for s in self.scores:
            row = rows.setdefault(s.step, {"step": s.step})
            key = f"{s.expert}_{'ema_' if s.ema else ''}val_loss"
            row[key] = row.get(key, 0.0) + s.val_loss / self._num_quantiles
        for step, mean in self.mean_by_step().items():
            rows[step]["mean_val_loss"] = mean
        for step, mean in self.mean_by_step(ema=True).items():
            rows[step]["mean_ema_val_loss"] = mean
        # Same columns in every row (the UI table's schema): the base has no EMA weights.
        columns = dict.fromkeys(key for row in rows.values() for key in row)
        return [{c: rows[k].get(c, float("nan")) for c in columns} for k in sorted(rows)]

    @property
    def _num_quantiles(self) -> int:
        return len({s.quantile for s in self.scores})

    @property
    def best_step(self) -> int:
        means = self.mean_by_step()
        return min(means, key=means.__getitem__)

    @property
    def beats_base(self) -> bool:
        means = self.mean_by_step()
        return self.best_step != 0 and means[self.best_step] < means[0]


def evaluate_run(job: JobConfig, cache_dir: Path, *, device: torch.device | None = None) -> EvaluationReport:
    device = device or pick_device()
    files = RunFiles.of(job)
    index = load_index(index_path(cache_dir, job))
    dtype = DTYPES[job.process.train.dtype]
    model = load_wan_model(job.process.model, dtype=dtype, device=device)
    network, validation = job.process.network, job.process.validation
    for expert in job.experts:
        add_lora(model.expert(expert), network, TRAINED_ADAPTER, seed=0)
    steps = [0, *files.complete_steps(job.experts)]
    report = EvaluationReport(files.root, [])
    for step in steps:
        for ema in (False, True) if files.ema and step > 0 else (False,):
            _apply_checkpoint(model, job, files, step, ema=ema)
            report.scores += _score(model, job, index, files, step, ema, device)
        _apply_checkpoint(model, job, files, step)
        if validation.num_samples > 0:
            report.samples[step] = _samples(model, job, index, files, step, device)
    if report.samples:
        report.contact_sheet = contact_sheet(
            report.samples, files.root / "eval" / "contact_sheet.png", losses=report.mean_by_step()
        )
    write_json(scores_path(files), [asdict(s) for s in report.scores])
    return report


def _score(
    model, job: JobConfig, index: LatentIndex, files: RunFiles, step: int, ema: bool, device: torch.device
) -> list[CheckpointScore]:
    validation, dtype = job.process.validation, DTYPES[job.process.train.dtype]
    scores = []
    for expert in job.experts:
        label = BASE if step == 0 else str(files.lora(expert, step, ema=ema))
        window = timestep_window(expert, model.boundary_timestep)
        result = validation_loss(
            model.expert(expert),
            index,
            expert,
            window,
            validation.timestep_quantiles,
            seed=validation.seed,
            device=device,
            dtype=dtype,
        )
        scores += [CheckpointScore(label, step, expert, q, v, ema) for q, v in result.by_quantile.items()]
    return scores


def scores_path(files: RunFiles) -> Path:
    """Where the last evaluation's scores live (read by the metrics database loader)."""
    return files.root / "eval" / "scores.json"


def _apply_checkpoint(model, job: JobConfig, files: RunFiles, step: int, *, ema: bool = False) -> None:
    for expert in job.experts:
        transformer = model.expert(expert)
        if step == 0:
            transformer.disable_adapters()
        else:
            load_lora_into(transformer, files.lora(expert, step, ema=ema), TRAINED_ADAPTER)
            transformer.enable_adapters()


def _samples(
    model, job: JobConfig, index: LatentIndex, files: RunFiles, step: int, device: torch.device
) -> list[Path]:
    sample = job.process.sample or SampleConfig()
    held_out = sorted(k for k, s in index.splits.items() if s == "val")[: job.process.validation.num_samples]
    pipe = sampling_pipeline({e: model.expert(e) for e in job.experts}, model)
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.transformer, pipe.transformer_2):
        part.eval()
    written = []
    for key in held_out:
        record = index.clips[key]
        image = Image.fromarray(read_frames(record.path, [0])[0])
        frames = generate(
            pipe, image, record.caption, sample, derive_seed(job.process.validation.seed, key) % 2**31
        )
        name = f"{step:09d}_{Path(key).stem}.mp4"
        written.append(write_video(files.root / "eval" / name, frames, sample.fps))
    return written


def contact_sheet(
    samples: dict[int, list[Path]],
    out: Path,
    *,
    losses: dict[int, float] | None = None,
    frames_per_row: int = 5,
    tile: int = 96,
) -> Path:
    """One row per (checkpoint, clip): evenly spaced frames. Each row is labelled with the step, the
    checkpoint's mean validation loss (`losses`, by step) and the clip; each column with its frame."""
    rows = [(step, path) for step, paths in sorted(samples.items()) for path in paths]
    label_w, header_h = 110, 18
    sheet = Image.new("RGB", (label_w + frames_per_row * tile, header_h + len(rows) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    columns: list[int] = []
    for r, (step, path) in enumerate(rows):
        video = read_frames(path, list(range(_count(path))))
        picks = np.linspace(0, len(video) - 1, frames_per_row).round().astype(int)
        columns = columns or [int(i) for i in picks]
        top = header_h + r * tile
        for c, i in enumerate(picks):
            frame = Image.fromarray(video[i])
            frame.thumbnail((tile, tile))
            sheet.paste(frame, (label_w + c * tile, top))
        draw.text((4, top + 4), "base model" if step == 0 else f"step {step}", fill="black")
        if losses and step in losses:
            draw.text((4, top + 20), f"val loss {losses[step]:.4f}", fill="black")
        draw.text((4, top + 36), Path(path).stem.split("_", 1)[1][:16], fill="gray")
    draw.text((4, 3), "checkpoint", fill="gray")
    for c, i in enumerate(columns):
        draw.text((label_w + c * tile + 4, 3), f"frame {i}", fill="gray")
    with atomic_output(out) as tmp:
        sheet.save(tmp, format="PNG")
    return out


def _count(path: Path) -> int:
    from wan_assets.core.data.video_io import probe_video

    return probe_video(path).num_frames
