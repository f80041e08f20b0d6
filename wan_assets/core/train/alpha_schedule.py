"""Alpha schedule: per-expert phase machines that raise the LoRA alpha as training settles (docs/architecture.md §5).

Each expert walks its own ordered phases on its own statistics. A phase is left when every exit
criterion holds at once; the last phase never ends. Wan has no conv layers, so the alpha in force
(`AlphaScheduler.alpha(expert)`) sets the scale alpha/rank of every LoRA module of that expert; in
the seed the phase alpha only reached conv layers and so changed nothing on Wan.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from wan_assets.core.config import ExitCriteria, NetworkConfig, PhaseConfig
from wan_assets.core.experts import check_expert
from wan_assets.core.files import write_json
from wan_assets.core.train.stats import ExpertStats

MIN_LOSS_SAMPLES = 100  # a trend over fewer losses is too noisy to end a phase on
# "Not rising": the slope may be positive only by this fraction of the plateau rate, so a phase
# never ends while the loss climbs.
NOT_RISING_FRACTION = 0.05
STATE_VERSION = 1

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


@dataclass(frozen=True)
class Criterion:
    """One exit criterion: passed = `value op threshold`; a null value (undefined statistic) fails."""

    name: str
    value: float | int | None
    op: str
    threshold: float | int
    passed: bool

    @classmethod
    def check(cls, name: str, value: float | int | None, op: str, threshold: float | int) -> Criterion:
        passed = value is not None and _OPS[op](value, threshold)
        return cls(name=name, value=value, op=op, threshold=threshold, passed=passed)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Criterion:
        return cls(**data)


@dataclass(frozen=True)
class Transition:
    """A phase change of one expert, with every criterion as it stood when it happened."""

    step: int
    expert: str
    from_phase: str
    to_phase: str
    from_alpha: float
    to_alpha: float
    forced: bool
    criteria: tuple[Criterion, ...]

    def to_json(self) -> dict[str, Any]:
        """The shape of the transitions JSON and of DuckDB's `phase_transitions` rows."""
        out = asdict(self)
        out["criteria"] = [c.to_json() for c in self.criteria]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Transition:
        fields = {**data, "criteria": tuple(Criterion.from_json(c) for c in data["criteria"])}
        return cls(**fields)


def exit_criteria(steps_in_phase: int, phase: PhaseConfig, stats: ExpertStats) -> list[Criterion]:
    """All criteria of docs/architecture.md §5, in a fixed order; the phase ends when every one passes."""
    rule: ExitCriteria = phase.exit_criteria
    trend = stats.trend()
    slope = trend.slope
    rate = rule.loss_improvement_rate_below
    return [
        Criterion.check("min_steps", steps_in_phase, ">=", phase.min_steps),
        Criterion.check("loss_samples", stats.loss_samples, ">=", MIN_LOSS_SAMPLES),
        # Improvement per step (-slope) has fallen below the rate: the loss has plateaued.
        Criterion.check("loss_improvement", None if slope is None else -slope, "<", rate),
        Criterion.check("loss_not_rising", slope, "<=", NOT_RISING_FRACTION * rate),
        Criterion.check(
            "gradient_stability", stats.gradient_stability_avg, ">=", rule.min_gradient_stability
        ),
        Criterion.check("loss_r2", trend.r2, ">=", rule.min_loss_r2),
        Criterion.check("loss_cv", stats.loss_cv, "<", rule.max_loss_cv),
    ]


class PhaseMachine:
    """The phases of one expert: where it is, how long it has been there, when it moves on."""

    def __init__(self, expert: str, phases: Sequence[tuple[str, PhaseConfig]]) -> None:
        if not phases:
            raise ValueError(f"alpha schedule for {expert} has no phases; add conv_alpha_phases")
        self.expert = check_expert(expert)
        self.phases = list(phases)
        self._idx = 0
        self._steps_in_phase = 0

    @property
    def phase_idx(self) -> int:
        return self._idx

    @property
    def phase_name(self) -> str:
        return self.phases[self._idx][0]

    @property
    def phase(self) -> PhaseConfig:
        return self.phases[self._idx][1]

    @property
    def alpha(self) -> float:
        return self.phase.alpha

    @property
    def steps_in_phase(self) -> int:
        return self._steps_in_phase

    @property
    def is_last(self) -> bool:
        return self._idx == len(self.phases) - 1

    def evaluate(self, stats: ExpertStats) -> list[Criterion]:
        return exit_criteria(self._steps_in_phase, self.phase, stats)

    def on_step(self, step: int, stats: ExpertStats) -> Transition | None:
        """Count one optimizer step of this expert, then move on if every criterion holds."""
        self._steps_in_phase += 1
        if self.is_last:
            return None
        criteria = self.evaluate(stats)
        if not all(c.passed for c in criteria):
            return None
        return self._advance(step, criteria, forced=False)

    def force_transition(self, step: int, stats: ExpertStats) -> Transition:
        """Move to the next phase now, whatever the criteria say (recorded as forced)."""
        if self.is_last:
            raise ValueError(
                f"{self.expert} is already in its last phase {self.phase_name!r}; there is no next phase"
            )
        return self._advance(step, self.evaluate(stats), forced=True)

    def _advance(self, step: int, criteria: list[Criterion], forced: bool) -> Transition:
        from_name, from_phase = self.phases[self._idx]
        to_name, to_phase = self.phases[self._idx + 1]
        self._idx += 1
        self._steps_in_phase = 0
        return Transition(
            step=step,
            expert=self.expert,
            from_phase=from_name,
            to_phase=to_name,
            from_alpha=from_phase.alpha,
            to_alpha=to_phase.alpha,
            forced=forced,
            criteria=tuple(criteria),
        )

    def state_dict(self) -> dict[str, Any]:
        return {"phase_idx": self._idx, "phase_name": self.phase_name, "steps_in_phase": self._steps_in_phase}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        idx, name = int(state["phase_idx"]), state["phase_name"]
        # The name guards against resuming with a config whose phases were renamed or reordered.
        if not 0 <= idx < len(self.phases) or self.phases[idx][0] != name:
            raise ValueError(
                f"saved alpha schedule of {self.expert} is in phase {idx} {name!r}, but the config's "
                f"phases are {[n for n, _ in self.phases]}; resume with the run's own config.yaml"
            )
        self._idx = idx
        self._steps_in_phase = int(state["steps_in_phase"])


