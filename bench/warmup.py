"""Warm-up: what a new bucket shape and a new process cost on top of steady training (docs/architecture.md §10).

Builds the random-weight model of `gpu_e2e.py` (12 heads x 128, 8 blocks per expert), writes
synthetic clips of six aspect ratios (six bucket shapes), caches them with `wan-assets cache`, then
runs `wan-assets train` twice with the shipped A14B recipe (`compile: true`, selective
checkpointing, the memory planner, samples mid-run and at the end), each run in its own process
and run folder, on the same workdir:
  run 1  cold: the workdir's torch.compile cache emptied first
  run 2  the same config again: compiled graphs come from the workdir's cache
(`--runs` names others: `cold,warm,warm2`; a run named `uncached...` runs with torch.compile's caches
switched off, TORCHINDUCTOR_FORCE_DISABLE_CACHES=1: it compiles everything as a cold run does, with
the memory plan of the runs before it, to compare the steady speed of compiled and loaded graphs.)
Per run, from the metrics JSONL: the steady s/step of each bucket (median of the bucket's later
half of steps), each bucket's extra time (the sum over its steps of step time minus its steady
s/step; the run's first bucket carries the compile), the total step time against steps x steady,
the number of recompiles dynamo logged, the process's wall time, and the seconds from its launch to
the end of its first step (imports, loading, baseline samples and that step, compile included).

  python bench/warmup.py --out bench/results/warmup_h200.json     # GPU, ~3 min
  python bench/warmup.py --tiny --steps 12                           # CPU smoke (no compile)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_e2e import SIZES, read_jsonl  # noqa: E402

# One aspect ratio per bucket of ASPECT_RATIOS but 9:16's mirror 10:16 (six buckets).
CLIP_SIZES = ((128, 128), (256, 144), (144, 256), (192, 144), (144, 192), (256, 160))
CLIPS_PER_SIZE = 3
NAME = "warmup"


def write_clips(folder: Path, frames: int) -> None:
    from wan_assets.core.data.synthetic import MovingShape, SampleClip, render_frames
    from wan_assets.core.data.video_io import write_video

    folder.mkdir(parents=True, exist_ok=True)
    motions = ("right", "left", "up", "down", "grows", "shrinks")
    for i, (width, height) in enumerate(CLIP_SIZES):
        for j in range(CLIPS_PER_SIZE):
            shape = MovingShape(("red", "green", "blue")[j], ("square", "triangle", "circle")[j], motions[i])
            clip = SampleClip(f"c{i}_{j}", (shape,), "black", width, height, frames, 16, j == 0)
            write_video(folder / f"{clip.name}.mp4", render_frames(clip), clip.fps)
            (folder / f"{clip.name}.txt").write_text(clip.caption)


def job_file(work: Path, model: Path, clips: Path, run: str, args) -> Path:
    """The shipped recipe; both runs share the config's name (and so the latent cache), not the run folder."""
    raw = yaml.safe_load((REPO / "configs" / "wan22_i2v_a14b.yaml").read_text())
    raw["config"]["name"] = NAME
    process = raw["config"]["process"][0]
    process["training_folder"] = str(work / f"runs_{run}")
    process["model"]["name_or_path"] = str(model)
    process["datasets"][0].update(
        folder_path=str(clips), num_frames=args.frames, max_pixels_per_frame=args.pixels**2,
        bucket_no_upscale=False, validation_split=0.1,
    )  # fmt: skip
    process["train"].update(steps=args.steps, switch_boundary_every=args.switch_every)
    if args.tiny:
        process["train"].update(compile=False)  # CPU smoke: the plumbing, not the compile
    process["save"].update(save_every=args.steps, max_step_saves_to_keep=1)
    half = args.steps // 2
    process["sample"].update(sample_every=half, width=160, height=96, num_frames=9, sample_steps=3)
    out = work / f"{run}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def cli(
    work: Path, log: Path, *args: str, timeout: float | None = None, uncached: bool = False
) -> tuple[int, float, float]:
    """The command's exit code, its wall seconds and when it was launched (unix time)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}  # the workdir's
    env["TORCH_LOGS"] = "recompiles"
    if uncached:
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    began, launched = time.perf_counter(), time.time()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "wan_assets.cli", *args, "--workdir", str(work)],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # the steps it logged so far are still analysed
            code = proc.wait()
    return code, time.perf_counter() - began, launched


def analyse(lines: list[dict], log: Path, wall: float, code: int, launched: float | None = None) -> dict:
    """Steady s/step per bucket, each bucket's extra time, the total against steps x steady, and
    (given the launch time) how long the process took to the end of its first step."""
    by_bucket: dict[str, list[float]] = {}
    order = []
    for line in lines:
        if line["bucket"] not in by_bucket:
            order.append(line["bucket"])
        by_bucket.setdefault(line["bucket"], []).append(line["step_time_s"])
    buckets = {}
    for bucket in order:
        times = by_bucket[bucket]
        steady = statistics.median(times[len(times) // 2 :])
        buckets[bucket] = {
            "steps": len(times),
            "first_s": round(times[0], 3),
            "steady_s": round(steady, 4),
            "extra_s": round(sum(t - steady for t in times), 2),
        }
    total = sum(line["step_time_s"] for line in lines)
    steady_total = sum(buckets[line["bucket"]]["steady_s"] for line in lines)
    later = [b["extra_s"] for bucket, b in buckets.items() if bucket != order[0]]
    text = log.read_text(errors="replace")
    # What a user waits for the first trained step: imports, loading, baseline samples and the first
    # step itself (compile included). A compile moved before the first step shows here, not in extra_s.
    first_end = before_first = None
    if launched is not None and lines:
        first_end = round(datetime.fromisoformat(lines[0]["timestamp"]).timestamp() - launched, 2)
        before_first = round(first_end - lines[0]["step_time_s"], 2)
    return {
        "exit": code,
        "steps": len(lines),
        "wall_s": round(wall, 1),
        "step_total_s": round(total, 2),
        "steady_total_s": round(steady_total, 2),
        "ratio": round(total / steady_total, 3) if steady_total else None,
        "extra_total_s": round(total - steady_total, 2),
        "first_bucket_extra_s": buckets[order[0]]["extra_s"] if order else None,
        "first_step_end_s": first_end,
        "before_first_step_s": before_first,
        "other_buckets_extra_max_s": max(later) if later else None,
        # By function: the blocks' compiled forward, torchao's AdamW step (per parameter shape), ...
        "recompiles": dict(Counter(re.findall(r"Recompiling function (\S+ in \S+)", text))),
        "skipped": sum(1 for line in lines if line.get("skipped")),
        "compile": next(iter(re.findall(r"^compile: .*$", text, re.MULTILINE)), None),  # graphs, cache hits
        "memory_plan": next(iter(re.findall(r"^memory plan: .*$", text, re.MULTILINE)), None),
        # The first step of each expert: the second expert reuses the first one's graphs.
        "expert_first_steps": {
            e: next(
                f"step {x['step']}, {x['bucket']}, {x['step_time_s']} s" for x in lines if x["expert"] == e
            )
            for e in dict.fromkeys(x["expert"] for x in lines)
        },
        "buckets": buckets,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--switch-every", type=int, default=6)
    parser.add_argument("--pixels", type=int, default=320, help="max pixels per frame = this squared")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wan_warmup"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny model, compile off: a CPU smoke test")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds per train process")
    parser.add_argument(
        "--runs", default="cold,warm", help="train processes in order; 'cold' empties the compile cache first"
    )
    args = parser.parse_args()

    from wan_assets.core.model.tiny import build_tiny_model

    work = args.work
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model, clips = work / "model", work / "clips"
    if not (model / "model_index.json").is_file():
        build_tiny_model(model, sizes=None if args.tiny else SIZES)
    if not clips.is_dir():
        write_clips(clips, args.frames)
    results: dict = {"sizes": None if args.tiny else SIZES, "steps": args.steps, "runs": {}}
    for run in args.runs.split(","):
        if run == "cold":
            shutil.rmtree(work / "compile_cache", ignore_errors=True)
        run_dir = work / f"runs_{run}" / NAME
        shutil.rmtree(run_dir, ignore_errors=True)
        config = job_file(work, model, clips, run, args)
        if not (work / "cache" / "index").is_dir():
            code, _, _ = cli(work, logs / "cache.log", "cache", str(config))
            if code != 0:
                print((logs / "cache.log").read_text()[-3000:])
                return 1
        log = logs / f"train_{run}.log"
        code, wall, launched = cli(
            work, log, "train", str(config), timeout=args.run_timeout, uncached=run.startswith("uncached")
        )
        lines = read_jsonl(run_dir / f"metrics_{NAME}.jsonl")
        if not lines:
            print(log.read_text()[-3000:])
            return 1
        results["runs"][run] = analyse(lines, log, wall, code, launched)
        print(
            f"{run}: {json.dumps({k: v for k, v in results['runs'][run].items() if k != 'buckets'})}",
            flush=True,
        )
        if args.out is not None:  # after each run: a run cut short by a time limit keeps the first
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    import torch  # only now: a CUDA context here would take memory from the runs' planner

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    results["environment"] = {"gpu": gpu, "torch": torch.__version__}
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    for run, r in results["runs"].items():
        print(f"\n{run}: {r['steps']} steps, exit {r['exit']}, wall {r['wall_s']} s, steps {r['step_total_s']} s "
              f"vs steady {r['steady_total_s']} s ({r['ratio']}x), recompiles {r['recompiles']}")  # fmt: skip
        print(f"  {'bucket':<14} {'steps':>5} {'first s':>8} {'steady s':>9} {'extra s':>8}")
        for bucket, b in r["buckets"].items():
            print(f"  {bucket:<14} {b['steps']:>5} {b['first_s']:>8} {b['steady_s']:>9} {b['extra_s']:>8}")
    return 0 if all(r["exit"] == 0 for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
