"""One A14B expert's training step: plain diffusers + peft against this project's step (docs/architecture.md §10).

Builds a real-size Wan 2.2 I2V-A14B expert with random weights directly on the GPU (no download),
adds a rank-64 LoRA on the block linears, and in this one process times, on identical batches and
initial weights:
  reference  plain diffusers + peft: full gradient checkpointing, bf16 autocast, SDPA, torch AdamW
  speed      the production `train_step` with selective checkpointing + compiled blocks (bf16)
  static     speed with static shapes: a compile per token count (the token dimension is dynamic in speed)
  eager      selective checkpointing without compile (what compile adds)
  memory     fp8 weight-only base (one e4m3 copy) + fp8 compute + activation offload + compile
  fp8        speed + fp8 compute for the frozen base linears (a transposed e4m3 copy per weight)
  memory8bit memory + torchao's 8-bit AdamW (the 24 GB recipe)
Per size and mode it prints s/step (median of the timed steps), peak GiB (max allocated during the
timed steps), MFU (3 x forward FLOPs of matmuls and attention over the card's dense bf16 peak), the
speed ratio against the reference, the first step's loss difference and the cosine between the
first step's LoRA gradients and the reference's. Modes run in the order above: each changes the
model in place (memory and fp8 quantize it).

  python bench/train_step.py --floor --mode-sizes "memory=512x512x81"   # the table (~12 min)
  python bench/train_step.py --sizes 512x512x33 --layers 2               # smoke test
--floor adds the matmul + attention floor per size (bounds any bf16 speed ratio) and the attention
backends, --memory-cap the allocator of a smaller card, --profile / --memory-snapshot where a mode's
time (GPU idle included) and memory go. See
bench/README.md for the device-box command lines and the results.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The allocator setting `wan-assets train` runs with (cli.py), unless set; read when CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusers import UniPCMultistepScheduler, WanTransformer3DModel  # noqa: E402

from wan_assets.core.config import parse_config  # noqa: E402
from wan_assets.core.data.batches import Batch  # noqa: E402
from wan_assets.core.experts import timestep_window  # noqa: E402
from wan_assets.core.model.loading import WanComponents  # noqa: E402
from wan_assets.core.model.lora import add_lora  # noqa: E402
from wan_assets.core.seeds import derive_seed  # noqa: E402
from wan_assets.core.speed import options as speed_options  # noqa: E402
from wan_assets.core.train.alpha_schedule import AlphaScheduler  # noqa: E402
from wan_assets.core.train.flow import flow_loss, noisy_input, sample_timesteps  # noqa: E402
from wan_assets.core.train.loop import TrainParts, TrainState, train_step  # noqa: E402
from wan_assets.core.train.optim import GradientStability, build_optimizer  # noqa: E402
from wan_assets.core.train.run_files import RunFiles  # noqa: E402

A14B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
MODES = {
    "reference": None,
    "eager": {"train": {"gradient_checkpointing": "selective"}},  # no compile: what compile adds
    "speed": {"train": {"gradient_checkpointing": "selective", "compile": True}},
    # speed compiled with static shapes (a graph per token count), as before the dynamic token dim
    "static": {"train": {"gradient_checkpointing": "selective", "compile": True}},
    "memory": {
        "train": {
            "gradient_checkpointing": True,
            "activation_offload": True,
            "compile": True,
            "fp8_compute": True,
        },
        "model": {"quantize": True, "qtype": "qfloat8"},
    },
    "fp8": {"train": {"gradient_checkpointing": "selective", "compile": True, "fp8_compute": True}},
}
# memory + the 8-bit AdamW a 24 GiB card usually trains with (torchao; moments in 8 bits).
MODES["memory8bit"] = {**MODES["memory"], "train": {**MODES["memory"]["train"], "optimizer": "adamw8bit"}}
PLANNED = ("speed", "static", "fp8")  # selective + compile: the memory plan settles over the first 3 steps
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16 tensor-core peak (SXM datasheet)
TEXT_TOKENS = 512
RANK = 64
EXPERT = "high_noise"
BOUNDARY = 900.0


@dataclass
class Result:
    size: str
    tokens: int
    mode: str
    s_per_step: float | None = None
    peak_gib: float | None = None
    reserved_gib: float | None = None
    mfu: float | None = None
    ratio: float | None = None
    loss: float | None = None
    loss_diff: float | None = None
    grad_cos: float | None = None
    first_step_s: float | None = None
    warmup_extra_s: float | None = None  # the warm-up steps' time beyond as many timed steps
    times: list[float] = field(default_factory=list)
    bound_s: float | None = None  # matmuls + attention at the measured kernel rates, nothing else
    profile: dict = field(default_factory=dict)
    peak_live: list = field(default_factory=list)
    oom: list = field(default_factory=list)  # --oom-report: the allocator at each out-of-memory error
    note: str = ""


# --- the model and the batch -----------------------------------------------------------------------


def build_expert(layers: int, device: torch.device) -> WanTransformer3DModel:
    """Random bf16 weights made on the GPU; fp32 where diffusers keeps them (as from_pretrained does)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**{**A14B, "num_layers": layers})
    finally:
        torch.set_default_dtype(default)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    for name, module in model.named_modules():
        if any(k in name.split(".") for k in keep):
            module.float()
    model.set_attention_backend("native")  # train.attention_backend "sdpa"
    return model.requires_grad_(False).eval()


def add_adapter(model: WanTransformer3DModel, job) -> list[torch.nn.Parameter]:
    params = add_lora(model, job.process.network, EXPERT, seed=1)
    g = torch.Generator(device=params[0].device).manual_seed(2)
    with torch.no_grad():
        for p in params:
            p.data = p.data.float()
            if p.abs().sum() == 0:  # lora_B starts at zero; give it weight so the adapter counts
                p.normal_(0, 0.01, generator=g)
    return params


