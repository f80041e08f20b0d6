"""The benchmarks' code paths on the tiny model on CPU, so a change cannot break them unseen (they
run only on a GPU box otherwise): bench/train_step.py's reference and production steps, and
bench/cache_throughput.py's serial and prefetching cache runs."""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from .conftest import REPO


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_train_step_bench_reference_and_production_steps(tmp_path: Path, tiny_model_dir: Path) -> None:
    from wan_assets.core.train.loop import TrainState, train_step

    bench = _bench("train_step")
    device = torch.device("cpu")
    model = WanTransformer3DModel.from_pretrained(tiny_model_dir / "transformer", torch_dtype=torch.bfloat16)
    model = model.requires_grad_(False).eval()
    reference_job = bench.bench_job(tmp_path, "reference")
    params = bench.add_adapter(model, reference_job)
    initial = [p.detach().clone() for p in params]
    batch = bench.make_batch("32x32x5", text_dim=model.config.text_dim)

    bench.setup_mode("reference", model, reference_job, device)
    train = reference_job.process.train
    optimizer = torch.optim.AdamW(params, lr=train.lr)
    reference_loss = bench.reference_step(model, params, optimizer, batch, 0, train, device)
    assert math.isfinite(reference_loss)

    # The production step from the same weights sees the same draws, so the same loss.
    with torch.no_grad():
        for p, value in zip(params, initial, strict=True):
            p.copy_(value)
    job = bench.bench_job(tmp_path, "eager")
    bench.setup_mode("eager", model, job, device)
    parts = bench.project_parts(model, params, job, batch, device)
    result = train_step(parts, TrainState(run_id="bench"), 0)
    assert result.skipped is None and result.loss is not None
    assert result.loss == pytest.approx(reference_loss, rel=1e-2)
    assert all(p.grad is not None for p in params)


