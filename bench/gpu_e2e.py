"""The path users run, end to end on a GPU: the real CLI with each shipped recipe (docs/architecture.md §10).

Builds a random-weight Wan 2.2 I2V model in the diffusers layout (the tiny model's classes and
layout at a width and depth where the recipes' machinery engages: 128-wide heads, fp8-sized linears,
several blocks for the memory planner, block halves and activation offload), writes the synthetic
clips, then per recipe runs, as a user would, each as its own process:

  wan-assets cache   -> wan-assets train (bf16, samples during training and at the end)
  -> SIGKILL after the first checkpoint -> wan-assets train --resume -> wan-assets eval

and checks what a user relies on: the resumed run continues from the newest checkpoint and ends
with one JSONL line per step, the final LoRAs, the samples, and the evaluation's scores. It prints
one row per recipe: pass/fail, s/step (median of the resumed run's steps after its first two),
peak GiB, and writes the rows as JSON. Core only: no Dagster is needed on the GPU machine.

  python bench/gpu_e2e.py --out bench/results/gpu_e2e.json            # every recipe
  python bench/gpu_e2e.py --recipes a14b --steps 8                     # one

Run it whenever training, sampling or performance code changes (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Random weights at a mid size: 12 heads x 128 (the A14B head width), fp8-friendly linears, 8 blocks.
SIZES = {
    "transformer": {
        "num_attention_heads": 12,
        "attention_head_dim": 128,
        "ffn_dim": 8960,
        "num_layers": 8,
        "freq_dim": 256,
        "rope_max_seq_len": 1024,
    },
    "text_encoder": {"d_model": 512, "d_kv": 64, "num_heads": 8, "d_ff": 1024, "num_layers": 2},
    "vae": {"base_dim": 96, "num_res_blocks": 2},  # the real Wan 2.1 VAE
}
RECIPES: dict[str, tuple[str, dict]] = {
    "a14b": ("configs/wan22_i2v_a14b.yaml", {}),
    "24gb": ("configs/wan22_i2v_a14b_24gb.yaml", {}),
    "fp8_compute": ("configs/wan22_i2v_a14b.yaml", {"fp8_compute": True}),
}


@dataclass
class Row:
    recipe: str
    stages: dict[str, bool] = field(default_factory=dict)
    s_per_step: float | None = None
    peak_gib: float | None = None
    resumed_at: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.stages) and all(self.stages.values()) and not self.problems


def job_file(recipe: str, work: Path, model: Path, clips: Path, steps: int) -> Path:
    """The shipped recipe with only paths and the run's length changed (and small samples)."""
    path, train_overrides = RECIPES[recipe]
    raw = yaml.safe_load((REPO / path).read_text())
    raw["config"]["name"] = f"e2e_{recipe}"
    process = raw["config"]["process"][0]
    process["training_folder"] = str(work / "runs")
    process["model"]["name_or_path"] = str(model)
    # Small clips upscaled into a 320x320-pixel bucket: 2,000 tokens a step, 10 clips, 2 held out.
    process["datasets"][0].update(
        folder_path=str(clips), num_frames=17, max_pixels_per_frame=320 * 320, bucket_no_upscale=False,
        validation_split=0.2,
    )  # fmt: skip
    process["train"].update(steps=steps, switch_boundary_every=3, **train_overrides)
    process["save"].update(save_every=4, max_step_saves_to_keep=3)
    process["sample"].update(sample_every=6, width=160, height=96, num_frames=9, sample_steps=3)
    out = work / f"{recipe}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def cli(*args: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "wan_assets.cli", *args]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)


