"""The training engine (docs/architecture.md §5): `wan-assets train` and the Dagster training asset both call `train`.

The loop reads like a table of contents: pick the expert for this step, run its micro-batches,
clip, measure gradient stability, step, update that expert's statistics and alpha phase, log,
checkpoint. Every random draw derives from (seed, step, micro-batch), so a resumed run replays the
exact losses of an uninterrupted one on CPU.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from wan_assets.core.config import JobConfig, dump_config, offloads_inactive_expert
from wan_assets.core.data.batches import Batch, BatchStream
from wan_assets.core.data.cache import index_path, load_index
from wan_assets.core.data.index import clip_of
from wan_assets.core.devices import pick_device
from wan_assets.core.errors import TrainingError
from wan_assets.core.experts import timestep_window
from wan_assets.core.files import write_json, write_text
from wan_assets.core.model.loading import WanComponents, load_wan_model
from wan_assets.core.model.lora import TRAINED_ADAPTER, add_lora, exported_alpha, save_lora, set_lora_scale
from wan_assets.core.model.metadata import LoraFacts, lora_metadata
from wan_assets.core.precision import DTYPES, autocast, dtype_problem
from wan_assets.core.seeds import derive_seed
from wan_assets.core.speed.options import apply_training_options
from wan_assets.core.train.alpha_schedule import AlphaScheduler, Transition
from wan_assets.core.train.distributed import Dist
from wan_assets.core.train.ema import LoraEMA
from wan_assets.core.train.flow import noisy_input, per_sample_loss, sample_timesteps
from wan_assets.core.train.lr_schedule import set_lr
from wan_assets.core.train.metrics_log import MetricsLog, truncate
from wan_assets.core.train.optim import (
    GradientStability,
    build_optimizer,
    clip_grad_norm,
    group_lr,
    load_optimizer_state,
)
from wan_assets.core.train.reporting import ConsoleReporter, QuietReporter, Reporter
from wan_assets.core.train.run_files import RunFiles, claim, save_state
from wan_assets.core.train.sampling import TrainingSampler

logger = logging.getLogger(__name__)
MAX_CONSECUTIVE_OOM = 3


@dataclass
class TrainParts:
    job: JobConfig
    files: RunFiles
    model: WanComponents
    params: dict[str, list[torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: AlphaScheduler
    stability: GradientStability
    stream: BatchStream
    device: torch.device
    compute_dtype: torch.dtype
    index_hash: str  # LatentIndex.identity() of the data trained on: a checkpoint resumes only on it
    dist: Dist = field(default_factory=Dist)
    sampler: TrainingSampler | None = None  # rank 0 only, when the job has `sample:`
    ema: LoraEMA | None = None  # `train.ema_config.use_ema`

    @property
    def experts(self) -> tuple[str, ...]:
        return self.job.experts


@dataclass
class TrainState:
    run_id: str
    step: int = 0  # optimizer steps completed
    consecutive_oom: int = 0


@dataclass(frozen=True)
class TrainOptions:
    """What one `train` call does with the run folder; the job's config says how to train."""

    resume: bool = False  # continue the run in the folder (or start afresh when it has no checkpoint)
    restart_on_new_data: bool = False  # on resume, a checkpoint of other data moves aside, not fails
    stop_after: int | None = None  # end after this many steps (tests); None trains to `train.steps`
    samples: bool = True  # False: no sample videos this call (tests of files that sample at 1024px)


@dataclass(frozen=True)
class StepResult:
    expert: str
    loss: float | None
    timestep: float | None
    grad_norm: float | None
    stability: float | None
    skipped: str | None
    batch: Batch | None
    transition: Transition | None = None


