"""Data-parallel scaling of one A14B expert's production training step (issue: multi-GPU).

Run once per process count under torchrun on one machine; each run appends one JSON line. Every
rank builds the real-size expert with random weights on its own GPU (no download), adds the
rank-64 LoRA, and runs `wan_assets.core.train.loop.train_step` on a global batch of one clip per rank,
so the per-GPU work is the same at every process count and throughput = ranks / (s/step).

  torchrun --standalone --nproc-per-node=1 bench/ddp_scaling.py --out scaling.jsonl
  torchrun --standalone --nproc-per-node=2 bench/ddp_scaling.py --out scaling.jsonl
  python bench/ddp_scaling.py --report scaling.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step as ts

from wan_assets.core.data.batches import Batch
from wan_assets.core.speed.options import apply_training_options
from wan_assets.core.train.distributed import init_from_env, shutdown
from wan_assets.core.train.loop import TrainState, train_step


def global_batch(size: str, world: int) -> Batch:
    """`world` samples of one bucket (every rank trains one; noise and timesteps differ per sample)."""
    one = ts.make_batch(size)
    return Batch(
        bucket=one.bucket,
        clip_keys=one.clip_keys * world,
        epoch=0,
        latents=one.latents.repeat(world, 1, 1, 1, 1),
        condition=one.condition.repeat(world, 1, 1, 1, 1),
        text=one.text.repeat(world, 1, 1),
        dropped=one.dropped * world,
    )


def measure(args: argparse.Namespace) -> None:
    dist = init_from_env()
    device = dist.device()
    cuda = device.type == "cuda"  # CPU only for a smoke test of the script itself
    if cuda:
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as tmp:
        job = ts.bench_job(Path(tmp), args.mode)
        model = ts.build_expert(args.layers, device)
        params = ts.add_adapter(model, job)
        applied = str(apply_training_options(model, job.process.train, job.process.model, device))
        model.train()
        parts = ts.project_parts(model, params, job, global_batch(args.size, dist.world_size), device)
        parts.dist = dist
        state = TrainState(run_id="scaling")
        times = []
        sync = torch.cuda.synchronize if cuda else lambda: None
        for i in range(args.warmup + args.steps):
            sync()
            began = time.perf_counter()
            result = train_step(parts, state, i)
            sync()
            dist.barrier()
            seconds = time.perf_counter() - began
            if dist.is_main:
                print(f"ranks {dist.world_size} step {i}: loss {result.loss} {seconds:.3f} s", flush=True)
            if i >= args.warmup:
                times.append(seconds)
        if dist.is_main:
            s = statistics.median(times)
            line = {
                "ranks": dist.world_size,
                "size": args.size,
                "mode": args.mode,
                "applied": applied,
                "s_per_step": s,
                "samples_per_s": dist.world_size / s,
                "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
                "card": torch.cuda.get_device_name(device) if cuda else "cpu",
                "torch": torch.__version__,
            }
            with open(args.out, "a") as out:
                out.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)
    shutdown(dist)


def report(path: Path) -> None:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    base = next(x for x in lines if x["ranks"] == 1)
    print(f"{base['card']}, torch {base['torch']}, {base['size']}, mode {base['mode']}")
    print("ranks  s/step  samples/s  speed-up  efficiency  peak GiB")
    for x in sorted(lines, key=lambda x: x["ranks"]):
        up = x["samples_per_s"] / base["samples_per_s"]
        print(
            f"{x['ranks']:5d}  {x['s_per_step']:6.2f}  {x['samples_per_s']:9.3f}  {up:7.2f}x"
            f"  {up / x['ranks']:9.0%}  {x['peak_gib']:8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="480x832x81")
    parser.add_argument("--mode", default="eager", choices=sorted(m for m in ts.MODES if m != "reference"))
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("scaling.jsonl"))
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args()
    if args.report is not None:
        report(args.report)
    else:
        measure(args)


if __name__ == "__main__":
    main()
