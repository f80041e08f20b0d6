"""The metrics database on a real tiny run: row counts, idempotence, resume, types, views, and
concurrency: DuckDB lets one read-write process XOR many read-only ones open a file, so ingestion
writes a copy and swaps it in, and no open session of a user blocks it."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from wan_assets.core.config import parse_config
from wan_assets.core.data.cache import EncoderHandle, cache_dataset
from wan_assets.core.metrics.database import (
    DatabaseBusy,
    MetricsDbError,
    ingest_evaluations,
    ingest_run,
    load_run,
)
from wan_assets.core.metrics.report import format_table, query, summary
from wan_assets.core.train.loop import TrainResult, train
from wan_assets.core.train.metrics_log import METRIC_FIELDS, read_lines, truncate

from .conftest import CONFIGS, REPO

# A transition needs >= 100 losses of an expert (alpha_schedule.MIN_LOSS_SAMPLES); experts
# alternate every 10 steps, so both move on near step 190 of 240.
NUM_STEPS = 240
SAVE_EVERY = 40
TABLES = ("runs", "metrics", "phase_transitions", "checkpoints", "evaluations")

# A user's own DuckDB session (CLI, notebook): opens the file, says so, keeps it open, closes.
HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "ro")
if sys.argv[2] == "rw":
    con.begin()
    con.execute("DELETE FROM metrics")  # a writer mid-transaction: nobody may see this
print("open", flush=True)
time.sleep(float(sys.argv[3]))
con.close()
"""

# A user's session left open (a notebook): runs each SQL line it is given on its one connection.
SESSION = """
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "ro")
if sys.argv[2] == "rw":
    con.begin()
print("open", flush=True)
for sql in sys.stdin:
    print(con.execute(sql).fetchall()[0][0], flush=True)
"""

# An ingest that takes its turn and keeps it (a slow one), to show writers queue.
TURN = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1] + ".lock", os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)  # as ingestion does: the last writer's PID may be longer
os.write(fd, str(os.getpid()).encode())
print("open", flush=True)
time.sleep(60)
"""

INGEST = """
import sys
from pathlib import Path
from wan_assets.core.metrics.database import ingest_run
for _ in range(3):
    ingest_run(Path(sys.argv[1]), Path(sys.argv[2]), run_id=sys.argv[3])
"""

# A dashboard polling the database until told to stop; prints how many queries and counts it saw.
POLLER = """
import sys
from pathlib import Path
from wan_assets.core.metrics.report import query
seen, n = set(), 0
while not Path(sys.argv[2]).exists():
    seen.add(query(Path(sys.argv[1]), "SELECT count(*) FROM metrics", timeout_s=30)[1][0][0])
    n += 1