@dataclass
class TrainResult:
    run_id: str
    steps: int
    files: RunFiles
    final_loras: dict[str, Path] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def expert_at(step: int, experts: tuple[str, ...], switch_every: int) -> str:
    """Experts alternate every `switch_every` optimizer steps (high noise first), as the seed."""
    return experts[(step // switch_every) % len(experts)]


# --- building ---------------------------------------------------------------------------------------


def build_parts(
    job: JobConfig, cache_dir: Path, device: torch.device | None = None, dist: Dist | None = None
) -> TrainParts:
    dist = dist or Dist()
    device = device or (dist.device() if dist.enabled else pick_device())
    train = job.process.train
    compute_dtype = DTYPES[train.dtype]
    problem = dtype_problem(train.dtype, device)
    if problem is not None:
        raise TrainingError(problem)
    index_file = index_path(cache_dir, job)
    if not index_file.is_file():
        raise TrainingError(
            f"no latent cache at {index_file}; run `wan-assets cache` first (or materialize latent_cache)"
        )
    model = load_wan_model(
        job.process.model,
        dtype=compute_dtype,
        # A quantized expert is loaded in RAM and moves to the device block by block, quantized.
        device="cpu" if _offload(job) or job.process.model.quantize else device,
        attention_backend=train.attention_backend,
        training=True,
        load_experts=job.experts,
        load_text_encoder=False,
        load_vae=False,
    )
    params = {}
    for expert in job.experts:
        transformer = model.expert(expert)
        params[expert] = add_lora(
            transformer, job.process.network, TRAINED_ADAPTER, seed=derive_seed(train.seed, "lora", expert)
        )
        for p in params[expert]:
            p.data = p.data.float()  # fp32 master weights for the adapter, whatever the base dtype
        apply_training_options(transformer, train, job.process.model, device)
        transformer.train()
    scheduler = AlphaScheduler(job.process.network, job.experts)
    apply_alpha(model, scheduler, job.experts)
    index = load_index(index_file)
    datasets = job.process.datasets
    stream = BatchStream(
        index,
        batch_size=train.batch_size * dist.world_size,  # batch_size is per process, as in ai-toolkit
        seed=train.seed,
        caption_dropout=[d.caption_dropout_rate for d in datasets],  # each dataset its own rate
        num_repeats=[d.num_repeats for d in datasets],
    )
    optimizer = build_optimizer(train, params)
    return TrainParts(
        job=job,
        files=RunFiles.of(job),
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        stability=GradientStability(),
        stream=stream,
        device=device,
        compute_dtype=compute_dtype,
        index_hash=index.identity(),
        dist=dist,
        sampler=_sampler(job, index, device, compute_dtype) if dist.is_main else None,
        ema=LoraEMA(params, train.ema_config.ema_decay) if train.ema_config.use_ema else None,
    )


def _sampler(job: JobConfig, index, device: torch.device, dtype: torch.dtype) -> TrainingSampler | None:
    if job.process.sample is None or job.process.train.disable_sampling:
        return None
    return TrainingSampler(
        job, index, RunFiles.of(job).samples, device, dtype, take_turns=_offload(job) and device.type != "cpu"
    )


def _offload(job: JobConfig) -> bool:
    return offloads_inactive_expert(job.process.train, job.process.model)


def apply_alpha(model: WanComponents, scheduler: AlphaScheduler, experts: tuple[str, ...]) -> None:
    """Put the alpha each expert's schedule has in force into that expert's LoRA scale."""
    for expert in experts:
        set_lora_scale(model.expert(expert), scheduler.alpha(expert), TRAINED_ADAPTER)


def activate(parts: TrainParts, expert: str) -> None:
    """Keep only the active expert on the accelerator when offloading (the other waits in RAM)."""
    if not _offload(parts.job) or parts.device.type == "cpu":
        return
    for other in parts.experts:
        parts.model.expert(other).to(parts.device if other == expert else "cpu")
    if parts.device.type == "cuda":
        torch.cuda.empty_cache()


# --- one optimizer step --------------------------------------------------------------------------------


def forward_loss(
    parts: TrainParts, expert: str, batch: Batch, step: int, micro: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of one micro-batch's flow-matching loss, and its timesteps.

    The loss is this rank's per-sample losses summed and divided by the global sample count, so
    gradients summed over ranks equal those of the whole batch in one process. Timestep and noise
    are drawn per sample from (seed, step, micro, sample index), independent of the rank layout.
    """
    train = parts.job.process.train
    window = timestep_window(expert, parts.model.boundary_timestep)
    count = batch.latents.shape[0]
    shard = list(parts.dist.shard(count))
    # A rank left without samples (short tail batch) runs sample 0 at weight 0, keeping collectives aligned.
    index, weight = (shard, 1.0) if shard else ([0], 0.0)
    timesteps, noises = [], []
    for i in index:
        generator = torch.Generator().manual_seed(derive_seed(train.seed, "noise", step, micro, i))
        timesteps.append(
            sample_timesteps(train.timestep_type, window, 1, generator, shift=train.timestep_shift)
        )
        noises.append(torch.randn(batch.latents.shape[1:], generator=generator))
    t = torch.cat(timesteps)
    x_t, target = noisy_input(batch.latents[index], torch.stack(noises), t)
    device, dtype = parts.device, parts.compute_dtype
    hidden = torch.cat([x_t, batch.condition[index]], dim=1).to(device, dtype)  # [b, 36, F', h, w]
    with autocast(device, dtype):
        pred = parts.model.expert(expert)(
            hidden_states=hidden,
            timestep=t.to(device),
            encoder_hidden_states=batch.text[index].to(device, dtype),
            return_dict=False,
        )[0]
    return per_sample_loss(pred, target.to(device)).sum() * (weight / count), t


def train_step(parts: TrainParts, state: TrainState, step: int) -> StepResult:
    train, dist = parts.job.process.train, parts.dist
    expert = expert_at(step, parts.experts, train.switch_boundary_every)
    parts.optimizer.zero_grad(set_to_none=True)
    loss_sum, timesteps, batch = 0.0, [], None
    # 1. Micro-batches: forward and backward each, gradients accumulating in the LoRA parameters.
    for micro in range(train.gradient_accumulation):
        batch = parts.stream.batch(step * train.gradient_accumulation + micro)
        torch.manual_seed(derive_seed(train.seed, "dropout", step, micro, dist.rank))  # LoRA dropout
        loss, oom = None, False
        try:
            loss, t = forward_loss(parts, expert, batch, step, micro)
            # No finiteness check here: it would wait for the forward to finish before backward is
            # queued. A nonfinite loss gives nonfinite gradients, dropped below.
            (loss / train.gradient_accumulation).backward()
        except torch.OutOfMemoryError as error:
            # Drop the graph (the forward's activations) now, before the out-of-memory handling
            # empties the allocator's cache, not when this function returns.
            oom, loss = True, None
            logger.warning(
                "step %d (%s, bucket %s): %s", step, expert, batch.bucket, str(error).split("\n")[0]
            )
        # 2. The out-of-memory / non-finite guard: the step is skipped, nothing is applied.
        # Every rank takes the same branch (these are collectives), so none waits forever.
        if dist.any_flag(oom):
            return _out_of_memory(parts, state, step, expert, batch)
        assert loss is not None, "no rank ran out of memory, so this one computed its loss"
        if dist.any_flag(not bool(torch.isfinite(loss))):
            parts.optimizer.zero_grad(set_to_none=True)
            return _skipped(expert, "nonfinite_loss", batch, timestep=float(t.mean()))
        loss_sum += dist.sum_scalar(loss.item())
        timesteps.append(t)
    state.consecutive_oom = 0
    # 3. Gradient sync across ranks, clipping, and the stability of the clipped gradients.
    dist.sum_grads(parts.params[expert])
    grad_norm = clip_grad_norm(parts.params[expert], train.max_grad_norm)
    mean_loss = loss_sum / train.gradient_accumulation
    if not math.isfinite(grad_norm):
        # A finite loss can still overflow in backward (bf16 activations, fp8 scales). Applying it
        # would turn every LoRA weight into NaN and skip all later steps, so the step is dropped
        # (its loss named in the warning, not in the statistics). The norm is of summed grads:
        # every rank takes this branch.
        parts.optimizer.zero_grad(set_to_none=True)
        logger.warning(
            "step %d (%s, bucket %s): loss %.4g is finite but its gradient norm is %s; step skipped",
            step,
            expert,
            batch.bucket if batch is not None else "?",
            mean_loss,
            grad_norm,
        )
        return _skipped(expert, "nonfinite_grad", batch, timestep=float(torch.cat(timesteps).mean()))
    stability = parts.stability.measure(expert, parts.params[expert])
    # 4. The optimizer step at this step's scheduled rate, then the weights' moving average.
    set_lr(parts.optimizer, train, step)
    parts.optimizer.step()
    if parts.ema is not None:
        parts.ema.update()
    # 5. The alpha schedule: this expert's statistics, and its new alpha when its phase changes.
    transition = parts.scheduler.record(step, expert, mean_loss, stability)
    if transition is not None:
        apply_alpha(parts.model, parts.scheduler, (expert,))
    return StepResult(
        expert=expert,
        loss=mean_loss,
        timestep=float(torch.cat(timesteps).mean()),
        grad_norm=grad_norm,
        stability=stability,
        skipped=None,
        batch=batch,
        transition=transition,
    )


def _skipped(expert: str, reason: str, batch: Batch | None, *, timestep: float | None = None) -> StepResult:
    """A step that applied nothing: logged with its reason, no loss or gradient statistics."""
    return StepResult(
        expert=expert,
        loss=None,
        timestep=timestep,
        grad_norm=None,
        stability=None,
        skipped=reason,
        batch=batch,
    )


def _out_of_memory(
    parts: TrainParts, state: TrainState, step: int, expert: str, batch: Batch | None
) -> StepResult:
    parts.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if parts.device.type == "cuda":
        torch.cuda.empty_cache()
    state.consecutive_oom += 1
    if state.consecutive_oom >= MAX_CONSECUTIVE_OOM:
        bucket = batch.bucket if batch is not None else "?"
        raise TrainingError(
            f"out of memory {MAX_CONSECUTIVE_OOM} times in a row (step {step}, {expert}, bucket {bucket}); "
            "lower max_pixels_per_frame or num_frames, turn on gradient_checkpointing or "
            "offload_inactive_expert; the last checkpoint is intact and `--resume` continues from it"
        )
    return _skipped(expert, "oom", batch)


# --- logging and checkpoints --------------------------------------------------------------------------


def metrics_record(
    parts: TrainParts, state: TrainState, step: int, result: StepResult, seconds: float
) -> dict:
    """One JSONL line (docs/architecture.md §5.2): statistics are those of the expert that trained at this step."""
    record = {
        "run_id": state.run_id,
        "step": step,
        "timestamp": datetime.now().astimezone().isoformat(),
        "expert": result.expert,
        "loss": result.loss,
        "gradient_stability": result.stability,
        **_learning_rates(parts),
        **parts.scheduler.metrics(result.expert),
        "lora_scale": parts.scheduler.alpha(result.expert) / parts.job.process.network.linear,
        "grad_norm": result.grad_norm,
        "timestep": result.timestep,
        "bucket": result.batch.bucket if result.batch is not None else None,
        "tokens": result.batch.tokens if result.batch is not None else None,
        "step_time_s": round(seconds, 4),
        "peak_mem_gib": _peak_mem_gib(parts.device),
        "skipped": result.skipped,
    }
    return record


def _learning_rates(parts: TrainParts) -> dict[str, float]:
    groups = parts.optimizer.param_groups
    if len(groups) == 1:
        return {"learning_rate": group_lr(parts.optimizer, 0)}
    # Seed naming: lr_0 = high noise, lr_1 = low noise (group order is EXPERTS order).
    return {f"lr_{i}": group_lr(parts.optimizer, i) for i in range(len(groups))}


def _peak_mem_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def save_checkpoint(parts: TrainParts, state: TrainState) -> list[Path]:
    step, files = state.step, parts.files
    written = list(_save_loras(parts, step).values())
    parts.scheduler.save(files.alpha_scheduler(step))
    written.append(files.alpha_scheduler(step))
    state_dict = {
        "step": step,
        "run_id": state.run_id,
        "experts": parts.experts,
        "index_hash": parts.index_hash,
        "optimizer": parts.optimizer.state_dict(),
        "gradient_stability": parts.stability.state_dict(),
        "lora": {e: [p.detach().clone() for p in parts.params[e]] for e in parts.experts},
    }
    if parts.ema is not None:
        state_dict["ema"] = parts.ema.state_dict()
    written.append(save_state(files.state(step), state_dict))  # last: marks the checkpoint complete
    files.prune(parts.experts, parts.job.process.save.max_step_saves_to_keep)
    return written


def _lora_metadata(parts: TrainParts, expert: str, step: int) -> dict[str, str]:
    """modelspec / kohya metadata (model/metadata.py), with the config made public."""
    alpha = parts.scheduler.alpha(expert)
    low, high = timestep_window(expert, parts.model.boundary_timestep)
    facts = LoraFacts(
        expert=expert,
        step=step,
        alpha=exported_alpha(parts.model.expert(expert), TRAINED_ADAPTER, alpha),
        trained_alpha=alpha,
        timestep_range=(round(low), round(high)),
        dataset_hash=parts.index_hash,
        resolution=max(
            math.isqrt(pixels) for d in parts.job.process.datasets for _, pixels in d.pixel_budgets
        ),
    )
    return lora_metadata(parts.job, facts)


def resume(
    parts: TrainParts,
    state: TrainState,
    *,
    restart_on_new_data: bool = False,
    log: Callable[[str], None] = logger.warning,
) -> bool:
    """Load the newest checkpoint that loads; truncate the JSONL to its step. False if there is none:
    the run starts afresh in the same folder (killed before its first checkpoint keeps nothing).

    A checkpoint trained on another latent index (or other experts) cannot be resumed exactly: that
    is an error, or, with `restart_on_new_data` (the Dagster asset after new clips arrived), the old
    run's files are kept aside in `<name>.<run_id>` and training starts afresh.
    """
    files = parts.files
    checkpoint = files.newest_loadable(parts.experts, log)
    if checkpoint is None:
        if parts.dist.is_main:
            truncate(files.metrics, 0)
        return False
    step, saved = checkpoint.step, checkpoint.state
    problem = _resume_problem(parts, saved, files.state(step))
    if problem is not None:
        if not restart_on_new_data:
            raise TrainingError(problem)
        if parts.dist.is_main:
            archive = files.root.with_name(f"{files.root.name}.{saved['run_id']}")
            files.move_aside(archive)
            log(f"{problem.split(';')[0]}: the old run's files are now in {archive}")
        parts.dist.barrier()
        return False
    with torch.no_grad():
        for expert in parts.experts:
            for p, value in zip(parts.params[expert], saved["lora"][expert], strict=True):
                p.copy_(value)
    load_optimizer_state(parts.optimizer, saved["optimizer"], parts.device)
    if parts.ema is not None:
        parts.ema.load_state_dict(saved["ema"])
    parts.stability.load_state_dict(saved["gradient_stability"])
    parts.scheduler.load_state_dict(checkpoint.scheduler)
    apply_alpha(parts.model, parts.scheduler, parts.experts)
    state.step, state.run_id = step, saved["run_id"]
    if parts.dist.is_main:
        truncate(files.metrics, step)
    return True


def _resume_problem(parts: TrainParts, saved: dict, path: Path) -> str | None:
    if tuple(saved["experts"]) != parts.experts:
        return (
            f"checkpoint {path} trained {', '.join(saved['experts'])}, this config trains "
            f"{', '.join(parts.experts)}; resume with the run's own config.yaml or change config.name"
        )
    if (parts.ema is not None) != ("ema" in saved):
        return (
            f"checkpoint {path} was trained {'without' if parts.ema is not None else 'with'} "
            "train.ema_config.use_ema; resume with the run's own config.yaml or change config.name"
        )
    if saved.get("index_hash") not in (parts.index_hash, _legacy_index_hash(parts)):
        return (
            f"the latent cache changed since checkpoint {path}, so it cannot be resumed exactly; "
            "change config.name for a new run (or pass --restart-on-new-data)"
        )
    return None


def _legacy_index_hash(parts: TrainParts) -> str:
    """What checkpoints written before `LatentIndex.identity` stored: the index file's bytes hashed."""
    index_file = index_path(parts.stream.index.cache_dir, parts.job)
    return hashlib.sha256(index_file.read_bytes()).hexdigest()[:16]


def save_final(parts: TrainParts) -> dict[str, Path]:
    return _save_loras(parts, None)


def _save_loras(parts: TrainParts, step: int | None) -> dict[str, Path]:
    """Each trained expert's LoRA at `step` (None: the final `<name>_<expert>.safetensors`), and
    with EMA on, its averaged weights beside it (`<expert>_ema` keys of the result)."""
    saved = {expert: _save_lora(parts, expert, step, ema=False) for expert in parts.experts}
    if parts.ema is not None:
        for expert in parts.experts:
            with parts.ema.applied(expert):
                saved[f"{expert}_ema"] = _save_lora(parts, expert, step, ema=True)
    return saved


def _save_lora(parts: TrainParts, expert: str, step: int | None, *, ema: bool) -> Path:
    metadata = _lora_metadata(parts, expert, parts.job.process.train.steps if step is None else step)
    if ema:
        metadata["ema_decay"] = str(parts.job.process.train.ema_config.ema_decay)
    return save_lora(
        parts.files.lora(expert, step, ema=ema),
        parts.model.expert(expert),
        TRAINED_ADAPTER,
        parts.scheduler.alpha(expert),
        dtype=DTYPES[parts.job.process.save.dtype],
        metadata=metadata,
    )


# --- the loop -----------------------------------------------------------------------------------------


def train(
    job: JobConfig,
    cache_dir: Path,
    *,
    resume_run: bool = False,
    restart_on_new_data: bool = False,
    reporter: Reporter | None = None,
    device: torch.device | None = None,
    stop_after: int | None = None,
    dist: Dist | None = None,
    samples: bool = True,
) -> TrainResult:
    """Train the configured experts; `stop_after` ends early after that many steps (for tests).

    Under torchrun (`dist`), every rank trains its share of each batch; rank 0 alone writes files
    and reports.
    """
    dist = dist or Dist()
    options = TrainOptions(
        resume=resume_run, restart_on_new_data=restart_on_new_data, stop_after=stop_after, samples=samples
    )
    reporter = (reporter or ConsoleReporter()) if dist.is_main else QuietReporter()
    # 1. The run folder: one trainer per folder, claimed before the model loads so a second fails at once.
    with open_run(RunFiles.of(job), dist):
        # 2. The parts: model with LoRAs, optimizer, alpha schedule, batches.
        parts = build_parts(job, cache_dir, device, dist)
        if not options.samples:
            parts.sampler = None
        # 3. Resume or start, then record the data and config trained on.
        state = start_run(parts, options, cache_dir, reporter)
        total = job.process.train.steps
        reporter.on_start(job, state.run_id, state.step, total)
        result = TrainResult(run_id=state.run_id, steps=total, files=parts.files)
        started = time.perf_counter()
        # The samples before training (ai-toolkit's baseline samples; skip_first_sample turns them off).
        if job.process.train.samples_first(resumed=state.step > 0) and state.step < total:
            _sample(parts, state, reporter, result)
        # 4. The loop: step, checkpoint if due, sample if due.
        end = total if options.stop_after is None else min(total, options.stop_after)
        _run_steps(parts, state, reporter, result, end=end)
        # 5. The final LoRAs, once every step has run.
        if state.step == total and dist.is_main:
            result.final_loras = save_final(parts)
        dist.barrier()
        result.seconds = time.perf_counter() - started
        result.transitions = parts.scheduler.transitions
        reporter.on_end(result)
        return result


def _run_steps(
    parts: TrainParts, state: TrainState, reporter: Reporter, result: TrainResult, *, end: int
) -> None:
    """Optimizer steps until `end`, each logged, then checkpointed and sampled when due."""
    log = MetricsLog(parts.files.metrics) if parts.dist.is_main else None
    try:
        while state.step < end:
            _one_step(parts, state, log, reporter)
            _maybe_checkpoint(parts, state, reporter, final=state.step == result.steps)
            _maybe_sample(parts, state, reporter, result, final=state.step == result.steps)
    finally:
        if log is not None:
            log.close()


@contextmanager
def open_run(files: RunFiles, dist: Dist) -> Iterator[None]:
    """Rank 0 holds the run folder's lock; every rank fails alike when another trainer has it."""
    with ExitStack() as stack:
        problem = ""
        if dist.is_main:
            try:
                stack.enter_context(claim(files))
            except TrainingError as exc:
                problem = str(exc)
        problem = dist.broadcast_str(problem)
        if problem:
            raise TrainingError(problem)
        yield


def start_run(parts: TrainParts, options: TrainOptions, cache_dir: Path, reporter: Reporter) -> TrainState:
    """Resume the run in the folder or start one (refusing to overwrite a run not asked to resume),
    then record its data and config. Every rank agrees on the run id (rank 0's) and on the folder.
    """
    job, files, dist = parts.job, parts.files, parts.dist
    state = TrainState(run_id=dist.broadcast_str(uuid.uuid4().hex[:12]))
    if options.resume:
        if resume(parts, state, restart_on_new_data=options.restart_on_new_data, log=reporter.log):
            reporter.log(f"resumed {job.name} at step {state.step} (run {state.run_id})")
        else:
            reporter.log(f"no checkpoint to resume in {files.root}: {job.name} starts afresh")
    elif files.complete_steps(parts.experts) or files.metrics.exists():
        raise TrainingError(
            f"{files.root} already holds a run named {job.name!r}; pass --resume to continue it or change config.name"
        )
    if dist.is_main:
        reporter.log(_record_data(parts, cache_dir))
    dist.barrier()  # every rank has looked at the run folder before rank 0 writes to it
    if dist.is_main:
        write_text(files.config, dump_config(job))
    return state


def _record_data(parts: TrainParts, cache_dir: Path) -> str:
    """Write what the run trains on to `data.json` (read into the metrics database's `runs`); the
    line to log: a cache run that lost clips must not go unnoticed."""
    stream = parts.stream
    samples = [sid for sids in stream.buckets.values() for sid in sids]
    data: dict[str, Any] = {
        "index": str(index_path(cache_dir, parts.job)),
        "index_hash": parts.index_hash,
        "num_clips": len({clip_of(sid) for sid in samples}),
        "num_samples": len(samples),  # windows x resolutions
        "num_cached_variants": sum(len(stream.index.sample(sid).variants) for sid in samples),
        "num_val_clips": sum(1 for split in stream.index.splits.values() if split == "val"),
        "buckets": {bucket: len(keys) for bucket, keys in sorted(stream.buckets.items())},
    }
    write_json(parts.files.data, data)
    return (
        f"training on {data['num_clips']} clips ({data['num_samples']} samples, "
        f"{data['num_cached_variants']} cached variants, "
        f"{len(data['buckets'])} buckets; {data['num_val_clips']} held out) from {data['index']}"
    )


def _one_step(parts: TrainParts, state: TrainState, log: MetricsLog | None, reporter: Reporter) -> None:
    step = state.step
    expert = expert_at(step, parts.experts, parts.job.process.train.switch_boundary_every)
    activate(parts, expert)
    if parts.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(parts.device)
    began = time.perf_counter()
    result = train_step(parts, state, step)
    record = metrics_record(parts, state, step, result, time.perf_counter() - began)
    if log is not None:
        log.write(record)
    state.step += 1
    reporter.on_step(record)
    if result.skipped:
        reporter.log(f"step {step} skipped ({result.skipped}, {expert}, bucket {record['bucket']})")
    if result.transition is not None:
        reporter.on_transition(result.transition)


def _maybe_checkpoint(parts: TrainParts, state: TrainState, reporter: Reporter, *, final: bool) -> None:
    if parts.job.process.save.should_save(state.step, final=final):
        if parts.dist.is_main:
            reporter.on_checkpoint(state.step, save_checkpoint(parts, state))
        parts.dist.barrier()  # no rank runs ahead of a checkpoint it might resume from


def _maybe_sample(
    parts: TrainParts, state: TrainState, reporter: Reporter, result: TrainResult, *, final: bool
) -> None:
    if parts.sampler is not None and parts.sampler.due(state.step, final=final):
        _sample(parts, state, reporter, result)


def _sample(parts: TrainParts, state: TrainState, reporter: Reporter, result: TrainResult) -> None:
    sampler = parts.sampler
    if sampler is None:
        return
    written = sampler.write({e: parts.model.expert(e) for e in parts.experts}, state.step)
    result.samples += written
    reporter.log(f"samples at step {state.step}: {', '.join(str(p) for p in written)}")