def test_cache_throughput_bench_prefetch_keeps_the_cache(
    tmp_path: Path, tiny_model_dir: Path, clips_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from wan_assets.core.data import latents
    from wan_assets.core.data.cache import EncoderHandle

    # Importing the bench wraps ClipEncoder.encode_video with a timer; undo that after the test.
    monkeypatch.setattr(latents.ClipEncoder, "encode_video", latents.ClipEncoder.encode_video)
    bench = _bench("cache_throughput")
    clips = tmp_path / "clips"
    clips.mkdir()
    for video in sorted(clips_dir.glob("*.mp4"))[:2]:
        for path in clips_dir.glob(video.stem + ".*"):
            shutil.copy(path, clips / path.name)
    job = bench.job_for(clips, tiny_model_dir, tmp_path, 9, 4096, 2)
    encoder = EncoderHandle(str(tiny_model_dir))
    serial = bench.run(job, tmp_path / "serial", encoder, prefetch=0)
    overlapped = bench.run(job, tmp_path / "prefetch", encoder, prefetch=2)
    assert serial["clips"] == overlapped["clips"] == 2
    assert serial["fingerprint"] == overlapped["fingerprint"]
    assert 0 < serial["vae_busy"] <= 1


def test_oom_report_reads_the_allocator_snapshot() -> None:
    """--oom-report's summary of an allocator snapshot (the GPU writes it only at an out-of-memory
    error): per stream reserved / allocated / awaiting free / free, and live bytes by site."""
    bench = _bench("train_step")
    frames = [{"filename": "/x/torch/cuda/memory.py", "line": 1, "name": "inner"}]
    frames += [{"filename": "/repo/wan_assets/core/speed/offload.py", "line": 7, "name": "prefetch"}]
    mib = 2**20
    snapshot = {
        "segments": [
            {
                "device": 0,
                "stream": 0,
                "total_size": 400 * mib,
                "blocks": [
                    {"state": "active_allocated", "size": 200 * mib, "frames": frames},
                    {"state": "active_allocated", "size": 100 * mib, "frames": frames},
                    {"state": "active_awaiting_free", "size": 60 * mib},
                    {"state": "inactive", "size": 40 * mib},
                ],
            },
            {
                "device": 0,
                "stream": 7,
                "total_size": 64 * mib,
                "blocks": [{"state": "inactive", "size": 64 * mib}],
            },
            {"device": 1, "stream": 0, "total_size": 999 * mib, "blocks": []},
        ],
        "device_traces": [[{"action": "alloc", "size": 200 * mib, "stream": 0, "frames": frames}], []],
    }
    report = bench.describe_oom(snapshot, 646 * mib, 0)
    assert report["streams"]["0x0"] == {
        "segments": 1,
        "reserved": 400 * mib,
        "allocated": 300 * mib,
        "awaiting_free": 60 * mib,
        "free": 40 * mib,
        "largest_free": 40 * mib,
    }
    assert report["streams"]["0x7"]["free"] == 64 * mib  # device 1's segment counted nowhere (0x0 above)
    assert report["sites"] == [{"site": "offload.py:7 prefetch", "gib": 300 / 1024, "count": 2}]
    assert "OUT OF MEMORY asking 646 MiB" in report["lines"][0]


def test_profile_names_what_launched_each_copy() -> None:
    """--profile's copy breakdown: each GPU copy is traced through its correlation id to the runtime
    call, and from there to the host operations open around it on its thread, innermost first."""
    bench = _bench("train_step")

    def op(name, ts, dur, cat="cpu_op", tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid, "args": args}

    mib = 2**20
    events = [
        op("_OffloadedBlockBackward", 0, 100),
        op("aten::clone", 10, 20, **{"Input Dims": [[21504, 5120]]}),
        op("aten::copy_", 12, 10, **{"Input Dims": [[21504, 5120], [21504, 5120]]}),
        op("cudaMemcpyAsync", 14, 2, cat="cuda_runtime", correlation=5),
        op("aten::copy_", 40, 10),  # a second copy, outside the clone
        op("cudaMemcpyAsync", 42, 2, cat="cuda_runtime", correlation=6),
        op("aten::to", 10, 20, tid=2),  # another thread's operation at the same time: not around it
        op(
            "Memcpy DtoD (Device -> Device)", 20, 140, cat="gpu_memcpy", tid=7, correlation=5, bytes=210 * mib
        ),
        op("Memcpy DtoD (Device -> Device)", 50, 4, cat="gpu_memcpy", tid=7, correlation=6, bytes=mib),
        op(
            "Memcpy DtoD (Device -> Device)",
            60,
            140,
            cat="gpu_memcpy",
            tid=7,
            correlation=99,
            bytes=210 * mib,
        ),
    ]
    gpu = [e for e in events if e["cat"] == "gpu_memcpy"]
    lines: list[str] = []
    rows = bench.copy_sources(gpu, events, lines.append)
    first = rows[0]
    assert first["host"] == "aten::copy_ < aten::clone < _OffloadedBlockBackward"
    assert first["mib"] == 210 and first["calls"] == 1 and first["ms"] == 0.14
    assert "[[21504, 5120], [21504, 5120]]" in first["shapes"]
    assert {r["host"] for r in rows[1:]} == {
        "aten::copy_ < _OffloadedBlockBackward",
        "",
    }  # 99: no runtime call
    assert len(lines) == 4 and "210.0 MiB" in lines[1]


def test_profile_splits_the_compute_streams_idle_time_by_what_it_waited_for() -> None:
    """A gap before a kernel launched after the previous one ended is the host's, summed by the host
    operations that launched it; a gap before a kernel already queued is the device's."""
    bench = _bench("train_step")

    def ev(name, ts, dur, cat, tid=1, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid, "args": args}

    events = [
        ev("Optimizer.step", 0, 200, "cpu_op"),
        ev("cudaLaunchKernel", 1, 1, "cuda_runtime", correlation=1),
        ev("cudaLaunchKernel", 2, 1, "cuda_runtime", correlation=2),  # queued early: waits on the device
        ev("aten::empty_strided", 20, 40, "cpu_op"),  # the host stalls here
        ev("cudaLaunchKernel", 70, 1, "cuda_runtime", correlation=3),
        ev("k1", 5, 10, "kernel", tid=7, stream=7, correlation=1),
        ev("k2", 25, 10, "kernel", tid=7, stream=7, correlation=2),  # 10 us gap, device side
        ev("k3", 75, 10, "kernel", tid=7, stream=7, correlation=3),  # 40 us gap, host side
        ev("side", 0, 5, "kernel", tid=9, stream=9, correlation=4),  # a less busy stream: ignored
    ]
    gpu = [e for e in events if e["cat"] == "kernel"]
    out = bench.stream_gaps(gpu, events, lambda line: None)
    assert out["device_ms"] == 0.010 and out["host_ms"] == 0.040
    assert out["host_sites"] == [{"host": "Optimizer.step", "gaps": 1, "ms": 0.040}]
