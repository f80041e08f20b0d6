"""Latent-cache throughput (docs/architecture.md §4): clips/s for decode + encode, and the share of wall time the
VAE is busy, with decoding done inline (prefetch 0) and overlapped with encoding (prefetch 2).

  python bench/cache_throughput.py                  # tiny model on CPU, the synthetic clips
  python bench/cache_throughput.py --real           # GPU: real-size Wan VAE (random weights, bf16)
                                                    # at 81x480x832 and 33x512x512

  python bench/cache_throughput.py --long          # CPU or GPU: a 10 s and a 3 min 1080p clip (ffmpeg
                                                    # testsrc2, 30 fps, a keyframe a second as phones
                                                    # record), 33 frames spread over each: cache time
                                                    # and frames decoded; goal: long within 1.5x of short
  python bench/cache_throughput.py --long --size 640x360 --seconds 10,60 --gop 250

Both runs of a size must produce the same cache: the script compares the index and every latent
file's bytes. The text encoder stays the tiny one in every case (captions are encoded once per
distinct text; the VAE is the cost). VAE busy = time inside ClipEncoder.encode_video (synchronized)
over wall time; goal >= 90% with prefetch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wan_assets.core.config import parse_config  # noqa: E402
from wan_assets.core.data import latents  # noqa: E402
from wan_assets.core.data.cache import EncoderHandle, cache_dataset  # noqa: E402
from wan_assets.core.data.synthetic import write_sample_videos  # noqa: E402
from wan_assets.core.data.video_io import write_video  # noqa: E402
from wan_assets.core.model.tiny import build_tiny_model  # noqa: E402

VAE_BUSY = {"seconds": 0.0}


def _timed_encode_video(original):
    def encode_video(self, video_cfhw):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        began = time.perf_counter()
        out = original(self, video_cfhw)  # returns CPU tensors: the work is done
        VAE_BUSY["seconds"] += time.perf_counter() - began
        return out

    return encode_video


latents.ClipEncoder.encode_video = _timed_encode_video(latents.ClipEncoder.encode_video)


def write_clips(folder: Path, count: int, frames: int, height: int, width: int) -> None:
    """Textured moving clips (noise plus a drifting gradient), so decoding does real work."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        noise = rng.integers(0, 64, size=(height, width, 3), dtype=np.uint8)
        video = np.empty((frames, height, width, 3), dtype=np.uint8)
        for f in range(frames):
            phase = (xx + 3 * f + 17 * i) / width + yy / height
            video[f] = (noise + (127 * (1 + np.sin(6.28 * phase)))[..., None].astype(np.uint8) // 2) % 255
        write_video(folder / f"clip_{i:03d}.mp4", video, 16)
        (folder / f"clip_{i:03d}.txt").write_text(f"a textured test pattern number {i}")


def write_long_clip(path: Path, seconds: int, size: str, gop: int) -> Path:
    """A moving test pattern (ffmpeg's testsrc2) at 30 fps, H.264 with a keyframe every `gop` frames."""
    if shutil.which("ffmpeg") is None:
        raise SystemExit("--long needs the ffmpeg command line tool to make its footage")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=30:duration={seconds}",
         "-c:v", "libx264", "-preset", "veryfast", "-g", str(gop), "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )  # fmt: skip
    path.with_suffix(".txt").write_text(f"a test pattern for {seconds} seconds")
    return path


def long_clip_cases(root: Path, model: Path, args: argparse.Namespace) -> None:
    """Cache time and decode work of one clip per duration, same frames sampled from each. `rest s`
    is the cache time outside the VAE: hashing, demuxing, decoding, resizing (what clip length costs)."""
    rows = []
    footage = Path(args.footage) if args.footage else root
    for seconds in (int(s) for s in args.seconds.split(",")):
        clips = footage / f"long_{seconds}s_{args.size}_g{args.gop}"
        if not (clips / "clip.mp4").is_file():
            write_long_clip(clips / "clip.mp4", seconds, args.size, args.gop)
        for variants in (int(v) for v in args.variants.split(",")):
            job = job_for(clips, model, root, 33, 4096, variants)
            encoder = EncoderHandle(str(model))
            encoder.get()
            VAE_BUSY["seconds"] = 0.0
            began = time.perf_counter()
            report = cache_dataset(job, root / f"cache_long_{seconds}_{variants}", encoder, prefetch=0)
            wall = time.perf_counter() - began
            assert not report.failures, report.failures
            rows.append(
                {
                    "clip": f"{seconds} s {args.size}",
                    "variants": variants,
                    "bytes": (clips / "clip.mp4").stat().st_size,
                    "wall_s": wall,
                    "rest_s": wall - VAE_BUSY["seconds"],
                    "decoded": report.decode.frames_decoded,
                    "seeks": report.decode.seeks,
                }
            )
    print(
        f"device: cpu | torch {torch.__version__} | 30 fps, keyframe every {args.gop} frames, 33 frames spread"
    )
    print(
        f"{'clip':>20s} {'variants':>8s} {'MB':>7s} {'cache s':>8s} {'rest s':>7s} {'decoded':>8s} {'seeks':>6s} "
        f"{'vs first':>8s}"
    )
    base = {}
    for r in rows:
        base.setdefault(r["variants"], r["wall_s"])
        print(
            f"{r['clip']:>20s} {r['variants']:8d} {r['bytes'] / 1e6:7.1f} {r['wall_s']:8.2f} {r['rest_s']:7.2f} "
            f"{r['decoded']:8d} {r['seeks']:6d} {r['wall_s'] / base[r['variants']]:7.2f}x"
        )


def job_for(clips: Path, model: Path, work: Path, frames: int, pixels: int, variants: int):
    raw = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    dataset = raw["config"]["process"][0]["datasets"][0]
    dataset.update(
        folder_path=str(clips),
        num_frames=frames,
        max_pixels_per_frame=pixels,
        cache_variants=variants,
        temporal_jitter=1 if variants > 1 else 0,
        validation_split=0.0,
    )
    raw["config"]["process"][0]["model"]["name_or_path"] = str(model)
    return parse_config(raw, workdir=work).job


def run(job, cache: Path, encoder: EncoderHandle, prefetch: int) -> dict:
    encoder.get()  # model load is not throughput
    VAE_BUSY["seconds"] = 0.0
    began = time.perf_counter()
    report = cache_dataset(job, cache, encoder, prefetch=prefetch)
    wall = time.perf_counter() - began
    assert not report.failures, report.failures
    clips = len(report.index.clips)
    return {
        "prefetch": prefetch,
        "clips": clips,
        "wall_s": round(wall, 2),
        "clips_per_s": round(clips / wall, 3),
        "vae_busy": round(VAE_BUSY["seconds"] / wall, 3),
        "fingerprint": fingerprint(cache, job.name),
    }


def fingerprint(cache: Path, name: str) -> str:
    index = json.loads((cache / "index" / f"{name}.json").read_text())
    digest = hashlib.sha256(json.dumps(index["clips"], sort_keys=True).encode())
    # Tensors and metadata, not file bytes: safetensors orders its metadata keys at random.
    for path in sorted((cache / "latents").rglob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            digest.update(path.name.encode() + json.dumps(handle.metadata(), sort_keys=True).encode())
            for key in sorted(handle.keys()):
                digest.update(key.encode() + handle.get_tensor(key).numpy().tobytes())
    return digest.hexdigest()[:16]


def real_encoder(model_dir: Path) -> EncoderHandle:
    """The tiny model's text encoder with a real-size AutoencoderKLWan (its default config)."""
    from diffusers import AutoencoderKLWan

    device = torch.device("cuda")
    handle = EncoderHandle(str(model_dir), device=device, vae_dtype=torch.bfloat16)
    encoder = handle.get()
    torch.manual_seed(0)
    encoder.vae = AutoencoderKLWan().to(device, torch.bfloat16).eval().requires_grad_(False)
    return handle


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--real", action="store_true", help="real-size VAE on the GPU")
    parser.add_argument("--clips", type=int, default=6, help="clips per size with --real")
    parser.add_argument("--long", action="store_true", help="short vs long clip: cache time, frames decoded")
    parser.add_argument("--size", default="1920x1080", help="frame size of the --long footage")
    parser.add_argument("--seconds", default="10,180", help="clip durations of --long, comma-separated")
    parser.add_argument(
        "--gop", type=int, default=30, help="keyframe interval (frames) of the --long footage"
    )
    parser.add_argument("--variants", default="1,4", help="cache_variants to time with --long (4: jitter 1)")
    parser.add_argument("--footage", help="keep / reuse the --long footage in this folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    model = build_tiny_model(root / "model")
    if args.long:
        long_clip_cases(root, model, args)
        return
    if args.real:
        cases = [("81x480x832", 81, 480, 832), ("33x512x512", 33, 512, 512)]
    else:
        cases = [("tiny", None, None, None)]
    rows = []
    for name, frames, height, width in cases:
        clips = root / f"clips_{name}"
        if frames is None:
            write_sample_videos(clips)
            job = job_for(clips, model, root, 9, 4096, 2)
            encoder = EncoderHandle(str(model))
        else:
            write_clips(clips, args.clips, frames, height, width)
            job = job_for(clips, model, root, frames, height * width, 1)
            encoder = real_encoder(model)
        serial = run(job, root / f"cache_{name}_serial", encoder, prefetch=0)
        overlapped = run(job, root / f"cache_{name}_prefetch", encoder, prefetch=2)
        assert serial["fingerprint"] == overlapped["fingerprint"], "prefetching changed the cache"
        rows += [{"size": name, **serial}, {"size": name, **overlapped}]
    device = torch.cuda.get_device_name() if args.real else "cpu"
    print(f"device: {device} | torch {torch.__version__}")
    print(
        f"{'size':11s} {'prefetch':>8s} {'clips':>5s} {'wall s':>7s} {'clips/s':>8s} {'VAE busy':>8s}  cache"
    )
    for r in rows:
        print(
            f"{r['size']:11s} {r['prefetch']:8d} {r['clips']:5d} {r['wall_s']:7.2f} {r['clips_per_s']:8.3f} "
            f"{100 * r['vae_busy']:7.1f}%  {r['fingerprint']}"
        )


if __name__ == "__main__":
    main()
