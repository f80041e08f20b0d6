"""The training reporter that talks to Dagster through Pipes (used when `wan-assets train` runs under
the training asset). Imports only `dagster_pipes`, never `dagster`.

While training: every `logging.log_every` steps a progress message (step, loss and EMA per expert,
gradient stability, phase, alpha, steps/s, ETA) and every phase transition at once; the asset turns
them into asset observations as they arrive. At the end: one materialization per trained expert
with the run's summary, the transition table and the loss plot.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster_pipes import PipesContext, open_dagster_pipes

from wan_assets.core.config import JobConfig
from wan_assets.core.metrics.summary import RunSummary, summarize
from wan_assets.core.train.alpha_schedule import Transition
from wan_assets.core.train.reporting import describe_transition

PROGRESS_FIELDS = (
    "step",
    "expert",
    "loss",
    "loss_ema_10",
    "loss_ema_50",
    "gradient_stability_avg",
    "phase",
    "conv_alpha",
    "lora_scale",
)


def asset_key(expert: str) -> str:
    return f"lora_{expert}"


@contextmanager
def pipes_reporter(job: JobConfig) -> Iterator[PipesReporter]:
    with open_dagster_pipes() as pipes:
        yield PipesReporter(pipes, job)


class PipesReporter:
    def __init__(self, pipes: PipesContext, job: JobConfig) -> None:
        self.pipes = pipes
        self.job = job
        self.every = job.process.logging.log_every
        self.total = job.process.train.steps
        self._began = time.perf_counter()
        self._first_step = 0

    def on_start(self, job: JobConfig, run_id: str, step: int, total: int) -> None:
        self._began, self._first_step = time.perf_counter(), step
        self.pipes.log.info(
            f"training {job.name} ({', '.join(job.experts)}) run {run_id} from step {step}/{total}"
        )

    def on_step(self, record: dict) -> None:
        step = record["step"] + 1
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self._began
        rate = (step - self._first_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else None
        payload = {k: record.get(k) for k in PROGRESS_FIELDS}
        payload |= {
            "kind": "progress",
            "run_id": record["run_id"],
            "steps_per_s": round(rate, 3),
            "eta_s": eta,
        }
        self.pipes.report_custom_message(payload)
        ema = record.get("loss_ema_50")
        self.pipes.log.info(
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%), {rate:.2f} steps/s, "
            f"ETA {eta or 0:.0f}s, {record['expert']} loss EMA50 {ema if ema is None else round(ema, 5)}"
        )

    def on_transition(self, transition: Transition) -> None:
        self.pipes.report_custom_message({"kind": "transition", **transition.to_json()})
        self.pipes.log.info(describe_transition(transition))

    def on_checkpoint(self, step: int, files: list[Path]) -> None:
        self.pipes.log.info(f"checkpoint at step {step}: {', '.join(p.name for p in files)}")

    def on_end(self, result) -> None:
        summary = summarize(result.files, self.job.experts)
        for expert in self.job.experts:
            lora = summary.final_loras.get(expert)
            self.pipes.report_asset_materialization(
                asset_key=asset_key(expert),
                metadata=materialization_metadata(summary, expert),
                data_version=_file_hash(lora) if lora else None,
            )

    def log(self, message: str) -> None:
        self.pipes.log.info(message)


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _table(rows: list[dict], types: dict[str, str]) -> dict:
    return {
        "type": "table",
        "raw_value": {
            "records": [{k: row.get(k) for k in types} for row in rows],
            "schema": [{"name": k, "type": t} for k, t in types.items()],
        },
    }


TRANSITION_COLUMNS = {"step": "int", "phase": "string", "criteria": "string"}


def rounded(value, digits: int = 4):
    """Floats to `digits` significant digits (what a person reads); anything else unchanged."""
    if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
        return float(f"{value:.{digits}g}")
    return value


def criteria_summary(criteria: list[dict]) -> str:
    """One short line: how many exit criteria passed, and each failing one with its value and bar."""
    failing = [c for c in criteria if not c["passed"]]
    head = f"{len(criteria) - len(failing)}/{len(criteria)} passed"
    if not failing:
        return head
    shown = ", ".join(
        f"{c['name']}={rounded(c['value'])} (needs {c['op']} {rounded(c['threshold'])})" for c in failing
    )
    return f"{head}; failing: {shown}"


def transition_rows(transitions: list[dict]) -> list[dict]:
    """One expert's transition table: three narrow columns per phase change (every criterion with
    its value: DuckDB `phase_transitions`)."""
    return [
        {
            "step": t["step"],
            "phase": f"{t['from_phase']} -> {t['to_phase']} (alpha {t['from_alpha']:g} -> {t['to_alpha']:g})",
            "criteria": ("forced; " if t["forced"] else "") + criteria_summary(t["criteria"]),
        }
        for t in transitions
    ]


def materialization_metadata(summary: RunSummary, expert: str) -> dict:
    mine = summary.experts[expert]
    meta: dict = {
        "run_id": {"type": "text", "raw_value": summary.run_id or ""},
        "steps": {"type": "int", "raw_value": summary.steps},
        "expert_steps": {"type": "int", "raw_value": mine.steps},
        "final_loss": {"type": "float", "raw_value": rounded(mine.final_loss)},
        "loss_ema_10": {"type": "float", "raw_value": rounded(mine.loss_ema_10)},
        "loss_ema_50": {"type": "float", "raw_value": rounded(mine.loss_ema_50)},
        "loss_ema_100": {"type": "float", "raw_value": rounded(mine.loss_ema_100)},
        "gradient_stability_avg": {"type": "float", "raw_value": rounded(mine.gradient_stability_avg)},
        "phase": {"type": "text", "raw_value": mine.phase or ""},
        "alpha": {"type": "float", "raw_value": rounded(mine.alpha)},
        "phase_transitions": _table(
            transition_rows([t for t in summary.transitions if t["expert"] == expert]), TRANSITION_COLUMNS
        ),
        "checkpoints": {
            "type": "json",
            "raw_value": [p.name for p in summary.checkpoints if expert in p.name],
        },
        "steps_per_s": {"type": "float", "raw_value": round(summary.steps_per_second, 3)},
        "config_hash": {"type": "text", "raw_value": summary.config_hash},
        "skipped_steps": {"type": "json", "raw_value": summary.skipped},
    }
    meta = {k: v for k, v in meta.items() if v["raw_value"] is not None}
    if expert in summary.final_loras:
        meta["lora"] = {"type": "path", "raw_value": str(summary.final_loras[expert])}
    if summary.plot is not None:
        meta["loss_plot"] = {"type": "path", "raw_value": str(summary.plot)}
        encoded = base64.b64encode(summary.plot.read_bytes()).decode()
        meta["loss_plot_preview"] = {
            "type": "md",
            "raw_value": f"![loss per expert](data:image/png;base64,{encoded})",
        }
    return meta