def finished(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            break  # a line cut by the kill
    return lines


def run_recipe(recipe: str, work: Path, model: Path, clips: Path, steps: int, logs: Path) -> Row:
    row = Row(recipe)
    config = job_file(recipe, work, model, clips, steps)
    wd = ["--workdir", str(work)]
    name = f"e2e_{recipe}"
    run_dir = work / "runs" / name
    metrics = run_dir / f"metrics_{name}.jsonl"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time; model and cache are kept

    row.stages["cache"] = finished(cli("cache", str(config), *wd, log=logs / f"{recipe}_cache.log"), 600) == 0
    if not row.stages["cache"]:
        return row
    # Killed once the first checkpoint (step 4) is complete and training has gone on past it.
    train = cli("train", str(config), *wd, log=logs / f"{recipe}_train.log")
    deadline = time.monotonic() + 900
    while train.poll() is None and time.monotonic() < deadline and len(read_jsonl(metrics)) < 6:
        time.sleep(0.2)
    alive = train.poll() is None
    if alive:
        os.kill(train.pid, signal.SIGKILL)
    train.wait()
    row.stages["train_until_kill"] = alive and len(read_jsonl(metrics)) >= 6
    if not row.stages["train_until_kill"]:
        row.problems.append(f"training ended (exit {train.returncode}) or stalled before the kill point")
        return row

    resumed_log = logs / f"{recipe}_resume.log"
    row.stages["resume"] = finished(cli("train", str(config), *wd, "--resume", log=resumed_log), 900) == 0
    text = resumed_log.read_text()
    marker = f"resumed {name} at step "
    if marker in text:
        row.resumed_at = int(text.split(marker, 1)[1].split()[0])
    lines = read_jsonl(metrics)
    row.problems += check_run(run_dir, name, lines, steps, row.resumed_at)
    timed = [line for line in lines if row.resumed_at is not None and line["step"] >= row.resumed_at + 2]
    if timed:
        row.s_per_step = round(statistics.median(line["step_time_s"] for line in timed), 3)
    peaks = [line["peak_mem_gib"] for line in lines if line.get("peak_mem_gib") is not None]
    row.peak_gib = max(peaks) if peaks else None

    row.stages["eval"] = finished(cli("eval", str(config), *wd, log=logs / f"{recipe}_eval.log"), 900) == 0
    if row.stages["eval"] and not (run_dir / "eval" / "scores.json").is_file():
        row.problems.append("eval wrote no scores.json")
    return row


def check_run(run_dir: Path, name: str, lines: list[dict], steps: int, resumed_at: int | None) -> list[str]:
    """What a user relies on after a kill and `--resume`; one line per thing that does not hold."""
    problems = []
    if resumed_at is None or resumed_at < 4:
        problems.append(f"did not resume from the step-4 checkpoint or later (resumed at {resumed_at})")
    if [line["step"] for line in lines] != list(range(steps)):
        problems.append(f"JSONL steps are not 0..{steps - 1} once each")
    if any(line.get("loss") is None for line in lines):
        problems.append("a step without a loss (skipped or non-finite)")
    for expert in ("high_noise", "low_noise"):
        if not (run_dir / f"{name}_{expert}.safetensors").is_file():
            problems.append(f"no final {expert} LoRA")
    samples = sorted(p.name for p in (run_dir / "samples").glob("*.mp4"))
    # The base model before the first step (ai-toolkit's default; the resumed run does not repeat
    # it), every sample_every steps, and the end.
    sampled = [0, *range(6, steps + 1, 6), steps]
    wanted = [f"{step:09d}_0.mp4" for step in sampled]
    if sorted(set(wanted)) != samples:
        problems.append(f"samples {samples}, expected {sorted(set(wanted))}")
    return problems


def print_table(rows: list[dict], env: dict) -> None:
    print(f"\n{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}")
    print(f"{'recipe':<12} {'result':<6} {'s/step':>7} {'peak GiB':>9} {'resumed at':>10}  stages / problems")
    for row in rows:
        stages = " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in row["stages"].items())
        resumed = row["resumed_at"] if row["resumed_at"] is not None else "-"
        print(
            f"{row['recipe']:<12} {'pass' if row['passed'] else 'FAIL':<6} {row['s_per_step'] or '-':>7} "
            f"{row['peak_gib'] or '-':>9} {resumed:>10}  {stages}"
        )
        for problem in row["problems"]:
            print(f"{'':<12} {problem}")


def environment() -> dict:
    import torch

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wan_e2e"))
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    parser.add_argument("--logs", type=Path, default=None, help="folder for each command's output")
    parser.add_argument("--tiny", action="store_true", help="the tiny model's sizes (a CPU smoke test)")
    args = parser.parse_args()

    from wan_assets.core.data.synthetic import write_sample_videos
    from wan_assets.core.model.tiny import build_tiny_model

    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.logs or args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model, clips = args.work / "model", args.work / "clips"
    if not (model / "model_index.json").is_file():
        build_tiny_model(model, sizes=None if args.tiny else SIZES)
    if not clips.is_dir():
        write_sample_videos(clips)
    rows = []
    for recipe in args.recipes:
        began = time.perf_counter()
        rows.append(run_recipe(recipe, args.work, model, clips, args.steps, logs))
        print(f"{recipe}: {time.perf_counter() - began:.0f} s", flush=True)
    env = environment()
    table = [asdict(row) | {"passed": row.passed} for row in rows]
    if args.out is not None:
        # Rows of recipes run earlier (another invocation, same card) stay in the file and the table.
        earlier = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
        table = [r for r in earlier if r["recipe"] not in args.recipes] + table
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": env, "steps": args.steps, "sizes": SIZES, "rows": table}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print_table(table, env)
    return 0 if all(row["passed"] for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
