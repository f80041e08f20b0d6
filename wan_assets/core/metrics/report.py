"""Reading the metrics database: read-only queries, plain-text tables, the demo's summary.

Every read opens the file read-only for one query and closes it, so each query sees the newest
ingest (which swaps in a new file, see `metrics.database`) and no session is left holding an old one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb

from wan_assets.core.errors import MetricsDbError
from wan_assets.core.metrics.database import READ_TIMEOUT_S, reader

# --- read -----------------------------------------------------------------------------------------------


def query(
    db_path: Path, sql: str, params: Sequence[Any] | None = None, *, timeout_s: float = READ_TIMEOUT_S
) -> tuple[list[str], list[tuple]]:
    """Run `sql` (with `?` / `$n` params) read-only; returns (column names, rows). Writes fail clearly."""
    with reader(db_path, timeout_s) as con:
        try:
            con.execute(sql, params)
            if con.description is None:
                return [], []
            return [d[0] for d in con.description], con.fetchall()
        except duckdb.Error as exc:
            raise MetricsDbError(_query_error(exc)) from None


def _query_error(exc: duckdb.Error) -> str:
    # DuckDB messages span lines (a caret under the error position); keep the sentence.
    text = " ".join(str(exc).split("\n\n")[0].split())
    if "read-only mode" in text:
        return (
            f"query failed: {text} `wan-assets sql` only reads; training and evaluation write the "
            "metrics database"
        )
    return f"query failed: {text}"


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table: numbers right-aligned and compact (5 significant digits)."""
    cells = [[_cell(v) for v in row] for row in rows]
    numeric = [
        bool(rows) and all(_is_number(row[i]) or row[i] is None for row in rows) for i in range(len(columns))
    ]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = (
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, date):
        return value.isoformat()
    return str(value).replace("\n", "\\n")


def summary(db_path: Path, *, max_runs: int = 5, timeout_s: float = READ_TIMEOUT_S) -> str:
    """What the demo prints: per run and expert steps, final EMA50, phase, transitions, best checkpoint."""
    with reader(db_path, timeout_s) as con:
        runs = con.execute(
            "SELECT run_id, name, status, steps, started FROM runs ORDER BY started DESC NULLS LAST LIMIT ?",
            [max_runs],
        ).fetchall()
        (total,) = con.execute("SELECT count(*) FROM runs").fetchone() or (0,)
        if not runs:
            return f"metrics database {db_path}: no runs yet"
        parts = [f"metrics database {db_path}: {total} run(s), newest {len(runs)} shown"]
        for run_id, name, status, steps, started in runs:
            parts += ["", f"run {run_id}  {name}  {status}  {steps} steps  started {_cell(started)}"]
            parts.append(_summary_tables(con, run_id))
    newest = runs[0][0]
    parts += [
        "",
        f"more: wan-assets sql \"SELECT * FROM expert_curves WHERE run_id = '{newest}' ORDER BY step\"",
        "views: expert_curves, last_metrics, checkpoint_scores, run_summary",
    ]
    return "\n".join(parts)


def _summary_tables(con: duckdb.DuckDBPyConnection, run_id: str) -> str:
    experts = con.execute(
        """
        SELECT expert, steps, final_loss_ema_50, final_phase AS phase, final_alpha AS alpha, transitions,
               parse_filename(best_checkpoint) AS best_checkpoint,
               best_val_loss, base_val_loss
        FROM run_summary WHERE run_id = ? ORDER BY expert
        """,
        [run_id],
    )
    expert_table = format_table([d[0] for d in experts.description], experts.fetchall())
    moves = con.execute(
        """
        SELECT step, expert, from_phase, to_phase, from_alpha, to_alpha, forced
        FROM phase_transitions WHERE run_id = ? ORDER BY step, expert
        """,
        [run_id],
    )
    columns, rows = [d[0] for d in moves.description], moves.fetchall()
    if not rows:
        return expert_table + "\nphase transitions: none"
    return expert_table + "\nphase transitions:\n" + format_table(columns, rows)