def make_batch(size: str, text_dim: int = A14B["text_dim"]) -> Batch:
    height, width, frames = (int(v) for v in size.split("x"))
    f_lat, h_lat, w_lat = (frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator().manual_seed(7)
    mask = torch.zeros(1, 4, f_lat, h_lat, w_lat)
    mask[:, :, 0] = 1
    return Batch(
        bucket=size,
        clip_keys=("random",),
        epoch=0,
        latents=torch.randn(1, 16, f_lat, h_lat, w_lat, generator=g),
        condition=torch.cat([mask, torch.randn(1, 16, f_lat, h_lat, w_lat, generator=g)], dim=1),
        text=torch.randn(1, TEXT_TOKENS, text_dim, generator=g),
        dropped=(False,),
    )


class FixedStream:
    def __init__(self, batch: Batch) -> None:
        self._batch = batch

    def batch(self, _n: int) -> Batch:
        return self._batch


def bench_job(tmp: Path, mode: str):
    raw = yaml.safe_load((REPO / "configs" / "tiny_cpu.yaml").read_text())
    process = raw["config"]["process"][0]
    process["network"] = {"type": "lora", "linear": RANK, "linear_alpha": RANK}
    process["datasets"][0]["folder_path"] = str(tmp)
    process["training_folder"] = str(tmp / "out")
    process["sample"] = None
    overrides = MODES[mode] or {}
    process["train"].update(
        {"optimizer": "adamw", "lr": 1e-5, "dtype": "bf16", "gradient_checkpointing": True}
        | overrides.get("train", {})
    )
    process["model"].update({"name_or_path": "random-a14b", "model_kwargs": {"train_low_noise": False}})
    process["model"].update(overrides.get("model", {}))
    return parse_config(raw, workdir=tmp).job


# --- FLOPs -----------------------------------------------------------------------------------------


def tokens_of(size: str) -> int:
    height, width, frames = (int(v) for v in size.split("x"))
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def forward_flops(tokens: int, layers: int, rank: int = RANK) -> float:
    d, f = A14B["num_attention_heads"] * A14B["attention_head_dim"], A14B["ffn_dim"]
    linear = 2 * tokens * (6 * d * d + 2 * d * f) + 2 * TEXT_TOKENS * 2 * d * d
    lora = 2 * rank * (tokens * (6 * 2 * d + 2 * (d + f)) + TEXT_TOKENS * 2 * 2 * d)
    attention = 4 * tokens * tokens * d + 4 * tokens * TEXT_TOKENS * d
    return layers * (linear + lora + attention)


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 989.4e12)


# --- steps -----------------------------------------------------------------------------------------


