"""The metrics database (docs/architecture.md §7): every training metric of every run, queryable in DuckDB.

One DuckDB file (`<workdir>/metrics.duckdb`) holds `runs`, `metrics` (every JSONL field of 5.2,
typed from `METRIC_FIELDS`), `phase_transitions`, `checkpoints` and `evaluations`, plus views for
the common questions (`expert_curves`, `last_metrics`, `checkpoint_scores`, `run_summary`).
Ingestion is idempotent: a run's rows are deleted and re-inserted in one transaction, so
re-ingesting a run, or a resumed run whose JSONL was truncated and continued, leaves exactly one
row per step.

Concurrency. DuckDB 2.0 lets one process open a file read-write, or any number open it read-only,
never both, and fails a conflicting `connect` at once (measured, see tests/test_metrics_db.py).
Writing in place would let any reader, even a read-only duckdb CLI left open, hold ingestion off.
So ingestion never writes the file readers open: under an flock on `<db>.lock` (writers queue one
at a time) it copies the database to a hidden temporary file, writes one transaction there,
closes it and renames it over `metrics.duckdb` (`os.replace`, atomic). A session that has the file
open keeps reading the version it opened (on Linux an open file survives the rename); a new
connection sees the new data; nobody ever sees a half-written ingest. Readers wait only for a
user's own read-write session on the file (DuckDB's lock), with backoff up to `READ_TIMEOUT_S`.
Writes made to `metrics.duckdb` by anyone else are replaced by the next ingest: it is a product
of the run folders, rebuilt from them by re-materializing `training_metrics`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from wan_assets.core.errors import MetricsDbError
from wan_assets.core.experts import EXPERTS
from wan_assets.core.files import atomic_output
from wan_assets.core.train.metrics_log import METRIC_FIELDS, read_lines

if TYPE_CHECKING:
    from wan_assets.core.train.run_files import RunFiles

WRITE_TIMEOUT_S = 30.0  # how long an ingest waits for the ones queued before it (each takes about a second)
READ_TIMEOUT_S = 10.0
RUN_STATUSES = ("running", "finished", "failed")
BASE_CHECKPOINT = "base"  # `evaluations.checkpoint` of the base model (no LoRA), scored as step 0

# --- schema: table -> (column -> DuckDB type, primary key); the DDL is generated from these --------------


def _columns(spec: str) -> dict[str, str]:
    return dict(part.split(maxsplit=1) for part in spec.split(", "))


TABLES: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "runs": (
        _columns(
            "run_id VARCHAR, name VARCHAR, config_hash VARCHAR, experts VARCHAR[], started TIMESTAMPTZ, "
            "finished TIMESTAMPTZ, status VARCHAR, steps BIGINT, run_dir VARCHAR, num_clips BIGINT, "
            "num_samples BIGINT"
        ),
        ("run_id",),
    ),
    "metrics": (METRIC_FIELDS, ("run_id", "step")),
    "phase_transitions": (
        _columns(
            "run_id VARCHAR, step BIGINT, expert VARCHAR, from_phase VARCHAR, to_phase VARCHAR, "
            "from_alpha DOUBLE, to_alpha DOUBLE, forced BOOLEAN, criteria JSON"
        ),
        # to_phase too: a forced move in the step of a normal one is a second row, not a key clash.
        ("run_id", "expert", "step", "to_phase"),
    ),
    "checkpoints": (
        _columns("run_id VARCHAR, path VARCHAR, step BIGINT, expert VARCHAR, bytes BIGINT, final BOOLEAN"),
        ("path",),
    ),
    # run_id is in the key because the base model's scores ('base') depend on the run's clips.
    "evaluations": (
        _columns(
            "run_id VARCHAR, checkpoint VARCHAR, step BIGINT, expert VARCHAR, quantile DOUBLE, val_loss DOUBLE"
        ),
        ("run_id", "checkpoint", "expert", "quantile"),
    ),
}

VIEWS: dict[str, str] = {
    "expert_curves": """
        SELECT run_id, step, expert, loss, loss_ema_10, loss_ema_50, loss_ema_100,
               gradient_stability_avg, phase, conv_alpha
        FROM metrics""",
    "last_metrics": """
        SELECT * FROM metrics
        QUALIFY row_number() OVER (PARTITION BY run_id, expert ORDER BY step DESC) = 1""",
    "checkpoint_scores": """
        SELECT run_id, checkpoint, expert, any_value(step) AS step,
               avg(val_loss) AS mean_val_loss, count(*) AS num_quantiles
        FROM evaluations GROUP BY run_id, checkpoint, expert""",
    "run_summary": """
        WITH steps AS (
            SELECT run_id, expert,
                   count(*) FILTER (WHERE skipped IS NULL) AS steps,
                   count(*) FILTER (WHERE skipped IS NOT NULL) AS skipped_steps,
                   max(step) AS last_step
            FROM metrics GROUP BY run_id, expert),
        transitions AS (
            SELECT run_id, expert, count(*) AS transitions FROM phase_transitions GROUP BY run_id, expert),
        best AS (
            SELECT run_id, expert,
                   arg_min(checkpoint, mean_val_loss) AS best_checkpoint,
                   arg_min(step, mean_val_loss) AS best_step,
                   min(mean_val_loss) AS best_val_loss,
                   min(mean_val_loss) FILTER (WHERE checkpoint = 'base') AS base_val_loss
            FROM checkpoint_scores GROUP BY run_id, expert)
        SELECT s.run_id, r.name, s.expert, s.steps, s.skipped_steps, s.last_step,
               l.loss_ema_50 AS final_loss_ema_50, l.phase AS final_phase, l.conv_alpha AS final_alpha,
               coalesce(t.transitions, 0) AS transitions,
               b.best_checkpoint, b.best_step, b.best_val_loss, b.base_val_loss
        FROM steps s
        JOIN last_metrics l USING (run_id, expert)
        LEFT JOIN runs r USING (run_id)
        LEFT JOIN transitions t USING (run_id, expert)
        LEFT JOIN best b USING (run_id, expert)""",
}


class DatabaseBusy(MetricsDbError):
    """Another process held the file (a read-write session) or the writers' lock past the retry window."""


