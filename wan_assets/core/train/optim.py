"""Optimizers over the per-expert LoRA parameters, gradient clipping and gradient stability (docs/architecture.md §5).

One param group per trained expert, in EXPERTS order, each tagged with `"expert"`: when both experts
train, group 0 is high_noise and group 1 low_noise, which is what the metrics' `lr_0` / `lr_1` mean.
The trainer must leave the inactive expert's gradients as None (not zeros): every optimizer here skips
a parameter whose grad is None, so the paused expert's weights and optimizer state stay untouched.
An adamw8bit state holds torchao tensor subclasses, which `torch.load(weights_only=True)` accepts only
once `torchao.optim` is imported: build the optimizer before loading a run's `_state.pt`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from wan_assets.core.config import ConfigError, OptimizerParams, TrainConfig
from wan_assets.core.experts import EXPERTS, check_expert

# Adafactor's eps1, added to grad**2 before the second-moment EMA. `optimizer_params.eps` (1e-8) is
# AdamW's denominator eps: added to squared LoRA gradients (often ~1e-12) it would swamp them.
AUTOMAGIC_EPS = 1e-30


def build_optimizer(train: TrainConfig, params: dict[str, list[torch.nn.Parameter]]) -> torch.optim.Optimizer:
    """The configured optimizer with one group per expert in `params`, in EXPERTS order."""
    for expert in params:
        check_expert(expert)
    experts = [e for e in EXPERTS if e in params]
    assert experts, "build_optimizer needs the parameters of at least one expert"
    opt = train.optimizer_params
    groups = [
        {"params": list(params[e]), "expert": e, "lr": opt.for_expert(e, "lr", train.start_lr)}
        for e in experts
    ]
    optimizer = _BUILDERS[train.optimizer](groups, opt)
    for group in optimizer.param_groups:
        # The start rate, which the lr schedule scales (lr_schedule.set_lr); saved with the state.
        group["base_lr"] = float(group["lr"])
    return optimizer


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict, device: torch.device) -> None:
    """Load a saved optimizer state with its tensors on `device`, where the steps run.

    torch moves each state tensor to its parameter's device at load time, but the LoRA of an expert
    that waits on the CPU (offload_inactive_expert) would leave its moments there for good, and
    torchao's 8-bit states stay where they were loaded (the CPU). `step` stays on the host where
    torch keeps it there (neither fused nor capturable).
    """
    optimizer.load_state_dict(state_dict)
    for group in optimizer.param_groups:
        step_on_host = not (group.get("fused") or group.get("capturable"))
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not (key == "step" and step_on_host):
                    state[key] = value.to(device)


def check_optimizer(train: TrainConfig, experts: Sequence[str]) -> None:
    """Raise the ConfigError `build_optimizer` would for these experts, building nothing."""
    if train.optimizer == "automagic":
        opt = train.optimizer_params
        for expert in experts:
            _automagic_bounds(opt, expert, opt.for_expert(expert, "lr", train.lr))
    if train.optimizer == "prodigy":
        lrs = {e: train.optimizer_params.for_expert(e, "lr", train.start_lr) for e in experts}
        if len(set(lrs.values())) > 1:
            raise ConfigError(
                f"train.optimizer_params: prodigy estimates one step size for all parameters and "
                f"refuses different lr per group, got {lrs}; drop high_noise_lr / low_noise_lr"
            )


def _adamw(groups: list[dict[str, Any]], opt: OptimizerParams) -> torch.optim.Optimizer:
    # Fused on CUDA: one multi-tensor kernel set for all of a LoRA's tensors instead of a dozen
    # foreach passes, whose launches kept the GPU idle at every step's end. Elsewhere (CPU, or an
    # expert parked on the CPU while inactive) torch picks its default.
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups,
        betas=opt.betas,
        eps=opt.eps_or(1e-8),
        weight_decay=opt.weight_decay,
        fused=True if on_cuda else None,
    )


def _adamw8bit(groups: list[dict[str, Any]], opt: OptimizerParams) -> torch.optim.Optimizer:
    # torchao quantizes the two moments of tensors with >= 4096 elements and a multiple of block_size
    # (256); smaller tensors keep plain moments in the param dtype. Its step is torch.compile'd, which
    # on CPU needs a C++ compiler and takes tens of seconds on first use.
    return _batched_adamw8bit()(groups, betas=opt.betas, eps=opt.eps_or(1e-8), weight_decay=opt.weight_decay)


@functools.cache
def _batched_adamw8bit() -> type:
    """torchao's AdamW8bit, stepping its quantized tensors in a few calls instead of one per tensor.

    torchao calls its compiled update once per parameter. A rank-64 LoRA of an A14B expert has 800
    tensors, and each call costs the host about half a millisecond (the state subclasses are
    flattened and unflattened around the compiled graph) while the GPU does microseconds of work: on
    an H100 the step's end sat mostly idle for about 0.6 s of a 6 s step (bench/README.md, issue 20).

    Here the two moments of all quantized tensors stepped together live in four flat buffers (codes
    and block scales), each parameter's state a torchao OptimState8bit viewing its part, so
    `state_dict` and `_state.pt` are torchao's. A step concatenates the parameters and gradients,
    runs torchao's own `single_param_adam` on chunks of CHUNK elements (blocks stay aligned: every
    quantized tensor is a multiple of the block size), and copies the parameters back. The
    arithmetic is torchao's element for element; the other tensors step as torchao steps them.
    """
    # Imported here: importing torchao costs seconds and logs warnings that other optimizers never need.
    from torchao.optim import AdamW8bit
    from torchao.optim.adam import single_param_adam
    from torchao.optim.subclass_8bit import OptimState8bit

    class BatchedAdamW8bit(AdamW8bit):
        CHUNK = 1 << 24  # elements per compiled call (its fp32 work stays inside the fused kernels)

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._batches: dict[tuple[int, ...], _FlatStates] = {}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            super().load_state_dict(state_dict)
            self._batches.clear()  # the loaded states are tensors of their own; gathered at the next step

        @torch.no_grad()
        def step(self, closure=None):  # type: ignore[override]
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            with torch._dynamo.utils.disable_cache_limit():
                for group in self.param_groups:
                    stepped = [p for p in group["params"] if p.grad is not None]
                    for p in stepped:
                        if p.grad.is_sparse:
                            raise RuntimeError("Sparse gradient is not supported")
                        if not self.state[p]:
                            self._init_state(p, group)
                    batches: dict[tuple, list[Tensor]] = {}
                    for p in stepped:
                        state = self.state[p]
                        if isinstance(state["exp_avg"], OptimState8bit) and not group["amsgrad"]:
                            key = (p.dtype, p.device, float(state["step"]))
                            batches.setdefault(key, []).append(p)
                        else:
                            self._step_one(p, group)
                    for params in batches.values():
                        self._step_batch(params, group)
            return loss

        def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
            state = self.state[p]
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = self._new_buffer(p, True)
            state["exp_avg_sq"] = self._new_buffer(p, False)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = self._new_buffer(p, False)

        def _step_one(self, p: Tensor, group: dict[str, Any]) -> None:
            """torchao's own per-tensor step (its loop body, for the tensors it keeps unquantized)."""
            state = self.state[p]
            state["step"] += 1
            moments = (state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq", None))
            self._update(p.detach(), cast(Tensor, p.grad), state["step"], moments, group)

        def _update(
            self, p: Tensor, grad: Tensor, step: Tensor, moments: tuple, group: dict[str, Any]
        ) -> None:
            """torchao's compiled update of `p` (a parameter, or a chunk of the concatenated ones)."""
            torch.compile(single_param_adam, fullgraph=True, dynamic=False)(
                p,
                grad,
                step,
                *moments,
                group["lr"],
                group["betas"][0],
                group["betas"][1],
                group["weight_decay"],
                group["eps"],
                self.is_adamw,
                self.bf16_stochastic_round and p.dtype is torch.bfloat16,
            )

        def _step_batch(self, params: list[Tensor], group: dict[str, Any]) -> None:
            key = tuple(id(p) for p in params)
            flat = self._batches.get(key)
            if flat is None or not flat.owns(params, self.state):
                flat = self._batches[key] = _FlatStates(params, self.state, OptimState8bit)
            for p in params:
                self.state[p]["step"] += 1
            step = self.state[params[0]]["step"]
            weights = torch.cat([p.detach().reshape(-1) for p in params])
            grads = torch.cat([cast(Tensor, p.grad).reshape(-1) for p in params])
            for start in range(0, weights.numel(), self.CHUNK):
                end = min(start + self.CHUNK, weights.numel())
                exp_avg, exp_avg_sq = flat.chunk(start, end, params[0].dtype, OptimState8bit)
                self._update(weights[start:end], grads[start:end], step, (exp_avg, exp_avg_sq, None), group)
            parts = weights.split([p.numel() for p in params])
            torch._foreach_copy_(
                [p.detach() for p in params], [w.view(p.shape) for w, p in zip(parts, params, strict=True)]
            )

    return BatchedAdamW8bit


class _FlatStates:
    """The 8-bit moments of several tensors in four flat buffers; each tensor's state views its part."""

    def __init__(self, params: list[Tensor], state: dict, state_class: type) -> None:
        first = state[params[0]]
        self.block = first["exp_avg"].block_size
        self.buffers: dict[str, tuple[Tensor, Tensor, Tensor, bool]] = {}
        for name in ("exp_avg", "exp_avg_sq"):
            moments = [state[p][name] for p in params]
            assert all(m.block_size == self.block and m.codes.numel() % self.block == 0 for m in moments)
            # Copied from the tensors' own states: fresh zeros, or the ones a resume loaded.
            codes = torch.cat([m.codes.reshape(-1) for m in moments])
            scale = torch.cat([m.scale.reshape(-1) for m in moments])
            qmap, signed = moments[0].qmap, moments[0].signed
            self.buffers[name] = (codes, scale, qmap, signed)
            offset = 0
            for p, m in zip(params, moments, strict=True):
                n = m.codes.numel()
                view = state_class(
                    codes[offset : offset + n].view(m.codes.shape),
                    scale[offset // self.block : (offset + n) // self.block],
                    qmap,
                    signed,
                    dtype=m.dtype,
                )
                state[p][name] = view
                offset += n
        self.views = [(state[p]["exp_avg"], state[p]["exp_avg_sq"]) for p in params]

    def owns(self, params: list[Tensor], state: dict) -> bool:
        """Whether the tensors' states are still the views made here (a load or a move replaces them)."""
        return all(
            state[p]["exp_avg"] is m and state[p]["exp_avg_sq"] is v
            for p, (m, v) in zip(params, self.views, strict=True)
        )

    def chunk(self, start: int, end: int, dtype: torch.dtype, state_class: type) -> tuple[Tensor, Tensor]:
        """The two moments of elements [start, end) as torchao states (start and end on block bounds)."""
        assert start % self.block == 0 and (end % self.block == 0 or end == self.total), (start, end)
        out = []
        for name in ("exp_avg", "exp_avg_sq"):
            codes, scale, qmap, signed = self.buffers[name]
            blocks = scale[start // self.block : end // self.block]
            out.append(state_class(codes[start:end], blocks, qmap, signed, dtype=dtype))
        return out[0], out[1]

    @property
    def total(self) -> int:
        return self.buffers["exp_avg"][0].numel()


def _automagic(groups: list[dict[str, Any]], opt: OptimizerParams) -> torch.optim.Optimizer:
    for group in groups:
        group.update(_automagic_bounds(opt, group["expert"], group["lr"]))
    return Automagic(
        groups, beta2=opt.beta2, clip_threshold=opt.clip_threshold, weight_decay=opt.weight_decay
    )


def _automagic_bounds(opt: OptimizerParams, expert: str, lr: float) -> dict[str, float]:
    """Per-expert lr_bump / min_lr / max_lr, checked against the expert's start lr."""
    bounds = {
        name: opt.for_expert(expert, name, getattr(opt, name)) for name in ("lr_bump", "min_lr", "max_lr")
    }
    if bounds["lr_bump"] < 0:
        raise ConfigError(
            f"train.optimizer_params: lr_bump for {expert} must be >= 0, got {bounds['lr_bump']}"
        )
    if not 0 <= bounds["min_lr"] <= lr <= bounds["max_lr"]:
        raise ConfigError(
            f"train.optimizer_params: automagic start lr {lr} for {expert} is outside "
            f"[min_lr, max_lr] = [{bounds['min_lr']}, {bounds['max_lr']}]; set train.lr "
            f"(or optimizer_params.{expert}_lr) inside that range or widen {expert}_min_lr / {expert}_max_lr"
        )
    return bounds


def _prodigy(groups: list[dict[str, Any]], opt: OptimizerParams) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    # ai-toolkit builds Prodigy(params, lr, eps=1e-6, **optimizer_params): eps 1e-6 unless given.
    return Prodigy(
        groups,
        betas=opt.betas,
        beta3=opt.beta3,
        eps=opt.eps_or(1e-6),
        weight_decay=opt.weight_decay,
        decouple=opt.decouple,
        use_bias_correction=opt.use_bias_correction,
        safeguard_warmup=opt.safeguard_warmup,
        d0=opt.d0,
        d_coef=opt.d_coef,
        growth_rate=opt.growth_rate,
        slice_p=opt.slice_p,
    )


_BUILDERS: dict[str, Callable[[list[dict[str, Any]], OptimizerParams], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "automagic": _automagic,
    "prodigy": _prodigy,
}


def group_lr(optimizer: torch.optim.Optimizer, group_index: int) -> float:
    """The learning rate to log for one group (automagic: the mean of its per-element lr masks)."""
    group = optimizer.param_groups[group_index]
    if isinstance(optimizer, Automagic):
        return optimizer.mean_lr(group)
    if "d" in group and "d0" in group:  # prodigy: the step size is its estimate d times lr
        return float(group["d"]) * float(group["lr"])
    # float() also covers torchao, which keeps lr as a 0-d tensor.
    return float(group["lr"])


# --- automagic -------------------------------------------------------------------------------------


class Automagic(torch.optim.Optimizer):
    """Adafactor-scaled sign-adaptive optimizer (after ai-toolkit's automagic; our own code).

    Per parameter: an Adafactor second moment (factored row/col EMAs for >= 2-D, full for 0/1-D) scales
    the gradient, the scaled update is capped at RMS `clip_threshold`, and a per-element learning-rate
    mask, started at the group lr, moves by +lr_bump where the update's sign repeats the previous step's
    and -lr_bump where it flips, clamped to [min_lr, max_lr]. Where either sign is 0 the mask stays put
    (no direction to compare), which also makes the first step leave the mask at the start lr.
    Weight decay is decoupled and scaled by the same mask.

    State per element: lr mask fp32 (4 bytes) + previous update sign int8 (1 byte); the factored second
    moment adds (rows + cols) fp32 per matrix. The mask is fp32, not bf16/8-bit as in the seed: in bf16
    a 1e-6 bump rounds to 2e-6 between 2.4e-4 and 4.9e-4 and to nothing above 4.9e-4 (2**-11).
    Computation is in fp32; lower-precision params are rounded to nearest when written back.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        lr_bump: float = 1e-6,
        min_lr: float = 1e-7,
        max_lr: float = 1e-3,
        beta2: float = 0.999,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        eps: float = AUTOMAGIC_EPS,
    ) -> None:
        defaults = {
            "lr": lr,
            "lr_bump": lr_bump,
            "min_lr": min_lr,
            "max_lr": max_lr,
            "beta2": beta2,
            "clip_threshold": clip_threshold,
            "weight_decay": weight_decay,
            "eps": eps,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    # One body for both of torch's `step` overloads (closure or none), as torch's own optimizers do.
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, group)
        return loss

    def _step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        assert p.grad is not None, "step() passes only parameters with a gradient"
        grad = p.grad.float()
        state = self.state[p]
        if not state:
            _init_state(state, p, group["lr"])
        update = _scaled_update(grad, state, group)
        lr_mask = _move_lr_mask(update, state, group)
        work = p if p.dtype == torch.float32 else p.float()
        if group["weight_decay"]:
            work.mul_(1 - group["weight_decay"] * lr_mask)
        work.addcmul_(lr_mask, update, value=-1)
        if work is not p:
            p.copy_(work)

    def mean_lr(self, group: dict[str, Any]) -> float:
        """Element-weighted mean of the group's lr masks; the group's start lr before its first step."""
        masks = [self.state[p]["lr_mask"] for p in group["params"] if "lr_mask" in self.state[p]]
        if not masks:
            return float(group["lr"])
        total = sum(m.sum(dtype=torch.float64) for m in masks)
        return float(total) / sum(m.numel() for m in masks)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every state tensor of a floating param to the param's dtype: the int8 signs would
        # become floats and, for bf16 params, the fp32 mask would lose bits. Put back the saved tensors,
        # copied so the loaded state never aliases the caller's dict.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                self.state[p][key] = value.to(device=p.device, copy=True)


def _init_state(state: dict[str, Tensor], p: Tensor, lr: float) -> None:
    state["lr_mask"] = torch.full(p.shape, lr, dtype=torch.float32, device=p.device)
    # Zero signs: sign * 0 = 0 leaves the mask unchanged on the first step.
    state["prev_sign"] = torch.zeros(p.shape, dtype=torch.int8, device=p.device)
    if p.dim() >= 2:
        state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
        state["exp_avg_sq_col"] = torch.zeros(
            p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device
        )
    else:
        state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)


def _scaled_update(grad: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor:
    """grad / sqrt(v), v the (factored) EMA of grad**2, with the update's RMS capped at clip_threshold."""
    beta2 = group["beta2"]
    grad_sq = grad.square().add_(group["eps"])
    if grad.dim() >= 2:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2).add_(grad_sq.mean(dim=-1), alpha=1 - beta2)
        col.mul_(beta2).add_(grad_sq.mean(dim=-2), alpha=1 - beta2)
        update = _factored_rsqrt(row, col).mul_(grad)
    else:
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta2).add_(grad_sq, alpha=1 - beta2)
        update = exp_avg_sq.rsqrt().mul_(grad)
    # Adafactor's update clipping: no bias correction, so early updates are large; this bounds them.
    return update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))


