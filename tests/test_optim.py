"""Optimizers per expert, automagic's lr mask, exact resume, gradient stability and clipping."""

from __future__ import annotations

import io
import math

import pytest
import torch

from wan_assets.core.config import ConfigError, OptimizerParams, TrainConfig
from wan_assets.core.train.optim import (
    Automagic,
    GradientStability,
    build_optimizer,
    clip_grad_norm,
    group_lr,
    load_optimizer_state,
)

OPTIMIZERS = ["adamw", "adamw8bit", "automagic", "prodigy"]
# Those that take a learning rate per group as given (prodigy estimates one step size for all).
PER_GROUP_LR = ["adamw", "adamw8bit", "automagic"]
# torchao's own warning about its tensor subclass and torch.compile caching; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:OptimState8bit does not implement:UserWarning")


def _train(optimizer: str = "automagic", lr: float = 1e-4, **optimizer_params: object) -> TrainConfig:
    return TrainConfig(optimizer=optimizer, lr=lr, optimizer_params=OptimizerParams(**optimizer_params))


def _param(*shape: int, seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)))


def _set_grads(params: list[torch.nn.Parameter], *grads: list) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.tensor(g, dtype=torch.float32)


def _roundtrip(obj: object) -> object:
    """Through torch.save / torch.load, as the run's `_state.pt` goes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- groups ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", PER_GROUP_LR)
def test_one_group_per_expert_in_expert_order(optimizer: str) -> None:
    train = _train(optimizer, lr=1e-4, high_noise_lr=2e-4, low_noise_lr=5e-5)
    # Insertion order low-then-high must not matter: group 0 is high_noise, as lr_0 in the metrics.
    params = {"low_noise": [_param(3, 2)], "high_noise": [_param(4, 2)]}
    opt = build_optimizer(train, params)
    assert [g["expert"] for g in opt.param_groups] == ["high_noise", "low_noise"]
    assert opt.param_groups[0]["params"][0] is params["high_noise"][0]
    assert group_lr(opt, 0) == pytest.approx(2e-4)
    assert group_lr(opt, 1) == pytest.approx(5e-5)


@pytest.mark.parametrize("optimizer", PER_GROUP_LR)
def test_single_expert_run_has_one_group(optimizer: str) -> None:
    opt = build_optimizer(_train(optimizer, lr=3e-5, high_noise_lr=1e-3), {"low_noise": [_param(2, 2)]})
    assert [g["expert"] for g in opt.param_groups] == ["low_noise"]
    assert group_lr(opt, 0) == pytest.approx(3e-5)


def test_unknown_expert_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown expert 'mid_noise'"):
        build_optimizer(_train("adamw"), {"mid_noise": [_param(2)]})


def test_automagic_start_lr_outside_bounds_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"start lr 0.01 for high_noise is outside \[min_lr, max_lr\]"):
        build_optimizer(_train(lr=1e-2, max_lr=1e-3), {"high_noise": [_param(2)]})


# --- automagic ---------------------------------------------------------------------------------------


def test_automagic_mask_follows_update_signs() -> None:
    p = _param(4)
    start = p.detach().clone()
    opt = Automagic([p], lr=1e-4, lr_bump=1e-5, min_lr=1e-6, max_lr=1e-3)

    _set_grads([p], [1.0, -1.0, 1.0, 0.0])
    opt.step()
    mask = opt.state[p]["lr_mask"]
    # First step: no previous sign, so the mask stays at the start lr.
    torch.testing.assert_close(mask, torch.full((4,), 1e-4))
    # Hand-computed update: v = (1 - beta2) g^2, so g / sqrt(v) = sign(g) / sqrt(0.001); its RMS over 4
    # elements with one zero is sqrt(3/4) / sqrt(0.001) > 1, so clipping leaves sign(g) / sqrt(3/4).
    expected = start - 1e-4 * torch.tensor([1.0, -1.0, 1.0, 0.0]) / math.sqrt(0.75)
    torch.testing.assert_close(p.detach(), expected)

    _set_grads([p], [2.0, -3.0, -1.0, 5.0])
    opt.step()
    # agree (+), agree (+), flip (-), previous sign 0 (unchanged)
    torch.testing.assert_close(mask, torch.tensor([1.1e-4, 1.1e-4, 0.9e-4, 1e-4]))
    assert group_lr(opt, 0) == pytest.approx(float(mask.double().mean()))


def test_automagic_mask_stays_within_bounds() -> None:
    p = _param(3)
    opt = Automagic([p], lr=1e-4, lr_bump=4e-5, min_lr=5e-5, max_lr=2e-4)
    for _ in range(10):  # same signs every step: grows to max_lr and stays
        _set_grads([p], [1.0, -2.0, 3.0])
        opt.step()
    assert torch.equal(opt.state[p]["lr_mask"], torch.full((3,), 2e-4))
    for i in range(10):  # alternating signs: shrinks to min_lr and stays
        _set_grads([p], [(-1.0) ** i] * 3)
        opt.step()
    assert torch.equal(opt.state[p]["lr_mask"], torch.full((3,), 5e-5))


def test_automagic_per_expert_overrides() -> None:
    train = _train(
        lr=1e-4,
        lr_bump=1e-6,
        high_noise_lr=2e-4,
        high_noise_lr_bump=3e-5,
        high_noise_max_lr=5e-4,
        low_noise_min_lr=1e-5,
    )
    high, low = _param(2, 3), _param(2, 3, seed=1)
    opt = build_optimizer(train, {"high_noise": [high], "low_noise": [low]})
    groups = {g["expert"]: g for g in opt.param_groups}
    assert (groups["high_noise"]["lr_bump"], groups["high_noise"]["max_lr"]) == (3e-5, 5e-4)
    assert (groups["low_noise"]["lr_bump"], groups["low_noise"]["min_lr"]) == (1e-6, 1e-5)
    for _ in range(2):  # two steps with the same signs: one bump each
        high.grad, low.grad = torch.ones(2, 3), torch.ones(2, 3)
        opt.step()
    assert group_lr(opt, 0) == pytest.approx(2e-4 + 3e-5)
    assert group_lr(opt, 1) == pytest.approx(1e-4 + 1e-6)


def test_automagic_factored_second_moment_for_matrices() -> None:
    matrix, vector = _param(3, 2), _param(5)
    start = matrix.detach().clone()
    opt = Automagic([matrix, vector], lr=1e-3)
    # A rank-1 grad: Adafactor's row/col estimate of grad^2 is then exact, so grad / sqrt(v) has the
    # same magnitude everywhere and the RMS clip makes it exactly sign(grad) = 1.
    matrix.grad = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.5]))
    vector.grad = torch.ones(5)
    opt.step()
    state = opt.state[matrix]
    assert state["exp_avg_sq_row"].shape == (3,) and state["exp_avg_sq_col"].shape == (2,)
    assert "exp_avg_sq" not in state
    torch.testing.assert_close(state["exp_avg_sq_row"], 0.001 * matrix.grad.square().mean(dim=-1))
    torch.testing.assert_close(matrix.detach(), start - 1e-3)
    assert opt.state[vector]["exp_avg_sq"].shape == (5,)


def test_automagic_reduces_a_quadratic() -> None:
    w = _param(8, 6)
    target = torch.randn(8, 6, generator=torch.Generator().manual_seed(7))
    opt = Automagic([w], lr=1e-3, lr_bump=1e-3, min_lr=1e-4, max_lr=5e-2)

    def loss() -> torch.Tensor:
        return (w - target).square().sum()

    initial = loss().item()
    for _ in range(300):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.01 * initial
    assert group_lr(opt, 0) > 1e-3  # consistent signs early on raised the lr


# --- exact resume ------------------------------------------------------------------------------------


def _resume_params() -> dict[str, list[torch.nn.Parameter]]:
    # (64, 64) has 4096 elements: the smallest tensor torchao's AdamW8bit quantizes.
    return {"high_noise": [_param(64, 64), _param(8, seed=1)], "low_noise": [_param(16, 8, seed=2)]}


def _run_steps(opt: torch.optim.Optimizer, params: dict, first: int, last: int) -> None:
    """Alternate experts per step, as the trainer does; the paused expert's grads are None."""
    experts = list(params)
    for step in range(first, last):
        active = experts[step % len(experts)]
        for expert, expert_params in params.items():
            for i, p in enumerate(expert_params):
                gen = torch.Generator().manual_seed(1000 * step + i)
                p.grad = torch.randn(p.shape, generator=gen) if expert == active else None
        opt.step()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_state_dict_round_trip_is_bit_exact(optimizer: str) -> None:
    train = _train(optimizer, lr=1e-3, weight_decay=0.01, lr_bump=1e-4, max_lr=1e-2)
    total, split = 8, 5

    straight = _resume_params()
    straight_opt = build_optimizer(train, straight)
    _run_steps(straight_opt, straight, 0, total)

    first = _resume_params()
    opt = build_optimizer(train, first)
    _run_steps(opt, first, 0, split)
    saved_opt = _roundtrip(opt.state_dict())
    saved_params = _roundtrip({e: [p.detach() for p in ps] for e, ps in first.items()})

    resumed = {e: [torch.nn.Parameter(t.clone()) for t in ts] for e, ts in saved_params.items()}
    fresh = build_optimizer(train, resumed)
    fresh.load_state_dict(saved_opt)
    _run_steps(fresh, resumed, split, total)

    for expert in straight:
        for a, b in zip(straight[expert], resumed[expert], strict=True):
            assert torch.equal(a, b)
    assert [group_lr(fresh, i) for i in range(2)] == [group_lr(straight_opt, i) for i in range(2)]


