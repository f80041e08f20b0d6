"""The metrics database (DESIGN 7): every training metric of every run, queryable in DuckDB.

One DuckDB file (`<workdir>/metrics.duckdb`) holds `runs`, `metrics` (every JSONL field of 5.2,
typed from `METRIC_FIELDS`), `phase_transitions`, `checkpoints` and `evaluations`, plus views for
the common questions (`expert_curves`, `last_metrics`, `checkpoint_scores`, `run_summary`).
Ingestion is idempotent: a run's rows are deleted and re-inserted in one transaction, so
re-ingesting a run, or a resumed run whose JSONL was truncated and continued, leaves exactly one
row per step.

Concurrency, as DuckDB 2.0 behaves (measured, see tests/test_metrics_db.py):

- Across processes a file is open read-write in ONE process, or read-only in any number of
  processes, never both. A conflicting `duckdb.connect` does not wait: it fails at once with
  "Could not set lock on file ... Conflicting lock is held in <exe> (PID n)". A read-only reader
  therefore blocks every writer for as long as it keeps the file open, and a writer blocks every
  reader.
- Within one process, read-only and read-write connections to the same file cannot coexist
  ("different configuration"); several connections of the same kind share one database.
- A writer killed mid-transaction leaves a `.wal` file: the uncommitted work is lost, the
  committed data is intact, and readers and the next writer open the file normally.
- DuckDB has no queue: readers whose queries overlap can keep a writer out indefinitely.

So every connection here is short: writers open read-write, write one transaction, close;
readers open read-only, run one query, fetch, close. Both retry a lock conflict with backoff for
a bounded time (`WRITE_TIMEOUT_S`, `READ_TIMEOUT_S`) and then raise `DatabaseBusy`, naming the
process that holds the file and what to do. Writers also hold an flock on `<db>.turnstile` while
they wait and write, and readers pass through it before opening, so a waiting writer stops new
readers and gets the file once the running queries end (writers queue one at a time). A user who
keeps the file open in the duckdb CLI (even with `-readonly`) bypasses the turnstile and holds
off ingestion until they close it; `wan-assets sql` never does.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from wan_assets.core.errors import MetricsDbError
from wan_assets.core.experts import EXPERTS
from wan_assets.core.metrics_log import METRIC_FIELDS, read_lines

if TYPE_CHECKING:
    from wan_assets.core.run_files import RunFiles

WRITE_TIMEOUT_S = 30.0  # an ingest holds the file well under a second; longer means a held session
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
            "finished TIMESTAMPTZ, status VARCHAR, steps BIGINT, run_dir VARCHAR"
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
    """Another process held the file past the retry window (DuckDB: one writer XOR many readers)."""


@dataclass(frozen=True)
class IngestStats:
    run_id: str
    num_metrics: int
    num_transitions: int
    num_checkpoints: int


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


def _turnstile(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".turnstile")


def _take_turn(fd: int, deadline: float) -> bool:
    for _ in _attempts(deadline):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


def _turn_holder(path: Path) -> str:
    pid = path.read_text(encoding="utf-8").strip()  # written by the writer that holds the turn
    return f"PID {pid}" if pid else "PID unknown"


@contextmanager
def _writer_turn(db_path: Path, deadline: float, timeout_s: float) -> Iterator[None]:
    """Hold the turnstile while writing. DuckDB has no queue: overlapping readers alone can keep its
    lock from a writer for ever (measured: 8 s waits with three polling readers). Readers pass
    through the turnstile before they open, so a waiting writer stops new readers and gets the
    file as soon as the current queries end."""
    path = _turnstile(db_path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _take_turn(fd, deadline):
            raise DatabaseBusy(
                f"metrics database {db_path} is busy: another writer ({_turn_holder(path)}) still held it "
                f"after {timeout_s:g}s; writers queue one at a time, re-run when it is done"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the turn


def _wait_for_writers(db_path: Path, deadline: float, timeout_s: float) -> None:
    path = _turnstile(db_path)
    if not path.is_file():
        return  # no writer ever used this file
    fd = os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor: readers need no write access
    try:
        if not _take_turn(fd, deadline):
            raise DatabaseBusy(
                f"metrics database {db_path} is busy: a writer ({_turn_holder(path)}) was still writing "
                f"or waiting to write after {timeout_s:g}s; retry in a moment"
            )
    finally:
        os.close(fd)


def _is_lock_conflict(exc: duckdb.Error) -> bool:
    text = str(exc)
    # Another process holds DuckDB's file lock / this process holds the other kind of connection.
    return "Could not set lock on file" in text or "different configuration" in text


def _holder(exc: duckdb.Error) -> str:
    match = _LOCK_HOLDER.search(str(exc))
    if match:
        return f"{Path(match.group(1)).name} (PID {match.group(2)})"
    if "different configuration" in str(exc):
        return "this process (an open connection of the other kind, read-only vs read-write)"
    return "another process"


def _busy_message(db_path: Path, exc: duckdb.Error, read_only: bool, timeout_s: float) -> str:
    holder = _holder(exc)
    if read_only:
        return (
            f"metrics database {db_path} is busy: {holder} has it open for writing and still did after "
            f"{timeout_s:g}s; retry in a moment, or close that session if it is a long-lived one"
        )
    return (
        f"metrics database {db_path} is busy: {holder} has it open and still did after {timeout_s:g}s. "
        "DuckDB lets one process write or several read, never both: close that session (a duckdb CLI, "
        "notebook or script holding the file, read-only included), query through `wan-assets sql` "
        "(it opens, reads and closes), then re-run; ingestion is idempotent"
    )


def _open(db_path: Path, *, read_only: bool, deadline: float, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """duckdb.connect, retrying lock conflicts (DuckDB fails them at once) until the deadline."""
    for _ in _attempts(deadline):
        try:
            return duckdb.connect(str(db_path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_conflict(exc):
                raise
            conflict = exc
    raise DatabaseBusy(_busy_message(db_path, conflict, read_only, timeout_s))


@contextmanager
def writer(db_path: Path, timeout_s: float = WRITE_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-write connection inside one transaction, closed (lock released) on exit."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with _writer_turn(db_path, deadline, timeout_s):
        con = _open(db_path, read_only=False, deadline=deadline, timeout_s=timeout_s)
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
            con.close()


@contextmanager
def reader(db_path: Path, timeout_s: float = READ_TIMEOUT_S) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection, closed on exit so that it holds writers off no longer than its use."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise MetricsDbError(f"no metrics database at {db_path}; run training or `wan-assets demo` first")
    deadline = time.monotonic() + timeout_s
    _wait_for_writers(db_path, deadline, timeout_s)
    con = _open(db_path, read_only=True, deadline=deadline, timeout_s=timeout_s)
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
    """Load a run folder (DESIGN 5.1) into the database, replacing whatever it held for that run.

    `run_id` defaults to the JSONL's; `config_hash` to the sha256 of the run's config.yaml.
    """
    from wan_assets.core.run_files import RunFiles  # imports torch: keep `wan-assets sql` light

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
    checkpoints = checkpoint_rows(files, run_id, num_steps=last_step + 1)
    experts = list(scheduler.get("experts") or [e for e in EXPERTS if any(m["expert"] == e for m in metrics)])
    with writer(db_path, timeout_s) as con:
        for table in ("metrics", "phase_transitions", "checkpoints", "runs"):
            con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        _insert(con, "metrics", metrics)
        _insert(con, "phase_transitions", transitions)
        # REPLACE: a path re-used by a later run of the same name now belongs to that run.
        _insert(con, "checkpoints", checkpoints, replace=True)
        _insert_run(con, run_id, files, experts, status, config_hash or files.config_hash())
    return IngestStats(run_id, len(metrics), len(transitions), len(checkpoints))


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
    """The LoRA files on disk (pruned ones are gone); a final LoRA counts as step `num_steps`."""
    rows = []
    for expert in EXPERTS:
        steps = files.steps_with(f"{expert}.safetensors")
        candidates = [(None, files.lora(expert)), *((step, files.lora(expert, step)) for step in steps)]
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


def _insert_run(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    files: RunFiles,
    experts: list[str],
    status: str,
    config_hash: str | None,
) -> None:
    # started/finished come from the typed timestamps: ISO strings with offsets do not sort as text.
    con.execute(
        """
        INSERT INTO runs (run_id, name, config_hash, experts, started, finished, status, steps, run_dir)
        SELECT $1, $2, $3, $4::VARCHAR[], min(timestamp),
               CASE WHEN $5 = 'running' THEN NULL ELSE max(timestamp) END, $5, count(*), $6
        FROM metrics WHERE run_id = $1
        """,
        [run_id, files.name, config_hash, experts, status, str(files.root)],
    )


def ingest_evaluations(
    db_path: Path, run_id: str, rows: list[dict[str, Any]], *, timeout_s: float = WRITE_TIMEOUT_S
) -> int:
    """Upsert validation losses; each row: checkpoint (a LoRA path or 'base'), step, expert, quantile,
    val_loss. Re-scoring a checkpoint replaces its rows; other checkpoints' scores stay."""
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
            {**row, "run_id": run_id, "checkpoint": checkpoint, "val_loss": _finite(row["val_loss"])}
        )
    with writer(db_path, timeout_s) as con:
        return _insert(con, "evaluations", clean, replace=True)