def reference_step(model, params, optimizer, batch: Batch, step: int, train, device) -> float:
    """Plain diffusers + peft, with the production step's inputs (same noise and timestep draws)."""
    optimizer.zero_grad(set_to_none=True)
    # The production step's draws: dropout per (step, micro, rank), noise per (step, micro, sample).
    torch.manual_seed(derive_seed(train.seed, "dropout", step, 0, 0))
    generator = torch.Generator().manual_seed(derive_seed(train.seed, "noise", step, 0, 0))
    t = sample_timesteps(
        train.timestep_type, timestep_window(EXPERT, BOUNDARY), 1, generator, shift=train.timestep_shift
    )
    noise = torch.randn(batch.latents.shape[1:], generator=generator).unsqueeze(0)
    x_t, target = noisy_input(batch.latents, noise, t)
    hidden = torch.cat([x_t, batch.condition], dim=1).to(device, torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        pred = model(
            hidden_states=hidden,
            timestep=t.to(device),
            encoder_hidden_states=batch.text.to(device, torch.bfloat16),
            return_dict=False,
        )[0]
    loss = flow_loss(pred, target.to(device))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
    optimizer.step()
    return loss.item()


def project_parts(model, params, job, batch: Batch, device) -> TrainParts:
    components = WanComponents(
        name_or_path="random-a14b",
        boundary_ratio=0.9,
        expand_timesteps=False,
        scheduler=UniPCMultistepScheduler(),
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer_high=model,
        transformer_low=None,
    )
    return TrainParts(
        job=job,
        files=RunFiles.of(job),
        model=components,
        params={EXPERT: params},
        optimizer=build_optimizer(job.process.train, {EXPERT: params}),
        scheduler=AlphaScheduler(job.process.network, (EXPERT,)),
        stability=GradientStability(),
        stream=FixedStream(batch),
        device=device,
        compute_dtype=torch.bfloat16,
        index_hash="bench",
    )


def run_size(mode: str, size: str, model, params, initial, job, args, ref: dict, log) -> Result:
    device = torch.device("cuda", torch.cuda.current_device())
    batch = make_batch(size)
    tokens = tokens_of(size)
    result = Result(size, tokens, mode)
    with torch.no_grad():
        for p, v in zip(params, initial, strict=True):
            p.copy_(v)
    train = job.process.train
    if mode == "reference":
        optimizer = torch.optim.AdamW(params, lr=train.lr)

        def step(i: int) -> float | None:
            return reference_step(model, params, optimizer, batch, i, train, device)
    else:
        parts = project_parts(model, params, job, batch, device)
        state = TrainState(run_id="bench")

        def step(i: int) -> float | None:
            return train_step(parts, state, i).loss

    gc.collect()
    torch.cuda.empty_cache()
    cap_gib = args.memory_cap if mode.startswith("memory") else 0
    cap_gib = float(dict(item.split("=") for item in args.caps.split(",") if item).get(mode, cap_gib))
    with allocator_cap(cap_gib, device), oom_report(mode in args.oom_report.split(","), log, result):
        return run_steps(mode, size, model, params, args, ref, log, result, step, cap_gib)


_OOM_SINK: list = []  # (log, result) of the (mode, size) whose out-of-memory errors are reported


@contextmanager
def oom_report(enabled: bool, log, result: Result):
    """With the allocator's history on from the first step: at each out-of-memory error (up to
    three), what the allocator held per stream and state, the live blocks by allocation site, and
    the large allocations and frees just before it. The training step catches the error and empties
    the cache, so afterwards nothing is left to look at: the report is made in the allocator's
    out-of-memory observer, at the failing request."""
    if not enabled:
        yield
        return
    if not getattr(oom_report, "attached", False):  # torch has no detach: one observer, redirected
        torch._C._cuda_attach_out_of_memory_observer(_on_oom)
        oom_report.attached = True  # type: ignore[attr-defined]
    torch.cuda.memory._record_memory_history(max_entries=300_000, stacks="python")
    _OOM_SINK[:] = [(log, result)]
    try:
        yield
    finally:
        _OOM_SINK.clear()
        torch.cuda.memory._record_memory_history(enabled=None)


def _on_oom(device: int, asked: int, device_allocated: int, device_free: int) -> None:
    if not _OOM_SINK:
        return
    log, result = _OOM_SINK[0]
    if len(result.oom) >= 3:
        return
    report = describe_oom(torch.cuda.memory._snapshot(), asked, device)
    result.oom.append(report)
    for line in report["lines"]:
        log(line)


def describe_oom(snap: dict, asked: int, device: int, top: int = 12, recent: int = 40) -> dict:
    """Per stream: reserved, allocated, awaiting free (freed, another stream's use pending), free and
    its largest block; live bytes by allocation site; the last large allocator events."""
    mib = 2**20
    streams: dict[int, dict[str, int]] = {}
    live: list[dict] = []
    for seg in snap["segments"]:
        if seg.get("device", device) != device:
            continue
        cell = streams.setdefault(
            seg["stream"],
            {"segments": 0, "reserved": 0, "allocated": 0, "awaiting_free": 0, "free": 0, "largest_free": 0},
        )
        cell["segments"] += 1
        cell["reserved"] += seg["total_size"]
        for block in seg["blocks"]:
            state, size = block["state"], block["size"]
            if state == "active_allocated":
                cell["allocated"] += size
                live.append(block)
            elif state == "active_awaiting_free":
                cell["awaiting_free"] += size
            else:
                cell["free"] += size
                cell["largest_free"] = max(cell["largest_free"], size)
    lines = [f"  OUT OF MEMORY asking {asked / mib:.0f} MiB; the allocator per stream (MiB):"]
    for stream, c in sorted(streams.items()):
        lines.append(
            f"    stream {stream:#x}: {c['segments']} segments, reserved {c['reserved'] / mib:.0f}, "
            f"allocated {c['allocated'] / mib:.0f}, awaiting free {c['awaiting_free'] / mib:.0f}, "
            f"free {c['free'] / mib:.0f} (largest {c['largest_free'] / mib:.0f})"
        )
    rows = _by_site(live, top)
    lines.append("  live at the failing request, by allocation site:")
    lines += [_site_line(row) for row in rows]
    trace = [
        e
        for e in snap["device_traces"][device]
        if e["action"] in ("alloc", "free_completed", "segment_alloc", "segment_free")
        and e["size"] >= 32 * mib
    ][-recent:]
    lines.append(f"  the last {len(trace)} allocator events of 32 MiB or more:")
    lines += [
        f"    {e['action']:15s} {e['size'] / mib:7.0f} MiB stream {e.get('stream', 0):#x}  {_site(e.get('frames', []))}"
        for e in trace
    ]
    return {
        "asked_mib": asked / mib,
        "streams": {f"{k:#x}": v for k, v in streams.items()},
        "sites": rows,
        "lines": lines,
    }


def _forward_warnings(log) -> None:
    """The training step's warnings (an out-of-memory step's allocator figures) into the log file too."""

    class ToLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            log(f"    {record.name}: {record.getMessage()}")

    handler = ToLog(logging.WARNING)
    logging.getLogger("wan_assets").addHandler(handler)


@contextmanager
def allocator_cap(gib: float, device: torch.device):
    """The allocator of a card with `gib` GiB (0: this card's): more is an out-of-memory error."""
    if not gib:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def run_steps(
    mode, size, model, params, args, ref: dict, log, result: Result, step, cap_gib: float
) -> Result:
    """Warm-up and timed steps of one (mode, size), then the optional profile and snapshot steps."""
    cap = f"run under a {cap_gib:g} GiB allocator cap" if cap_gib else ""
    result.note = cap
    times, peaks, reserved, counts, warm = [], [], [], [], []
    warmup = args.warmup if mode in PLANNED else min(args.warmup, 1)  # others: compile only
    for i in range(warmup + args.steps):
        torch.cuda.reset_peak_memory_stats()  # per step, as the training loop does
        torch.cuda.synchronize()
        before = _allocator_events()
        began = time.perf_counter()
        loss = step(i)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        count = getattr(model, "wan_matmul_blocks", None)
        peak = torch.cuda.max_memory_allocated() / 2**30
        held = torch.cuda.max_memory_reserved() / 2**30  # under a cap, what runs out is this
        events = {k: v - before[k] for k, v in _allocator_events().items() if v != before[k]}
        log(
            f"  {mode:9s} {size:11s} step {i}: loss {loss} {seconds:.3f} s, {peak:.1f} GiB "
            f"({held:.1f} reserved), matmul blocks {count}; allocator: "
            + (", ".join(f"{k} {v}" for k, v in events.items()) or "no device calls")
        )
        if loss is None and i >= warmup:
            result.note = "; ".join(filter(None, ["timed step skipped (out of memory)", cap]))
            return result
        if i == 0 and loss is not None:
            result.loss, result.first_step_s = loss, seconds
            grads = torch.cat([p.grad.detach().double().flatten().cpu() for p in params])
            if mode == "reference":
                ref[size] = {"loss": loss, "grads": grads}
            elif size in ref:
                result.loss_diff = abs(loss - ref[size]["loss"]) / abs(ref[size]["loss"])
                cos = torch.nn.functional.cosine_similarity(grads, ref[size]["grads"], dim=0)
                result.grad_cos = float(cos)
            del grads
        if i < warmup:
            warm.append(seconds)
        if i >= warmup:
            times.append(seconds)
            peaks.append(peak)
            reserved.append(held)
            counts.append(count)
    if mode in args.profile.split(","):
        result.profile = profile_step(lambda: step(warmup + args.steps), log)
    if mode in args.memory_snapshot.split(","):
        result.peak_live = snapshot_step(lambda: step(warmup + args.steps + 1), log)
    result.times = times
    result.s_per_step = statistics.median(times)
    result.warmup_extra_s = round(sum(t - result.s_per_step for t in warm), 2)
    result.peak_gib = max(peaks)
    result.reserved_gib = max(reserved)
    result.mfu = 3 * forward_flops(result.tokens, args.layers) / result.s_per_step / peak_flops()
    if mode == "reference":
        ref[size]["s"] = result.s_per_step
    elif size in ref and "s" in ref[size]:
        result.ratio = ref[size]["s"] / result.s_per_step
    if any(c is not None for c in counts):
        result.note = f"blocks keeping matmul outputs: {counts}"
    if cap:
        result.note = f"{cap}; reserved {result.reserved_gib:.1f} GiB"
    return result


def _allocator_events() -> dict[str, int]:
    """The CUDA allocator's counters of what stalls a step: cudaMalloc / cudaFree (or, with expandable
    segments, mapping and unmapping), a retry after freeing the cache, a synchronization of all
    streams (a cudaFree waits for the device, and the host then refills an empty queue)."""
    stats = torch.cuda.memory_stats()
    names = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams", "num_ooms")
    return {name.removeprefix("num_"): int(stats.get(name, 0)) for name in names}


def setup_mode(mode: str, model, job, device: torch.device | None = None) -> str:
    """Apply a mode's options to the model in place; return what was applied (on CUDA by default)."""
    if mode == "reference":
        model.enable_gradient_checkpointing()
        model.train()
        return "diffusers gradient checkpointing, peft defaults"
    torch._dynamo.reset()  # the previous mode's compiled graphs would only add guard checks
    speed_options.DYNAMIC_TOKENS = mode != "static"
    applied = speed_options.apply_training_options(
        model, job.process.train, job.process.model, device or torch.device("cuda")
    )
    model.train()
    return str(applied)


# --- micro-benchmarks ------------------------------------------------------------------------------


def attention_time(tokens: int, backend, keys: int | None = None, layout: str = "bhld") -> float | None:
    """Seconds for one A14B attention (40 heads x tokens x 128, bf16) forward + backward over `keys`
    keys (default: self-attention). layout "blhd" hands SDPA transposed views of (batch, tokens,
    heads, dim) tensors, as diffusers' native dispatcher does. None: the backend cannot run it."""
    from torch.nn.attention import sdpa_kernel

    def make(n: int) -> torch.Tensor:
        shape = (1, 40, n, 128) if layout == "bhld" else (1, n, 40, 128)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    q = make(tokens)
    kv = q if keys is None else make(keys)

    def view(t: torch.Tensor) -> torch.Tensor:
        return t if layout == "bhld" else t.transpose(1, 2)

    def run():
        q.grad = kv.grad = None
        torch.nn.functional.scaled_dot_product_attention(view(q), view(kv), view(kv)).sum().backward()

    try:
        if backend is None:
            return cuda_time(run, 3)
        with sdpa_kernel(backend):
            return cuda_time(run, 3)
    except RuntimeError:
        return None


def attention_backends(tokens: int, log) -> dict:
    """Self- and text cross-attention (512 keys) per SDPA backend, in diffusers' layout: which
    kernel the step should use for each."""
    from torch.nn.attention import SDPBackend

    backends = {
        "default": None,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    out = {}
    for kind, keys in (("self", None), ("cross", TEXT_TOKENS)):
        times = {name: attention_time(tokens, b, keys, layout="blhd") for name, b in backends.items()}
        out[kind] = times
        log(
            f"  {kind}-attention at {tokens} tokens, fwd+bwd per layer: "
            + ", ".join(f"{n} {'-' if t is None else f'{1000 * t:.2f} ms'}" for n, t in times.items())
        )
    return out


def kernel_floor(size: str, layers: int, log) -> float:
    """Seconds per step for the frozen matmuls (forward + input gradient) and cuDNN self-attention
    (forward + backward) alone, each timed at this size's tokens: no LoRA, norms, recompute or
    optimizer. No bf16 step can beat it on this card; reference / floor bounds the speed ratio."""
    from torch.nn.attention import SDPBackend

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    tokens = tokens_of(size)
    d, f = A14B["num_attention_heads"] * A14B["attention_head_dim"], A14B["ffn_dim"]
    x_d = torch.randn(tokens, d, device=dev, dtype=bf16, requires_grad=True)
    x_f = torch.randn(tokens, f, device=dev, dtype=bf16, requires_grad=True)

    def linear_time(x, k, n) -> float:
        w = torch.randn(n, k, device=dev, dtype=bf16) / k**0.5

        def run():
            x.grad = None
            torch.nn.functional.linear(x, w).backward(torch.ones(tokens, n, device=dev, dtype=bf16))

        return cuda_time(run)

    per_layer = 6 * linear_time(x_d, d, d) + linear_time(x_d, d, f) + linear_time(x_f, f, d)
    del x_f
    attn = attention_time(tokens, SDPBackend.CUDNN_ATTENTION)
    floor = layers * (per_layer + attn)
    attention_backends(tokens, log)
    log(
        f"  floor {size}: matmuls {1000 * per_layer:.1f} ms + attention {1000 * attn:.1f} ms per layer "
        f"-> {floor:.2f} s/step for {layers} layers"
    )
    return floor


def profile_step(run, log, top: int = 14) -> dict:
    """One step under the profiler: GPU time by kernel family, the costliest kernels, the host
    operations that launched the most GPU time, and where the GPU sat idle (idle_gaps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    began = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        run()
        torch.cuda.synchronize()
    wall_ms = 1000 * (time.perf_counter() - began)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_EVENT_KINDS]
    per_kernel: dict[str, list[float]] = {}
    for e in gpu:
        calls_ms = per_kernel.setdefault(e["name"], [0, 0.0])
        calls_ms[0] += 1
        calls_ms[1] += e.get("dur", 0) / 1000
    families: dict[str, float] = {}
    for name, (_, ms) in per_kernel.items():
        families[_kernel_family(name)] = families.get(_kernel_family(name), 0.0) + ms
    total = sum(families.values())
    out = {"total_ms": total, "families_ms": families, "top": [], "ops": []}
    log(
        f"  profile: {total:.0f} ms of kernels; "
        + ", ".join(
            f"{k} {v:.0f} ms ({100 * v / total:.0f}%)"
            for k, v in sorted(families.items(), key=lambda kv: -kv[1])
        )
    )
    for name, (calls, ms) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:top]:
        out["top"].append({"kernel": name[:110], "calls": calls, "ms": ms})
        log(f"    {ms:8.1f} ms {calls:6d}x  {name[:110]}")
    # Host operations by the GPU time of what they launched themselves (inside compiled graphs:
    # the extern calls, e.g. aten::mm; the generated Triton kernels appear under their own names).
    # "Command Buffer Full" marks the host blocked on a full launch queue (the GPU was busy), not work.
    ops = [
        e
        for e in prof.key_averages()
        if e.device_type == DeviceType.CPU and e.self_device_time_total > 0 and e.key != "Command Buffer Full"
    ]
    log("  host operations by the GPU time they launched:")
    for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:top]:
        row = {"op": e.key[:90], "calls": e.count, "ms": e.self_device_time_total / 1000}
        out["ops"].append(row)
        log(f"    {row['ms']:8.1f} ms {row['calls']:6d}x  {row['op']}")
    out["idle"] = idle_gaps(gpu, events, wall_ms, log)
    out["copies"] = copy_sources(gpu, events, log)
    out["stream_gaps"] = stream_gaps(
        [e for e in gpu if e.get("cat") == "kernel" or "Memcpy DtoD" in e["name"]], events, log
    )
    return out


def copy_sources(gpu: list[dict], events: list[dict], log, top: int = 8) -> list[dict]:
    """The copies (memcpy / memset) by kind, size and the host operations that launched them.

    Each GPU copy is matched to its runtime call through the correlation id, and the runtime call to
    the host operations open around it on its thread (innermost first, with the innermost
    operation's input shapes): what a device-to-device copy is for shows there, not in the kernel
    name.
    """
    copies = [e for e in gpu if e.get("cat") in ("gpu_memcpy", "gpu_memset")]
    wanted = {e["args"].get("correlation"): e for e in copies if "args" in e}
    launched = launch_stacks(events, set(wanted))
    groups: dict[tuple, list] = {}
    for correlation, copy in wanted.items():
        ops = launched[correlation]["ops"] if correlation in launched else []
        chain = _chain(ops)
        shapes = str(ops[0].get("args", {}).get("Input Dims", ""))[:80] if ops else ""
        key = (copy["name"], copy["args"].get("bytes", 0), chain, shapes)
        row = groups.setdefault(key, [0, 0.0])
        row[0] += 1
        row[1] += copy.get("dur", 0) / 1000
    rows = [
        {"copy": name, "mib": size / 2**20, "calls": calls, "ms": ms, "host": chain, "shapes": shapes}
        for (name, size, chain, shapes), (calls, ms) in sorted(groups.items(), key=lambda kv: -kv[1][1])
    ][:top]
    if rows:
        log("  copies by size and what launched them:")
    for r in rows:
        log(
            f"    {r['ms']:8.1f} ms {r['calls']:5d}x {r['mib']:8.1f} MiB  {r['copy']}; {r['host'] or '?'} {r['shapes']}"
        )
    return rows


def launch_stacks(events: list[dict], correlations: set) -> dict[int, dict]:
    """For GPU work's correlation ids: the runtime call that launched it ("call") and the host
    operations open around that call on its thread ("ops", innermost first)."""
    by_thread: dict[tuple, list[dict]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime"):
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    found: dict[int, dict] = {}
    for thread in by_thread.values():
        stack: list[dict] = []
        for e in sorted(thread, key=lambda e: (e["ts"], -e.get("dur", 0))):
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) <= e["ts"]:
                stack.pop()
            correlation = e.get("args", {}).get("correlation")
            if e["cat"] == "cuda_runtime" and correlation in correlations:
                ops = [o for o in reversed(stack) if o["cat"] != "cuda_runtime"]
                found[correlation] = {"call": e, "ops": ops}
            stack.append(e)
    return found


def _chain(ops: list[dict], depth: int = 5) -> str:
    return " < ".join(o["name"][:40] for o in ops[:depth] if not o["name"].startswith("ProfilerStep"))


def stream_gaps(gpu: list[dict], events: list[dict], log, top: int = 8) -> dict:
    """The busiest stream's idle time, split by what its next kernel waited for.

    A gap before a kernel launched after the previous kernel had ended is the host's (the queue ran
    empty: launch overhead, a host synchronization, an allocation); one before a kernel already queued
    is the device's (an event from another stream, a launch's own latency). Host gaps are summed by
    the host operations that launched the kernel after them.
    """
    streams: dict[object, list[dict]] = {}
    for e in gpu:
        streams.setdefault(e.get("args", {}).get("stream", e.get("tid")), []).append(e)
    if not streams:
        return {}
    busiest = max(streams.values(), key=lambda es: sum(e.get("dur", 0) for e in es))
    busiest.sort(key=lambda e: e["ts"])
    launches = launch_stacks(events, {e.get("args", {}).get("correlation") for e in busiest})
    host_us = device_us = 0.0
    by_site: dict[str, list] = {}
    end = busiest[0]["ts"] + busiest[0].get("dur", 0)
    for e in busiest[1:]:
        gap = e["ts"] - end
        if gap > 0:
            launch = launches.get(e.get("args", {}).get("correlation"))
            if launch is not None and launch["call"]["ts"] >= end:
                host_us += gap
                row = by_site.setdefault(_chain(launch["ops"], 3) or launch["call"]["name"], [0, 0.0])
                row[0] += 1
                row[1] += gap
            else:
                device_us += gap
        end = max(end, e["ts"] + e.get("dur", 0))
    sites = [
        {"host": site, "gaps": n, "ms": us / 1000}
        for site, (n, us) in sorted(by_site.items(), key=lambda kv: -kv[1][1])[:top]
    ]
    out = {"host_ms": host_us / 1000, "device_ms": device_us / 1000, "host_sites": sites}
    log(
        f"  compute stream idle: {out['host_ms']:.0f} ms waiting for the host (kernel launched after the "
        f"previous one ended), {out['device_ms']:.0f} ms with the next kernel queued; host gaps by launcher:"
    )
    for r in sites:
        log(f"    {r['ms']:8.1f} ms {r['gaps']:6d} gaps  {r['host']}")
    return out


GPU_EVENT_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")


def idle_gaps(gpu: list[dict], events: list[dict], wall_ms: float, log, top: int = 8) -> dict:
    """GPU idle time in a profiled step: the union of GPU work intervals against their span, and the
    longest gaps with the host-side operations that overlap them most (what the GPU waited for)."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in gpu)
    if not spans:
        return {}
    busy, gaps, (start, end) = 0.0, [], spans[0]
    for a, b in spans[1:]:
        if a > end:
            busy += end - start
            gaps.append((end, a))
            start, end = a, b
        else:
            end = max(end, b)
    busy += end - start
    first, last = spans[0][0], max(b for _, b in spans)
    host = [
        e
        for e in events
        if e.get("ph") == "X"
        and e.get("cat") in ("cpu_op", "cuda_runtime", "user_annotation", "python_function")
    ]
    rows = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        overlaps: dict[str, float] = {}
        for e in host:
            o = min(b, e["ts"] + e.get("dur", 0)) - max(a, e["ts"])
            if o > 0.5 * (b - a) and not e["name"].startswith("ProfilerStep"):
                overlaps[e["name"]] = max(overlaps.get(e["name"], 0.0), e.get("dur", 0))
        # Innermost first: the shortest operations that still cover the gap say what the host was in.
        names = [n[:60] for n, _ in sorted(overlaps.items(), key=lambda kv: kv[1])[:4]]
        rows.append({"at_ms": (a - first) / 1000, "ms": (b - a) / 1000, "host": names})
    streams: dict[str, float] = {}  # GPU time per stream (overlapping kernels counted once each)
    for e in gpu:
        stream = str(e.get("args", {}).get("stream", e.get("tid")))
        streams[stream] = streams.get(stream, 0.0) + e.get("dur", 0) / 1000
    idle = {
        "streams_ms": streams,
        "span_ms": (last - first) / 1000,
        "busy_ms": busy / 1000,
        "idle_ms": (last - first - busy) / 1000,
        "wall_ms": wall_ms,
        "gaps_over_1ms": sum(1 for a, b in gaps if b - a > 1000),
        "longest": rows,
    }
    log(
        f"  idle: GPU busy {idle['busy_ms']:.0f} of {idle['span_ms']:.0f} ms between first and last kernel "
        f"(step wall {wall_ms:.0f} ms under the profiler); {idle['gaps_over_1ms']} gaps over 1 ms; per stream "
        + ", ".join(f"{k}: {v:.0f} ms" for k, v in sorted(streams.items(), key=lambda kv: -kv[1]))
    )
    for row in rows:
        log(
            f"    gap {row['ms']:7.2f} ms at {row['at_ms']:8.1f} ms; host in: {' < '.join(row['host']) or '?'}"
        )
    return idle


def _kernel_family(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("fmha", "flash", "cudnn", "attention", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "xmma", "cutlass", "matmul", "_mm_", "splitk")):
        return "matmul"
    if "triton" in low:
        return "triton (fused pointwise/norms)"
    if "memcpy" in low or "memset" in low:
        return "copies"
    return "other"


def snapshot_step(run, log, top: int = 12) -> list:
    """One step with the allocator's history on: what is live at the step's peak, by allocation site."""
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=500_000)
    try:
        run()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for event in snap["device_traces"][torch.cuda.current_device()]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif event["action"] == "free_completed":
            # A block held before the step (in `base`) may be freed during it: it counts down too.
            total -= live.pop(event["addr"])["size"] if event["addr"] in live else event["size"]
    rows = _by_site(at_peak, top)
    log(
        f"  memory at the step's peak: {(base + peak) / 2**30:.2f} GiB ({base / 2**30:.2f} held before the step)"
    )
    for row in rows:
        log(_site_line(row))
    return rows