@dataclass(frozen=True)
class IngestStats:
    run_id: str
    num_metrics: int
    num_transitions: int
    num_checkpoints: int
    num_evaluations: int = 0


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create what is missing; new `METRIC_FIELDS` reach an old file as added columns."""
    for table, (columns, key) in TABLES.items():
        body = ", ".join(f"{name} {kind}" for name, kind in columns.items())
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({body}, PRIMARY KEY ({', '.join(key)}))")
        for name, kind in columns.items():
            con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
    for view, sql in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {view} AS {sql}")


# --- connections ---------------------------------------------------------------------------------------

_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.+?) \(PID (\d+)\)")


def _attempts(deadline: float) -> Iterator[None]:
    """Yield once per attempt, sleeping 20 ms doubling to 0.5 s between them, until the deadline."""
    delay = 0.02
    while True:
        yield
        if time.monotonic() + delay > deadline:
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _writers_lock(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".lock")


@contextmanager
def _writer_turn(db_path: Path, deadline: float, timeout_s: float) -> Iterator[None]:
    """Hold `<db>.lock` while copying, writing and swapping: two ingests must not both start from
    the same old file (the second swap would drop the first one's rows)."""
    path = _writers_lock(db_path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in _attempts(deadline):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                continue
        else:
            pid = path.read_text(encoding="utf-8").strip() or "unknown"
            raise DatabaseBusy(
                f"metrics database {db_path} is busy: another ingest (PID {pid}) still held it after "
                f"{timeout_s:g}s; writers queue one at a time, re-run when it is done"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the turn


def _wal(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".wal")


def _remove_stale_copies(db_path: Path) -> None:
    """Temporary copies (and their WALs) of ingests that were killed; called under the writers' lock."""
    for path in db_path.parent.glob(f".{db_path.name}.*.tmp*"):
        path.unlink(missing_ok=True)


def _is_lock_conflict(exc: duckdb.Error) -> bool:
    text = str(exc)
    # Another process holds DuckDB's file lock / this process holds the other kind of connection.
    return "Could not set lock on file" in text or "different configuration" in text


def _holder(exc: duckdb.Error) -> str:
    match = _LOCK_HOLDER.search(str(exc))
    if match:
        return f"{Path(match.group(1)).name} (PID {match.group(2)})"
    if "different configuration" in str(exc):
        return "this process (an open read-write connection)"
    return "another process"


def _open_read_only(db_path: Path, deadline: float, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """duckdb.connect, retrying the conflict with a read-write session (DuckDB fails it at once)."""
    for _ in _attempts(deadline):
        try:
            return duckdb.connect(str(db_path), read_only=True)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_conflict(exc):
                raise
            conflict = exc
    raise DatabaseBusy(
        f"metrics database {db_path} is busy: {_holder(conflict)} has it open for writing and still did "
        f"after {timeout_s:g}s; close that session (ingestion never opens this file for writing, so "
        "it is someone's own), or retry in a moment"
    )


@contextmanager
def writer(db_path: Path, timeout_s: float = WRITE_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection to a copy of the database inside one transaction; when the block
    ends without error the copy replaces the database in one rename (see the module docstring)."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with _writer_turn(db_path, time.monotonic() + timeout_s, timeout_s):
        _remove_stale_copies(db_path)
        with atomic_output(db_path) as copy:
            if db_path.is_file():
                shutil.copyfile(db_path, copy)
            if _wal(db_path).is_file():
                # Committed work of a writer that did not checkpoint (a killed one): replayed into the
                # copy. DuckDB refuses to open a file next to a WAL that is not its own, so it goes
                # before the rename.
                shutil.copyfile(_wal(db_path), _wal(copy))
            con = duckdb.connect(str(copy))
            try:
                con.begin()
                try:
                    ensure_schema(con)
                    yield con
                except BaseException:
                    con.rollback()
                    raise
                con.commit()
            finally:
                con.close()  # checkpoints: the copy is one self-contained file
            _wal(db_path).unlink(missing_ok=True)


@contextmanager
def reader(db_path: Path, timeout_s: float = READ_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection, closed on exit."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise MetricsDbError(f"no metrics database at {db_path}; run training or `wan-assets demo` first")
    con = _open_read_only(db_path, time.monotonic() + timeout_s, timeout_s)
    try:
        yield con
    finally:
        con.close()


def _insert(
    con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[dict[str, Any]], *, replace: bool = False
) -> int:
    """Insert rows as one statement of typed column lists: ~50x faster than executemany in DuckDB."""
    if not rows:
        return 0
    columns = TABLES[table][0]
    selects = ", ".join(
        f"unnest(${i}::{kind}[]) AS {name}" for i, (name, kind) in enumerate(columns.items(), 1)
    )
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    values = [[row.get(name) for row in rows] for name in columns]
    con.execute(f"{verb} INTO {table} ({', '.join(columns)}) SELECT {selects}", values)
    return len(rows)


# --- ingest ---------------------------------------------------------------------------------------------


def ingest_run(
    db_path: Path,
    run_dir: Path,
    *,
    run_id: str | None = None,
    status: str = "finished",
    config_hash: str | None = None,
    timeout_s: float = WRITE_TIMEOUT_S,
) -> IngestStats:
    """Load a run folder (docs/architecture.md §5.1) into the database, replacing whatever it held for that run.

    `run_id` defaults to the JSONL's; `config_hash` to the sha256 of the run's config.yaml.
    """
    rows = read_run(run_dir, run_id=run_id, status=status, config_hash=config_hash)
    with writer(db_path, timeout_s) as con:
        return _write_run(con, rows)


def load_run(db_path: Path, run_dir: Path, *, timeout_s: float = WRITE_TIMEOUT_S) -> IngestStats:
    """A finished run folder and its evaluation scores (`eval/scores.json`, when evaluated), in one
    ingest: what the training_metrics asset loads, and `wan-assets train` when it ends."""
    from wan_assets.core.eval.checkpoints import scores_path  # imports torch: keep `wan-assets sql` light

    rows = read_run(run_dir)
    scores = scores_path(rows.files)
    evaluations = json.loads(scores.read_text(encoding="utf-8")) if scores.is_file() else []
    with writer(db_path, timeout_s) as con:
        stats = _write_run(con, rows)
        return dataclasses.replace(stats, num_evaluations=_write_evaluations(con, stats.run_id, evaluations))


@dataclass(frozen=True)
class RunRows:
    """What a run folder puts into each table."""

    files: RunFiles
    run: dict[str, Any]
    metrics: list[dict[str, Any]]
    transitions: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]


def read_run(
    run_dir: Path, *, run_id: str | None = None, status: str = "finished", config_hash: str | None = None
) -> RunRows:
    from wan_assets.core.train.run_files import RunFiles  # imports torch: keep `wan-assets sql` light

    if status not in RUN_STATUSES:
        raise ValueError(f"run status {status!r}; expected one of {', '.join(RUN_STATUSES)}")
    run_dir = Path(run_dir).resolve()
    files = RunFiles(run_dir, run_dir.name)
    if not files.metrics.is_file():
        raise MetricsDbError(
            f"no metrics file {files.metrics}; is {run_dir} a run folder (<training_folder>/<name>)?"
        )
    metrics = metric_rows(read_lines(files.metrics), run_id, files.metrics)
    run_id = metrics[0]["run_id"] if metrics else run_id
    if run_id is None:
        raise MetricsDbError(f"{files.metrics} holds no complete line, so no run id; pass run_id")
    last_step = metrics[-1]["step"] if metrics else -1
    scheduler = _newest_scheduler_state(files)
    transitions = [
        {**t, "run_id": run_id, "criteria": json.dumps(t["criteria"])}
        for t in scheduler.get("transitions", [])
        if t["step"] <= last_step  # a scheduler file left ahead of a truncated JSONL by a crash
    ]
    experts = list(scheduler.get("experts") or [e for e in EXPERTS if any(m["expert"] == e for m in metrics)])
    data = (
        json.loads(files.data.read_text(encoding="utf-8")) if files.data.is_file() else {}
    )  # older runs lack it
    run = {
        "run_id": run_id,
        "name": files.name,
        "config_hash": config_hash or files.config_hash(),
        "experts": experts,
        "status": status,
        "run_dir": str(files.root),
        "num_clips": data.get("num_clips"),
        "num_samples": data.get("num_samples"),
    }
    checkpoints = checkpoint_rows(files, run_id, num_steps=last_step + 1)
    return RunRows(files, run, metrics, transitions, checkpoints)


def _write_run(con: duckdb.DuckDBPyConnection, rows: RunRows) -> IngestStats:
    run_id = rows.run["run_id"]
    for table in ("metrics", "phase_transitions", "checkpoints", "runs"):
        con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
    _insert(con, "metrics", rows.metrics)
    _insert(con, "phase_transitions", rows.transitions)
    # REPLACE: a path re-used by a later run of the same name now belongs to that run.
    _insert(con, "checkpoints", rows.checkpoints, replace=True)
    _insert_run(con, rows.run)
    return IngestStats(run_id, len(rows.metrics), len(rows.transitions), len(rows.checkpoints))


def metric_rows(lines: list[dict[str, Any]], run_id: str | None, source: Path) -> list[dict[str, Any]]:
    """One row per step (a later line for a step wins), non-finite numbers as null, sorted by step."""
    by_step = {line["step"]: line for line in lines if "step" in line}
    ids = {line.get("run_id") for line in by_step.values()}
    if run_id is None and len(ids) > 1:
        raise MetricsDbError(f"{source} holds several run ids {sorted(map(str, ids))}; pass run_id")
    rows = []
    for step in sorted(by_step):
        row = {name: _finite(by_step[step].get(name)) for name in METRIC_FIELDS}
        if run_id is not None:
            row["run_id"] = run_id  # the caller's id wins over the file's
        rows.append(row)
    return rows


def _finite(value: Any) -> Any:
    # read_lines' json.loads accepts bare NaN / Infinity; DuckDB should only ever see null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _newest_scheduler_state(files: RunFiles) -> dict[str, Any]:
    """The newest `_alpha_scheduler.json`: it holds every transition up to its step."""
    newest = files.newest_alpha_scheduler()
    return json.loads(newest.read_text(encoding="utf-8")) if newest is not None else {}


def checkpoint_rows(files: RunFiles, run_id: str, *, num_steps: int) -> list[dict[str, Any]]:
    """The LoRA files on disk (pruned ones are gone); a final LoRA counts as step `num_steps`.
    A run with EMA has its `_ema` files listed too (their path tells them apart)."""
    rows = []
    for expert in EXPERTS:
        candidates = []
        for ema in (False, True):
            steps = files.steps_with(f"{expert}{'_ema' if ema else ''}.safetensors")
            candidates += [
                (None, files.lora(expert, ema=ema)),
                *((s, files.lora(expert, s, ema=ema)) for s in steps),
            ]
        for step, path in candidates:
            if path.is_file():
                final = step is None
                rows.append(
                    {
                        "run_id": run_id,
                        "path": str(path),
                        "step": num_steps if final else step,
                        "expert": expert,
                        "bytes": path.stat().st_size,
                        "final": final,
                    }
                )
    return sorted(rows, key=lambda r: (r["expert"], r["final"], r["step"]))


def _insert_run(con: duckdb.DuckDBPyConnection, run: dict[str, Any]) -> None:
    # started/finished come from the typed timestamps: ISO strings with offsets do not sort as text.
    con.execute(
        """
        INSERT INTO runs (run_id, name, config_hash, experts, started, finished, status, steps, run_dir,
                          num_clips, num_samples)
        SELECT $run_id, $name, $config_hash, $experts::VARCHAR[], min(timestamp),
               CASE WHEN $status = 'running' THEN NULL ELSE max(timestamp) END, $status, count(*), $run_dir,
               $num_clips, $num_samples
        FROM metrics WHERE run_id = $run_id
        """,
        run,
    )


def ingest_evaluations(
    db_path: Path, run_id: str, rows: list[dict[str, Any]], *, timeout_s: float = WRITE_TIMEOUT_S
) -> int:
    """Upsert validation losses; each row: checkpoint (a LoRA path or 'base'), step, expert, quantile,
    val_loss. Re-scoring a checkpoint replaces its rows; other checkpoints' scores stay."""
    with writer(db_path, timeout_s) as con:
        return _write_evaluations(con, run_id, rows)


def _write_evaluations(con: duckdb.DuckDBPyConnection, run_id: str, rows: list[dict[str, Any]]) -> int:
    needed = ("checkpoint", "step", "expert", "quantile", "val_loss")
    clean = []
    for row in rows:
        missing = [k for k in needed if k not in row]
        if missing:
            raise ValueError(f"evaluation row {row} lacks {', '.join(missing)}")
        checkpoint = str(row["checkpoint"])
        if checkpoint != BASE_CHECKPOINT:
            checkpoint = str(Path(checkpoint).resolve())  # the same spelling as `checkpoints.path`
        clean.append(
            # An EMA score's checkpoint is its `_ema` LoRA file: the path tells the two apart.
            {
                **{k: row[k] for k in needed},
                "run_id": run_id,
                "checkpoint": checkpoint,
                "val_loss": _finite(row["val_loss"]),
            }
        )
    return _insert(con, "evaluations", clean, replace=True)