class AlphaScheduler:
    """Statistics and (when enabled) a phase machine per trained expert, and the alpha each uses."""

    def __init__(self, network: NetworkConfig, experts: Sequence[str]) -> None:
        if not experts or len(set(experts)) != len(experts):
            raise ValueError(f"AlphaScheduler needs distinct experts, got {list(experts)}")
        self.network = network
        self.experts = tuple(check_expert(e) for e in experts)
        schedule = network.alpha_schedule
        self.stats: dict[str, ExpertStats] = {e: ExpertStats() for e in self.experts}
        # Statistics are kept either way (they are logged); machines only exist when they can act.
        self.machines: dict[str, PhaseMachine] = (
            {e: PhaseMachine(e, schedule.phases_for(e)) for e in self.experts} if schedule.enabled else {}
        )
        self._transitions: list[Transition] = []

    @property
    def enabled(self) -> bool:
        return self.network.alpha_schedule.enabled

    @property
    def linear_alpha(self) -> float:
        own = self.network.alpha_schedule.linear_alpha
        return self.network.linear_alpha if own is None else own

    @property
    def transitions(self) -> list[Transition]:
        return list(self._transitions)

    def alpha(self, expert: str) -> float:
        """The alpha in force for `expert`: LoRA scale = alpha / rank for every module."""
        self._check_trained(expert)
        return self.machines[expert].alpha if self.enabled else self.network.linear_alpha

    def record(
        self, step: int, expert: str, loss: float | None, grad_stability: float | None
    ) -> Transition | None:
        """One optimizer step of `expert` (call it only for steps taken): update, maybe transition."""
        self._check_trained(expert)
        stats = self.stats[expert]
        stats.update(loss, grad_stability)
        if not self.enabled:
            return None
        transition = self.machines[expert].on_step(step, stats)
        if transition is not None:
            self._transitions.append(transition)
        return transition

    def force_transition(self, step: int, expert: str) -> Transition:
        """Move `expert` to its next phase by hand; its alpha changes from the next step on."""
        self._check_trained(expert)
        if not self.enabled:
            raise ValueError("alpha_schedule.enabled is false: there are no phases to move between")
        transition = self.machines[expert].force_transition(step, self.stats[expert])
        self._transitions.append(transition)
        return transition

    def metrics(self, expert: str) -> dict[str, Any]:
        """Schedule and statistics fields of the metrics JSONL for a step of `expert` (docs/architecture.md §5.2)."""
        self._check_trained(expert)
        machine = self.machines.get(expert)
        out: dict[str, Any] = {
            "alpha_enabled": self.enabled,
            "phase": None if machine is None else machine.phase_name,
            "phase_idx": None if machine is None else machine.phase_idx,
            "steps_in_phase": None if machine is None else machine.steps_in_phase,
            "conv_alpha": self.alpha(expert),
            "linear_alpha": self.linear_alpha,
        }
        out.update(self.stats[expert].snapshot())
        return out

    # --- exact resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        experts = {
            e: {
                "phase": self.machines[e].state_dict() if self.enabled else None,
                "stats": self.stats[e].state_dict(),
            }
            for e in self.experts
        }
        return {
            "version": STATE_VERSION,
            "enabled": self.enabled,
            "experts": experts,
            "transitions": [t.to_json() for t in self._transitions],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        for expert in self.experts:
            saved = state["experts"][expert]
            self.stats[expert].load_state_dict(saved["stats"])
            if self.enabled:
                self.machines[expert].load_state_dict(saved["phase"])
        self._transitions = [Transition.from_json(t) for t in state["transitions"]]

    def save(self, path: Path) -> Path:
        """Write `<name>_<step:09d>_alpha_scheduler.json` atomically (docs/architecture.md §5.1)."""
        return write_json(path, self.state_dict())

    def load(self, path: Path) -> None:
        self.load_state_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"alpha scheduler state has version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        if state["enabled"] != self.enabled or set(state["experts"]) != set(self.experts):
            raise ValueError(
                f"alpha scheduler state is for experts {sorted(state['experts'])} with the schedule "
                f"{'enabled' if state['enabled'] else 'disabled'}; this run trains {sorted(self.experts)} "
                f"with it {'enabled' if self.enabled else 'disabled'}. Resume with the run's own config.yaml"
            )

    def _check_trained(self, expert: str) -> None:
        if expert not in self.stats:
            raise ValueError(f"expert {expert!r} is not trained in this run; it trains {list(self.experts)}")