def _factored_rsqrt(row: Tensor, col: Tensor) -> Tensor:
    """1 / sqrt(v_hat), v_hat[i, j] = row[i] * col[j] / mean(row) (Adafactor's rank-1 estimate)."""
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # [..., m, 1]
    c_factor = col.unsqueeze(-2).rsqrt()  # [..., 1, n]
    return r_factor * c_factor


def _rms(tensor: Tensor) -> Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _move_lr_mask(update: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> Tensor:
    sign = torch.sign(update).to(torch.int8)
    # sign * prev: +1 where the sign repeats, -1 where it flips, 0 where either is zero.
    direction = sign * state["prev_sign"]
    lr_mask = state["lr_mask"]
    lr_mask.add_(direction, alpha=group["lr_bump"]).clamp_(group["min_lr"], group["max_lr"])
    state["prev_sign"] = sign
    return lr_mask


# --- gradient stability and clipping -----------------------------------------------------------------


class GradientStability:
    """Per expert: the fraction of LoRA gradient elements whose sign repeats that expert's previous step.

    Weighted by element count across params (one fraction over all elements, not a mean of per-param
    fractions). Signs compare as torch.sign: 0 is its own sign, so an element that stays exactly zero
    counts as agreeing and one that moves between zero and nonzero as not. A param whose grad is None
    counts as all zeros. Call `measure` once per optimizer step of an expert, after accumulation and
    clipping (clipping scales by a positive factor, so signs do not change), only for steps taken.
    Previous signs are int8 (1 byte per element) on the params' device.
    """

    def __init__(self) -> None:
        self._prev_signs: dict[str, Tensor] = {}  # per expert: all its params' signs, one flat tensor
        self._shapes: dict[str, list[torch.Size]] = {}

    def measure(self, expert: str, params: Sequence[Tensor]) -> float | None:
        """This step's sign agreement for `expert`; None on its first measured step."""
        check_expert(expert)
        assert params, "GradientStability.measure needs the expert's LoRA parameters"
        shapes, signs = [p.shape for p in params], _grad_signs(params)
        prev, prev_shapes = self._prev_signs.get(expert), self._shapes.get(expert)
        self._prev_signs[expert], self._shapes[expert] = signs, shapes
        if prev is None:
            return None
        assert prev_shapes is not None, "signs and shapes are stored together"
        _check_same_layout(expert, prev_shapes, shapes)
        return float((signs == prev.to(signs.device)).sum()) / signs.numel()

    def state_dict(self) -> dict[str, dict[str, list[Tensor]]]:
        # One int8 tensor per param, as the checkpoint format has it (views of the flat signs).
        return {
            "prev_signs": {
                e: [
                    t.view(shape)
                    for t, shape in zip(
                        flat.split([s.numel() for s in self._shapes[e]]), self._shapes[e], strict=True
                    )
                ]
                for e, flat in self._prev_signs.items()
            }
        }

    def load_state_dict(self, state: dict[str, dict[str, list[Tensor]]]) -> None:
        self._prev_signs, self._shapes = {}, {}
        for expert, signs in state["prev_signs"].items():
            self._prev_signs[check_expert(expert)] = torch.cat([s.reshape(-1) for s in signs])
            self._shapes[expert] = [s.shape for s in signs]


def _grad_signs(params: Sequence[Tensor]) -> Tensor:
    """All grads' signs as one flat int8 tensor: a few kernels, not several per param (a LoRA on 40
    blocks has 800), which kept the GPU waiting for their launches at every step's end."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    return flat.sign_().to(torch.int8)


def _check_same_layout(expert: str, prev: list[torch.Size], shapes: list[torch.Size]) -> None:
    if prev != shapes:
        raise ValueError(
            f"gradient stability for {expert}: the parameters changed shape or number since its previous "
            "step (a resume with a different LoRA rank or module filter?); start a new run for a new layout"
        )


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> float:
    """Clip the total L2 gradient norm to `max_norm` (0 = no clipping); return the norm before clipping.

    A non-finite norm is returned as is (the trainer skips such steps); grads are then left unclipped.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total_norm = torch.nn.utils.get_total_norm(grads)
    if max_norm > 0 and torch.isfinite(total_norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm)
    return float(total_norm)
