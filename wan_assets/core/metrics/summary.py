"""What a finished (or running) training run amounts to: per-expert numbers, transitions, files, plot.

Read from the run's own files, so the Dagster asset, the CLI and the DuckDB loader agree, and a
run can be summarised again later without the process that trained it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from wan_assets.core.train.metrics_log import read_lines
from wan_assets.core.train.run_files import RunFiles


@dataclass(frozen=True)
class ExpertSummary:
    expert: str
    steps: int
    final_loss: float | None
    loss_ema_10: float | None
    loss_ema_50: float | None
    loss_ema_100: float | None
    gradient_stability_avg: float | None
    phase: str | None
    alpha: float | None


@dataclass
class RunSummary:
    run_id: str | None
    steps: int
    experts: dict[str, ExpertSummary]
    transitions: list[dict]
    checkpoints: list[Path]
    final_loras: dict[str, Path]
    samples: list[Path]
    seconds: float
    config_hash: str
    plot: Path | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def latest_transitions(files: RunFiles) -> list[dict]:
    """The transition log of the newest alpha-scheduler file (it carries the whole history)."""
    newest = files.newest_alpha_scheduler()
    return json.loads(newest.read_text()).get("transitions", []) if newest is not None else []


def summarize(files: RunFiles, experts: tuple[str, ...], *, plot: bool = True) -> RunSummary:
    lines = read_lines(files.metrics) if files.metrics.is_file() else []
    per_expert = {}
    for expert in experts:
        mine = [line for line in lines if line["expert"] == expert]
        taken = [line for line in mine if line["loss"] is not None]
        last = taken[-1] if taken else {}
        per_expert[expert] = ExpertSummary(
            expert=expert,
            steps=len(mine),
            final_loss=last.get("loss"),
            loss_ema_10=last.get("loss_ema_10"),
            loss_ema_50=last.get("loss_ema_50"),
            loss_ema_100=last.get("loss_ema_100"),
            gradient_stability_avg=last.get("gradient_stability_avg"),
            phase=last.get("phase"),
            alpha=last.get("conv_alpha"),
        )
    skipped: dict[str, int] = {}
    for line in lines:
        if line.get("skipped"):
            skipped[line["skipped"]] = skipped.get(line["skipped"], 0) + 1
    transitions = latest_transitions(files)
    summary = RunSummary(
        run_id=lines[-1]["run_id"] if lines else None,
        steps=len(lines),
        experts=per_expert,
        transitions=transitions,
        checkpoints=[p for s in files.complete_steps(experts) for p in files.checkpoint_files(s, experts)],
        final_loras={e: files.lora(e) for e in experts if files.lora(e).is_file()},
        samples=sorted(files.samples.glob("*.mp4")) if files.samples.is_dir() else [],
        seconds=sum(line.get("step_time_s") or 0.0 for line in lines),
        config_hash=files.config_hash() or "",
        skipped=skipped,
    )
    if plot and lines:
        summary.plot = plot_run(lines, transitions, files.root / "loss_plot.png")
    return summary


def plot_run(lines: list[dict], transitions: list[dict], out: Path) -> Path:
    """Loss and EMA per expert against step, gradient stability below, phase transitions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wan_assets.core.files import atomic_output

    fig, (ax_loss, ax_grad) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[2, 1])
    colours = {"high_noise": "tab:red", "low_noise": "tab:blue"}
    for expert, colour in colours.items():
        mine = [line for line in lines if line["expert"] == expert and line["loss"] is not None]
        if not mine:
            continue
        steps = [line["step"] for line in mine]
        ax_loss.plot(steps, [line["loss"] for line in mine], color=colour, alpha=0.25, lw=0.8)
        ax_loss.plot(
            steps, [line["loss_ema_50"] for line in mine], color=colour, lw=1.8, label=f"{expert} EMA50"
        )
        grad = [
            (line["step"], line["gradient_stability_avg"])
            for line in mine
            if line["gradient_stability_avg"] is not None
        ]
        if grad:
            ax_grad.plot(*zip(*grad, strict=True), color=colour, lw=1.4, label=expert)
    for t in transitions:
        for ax in (ax_loss, ax_grad):
            ax.axvline(t["step"], color=colours.get(t["expert"], "k"), ls="--", lw=1)
        ax_loss.annotate(
            f"{t['to_phase']} (α {t['to_alpha']:g})",
            (t["step"], 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=8,
        )
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_grad.set_ylabel("grad stability (EMA50)")
    ax_grad.set_xlabel("step")
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out
