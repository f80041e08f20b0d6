"""Learning-rate schedules as ai-toolkit builds them (toolkit/scheduler.py), in closed form.

ai-toolkit wraps torch's schedulers (`ConstantLR`, `LinearLR`, `CosineAnnealingLR`,
`CosineAnnealingWarmRestarts`, `StepLR`) and diffusers' `get_constant_schedule_with_warmup`, with
`total_iters` defaulting to `train.steps` (it becomes `T_max` / `T_0`, overwriting any given), and steps them once per optimizer
step. Here the factor of step n is the closed form of those schedules, so the learning rate is a pure
function of the step: a resumed run sets exactly the rate an uninterrupted one had, with no
scheduler state to save.
"""

from __future__ import annotations

import math

import torch

from wan_assets.core.config import TrainConfig


def lr_at(train: TrainConfig, base_lr: float, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based) for a group that starts at `base_lr`."""
    p, name, total = train.lr_scheduler_params, train.lr_scheduler, train.steps
    if name == "constant":
        return base_lr * (p.factor if step < (p.total_iters or total) else 1.0)
    if name == "constant_with_warmup":
        warmup = p.num_warmup_steps
        return base_lr * (step / warmup if step < warmup else 1.0)
    if name == "linear":
        span = p.total_iters or total
        return base_lr * (p.start_factor + (p.end_factor - p.start_factor) * min(step, span) / span)
    if name == "cosine":
        span = p.total_iters or total
        return p.eta_min + (base_lr - p.eta_min) * (1 + math.cos(math.pi * step / span)) / 2
    if name == "cosine_with_restarts":
        t_cur, t_i = _restart_position(step, p.total_iters or total, p.T_mult)
        return p.eta_min + (base_lr - p.eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
    assert name == "step", f"unknown lr_scheduler {name}"
    assert p.step_size is not None, "TrainConfig requires step_size for the step schedule"
    return base_lr * p.gamma ** (step // p.step_size)


def _restart_position(step: int, t_0: int, t_mult: int) -> tuple[int, int]:
    """(steps into the current cycle, cycle length) of CosineAnnealingWarmRestarts."""
    if t_mult == 1:
        return step % t_0, t_0
    n = int(math.log(step / t_0 * (t_mult - 1) + 1, t_mult))
    return step - t_0 * (t_mult**n - 1) // (t_mult - 1), t_0 * t_mult**n


def set_lr(optimizer: torch.optim.Optimizer, train: TrainConfig, step: int) -> None:
    """Put step `step`'s rate into every group (each group keeps its start rate in `base_lr`)."""
    for group in optimizer.param_groups:
        value = lr_at(train, group["base_lr"], step)
        if torch.is_tensor(group["lr"]):  # torchao keeps lr as a tensor its compiled step reads
            group["lr"].fill_(value)
        else:
            group["lr"] = value
