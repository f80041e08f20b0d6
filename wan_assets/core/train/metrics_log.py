"""The metrics JSONL (docs/architecture.md §5.2): one line per optimizer step, the seed's field names kept.

Existing tooling (the seed UI, scripts) reads these names; DuckDB reads the same file with the
column types below. NaN and inf are written as null, never as bare NaN (which is not JSON).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from wan_assets.core.files import write_text

# Field -> DuckDB type: the one definition of the schema (training writes it, DuckDB loads it).
METRIC_FIELDS: dict[str, str] = {
    "run_id": "VARCHAR",
    "step": "BIGINT",
    "timestamp": "TIMESTAMPTZ",
    "expert": "VARCHAR",
    "loss": "DOUBLE",
    "gradient_stability": "DOUBLE",
    "lr_0": "DOUBLE",
    "lr_1": "DOUBLE",
    "learning_rate": "DOUBLE",
    "alpha_enabled": "BOOLEAN",
    "phase": "VARCHAR",
    "phase_idx": "INTEGER",
    "steps_in_phase": "BIGINT",
    "conv_alpha": "DOUBLE",
    "linear_alpha": "DOUBLE",
    "lora_scale": "DOUBLE",
    "loss_slope": "DOUBLE",
    "loss_r2": "DOUBLE",
    "loss_samples": "INTEGER",
    "loss_cv": "DOUBLE",
    "gradient_stability_avg": "DOUBLE",
    "loss_ema_10": "DOUBLE",
    "loss_ema_50": "DOUBLE",
    "loss_ema_100": "DOUBLE",
    "grad_ema_10": "DOUBLE",
    "grad_ema_50": "DOUBLE",
    "grad_ema_100": "DOUBLE",
    "grad_norm": "DOUBLE",
    "timestep": "DOUBLE",
    "bucket": "VARCHAR",
    "tokens": "BIGINT",
    "step_time_s": "DOUBLE",
    "peak_mem_gib": "DOUBLE",
    "skipped": "VARCHAR",
}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_line(record: dict[str, Any]) -> str:
    unknown = set(record) - set(METRIC_FIELDS)
    assert not unknown, f"metrics fields not in the schema: {sorted(unknown)}"
    return json.dumps({k: _clean(v) for k, v in record.items()}, allow_nan=False)


class MetricsLog:
    """Append-only JSONL; each line is flushed so a killed run keeps every logged step."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(format_line(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


def truncate(path: Path, num_steps: int) -> int:
    """Keep the lines of steps < num_steps (a resume from the checkpoint after num_steps steps).

    A torn last line from a killed process is dropped too. Returns the number of lines kept.
    """
    if not path.is_file():
        return 0
    kept = [line for line in read_lines(path) if line["step"] < num_steps]
    write_text(path, "".join(json.dumps(line) + "\n" for line in kept))
    return len(kept)


def read_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
    return lines