def _by_site(blocks: list[dict], top: int) -> list[dict]:
    """Allocator blocks or trace events (`size`, `frames`) summed by allocation site, largest first."""
    sites: dict[str, list[int]] = {}
    for block in blocks:
        cell = sites.setdefault(_site(block.get("frames", [])), [0, 0])
        cell[0] += block["size"]
        cell[1] += 1
    rows = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"site": site, "gib": size / 2**30, "count": count} for site, (size, count) in rows]


def _site_line(row: dict) -> str:
    return f"    {row['gib']:6.2f} GiB {row['count']:5d}x  {row['site']}"


def _site(frames: list[dict]) -> str:
    """The innermost frame outside torch's own code (compiled graphs show as their generated file)."""
    for frame in frames:
        name = frame.get("filename", "")
        if name.endswith(".py") and "/torch/" not in name:
            return f"{Path(name).name}:{frame.get('line')} {frame.get('name')}"
    return frames[0]["name"] if frames else "?"


def cuda_time(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / reps


def micro(log) -> dict:
    """Frozen linear fwd+bwd (bf16, torchao float8 rowwise, ours), SDPA kernels, int4 weight-only."""
    from torch.nn.attention import SDPBackend

    from wan_assets.core.model.quantize import Float8FrozenLinear

    out = {}
    dev = torch.device("cuda")
    m, k, n = 32760, 5120, 13824
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    base = torch.nn.Linear(k, n, device=dev, dtype=torch.bfloat16).requires_grad_(False)
    flops = 2 * 2 * m * k * n  # forward + input gradient

    def fwd_bwd(layer):
        def run():
            x.grad = None
            layer(x).sum().backward()

        return run

    layers = {"bf16": base, "ours_fp8": Float8FrozenLinear(base, keep_transposed=True)}
    layers["ours_fp8_no_t"] = Float8FrozenLinear(base, keep_transposed=False)
    try:
        import copy

        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        wrapped = torch.nn.Sequential(copy.deepcopy(base))
        convert_to_float8_training(wrapped, config=Float8LinearConfig.from_recipe_name("rowwise"))
        wrapped.requires_grad_(False)
        layers["torchao_fp8_rowwise"] = wrapped
    except Exception as exc:  # report, keep going
        out["torchao_error"] = repr(exc)
    for name, layer in layers.items():
        for compiled in (False, True):
            try:
                fn = torch.compile(layer) if compiled else layer
                s = cuda_time(fwd_bwd(fn))
                out[f"linear_{name}{'_compiled' if compiled else ''}_tflops"] = round(flops / s / 1e12, 1)
            except Exception as exc:
                out[f"linear_{name}{'_compiled' if compiled else ''}_error"] = repr(exc)[:300]
    attn_flops = 4 * 32760 * 32760 * 128 * 40 * 3.5  # forward + backward (2.5x)
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            out[f"sdpa_{backend.name}_tflops"] = round(attn_flops / attention_time(32760, backend) / 1e12, 1)
        except Exception as exc:
            out[f"sdpa_{backend.name}_error"] = repr(exc)[:200]
    try:
        from wan_assets.core.model.quantize import weight_only

        block = torch.nn.Sequential(torch.nn.Linear(k, k, device=dev, dtype=torch.bfloat16)).requires_grad_(
            False
        )
        weight_only(block, "int4")
        xi = torch.randn(64, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        block(xi).sum().backward()
        out["int4_weight_only_backward"] = "ok"
    except Exception as exc:
        out["int4_weight_only_backward"] = repr(exc)[:300]
    out.update(lora_overhead())
    for key, value in out.items():
        log(f"  micro {key}: {value}")
    return out


def lora_overhead(tokens: int = 9216) -> dict:
    """One real block, forward + backward at `tokens`: without LoRA, peft's LoRA as it comes (input
    up-cast to the fp32 adapter), without the up-cast, and that compiled."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed, WanTransformerBlock
    from peft import LoraConfig, inject_adapter_in_model

    dev, bf16 = torch.device("cuda"), torch.bfloat16
    d = A14B["num_attention_heads"] * A14B["attention_head_dim"]

    def block():
        torch.manual_seed(0)
        b = WanTransformerBlock(d, A14B["ffn_dim"], 40, "rms_norm_across_heads", True, 1e-6, None)
        b = b.to(dev, bf16).requires_grad_(False)
        b.norm2.float()
        b.scale_shift_table.data = b.scale_shift_table.data.float()
        return b

    side = int((tokens // 9) ** 0.5) * 2
    rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024).to(dev)
    rotary = rope(torch.zeros(1, 36, 9, side, side, device=dev))
    hidden = torch.randn(1, 9 * (side // 2) ** 2, d, device=dev, dtype=bf16, requires_grad=True)
    enc = torch.randn(1, TEXT_TOKENS, d, device=dev, dtype=bf16)
    temb = torch.randn(1, 6, d, device=dev)

    def timed(b):
        def run():
            hidden.grad = None
            with torch.autocast("cuda", dtype=bf16):
                b(hidden, enc, temb, rotary).float().sum().backward()

        return round(1000 * cuda_time(run), 2)

    out = {"block_tokens": hidden.shape[1], "block_no_lora_ms": timed(block())}
    targets = list(__import__("wan_assets.core.model.lora", fromlist=["COMFY_NAMES"]).COMFY_NAMES)
    lora = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets), block())
    for name, p in lora.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    out["block_peft_lora_ms"] = timed(lora)
    for m in lora.modules():
        if hasattr(m, "lora_A"):
            m.cast_input_dtype_enabled = False
    out["block_lora_no_upcast_ms"] = timed(lora)
    lora.compile()
    out["block_lora_no_upcast_compiled_ms"] = timed(lora)
    return out


# --- main ------------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    head = f"{'size':11s} {'tokens':>6s} {'mode':9s} {'s/step':>7s} {'GiB':>6s} {'MFU':>5s} {'ratio':>6s} {'loss diff':>9s} {'grad cos':>8s}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.s_per_step is None:
            lines.append(f"{r.size:11s} {r.tokens:6d} {r.mode:9s} {r.note}")
            continue
        ratio = f"{r.ratio:.2f}x" if r.ratio else "1.00x" if r.mode == "reference" else "-"
        diff = f"{100 * r.loss_diff:.3f}%" if r.loss_diff is not None else "-"
        cos = f"{r.grad_cos:.4f}" if r.grad_cos is not None else "-"
        lines.append(
            f"{r.size:11s} {r.tokens:6d} {r.mode:9s} {r.s_per_step:7.2f} {r.peak_gib:6.1f} "
            f"{100 * r.mfu:4.0f}% {ratio:>6s} {diff:>9s} {cos:>8s}"
        )
    return "\n".join(lines)


def scaling(results: list[Result]) -> str:
    lines = [
        "scaling: s/step and peak GiB against tokens",
        f"{'mode':9s} " + " ".join(f"{t:>14d}" for t in sorted({r.tokens for r in results})),
    ]
    for mode in dict.fromkeys(r.mode for r in results):
        cells = []
        for tokens in sorted({r.tokens for r in results}):
            r = next((r for r in results if r.mode == mode and r.tokens == tokens and r.s_per_step), None)
            cells.append(f"{r.s_per_step:6.2f}s {r.peak_gib:5.1f}G" if r else f"{'-':>14s}")
        lines.append(f"{mode:9s} " + " ".join(cells))
    return "\n".join(lines)


def inductor_settings(text: str) -> dict:
    """Set `name=value,...` on torch._inductor.config (numbers and true/false parsed); what was set."""
    import torch._inductor.config as inductor

    settings = {}
    for item in filter(None, text.split(",")):
        name, _, raw = item.partition("=")
        value: object = {"true": True, "false": False}.get(raw.lower(), raw)
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        owner, _, leaf = name.rpartition(".")
        target = functools.reduce(getattr, owner.split("."), inductor) if owner else inductor
        if not hasattr(target, leaf):
            raise SystemExit(f"--inductor: torch._inductor.config has no {name}")
        setattr(target, leaf, value)
        settings[name] = value
    return settings


def compile_timers() -> dict[str, float]:
    """Seconds per timer of torch.compile in this process so far (dynamo's `dynamo_timed` keys:
    tracing, code generation, loading, Triton's autotuning at first call, ...)."""
    from torch._dynamo.utils import compilation_time_metrics

    return {k: sum(v) for k, v in compilation_time_metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="512x512x33,512x512x81,480x832x81", help="HxWxF, comma-separated")
    parser.add_argument("--modes", default=",".join(MODES), help="in the order: " + ",".join(MODES))
    parser.add_argument("--mode-sizes", default="", help="mode=size+size;... limits a mode to some sizes")
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3, help="3 lets the memory plan settle")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro", action="store_true", help="also run the micro-benchmarks")
    parser.add_argument("--floor", action="store_true", help="time the matmul + attention floor per size")
    parser.add_argument("--profile", default="", help="modes: one more step per size under the profiler")
    parser.add_argument(
        "--memory-snapshot", default="", help="modes: one more step per size, what is live at its peak"
    )
    parser.add_argument(
        "--oom-report", default="", help="modes: allocator history on; at out of memory, what held the memory"
    )
    parser.add_argument("--memory-cap", type=float, default=0, help="GiB: cap the allocator in memory modes")
    parser.add_argument("--caps", default="", help="mode=GiB,...: cap the allocator in these modes")
    parser.add_argument(
        "--inductor",
        default="",
        help="name=value,...: torch._inductor.config settings (triton.autotune_pointwise=false)",
    )
    parser.add_argument("--deadline-at", type=float, default=0, help="unix time: start nothing after it")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logfile = (out / "train_step.log").open("a")

    started = time.perf_counter()

    def log(msg: str) -> None:
        msg = f"[{time.perf_counter() - started:6.0f}s] {msg}" if msg else msg
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    sizes, modes = args.sizes.split(","), args.modes.split(",")
    limits = dict(item.split("=") for item in args.mode_sizes.split(";") if item)
    order = list(MODES)
    assert modes == sorted(modes, key=order.index), f"modes must keep the order {order}"
    env = (
        f"card: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
        f"cuDNN {torch.backends.cudnn.version()} | layers {args.layers} | LoRA r{RANK} | "
        f"warm-up {args.warmup}, timed {args.steps} (median)"
    )
    log(env)
    for name, value in inductor_settings(args.inductor).items():
        log(f"torch._inductor.config.{name} = {value!r}")
    _forward_warnings(log)
    micro_results = micro(log) if args.micro else {}
    floors = {size: kernel_floor(size, args.layers, log) for size in sizes} if args.floor else {}
    device = torch.device("cuda")
    tmp = Path(tempfile.mkdtemp())
    began = time.perf_counter()
    model = build_expert(args.layers, device)
    job = bench_job(tmp, "reference")
    params = add_adapter(model, job)
    initial = [p.detach().cpu().clone() for p in params]  # off the GPU: not part of any mode's peak
    log(
        f"built expert in {time.perf_counter() - began:.1f} s: {torch.cuda.memory_allocated() / 2**30:.1f} GiB"
    )
    results, ref = [], {}
    for mode in modes:
        job = bench_job(tmp, mode)
        timers = compile_timers()
        began = time.perf_counter()
        applied = setup_mode(mode, model, job)
        log(
            f"{mode}: {applied} ({time.perf_counter() - began:.1f} s); "
            f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated"
        )
        for size in sizes:
            if mode in limits and size not in limits[mode].split("+"):
                continue
            if args.deadline_at and time.time() > args.deadline_at:
                results.append(Result(size, tokens_of(size), mode, note="not run: out of time"))
                continue
            try:
                result = run_size(mode, size, model, params, initial, job, args, ref, log)
            except torch.OutOfMemoryError as exc:
                result = Result(size, tokens_of(size), mode, note=f"out of memory: {str(exc)[:120]}")
            result.bound_s = floors.get(size)
            results.append(result)
            log(
                table([result]).splitlines()[-1]
                + f"   first step {result.first_step_s}s, warm-up extra {result.warmup_extra_s}s {result.note}"
            )
            (out / "train_step.json").write_text(
                json.dumps(
                    {"env": env, "micro": micro_results, "results": [asdict(r) for r in results]}, indent=1
                )
            )
        if mode == "reference":
            model.disable_gradient_checkpointing()
        from torch._dynamo.utils import counters

        log(f"{mode}: dynamo graph breaks {dict(counters['graph_break'])}, stats {dict(counters['stats'])}")
        spent = {k: v - timers.get(k, 0.0) for k, v in compile_timers().items()}
        costliest = sorted(((v, k) for k, v in spent.items() if v >= 0.05), reverse=True)[:12]
        if costliest:
            log(f"{mode}: compile seconds " + ", ".join(f"{k} {v:.1f}" for v, k in costliest))
    log("")
    log(env)
    log(table(results))
    log(scaling(results))
    for size, floor in floors.items():
        r = next((r for r in results if r.size == size and r.mode == "reference" and r.s_per_step), None)
        most = f"; at most {r.s_per_step / floor:.2f}x the reference" if r else ""
        log(f"floor {size}: matmuls + cuDNN attention alone {floor:.2f} s/step{most}")


if __name__ == "__main__":
    main()
