"""Alpha schedule and per-expert statistics (docs/architecture.md §5): numbers vs numpy, transitions, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wan_assets.core.config import NetworkConfig
from wan_assets.core.train.alpha_schedule import AlphaScheduler, PhaseMachine, Transition
from wan_assets.core.train.stats import ExpertStats

RATE = 0.0005  # loss_improvement_rate_below of the designed schedule
CRITERIA = {
    "loss_improvement_rate_below": RATE,
    "min_gradient_stability": 0.5,
    "min_loss_r2": 0.1,
    "max_loss_cv": 0.5,
}
CRITERION_NAMES = [
    "min_steps",
    "loss_samples",
    "loss_improvement",
    "loss_not_rising",
    "gradient_stability",
    "loss_r2",
    "loss_cv",
]


def network(enabled: bool = True, min_steps: int = 200, **schedule: Any) -> NetworkConfig:
    phases = {
        "foundation": {"alpha": 8, "min_steps": min_steps, "exit_criteria": CRITERIA},
        "balance": {"alpha": 14, "min_steps": min_steps, "exit_criteria": CRITERIA},
        "emphasis": {"alpha": 20, "min_steps": min_steps},
    }
    alpha_schedule = {"enabled": enabled, "conv_alpha_phases": phases, **schedule}
    return NetworkConfig.model_validate({"linear": 16, "linear_alpha": 16, "alpha_schedule": alpha_schedule})


def plateau(num_steps: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A loss decaying into a noisy plateau while gradient signs settle: phases should end."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_steps)
    losses = 0.1 + 0.3 * np.exp(-t / 150) + rng.normal(0, 0.01, num_steps)
    grads = np.clip(0.3 + 0.4 * t / 600, 0, 0.7) + rng.normal(0, 0.02, num_steps)
    return losses, grads


# --- numpy reference --------------------------------------------------------------------------


def reference_ema(values: list[float], span: int) -> float | None:
    ema = None
    for v in values:
        ema = v if ema is None else (2 / (span + 1)) * v + (1 - 2 / (span + 1)) * ema
    return ema


def reference_stats(losses: list[float | None], grads: list[float | None]) -> dict[str, Any]:
    finite = [v for v in losses if v is not None and math.isfinite(v)]
    grad_values = [g for g in grads if g is not None]
    window = np.array(finite[-200:])
    n = len(window)
    slope = r2 = None
    if n >= 20:
        x = np.arange(n)
        slope, intercept = np.polyfit(x, window, 1)
        ss_res = float(np.sum((window - (slope * x + intercept)) ** 2))
        ss_tot = float(np.sum((window - window.mean()) ** 2))
        r2 = 1 - ss_res / ss_tot
    ema50 = reference_ema(finite, 50)
    out = {
        "loss_slope": slope,
        "loss_r2": r2,
        "loss_samples": n,
        "loss_cv": None if ema50 is None else float(np.std(finite[-50:])) / ema50,
        "gradient_stability_avg": reference_ema(grad_values, 50),
    }
    for span in (10, 50, 100):
        out[f"loss_ema_{span}"] = reference_ema(finite, span)
        out[f"grad_ema_{span}"] = reference_ema(grad_values, span)
    return out


def reference_all_hold(ref: dict[str, Any], steps_in_phase: int, min_steps: int) -> bool:
    slope, r2, cv, grad = ref["loss_slope"], ref["loss_r2"], ref["loss_cv"], ref["gradient_stability_avg"]
    if None in (slope, r2, cv, grad):
        return False
    return (
        steps_in_phase >= min_steps
        and ref["loss_samples"] >= 100
        and -slope < RATE
        and slope <= 0.05 * RATE
        and grad >= CRITERIA["min_gradient_stability"]
        and r2 >= CRITERIA["min_loss_r2"]
        and cv < CRITERIA["max_loss_cv"]
    )


def assert_stats_close(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def feed(stats: ExpertStats, losses: Any, grads: Any) -> None:
    for loss, grad in zip(losses, grads, strict=True):
        stats.update(loss, grad)


# --- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [5, 19, 20, 57, 250])
def test_statistics_match_numpy_reference(num_steps: int) -> None:
    rng = np.random.default_rng(num_steps)
    losses = list(0.2 + 0.05 * rng.standard_normal(num_steps))
    # Gradient stability is null on an expert's first step.
    grads: list[float | None] = [None, *rng.uniform(0.3, 0.7, num_steps - 1)]
    stats = ExpertStats()
    feed(stats, losses, grads)
    assert_stats_close(stats.snapshot(), reference_stats(losses, grads))
    assert stats.snapshot()["loss_samples"] == min(num_steps, 200)


def test_missing_and_non_finite_values_are_ignored() -> None:
    rng = np.random.default_rng(1)
    losses = list(rng.uniform(0.1, 0.3, 60))
    grads = list(rng.uniform(0.3, 0.7, 60))
    clean, dirty = ExpertStats(), ExpertStats()
    feed(clean, losses, grads)
    feed(dirty, losses[:30], grads[:30])
    feed(dirty, [None, math.nan, math.inf], [None, math.nan, 0.5])
    feed(dirty, losses[30:], grads[30:])
    want = reference_stats(losses, [*grads[:30], 0.5, *grads[30:]])
    assert_stats_close(dirty.snapshot(), want)
    assert dirty.snapshot()["loss_slope"] == clean.snapshot()["loss_slope"]


def test_constant_losses_have_no_r2() -> None:
    stats = ExpertStats()
    feed(stats, [0.1] * 30, [0.5] * 30)
    snap = stats.snapshot()
    assert snap["loss_r2"] is None
    assert snap["loss_slope"] == 0.0
    assert snap["loss_cv"] == pytest.approx(0.0, abs=1e-15)


def test_stats_state_round_trips_through_json() -> None:
    losses, grads = plateau(260)
    stats = ExpertStats()
    feed(stats, losses, grads)
    restored = ExpertStats()
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert restored.state_dict() == stats.state_dict()
    assert restored.snapshot() == stats.snapshot()


# --- phase machine ----------------------------------------------------------------------------


def expected_first_transition(losses: np.ndarray, grads: np.ndarray, min_steps: int) -> int:
    for i in range(len(losses)):
        ref = reference_stats(list(losses[: i + 1]), list(grads[: i + 1]))
        if reference_all_hold(ref, steps_in_phase=i + 1, min_steps=min_steps):
            return i
    raise AssertionError("the designed sequence never satisfies every criterion")


def test_transition_happens_at_first_step_where_every_criterion_holds() -> None:
    losses, grads = plateau(600)
    min_steps = 200
    expected = expected_first_transition(losses, grads, min_steps)
    # The statistics, not min_steps, must decide it, or the test would not test the criteria.
    assert expected + 1 > min_steps + 20
    scheduler = AlphaScheduler(network(min_steps=min_steps), ["high_noise"])
    for step in range(expected + 1):
        transition = scheduler.record(step, "high_noise", float(losses[step]), float(grads[step]))
        assert (transition is not None) == (step == expected), step
    assert transition is not None
    assert (transition.from_phase, transition.to_phase) == ("foundation", "balance")
    assert (transition.from_alpha, transition.to_alpha, transition.forced) == (8, 14, False)
    assert scheduler.alpha("high_noise") == 14
    assert scheduler.metrics("high_noise")["steps_in_phase"] == 0


def test_transition_records_every_criterion() -> None:
    losses, grads = plateau(600)
    expected = expected_first_transition(losses, grads, 200)
    scheduler = AlphaScheduler(network(min_steps=200), ["high_noise"])
    for step in range(expected + 1):
        scheduler.record(step, "high_noise", float(losses[step]), float(grads[step]))
    (transition,) = scheduler.transitions
    ref = reference_stats(list(losses[: expected + 1]), list(grads[: expected + 1]))
    by_name = {c.name: c for c in transition.criteria}
    assert list(by_name) == CRITERION_NAMES
    assert all(c.passed for c in transition.criteria)
    assert (by_name["min_steps"].value, by_name["min_steps"].threshold) == (expected + 1, 200)
    assert (by_name["loss_samples"].value, by_name["loss_samples"].threshold) == (200, 100)
    assert by_name["loss_improvement"].value == pytest.approx(-ref["loss_slope"], rel=1e-9)
    assert by_name["loss_improvement"].threshold == RATE
    assert by_name["loss_not_rising"].value == pytest.approx(ref["loss_slope"], rel=1e-9)
    assert by_name["loss_not_rising"].threshold == pytest.approx(0.05 * RATE)
    assert by_name["gradient_stability"].value == pytest.approx(ref["gradient_stability_avg"], rel=1e-9)
    assert by_name["loss_r2"].value == pytest.approx(ref["loss_r2"], rel=1e-9)
    assert by_name["loss_cv"].value == pytest.approx(ref["loss_cv"], rel=1e-9)
    assert by_name["loss_cv"].threshold == CRITERIA["max_loss_cv"]
    as_json = json.loads(json.dumps(transition.to_json()))
    assert as_json["step"] == expected and as_json["expert"] == "high_noise"
    assert [c["name"] for c in as_json["criteria"]] == CRITERION_NAMES
    assert Transition.from_json(as_json) == transition


def test_rising_loss_never_transitions() -> None:
    rng = np.random.default_rng(2)
    num_steps = 800
    # Rising slowly (well under the plateau rate, over 0.05 of it) with a clean trend and stable grads.
    losses = 0.1 + 1e-4 * np.arange(num_steps) + rng.normal(0, 0.002, num_steps)
    scheduler = AlphaScheduler(network(min_steps=0), ["low_noise"])
    for step in range(num_steps):
        assert scheduler.record(step, "low_noise", float(losses[step]), 0.9) is None
    criteria = {c.name: c for c in scheduler.machines["low_noise"].evaluate(scheduler.stats["low_noise"])}
    assert criteria["loss_improvement"].passed
    assert not criteria["loss_not_rising"].passed
    assert scheduler.alpha("low_noise") == 8


def test_none_statistic_fails_its_criterion() -> None:
    machine = PhaseMachine("high_noise", network(min_steps=0).alpha_schedule.phases_for("high_noise"))
    stats = ExpertStats()
    feed(stats, [0.1] * 150, [None] * 150)  # constant: R^2 null; no gradient stability at all
    by_name = {c.name: c for c in machine.evaluate(stats)}
    assert by_name["loss_r2"].value is None and not by_name["loss_r2"].passed
    assert by_name["gradient_stability"].value is None and not by_name["gradient_stability"].passed
    assert by_name["loss_improvement"].passed and by_name["loss_not_rising"].passed


def test_last_phase_never_ends() -> None:
    losses, grads = plateau(1500)
    # Lenient criteria everywhere, so only "last phase" can keep the machine where it is.
    lenient = {"loss_improvement_rate_below": 0.01, "min_gradient_stability": 0.0, "min_loss_r2": -1.0}
    phases = {
        name: {"alpha": alpha, "min_steps": 0, "exit_criteria": lenient}
        for name, alpha in [("a", 8), ("b", 20)]
    }
    net = NetworkConfig.model_validate({"alpha_schedule": {"enabled": True, "conv_alpha_phases": phases}})
    scheduler = AlphaScheduler(net, ["high_noise"])
    for step in range(len(losses)):
        scheduler.record(step, "high_noise", float(losses[step]), float(grads[step]))
    (transition,) = scheduler.transitions
    assert (transition.to_phase, transition.to_alpha) == ("b", 20)
    machine = scheduler.machines["high_noise"]
    assert machine.is_last and scheduler.alpha("high_noise") == 20
    assert all(c.passed for c in machine.evaluate(scheduler.stats["high_noise"]))
    assert machine.steps_in_phase == len(losses) - 1 - transition.step
    with pytest.raises(ValueError, match="last phase"):
        scheduler.force_transition(len(losses), "high_noise")


def test_experts_keep_separate_statistics_and_phases() -> None:
    losses, grads = plateau(600)
    scheduler = AlphaScheduler(network(min_steps=0), ["high_noise", "low_noise"])
    for step in range(len(losses)):
        scheduler.record(step, "high_noise", float(losses[step]), float(grads[step]))
    assert scheduler.alpha("high_noise") > 8
    low = scheduler.metrics("low_noise")
    assert (low["phase"], low["phase_idx"], low["steps_in_phase"], low["conv_alpha"]) == (
        "foundation",
        0,
        0,
        8,
    )
    assert low["loss_samples"] == 0 and low["loss_ema_50"] is None and low["gradient_stability_avg"] is None
    assert all(t.expert == "high_noise" for t in scheduler.transitions)


def test_per_expert_overrides_change_one_expert_only() -> None:
    losses, grads = plateau(600)
    overrides = {"low_noise": {"foundation": {"alpha": 4, "min_steps": 450}}}
    scheduler = AlphaScheduler(network(min_steps=200, per_expert=overrides), ["high_noise", "low_noise"])
    assert (scheduler.alpha("high_noise"), scheduler.alpha("low_noise")) == (8, 4)
    moved: dict[str, int] = {}
    for step in range(len(losses)):
        for expert in ("high_noise", "low_noise"):
            transition = scheduler.record(step, expert, float(losses[step]), float(grads[step]))
            if transition is not None:
                moved.setdefault(expert, step)
    expected = expected_first_transition(losses, grads, 200)
    assert moved == {"high_noise": expected, "low_noise": 449}
    low_first = next(t for t in scheduler.transitions if t.expert == "low_noise")
    assert (low_first.from_alpha, low_first.to_alpha) == (4, 14)


def test_disabled_schedule_uses_linear_alpha_and_still_keeps_statistics() -> None:
    losses, grads = plateau(600)
    scheduler = AlphaScheduler(network(enabled=False, min_steps=0), ["high_noise", "low_noise"])
    for step in range(len(losses)):
        assert scheduler.record(step, "low_noise", float(losses[step]), float(grads[step])) is None
    assert scheduler.transitions == []
    assert scheduler.alpha("low_noise") == scheduler.alpha("high_noise") == 16
    metrics = scheduler.metrics("low_noise")
    assert metrics["alpha_enabled"] is False and metrics["phase"] is None and metrics["conv_alpha"] == 16
    assert_stats_close(
        {k: metrics[k] for k in reference_stats([], [])}, reference_stats(list(losses), list(grads))
    )
    with pytest.raises(ValueError, match="enabled is false"):
        scheduler.force_transition(0, "low_noise")


def test_linear_alpha_prefers_the_schedule_value() -> None:
    assert AlphaScheduler(network(linear_alpha=32), ["low_noise"]).linear_alpha == 32
    assert AlphaScheduler(network(), ["low_noise"]).linear_alpha == 16


def test_force_transition_changes_alpha() -> None:
    scheduler = AlphaScheduler(network(), ["high_noise", "low_noise"])
    scheduler.record(0, "low_noise", 0.2, None)
    transition = scheduler.force_transition(1, "low_noise")
    assert transition.forced and (transition.from_alpha, transition.to_alpha) == (8, 14)
    assert [c.name for c in transition.criteria] == CRITERION_NAMES
    assert transition.criteria[0].value == 1 and not transition.criteria[0].passed
    assert (scheduler.alpha("low_noise"), scheduler.alpha("high_noise")) == (14, 8)
    assert scheduler.transitions == [transition]


# --- exact resume -----------------------------------------------------------------------------


def run(scheduler: AlphaScheduler, losses: np.ndarray, grads: np.ndarray, steps: range) -> list[dict]:
    """Alternate experts every 10 steps, as the trainer does, and log what the JSONL would."""
    logged = []
    for step in steps:
        expert = ("high_noise", "low_noise")[(step // 10) % 2]
        scheduler.record(step, expert, float(losses[step]), float(grads[step]))
        logged.append({"step": step, **scheduler.metrics(expert)})
    return logged


def test_resume_mid_run_matches_uninterrupted_run(tmp_path: Path) -> None:
    losses, grads = plateau(1600, seed=3)
    net = network(min_steps=150)
    experts = ["high_noise", "low_noise"]
    straight = AlphaScheduler(net, experts)
    logged = run(straight, losses, grads, range(1600))
    assert len(straight.transitions) >= 3  # transitions on both sides of the cut

    first = AlphaScheduler(net, experts)
    resumed_log = run(first, losses, grads, range(700))
    path = first.save(tmp_path / "run_000000699_alpha_scheduler.json")
    second = AlphaScheduler(net, experts)
    second.load(path)
    assert second.state_dict() == first.state_dict()
    resumed_log += run(second, losses, grads, range(700, 1600))

    assert resumed_log == logged  # exact equality: floats included
    assert second.transitions == straight.transitions
    assert second.state_dict() == straight.state_dict()


def test_resume_with_other_phases_is_a_clear_error() -> None:
    scheduler = AlphaScheduler(network(), ["high_noise"])
    state = scheduler.state_dict()
    state["experts"]["high_noise"]["phase"]["phase_name"] = "warmup"
    with pytest.raises(ValueError, match="own config"):
        AlphaScheduler(network(), ["high_noise"]).load_state_dict(state)
    with pytest.raises(ValueError, match="own config"):
        AlphaScheduler(network(), ["high_noise", "low_noise"]).load_state_dict(scheduler.state_dict())