print(n, sorted(seen))
"""


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, clips_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    root = tmp_path_factory.mktemp("metrics_run")
    raw = yaml.safe_load((CONFIGS / "tiny_cpu.yaml").read_text())
    process = raw["config"]["process"][0]
    process["model"]["name_or_path"] = str(tiny_model_dir)
    process["datasets"][0]["folder_path"] = str(clips_dir)
    process["train"]["steps"] = NUM_STEPS
    process["save"]["save_every"] = SAVE_EVERY
    del process["sample"]  # sample videos are not what the database stores
    job = parse_config(raw, workdir=root).job
    cache_dataset(job, root / "cache", EncoderHandle(job.process.model.name_or_path))
    result = train(job, root / "cache")
    assert len(result.transitions) >= 1, "the fixture run must move phase to test transitions"
    return result


@pytest.fixture
def db(run: TrainResult, tmp_path: Path) -> Path:
    path = tmp_path / "metrics.duckdb"
    ingest_run(path, run.files.root)
    return path


def counts(db: Path) -> dict[str, int]:
    return {table: query(db, f"SELECT count(*) FROM {table}")[1][0][0] for table in TABLES}


def copy_run(run: TrainResult, tmp_path: Path) -> Path:
    """A copy keeps the folder name: the run's name is the folder's (`<training_folder>/<name>`)."""
    return Path(shutil.copytree(run.files.root, tmp_path / "copy" / run.files.root.name))


def spawn(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )


def hold(db: Path, mode: str, seconds: float) -> subprocess.Popen:
    proc = spawn(HOLDER, db, mode, seconds)
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_rows_match_the_files_of_the_run(run: TrainResult, db: Path) -> None:
    lines = read_lines(run.files.metrics)
    assert len(lines) == NUM_STEPS
    _, rows = query(db, "SELECT step, expert, loss, run_id FROM metrics ORDER BY step")
    assert rows == [(x["step"], x["expert"], x["loss"], run.run_id) for x in lines]

    on_disk = {str(p): p.stat().st_size for p in run.files.root.glob("*.safetensors")}
    _, rows = query(db, "SELECT path, bytes, final, step FROM checkpoints")
    assert {path: size for path, size, _, _ in rows} == on_disk
    assert sorted(step for *_, final, step in rows if final) == [NUM_STEPS, NUM_STEPS]

    _, rows = query(
        db,
        "SELECT step, expert, from_phase, to_phase, to_alpha, criteria FROM phase_transitions ORDER BY step",
    )
    expected = [t.to_json() for t in sorted(run.transitions, key=lambda t: t.step)]
    keys = ("step", "expert", "from_phase", "to_phase", "to_alpha")
    assert [r[:5] for r in rows] == [tuple(t[k] for k in keys) for t in expected]
    assert [json.loads(r[5]) for r in rows] == [t["criteria"] for t in expected]

    _, [(run_id, status, steps, experts, in_order)] = query(
        db, "SELECT run_id, status, steps, experts, started < finished FROM runs"
    )
    assert (run_id, status, steps, experts, in_order) == (
        run.run_id,
        "finished",
        NUM_STEPS,
        ["high_noise", "low_noise"],
        True,
    )


def test_ingesting_again_changes_no_counts(run: TrainResult, db: Path) -> None:
    rows = [{"checkpoint": "base", "step": 0, "expert": "high_noise", "quantile": 0.5, "val_loss": 1.0}]
    ingest_evaluations(db, run.run_id, rows)
    before = counts(db)
    assert ingest_run(db, run.files.root).num_metrics == NUM_STEPS
    ingest_evaluations(db, run.run_id, rows)
    assert counts(db) == before


def test_a_resumed_run_ends_with_one_row_per_step(run: TrainResult, tmp_path: Path) -> None:
    db = tmp_path / "metrics.duckdb"
    run_dir = copy_run(run, tmp_path)
    jsonl = run_dir / run.files.metrics.name
    lines = read_lines(jsonl)
    # Killed at step 200 mid-write: a torn last line.
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines[:200]) + '{"run_id": "x", "step": 2')
    assert ingest_run(db, run_dir, status="running").num_metrics == 200
    assert query(db, "SELECT count(*), max(step), any_value(finished) FROM runs JOIN metrics USING (run_id)")[
        1
    ] == [(200, 199, None)]
    # Resume from the checkpoint at 160: the JSONL is cut back to it, then steps 160.. come again.
    truncate(jsonl, 160)
    with jsonl.open("a") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines[160:])
        f.write(json.dumps({**lines[-1], "loss": 9.5}) + "\n")  # a step logged twice: the later line wins
    assert ingest_run(db, run_dir).num_metrics == NUM_STEPS
    _, [(num, distinct, last_loss)] = query(
        db, "SELECT count(*), count(DISTINCT step), max(loss) FILTER (WHERE step = 239) FROM metrics"
    )
    assert (num, distinct, last_loss) == (NUM_STEPS, NUM_STEPS, 9.5)


def test_types_come_from_metric_fields_and_non_finite_becomes_null(run: TrainResult, tmp_path: Path) -> None:
    db = tmp_path / "metrics.duckdb"
    run_dir = copy_run(run, tmp_path)
    jsonl = run_dir / run.files.metrics.name
    lines = read_lines(jsonl)
    lines[5] |= {"loss": math.nan, "grad_norm": math.inf}  # json.dumps writes bare NaN / Infinity
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    ingest_run(db, run_dir)
    _, rows = query(
        db, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'metrics'"
    )
    canonical = {
        name: duckdb.sql(f"SELECT typeof(NULL::{kind})").fetchall()[0][0]
        for name, kind in METRIC_FIELDS.items()
    }
    assert dict(rows) == canonical
    assert canonical["timestamp"] == "TIMESTAMP WITH TIME ZONE"
    doubles = [name for name, kind in METRIC_FIELDS.items() if kind == "DOUBLE"]
    non_finite = " + ".join(f"count(*) FILTER (WHERE NOT isfinite({name}))" for name in doubles)
    assert query(db, f"SELECT {non_finite} FROM metrics")[1] == [(0,)]
    assert query(db, "SELECT loss, grad_norm FROM metrics WHERE step = 5")[1] == [(None, None)]
    assert query(db, "SELECT gradient_stability FROM metrics WHERE step = 0")[1] == [(None,)]  # null in JSONL


def test_views_answer_the_common_questions(run: TrainResult, db: Path) -> None:
    lines = read_lines(run.files.metrics)
    assert query(db, "SELECT count(*) FROM expert_curves")[1] == [(NUM_STEPS,)]
    _, rows = query(db, "SELECT expert, step, loss_ema_50 FROM last_metrics ORDER BY expert")
    last = {x["expert"]: x for x in lines}  # the last line of each expert
    assert rows == [(e, last[e]["step"], last[e]["loss_ema_50"]) for e in ("high_noise", "low_noise")]

    checkpoints = dict(query(db, "SELECT expert, path FROM checkpoints WHERE final")[1])
    scores = [("base", 0, 2.0), (checkpoints["high_noise"], NUM_STEPS, 1.0)]
    evaluations = [
        {"checkpoint": c, "step": s, "expert": "high_noise", "quantile": q, "val_loss": v + q}
        for c, s, v in scores
        for q in (0.25, 0.75)
    ]
    ingest_evaluations(db, run.run_id, evaluations)
    _, rows = query(
        db,
        "SELECT expert, steps, transitions, best_checkpoint, best_step, best_val_loss, base_val_loss "
        "FROM run_summary WHERE run_id = ? ORDER BY expert",
        [run.run_id],
    )
    moves = {e: sum(t.expert == e for t in run.transitions) for e in ("high_noise", "low_noise")}
    assert rows == [
        ("high_noise", NUM_STEPS // 2, moves["high_noise"], checkpoints["high_noise"], NUM_STEPS, 1.5, 2.5),
        ("low_noise", NUM_STEPS // 2, moves["low_noise"], None, None, None, None),
    ]


def test_summary_names_each_expert_and_transition(run: TrainResult, db: Path) -> None:
    text = summary(db)
    assert run.run_id in text and "high_noise" in text and "low_noise" in text
    for t in run.transitions:
        assert re.search(rf"{t.step}\s+{t.expert}\s+{t.from_phase}\s+{t.to_phase}", text)


def test_format_table_aligns_and_compacts() -> None:
    text = format_table(["name", "value"], [("a", 1.23456789), ("bb", None), ("c", 10)])
    assert text.splitlines() == [
        "name   value",
        "----  ------",
        "a     1.2346",
        "bb      NULL",
        "c         10",
    ]


def test_query_refuses_writes_and_a_missing_database(db: Path, tmp_path: Path) -> None:
    before = counts(db)
    with pytest.raises(MetricsDbError, match=r"read-only.*only reads"):
        query(db, "DELETE FROM metrics")
    assert counts(db) == before
    with pytest.raises(MetricsDbError, match=r"no metrics database at .*wan-assets demo"):
        query(tmp_path / "absent.duckdb", "SELECT 1")


@pytest.mark.parametrize("mode", ["ro", "rw"])
def test_an_open_session_never_blocks_ingestion(
    run: TrainResult, db: Path, tmp_path: Path, mode: str
) -> None:
    session = subprocess.Popen(
        [sys.executable, "-c", SESSION, str(db), mode],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert session.stdout.readline().strip() == "open"

    def ask(sql: str) -> int:
        session.stdin.write(sql + "\n")
        session.stdin.flush()
        return int(session.stdout.readline())

    try:
        assert ask("SELECT count(*) FROM metrics") == NUM_STEPS
        began = time.monotonic()
        ingest_run(db, copy_run(run, tmp_path), run_id="another", timeout_s=5)
        ingest_run(db, run.files.root, timeout_s=5)  # re-ingest: idempotent
        assert time.monotonic() - began < 5
        assert ask("SELECT count(*) FROM metrics") == NUM_STEPS  # the version it opened, still working
    finally:
        session.stdin.close()
        assert session.wait(timeout=30) == 0
    _, [(num, distinct, runs)] = query(
        db, "SELECT count(*), count(DISTINCT (run_id, step)), count(DISTINCT run_id) FROM metrics"
    )
    assert (num, distinct, runs) == (2 * NUM_STEPS, 2 * NUM_STEPS, 2)  # a new reader sees the new rows
    assert not [p.name for p in db.parent.iterdir() if p.name.endswith((".tmp", ".wal"))]


def test_ingests_queue_one_at_a_time(run: TrainResult, db: Path, tmp_path: Path) -> None:
    turn = spawn(TURN, db)
    assert turn.stdout.readline().strip() == "open"
    try:
        with pytest.raises(DatabaseBusy, match=rf"another ingest \(PID {turn.pid}\)"):
            ingest_run(db, run.files.root, timeout_s=0.5)
    finally:
        turn.kill()
        turn.wait()
    # A killed ingest leaves its copy behind; the next one clears it.
    (tmp_path / f".{db.name}.dead.tmp").write_bytes(b"half")
    (tmp_path / f".{db.name}.dead.tmp.wal").write_bytes(b"half")
    # Two processes ingesting at once, each from the file the other may just have replaced.
    copies = {run_id: copy_run(run, tmp_path / run_id) for run_id in ("first", "second")}
    ingests = [spawn(INGEST, db, run_dir, run_id) for run_id, run_dir in copies.items()]
    assert [p.wait(timeout=120) for p in ingests] == [0, 0]
    _, rows = query(db, "SELECT run_id, count(*) FROM metrics GROUP BY run_id")
    assert dict(rows) == {"first": NUM_STEPS, run.run_id: NUM_STEPS, "second": NUM_STEPS}
    assert not list(tmp_path.glob(f".{db.name}.*"))


def test_load_run_brings_the_evaluations_along_once(run: TrainResult, tmp_path: Path) -> None:
    db = tmp_path / "metrics.duckdb"
    run_dir = copy_run(run, tmp_path)
    scores = [
        {"checkpoint": "base", "step": 0, "expert": "low_noise", "quantile": q, "val_loss": 1.0}
        for q in (0.1, 0.9)
    ]
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "scores.json").write_text(json.dumps(scores))
    stats = load_run(db, run_dir)
    assert (stats.num_metrics, stats.num_evaluations) == (NUM_STEPS, 2)
    before = counts(db)
    load_run(db, run_dir)
    assert counts(db) == before and before["evaluations"] == 2
    data = json.loads((run_dir / "data.json").read_text())
    assert query(db, "SELECT num_clips, num_samples FROM runs")[1] == [
        (data["num_clips"], data["num_samples"])
    ]
    assert data["num_clips"] > 0


def test_a_reader_waits_for_a_writer_and_never_sees_its_open_transaction(db: Path) -> None:
    writer = hold(db, "rw", 1.5)
    with pytest.raises(DatabaseBusy, match="open for writing"):
        query(db, "SELECT 1", timeout_s=0.3)
    assert query(db, "SELECT count(*) FROM metrics", timeout_s=30)[1] == [(NUM_STEPS,)]
    assert writer.wait(timeout=10) == 0


def test_a_writer_gets_in_between_polling_readers(run: TrainResult, db: Path, tmp_path: Path) -> None:
    stop = tmp_path / "stop"
    pollers = [spawn(POLLER, db, stop) for _ in range(3)]
    time.sleep(1.0)  # they are polling, their queries overlapping
    waits = []
    for _ in range(5):
        began = time.monotonic()
        ingest_run(db, run.files.root, timeout_s=30)
        waits.append(time.monotonic() - began)
    stop.touch()
    reports = [p.communicate(timeout=30)[0].split(maxsplit=1) for p in pollers]
    # Writing in place, overlapping readers kept the writer out for up to 8 s per ingest.
    assert max(waits) < 3.0, waits
    for num_queries, seen in reports:
        assert int(num_queries) > 0 and seen.strip() == f"[{NUM_STEPS}]"  # whole ingests only