def test_automagic_resume_keeps_state_dtypes() -> None:
    p = _param(4, 3)
    opt = Automagic([p])
    p.grad = torch.ones(4, 3)
    opt.step()
    fresh = Automagic([torch.nn.Parameter(p.detach().to(torch.bfloat16))])
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    state = next(iter(fresh.state.values()))
    # torch alone would cast both to the param dtype (bf16).
    assert state["lr_mask"].dtype == torch.float32 and state["prev_sign"].dtype == torch.int8


def test_adamw8bit_quantizes_only_large_tensors() -> None:
    params = _resume_params()
    opt = build_optimizer(_train("adamw8bit"), params)
    _run_steps(opt, params, 0, 2)
    big, small = params["high_noise"]
    assert type(opt.state[big]["exp_avg"]).__name__ == "OptimState8bit"
    assert type(opt.state[small]["exp_avg"]) is torch.Tensor


def test_adamw8bit_steps_as_torchao_does_in_a_few_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched 8-bit AdamW gives torchao's AdamW8bit parameters and moments bit for bit, with
    chunks that cross tensor boundaries, a tensor torchao leaves unquantized, an expert whose grads
    are None, and a resume from the saved state in the middle; its compiled update runs once per
    chunk, not once per tensor."""
    from torchao.optim import AdamW8bit

    from wan_assets.core.train import optim

    def bf16(p: torch.nn.Parameter) -> torch.nn.Parameter:
        return torch.nn.Parameter(p.detach().to(torch.bfloat16))

    def make() -> dict[str, list[torch.nn.Parameter]]:
        shapes = [(16, 512), (512, 16), (8, 1024), (1024, 8), (3, 5)]  # the last one: plain moments
        return {
            "high_noise": [bf16(_param(*shape, seed=i)) for i, shape in enumerate(shapes)],
            "low_noise": [bf16(_param(16, 256, seed=9))],
        }

    def grads(params: dict, step: int) -> None:
        for i, p in enumerate(params["high_noise"]):
            g = torch.Generator().manual_seed(100 * step + i)
            p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype)
        for p in params["low_noise"]:
            p.grad = None  # the paused expert

    # 32 K quantized elements in chunks of 3 K: eleven chunks, two of them across two tensors.
    monkeypatch.setattr(optim._batched_adamw8bit(), "CHUNK", 3072)
    calls = []
    compile_ = torch.compile

    def counted(fn, **kwargs):
        compiled = compile_(fn, **kwargs)
        return lambda *args: calls.append(fn) or compiled(*args)

    monkeypatch.setattr(torch, "compile", counted)
    ours_params, theirs_params = make(), make()
    ours = build_optimizer(_train("adamw8bit", lr=1e-3, weight_decay=0.01), ours_params)
    groups = [{"params": theirs_params[e], "lr": 1e-3} for e in ("high_noise", "low_noise")]
    theirs = AdamW8bit(groups, betas=ours.defaults["betas"], eps=ours.defaults["eps"], weight_decay=0.01)
    for step in range(4):
        if step == 2:  # resume: a fresh optimizer from the saved state, as a killed run restarts
            saved = _roundtrip(ours.state_dict())
            ours = build_optimizer(_train("adamw8bit", lr=1e-3, weight_decay=0.01), ours_params)
            load_optimizer_state(ours, saved, torch.device("cpu"))
        grads(ours_params, step)
        grads(theirs_params, step)
        calls.clear()
        ours.step()
        assert len(calls) == 11 + 1, len(calls)  # the chunks and the unquantized tensor
        theirs.step()
        for a, b in zip(ours_params["high_noise"], theirs_params["high_noise"], strict=True):
            assert torch.equal(a, b), (step, a.shape)
            for name in ("exp_avg", "exp_avg_sq"):
                mine, torchaos = ours.state[a][name], theirs.state[b][name]
                assert type(mine) is type(torchaos)
                assert torch.equal(
                    mine.dequantize() if hasattr(mine, "dequantize") else mine,
                    torchaos.dequantize() if hasattr(torchaos, "dequantize") else torchaos,
                )
            assert float(ours.state[a]["step"]) == step + 1
    assert not ours.state[ours_params["low_noise"][0]]  # never stepped: no state
    big = ours_params["high_noise"][0]
    assert type(ours.state[big]["exp_avg"]).__name__ == "OptimState8bit"


# --- gradient stability ------------------------------------------------------------------------------


def test_gradient_stability_weights_by_element_count() -> None:
    a, b = _param(2, 2), _param(8)
    stability = GradientStability()
    _set_grads([a, b], [[1.0, -1.0], [0.0, 2.0]], [1.0] * 8)
    assert stability.measure("high_noise", [a, b]) is None
    # a: 1->3 same, -1->1 flip, 0->0 same (sign 0), 2->-2 flip: 2 of 4. b: 2 of 8 keep their sign.
    _set_grads([a, b], [[3.0, 1.0], [0.0, -2.0]], [1.0, 1.0] + [-1.0] * 6)
    # (2 + 2) / 12, not the mean of the per-param fractions (0.5 + 0.25) / 2.
    assert stability.measure("high_noise", [a, b]) == pytest.approx(4 / 12)


def test_gradient_stability_is_per_expert() -> None:
    high, low = _param(4), _param(4, seed=1)
    stability = GradientStability()
    _set_grads([high], [1.0, 1.0, 1.0, 1.0])
    assert stability.measure("high_noise", [high]) is None
    _set_grads([low], [-1.0, -1.0, -1.0, -1.0])
    assert stability.measure("low_noise", [low]) is None  # its own first step, despite high's
    _set_grads([high], [1.0, 1.0, 1.0, -1.0])
    assert stability.measure("high_noise", [high]) == pytest.approx(0.75)  # vs high's step, not low's
    _set_grads([low], [-1.0, 1.0, 1.0, 1.0])
    assert stability.measure("low_noise", [low]) == pytest.approx(0.25)


def test_gradient_stability_none_grad_counts_as_zero() -> None:
    p = _param(2)
    stability = GradientStability()
    stability.measure("low_noise", [p])
    _set_grads([p], [0.0, 1.0])
    assert stability.measure("low_noise", [p]) == pytest.approx(0.5)


def test_gradient_stability_state_round_trip() -> None:
    a, b = _param(3), _param(2, 2)
    stability = GradientStability()
    _set_grads([a, b], [1.0, -1.0, 0.0], [[1.0, 1.0], [-1.0, -1.0]])
    stability.measure("high_noise", [a, b])
    restored = GradientStability()
    restored.load_state_dict(_roundtrip(stability.state_dict()))
    assert all(t.dtype == torch.int8 for t in restored.state_dict()["prev_signs"]["high_noise"])
    _set_grads([a, b], [1.0, 1.0, 0.0], [[1.0, -1.0], [-1.0, 1.0]])
    assert restored.measure("high_noise", [a, b]) == stability.measure("high_noise", [a, b]) == 4 / 7


def test_gradient_stability_rejects_a_changed_layout() -> None:
    stability = GradientStability()
    stability.measure("high_noise", [_param(3)])
    with pytest.raises(ValueError, match="changed shape or number"):
        stability.measure("high_noise", [_param(4)])


# --- clipping ------------------------------------------------------------------------------------------


def test_clip_grad_norm_returns_pre_clip_norm() -> None:
    a, b = _param(1), _param(1)
    _set_grads([a, b], [3.0], [4.0])
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)


def test_clip_grad_norm_zero_means_no_clipping() -> None:
    a, b = _param(1), _param(1)
    _set_grads([a, b], [3.0], [4.0])
    assert clip_grad_norm([a, b], 0.0) == pytest.approx(5.0)
    assert torch.equal(torch.cat([a.grad, b.grad]), torch.tensor([3.0, 4.0]))
    assert clip_grad_norm([_param(2)], 1.0) == 0.0  # no grads at all


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_loaded_state_lives_where_the_steps_run(optimizer: str) -> None:
    # Resume loads `_state.pt` to the CPU, where an offloaded expert's LoRA also waits: the state
    # must still end on the training device ("meta" stands in for a GPU on a CPU-only machine).
    params = {"high_noise": [_param(64, 256)]}
    opt = build_optimizer(_train(optimizer, lr=1e-3), params)
    params["high_noise"][0].grad = torch.ones(64, 256)
    opt.step()
    saved = opt.state_dict()
    fresh = build_optimizer(_train(optimizer, lr=1e-3), {"high_noise": [_param(64, 256)]})
    load_optimizer_state(fresh, saved, torch.device("meta"))
    (state,) = fresh.state.values()
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v) and k != "step"}
    assert tensors and all(v.device.type == "meta" for v in tensors.values()), {
        k: v.device for k, v in tensors.items()
    }
    if torch.is_tensor(state.get("step")):
        assert state["step"].device.type == "cpu"  # torch keeps it on the host unless fused


# --- lr schedules (ai-toolkit's toolkit/scheduler.py) and EMA ----------------------------------------


def _torch_schedule(name: str, optimizer: torch.optim.Optimizer, steps: int, **params: object):
    """The scheduler ai-toolkit's get_lr_scheduler builds (total_iters = train.steps)."""
    from diffusers.optimization import get_constant_schedule_with_warmup

    params = {"total_iters": steps, **params}  # get_lr_scheduler: total_iters unless given
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=params.pop("total_iters"), **params
        )
    if name == "cosine_with_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=params.pop("total_iters"), **params
        )
    if name == "step":
        params.pop("total_iters")
        return torch.optim.lr_scheduler.StepLR(optimizer, **params)
    if name == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, **{"factor": 1.0, **params})
    if name == "linear":
        return torch.optim.lr_scheduler.LinearLR(optimizer, **params)
    assert name == "constant_with_warmup"
    params.pop("total_iters")
    return get_constant_schedule_with_warmup(optimizer, **params)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("constant", {}),
        ("constant", {"factor": 0.5, "total_iters": 7}),
        ("linear", {}),
        ("linear", {"start_factor": 0.1, "end_factor": 0.5}),
        ("cosine", {}),
        ("cosine", {"eta_min": 1e-5}),
        ("cosine_with_restarts", {"total_iters": 6, "T_mult": 2}),
        ("cosine", {"total_iters": 8}),
        ("step", {"step_size": 5, "gamma": 0.5}),
        ("constant_with_warmup", {"num_warmup_steps": 8}),
    ],
)
def test_lr_schedule_matches_the_torch_scheduler_ai_toolkit_builds(name: str, params: dict) -> None:
    from wan_assets.core.config import LRSchedulerParams
    from wan_assets.core.train.lr_schedule import lr_at, set_lr

    steps = 20
    train = TrainConfig(
        optimizer="adamw",
        lr=1e-3,
        steps=steps,
        lr_scheduler=name,
        lr_scheduler_params=LRSchedulerParams(**params),
    )
    reference = torch.optim.AdamW([_param(2)], lr=1e-3)
    schedule = _torch_schedule(name, reference, steps, **params)
    expected = []
    for _ in range(steps + 5):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    ours = build_optimizer(train, {"high_noise": [_param(2)]})
    got = []
    for step in range(steps + 5):
        set_lr(ours, train, step)
        got.append(group_lr(ours, 0))
        assert got[-1] == pytest.approx(lr_at(train, 1e-3, step))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_ema_is_ai_toolkits_average_and_applies_only_inside_its_block() -> None:
    from wan_assets.core.train.ema import LoraEMA

    params = {"high_noise": [_param(3, 2)], "low_noise": [_param(4, seed=1)]}
    start = {e: [p.detach().clone() for p in ps] for e, ps in params.items()}
    ema = LoraEMA(params, decay=0.9)
    expected = {e: [s.clone() for s in ss] for e, ss in start.items()}
    for step in range(5):
        with torch.no_grad():
            params["high_noise"][0].add_(float(step + 1))  # only the active expert moves
        ema.update()
        for e, ps in params.items():  # toolkit/ema.py: s -= (1 - decay) * (s - p), every param
            for s, p in zip(expected[e], ps, strict=True):
                s -= (1 - 0.9) * (s - p.detach())
    for e in params:
        assert torch.allclose(ema.shadow[e][0], expected[e][0], atol=1e-6)
    raw = params["high_noise"][0].detach().clone()
    with ema.applied("high_noise"):
        assert torch.allclose(params["high_noise"][0], expected["high_noise"][0], atol=1e-6)
    assert torch.equal(params["high_noise"][0], raw)
    fresh = LoraEMA({e: [p.detach().clone() for p in ps] for e, ps in params.items()}, decay=0.9)
    fresh.load_state_dict(_roundtrip(ema.state_dict()))
    assert all(torch.equal(a, b) for e in params for a, b in zip(fresh.shadow[e], ema.shadow[e], strict=True))


def test_prodigy_trains_at_lr_one_like_ai_toolkit_and_logs_its_step_size() -> None:
    train = _train("prodigy", lr=1e-4)
    assert train.start_lr == 1.0
    params = {"high_noise": [_param(8, 4)]}
    opt = build_optimizer(train, params)
    assert opt.param_groups[0]["lr"] == 1.0 and opt.param_groups[0]["eps"] == 1e-6  # ai-toolkit's eps
    params["high_noise"][0].grad = torch.ones(8, 4)
    opt.step()
    group = opt.param_groups[0]
    assert group_lr(opt, 0) == pytest.approx(float(group["d"]) * 1.0)


def test_prodigy_refuses_per_expert_lrs() -> None:
    from wan_assets.core.train.optim import check_optimizer

    with pytest.raises(ConfigError, match="prodigy estimates one step size"):
        check_optimizer(_train("prodigy", lr=1.0, high_noise_lr=0.5), ["high_noise", "low_noise"])
