"""Dagster at real scale (CPU, tiny model): N new clips through the real daemon vs `wan-assets cache`.

  python bench/dagster_scale.py                 # 1000 clips (+ the 6 bad inputs)
  python bench/dagster_scale.py --clips 200 --batch 50 --out /tmp/dagster_scale.json

Writes N distinct synthetic clips (the sample set under different seeds, 10 per seed) and the six
bad inputs (corrupt, empty, not a video, too short, bad caption, no caption), then:

1. `wan-assets cache` on them (one process): wall and CPU time.
2. `wan-assets ui CONFIG` (the real webserver and daemon, its own session, DAGSTER_HOME in a temp
   folder) on an empty dataset folder; once it answers, the same clips are dropped into the folder.
   The new-clip sensor picks them up and requests batch runs, the daemon runs them, the automation
   sensor materializes `latent_cache`. Timed from the drop until `latent_cache` holds every good
   clip and no run is queued or running. CPU time: the UI process and all its descendants (daemon,
   code servers, run workers), sampled from /proc twice a second (what each used after the drop;
   a process shorter than a sample is missed).

Reports wall and CPU time of both, runs launched, encoder loads (batch runs that loaded the models),
the bad clips named by the failed runs, and the instance's size on disk (event log, run storage,
compute logs) beside the latent cache's. Goal: Dagster within 1.5x the CLI's wall time, encoder
loads == batches, every bad clip named. Both use OMP_NUM_THREADS=1 (`--threads`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wan_assets.core.data.synthetic import BAD_INPUT_KINDS, write_bad_inputs, write_sample_videos  # noqa: E402
from wan_assets.core.model.tiny import build_tiny_model  # noqa: E402

CLIPS_PER_SEED = 10
CLK_TCK = os.sysconf("SC_CLK_TCK")


def write_dataset(folder: Path, clips: int) -> list[Path]:
    """`clips` distinct good clips (seeds in sub-folders) and the bad inputs under bad/."""
    for seed in range((clips + CLIPS_PER_SEED - 1) // CLIPS_PER_SEED):
        write_sample_videos(folder / f"s{seed:03d}", seed=seed)
    videos = sorted(folder.rglob("*.mp4"))
    for extra in videos[clips:]:  # keep exactly `clips`
        extra.unlink()
        extra.with_suffix(".txt").unlink(missing_ok=True)
    write_bad_inputs(folder / "bad")
    return sorted(folder.rglob("*.mp4"))


def write_config(path: Path, folder: Path, model: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    process = raw["config"]["process"][0]
    process["model"]["name_or_path"] = str(model)
    process["datasets"][0]["folder_path"] = str(folder)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_cli(config: Path, workdir: Path, env: dict[str, str]) -> dict:
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wan_assets.cli", "cache", str(config), "--workdir", str(workdir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - began
    usage = resource_children()
    failed = [line.strip().split(": ", 1)[0] for line in stderr.splitlines() if line.startswith("  ")]
    indexed = int(stdout.rsplit("(", 1)[1].split()[0])
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(usage, 1),
        "exit": proc.returncode,
        "failed_clips": sorted(failed),
        "indexed_clips": indexed,
        "encoder_loads": 1,
        "cache_bytes": du(workdir / "cache"),
        "stdout_tail": stdout.strip().splitlines()[-1:],
    }


_CHILD_CPU = {"seen": 0.0}


def resource_children() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    delta, _CHILD_CPU["seen"] = total - _CHILD_CPU["seen"], total
    return delta


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds (user + system) of `root` and every live descendant (the daemon, its code
    servers and run workers sit in other sessions, so the tree is followed by parent pid)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state (field 3): ppid is field 4, utime 14, stime 15.
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[pid] = stats[pid][1]
            todo += children.get(pid, [])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answering(port: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"wan-assets ui exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).read()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"wan-assets ui did not answer within {timeout_s}s")


def stop_session(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM the UI's process group (it stops its daemon group itself); SIGKILL what is left."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_dagster(
    config: Path, staging: Path, folder: Path, workdir: Path, env: dict, good: int, timeout_s: float
) -> dict:
    from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter

    from wan_assets.assets.data import ENCODERS_LOADED

    home = workdir / "dagster"
    env = {**env, "DAGSTER_HOME": str(home), "WAN_ASSETS_HOME": str(workdir)}
    port = free_port()
    log = (workdir.parent / "ui.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wan_assets.cli",
            "ui",
            str(config),
            "--workdir",
            str(workdir),
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_answering(port, proc)
        time.sleep(5)  # let the daemon load the code location and tick once on the empty folder
        baseline = tree_cpu(proc.pid)
        samples: dict[int, float] = {}
        dropped = time.perf_counter()
        for path in sorted(staging.iterdir()):
            path.rename(folder / path.name)  # the whole set appears at once, as a copy-then-move does
        instance = DagsterInstance.from_config(str(home))
        finished_at = None
        while time.perf_counter() - dropped < timeout_s:
            for pid, cpu in tree_cpu(proc.pid).items():
                samples[pid] = max(samples.get(pid, 0.0), cpu)
            event = instance.get_latest_materialization_event(AssetKey("latent_cache"))
            busy = instance.get_runs_count(
                RunsFilter(
                    statuses=[
                        DagsterRunStatus.QUEUED,
                        DagsterRunStatus.STARTING,
                        DagsterRunStatus.STARTED,
                        DagsterRunStatus.NOT_STARTED,
                    ]
                )
            )
            if event and event.asset_materialization.metadata["clips"].value == good and not busy:
                finished_at = time.perf_counter()
                break
            time.sleep(0.5)
        wall = (finished_at or time.perf_counter()) - dropped
        cpu = sum(v - baseline.get(pid, 0.0) for pid, v in samples.items())
        runs = instance.get_runs()
        batch_runs = [
            r
            for r in runs
            if r.job_name == "clip_batches" or AssetKey("latents") in (r.asset_selection or set())
        ]
        loads, named, starts, ends = 0, {}, [], []
        for run in batch_runs:
            for entry in instance.all_logs(run.run_id):
                if entry.message and ENCODERS_LOADED in entry.message:
                    loads += 1
                event = entry.dagster_event
                if event is not None and event.is_step_failure:
                    data = event.step_failure_data.user_failure_data
                    if data is not None and "failed_clips" in data.metadata:
                        named.update(data.metadata["failed_clips"].value)
            record = instance.get_run_record_by_id(run.run_id)
            if record and record.start_time and record.end_time:
                starts.append(record.start_time)
                ends.append(record.end_time)
        index_runs = [r for r in runs if r not in batch_runs]
        instance.dispose()
    finally:
        stop_session(proc)
        log.close()
    return {
        "wall_s": round(wall, 1),
        "finished": finished_at is not None,
        "cpu_s": round(cpu, 1),
        "runs_launched": len(runs),
        "batch_runs": len(batch_runs),
        "other_runs": len(index_runs),
        "batch_runs_failed": sum(r.status == DagsterRunStatus.FAILURE for r in batch_runs),
        "encoder_loads": loads,
        "failed_clips_named": sorted(named),
        "batch_span_s": round(max(ends) - min(starts), 1) if starts else None,
        "event_log_bytes": du(home / "history"),
        "compute_log_bytes": du(home / "storage"),
        "schedule_tick_bytes": du(home / "schedules"),
        "cache_bytes": du(workdir / "cache"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50, help="clips per run (WAN_ASSETS_BATCH_CLIPS)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both paths")
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp one, removed)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="dagster_scale_"))
    try:
        began = time.perf_counter()
        model = build_tiny_model(root / "model")
        cli_clips = root / "cli_clips"
        videos = write_dataset(cli_clips, args.clips)
        written = len(videos) - len(BAD_INPUT_KINDS)
        staging, dag_clips = root / "staging", root / "dagster_clips"
        shutil.copytree(cli_clips, staging)
        dag_clips.mkdir()
        print(
            f"{written} clips + {len(BAD_INPUT_KINDS)} bad inputs written ({time.perf_counter() - began:.0f}s)",
            flush=True,
        )
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "PYTHONPATH": str(REPO),
            "WAN_ASSETS_BATCH_CLIPS": str(args.batch),
        }
        env.pop("WAN_ASSETS_AUTH", None)
        cli = run_cli(write_config(root / "cli.yaml", cli_clips, model), root / "cli_work", env)
        print(f"cli: {cli}", flush=True)
        good = cli["indexed_clips"]  # what the index holds when done (a "bad" input may be usable)
        dagster = run_dagster(
            write_config(root / "dagster.yaml", dag_clips, model),
            staging,
            dag_clips,
            root / "dagster_work",
            env,
            good,
            args.timeout,
        )
        print(f"dagster: {dagster}", flush=True)
        # The CLI names the file at fault (a caption error names the .txt); compare clip stems.
        bad = {Path(p).relative_to(cli_clips).with_suffix("").as_posix() for p in cli["failed_clips"]}
        expected_batches = -(-len(videos) // args.batch)
        result = {
            "clips": written,
            "good_clips": good,
            "bad_inputs": len(BAD_INPUT_KINDS),
            "batch": args.batch,
            "threads": args.threads,
            "cli": cli,
            "dagster": dagster,
            "wall_ratio": round(dagster["wall_s"] / cli["wall_s"], 2),
            "cpu_ratio": round(dagster["cpu_s"] / cli["cpu_s"], 2),
            "encoder_loads_equal_batches": dagster["encoder_loads"]
            == dagster["batch_runs"]
            == expected_batches,
            "every_bad_clip_named": {str(Path(k).with_suffix("")) for k in dagster["failed_clips_named"]}
            == bad,
            "event_log_bytes_per_clip": round(dagster["event_log_bytes"] / len(videos)),
        }
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
