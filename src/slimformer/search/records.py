"""What a study produces, typed: one trial (`TrialRecord`, a line of trials.jsonl), the
chosen model's facts (`BestModel`, best/metrics.json) and the whole study (`StudyResult`).
One evaluation, the child process's answer, is `evaluate.EvaluationResult`."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimformer.figures import BY_FIELD, BY_NAME, OBJECTIVES

if TYPE_CHECKING:
    from slimformer.search.settings import StudySettings


# pruned: stopped early, shown over budget before its evaluation ended (early_stop says how).
STATES = ("complete", "failed", "pruned", "interrupted", "running")


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str  # one of STATES
    description: str
    recipe: dict[str, Any] | None = None
    quality: float | None = None
    drop: float | None = None
    feasible: bool | None = None  # within max_drop and every guard met
    details: dict[str, float] = field(default_factory=dict)
    guards: dict[str, bool] = field(default_factory=dict)  # guard -> met (search/guards.py)
    measurement: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration_s: float | None = None
    # Where its time went: build_s, evaluate_s (wall clock, child start included), load_s,
    # save_s and seconds by pass (inside the build child); the time budget's estimates use them.
    timings: dict[str, Any] = field(default_factory=dict)
    duplicate_of: int | None = None
    cpu: dict[str, Any] | None = None  # the fingerprint of the machine that measured it
    # Measured on another machine than the study's current one: kept as history, but its
    # timings take no part in the front or the choice (a resumed study measures it again).
    stale: bool = False
    # Why and where a pruned trial stopped: "by" (subset: staged scoring's verdict, with each
    # figure's estimate and bound; distillation: the pruner, with the last held-out loss
    # reported), "reason"; a trial that went on keeps its subset verdict here too.
    early_stop: dict[str, Any] | None = None

    @property
    def is_baseline(self) -> bool:
        return self.description == "baseline"

    @property
    def counts(self) -> bool:
        """Whether it used a slot of the trial budget (repeats and interrupted runs don't)."""
        if self.state in ("complete", "pruned"):
            return self.duplicate_of is None
        return self.state == "failed"

    @property
    def comparable(self) -> bool:
        """A finished, first-of-its-recipe measurement from this machine."""
        return (
            self.state == "complete"
            and self.duplicate_of is None
            and self.quality is not None
            and not self.stale
        )

    def cost(self, objective: str) -> float | None:
        return self.measurement.get(OBJECTIVES[objective][0])

    @classmethod
    def from_dict(cls, data: Any) -> TrialRecord:
        """A line of trials.jsonl, checked; ValueError saying what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("not a mapping")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        missing = [name for name in ("number", "state", "description") if name not in data]
        if unknown or missing:
            raise ValueError(f"unknown {unknown}, missing {missing}")
        for name, value in data.items():
            if value is None and known[name].default is None:
                continue
            if not _has_type(value, _RECORD_TYPES[name]):
                raise ValueError(f"'{name}' is not {_RECORD_TYPES[name].__name__}")
        record = cls(**data)
        if record.state not in STATES:
            raise ValueError(f"state {record.state[:20]!r} is not one of {', '.join(STATES)}")
        if not all(_has_type(v, float) for v in record.details.values()):
            raise ValueError("'details' holds a value that is not a number")
        for key, value in record.measurement.items():
            if key in BY_FIELD and not BY_FIELD[key].accepts(value):
                raise ValueError(f"measurement '{key}' is {value!r}")
        if record.comparable:
            costs = [
                record.measurement.get(field)
                for name, (field, _) in OBJECTIVES.items()
                if not BY_NAME[name].causal_only  # decoding: None where no KV cache serves
            ]
            if not all(_has_type(v, float) for v in [record.drop, *costs]):
                raise ValueError("a finished trial lacks its drop or a measured figure")
        return record


# The type of each TrialRecord field in trials.jsonl (float: any number; None is allowed
# where the field's default is None).
_RECORD_TYPES: dict[str, type] = {
    "number": int,
    "state": str,
    "description": str,
    "recipe": dict,
    "quality": float,
    "drop": float,
    "feasible": bool,
    "details": dict,
    "measurement": dict,
    "error": str,
    "duration_s": float,
    "timings": dict,
    "guards": dict,
    "duplicate_of": int,
    "cpu": dict,
    "stale": bool,
    "early_stop": dict,
}


def _has_type(value: Any, kind: type) -> bool:
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def find(records: list[TrialRecord], number: int) -> TrialRecord:
    return next(r for r in records if r.number == number)


@dataclass(frozen=True)
class BestModel:
    """The model a study saved in best/, with what it was chosen against."""

    chosen: TrialRecord
    baseline: TrialRecord
    settings: StudySettings
    metric: str
    met_budget: bool
    cpu: dict[str, Any]  # the machine the study measured on
    # Baseline vs chosen timed again in alternating fresh processes (confirm.py).
    confirmed: dict[str, Any] | None = None

    def metrics(self) -> dict[str, Any]:
        """best/metrics.json."""
        chosen, baseline = self.chosen, self.baseline
        return {
            "trial": chosen.number,
            "met_max_drop": self.met_budget,
            "max_drop": self.settings.max_drop,
            "objective": self.settings.objective,
            "metric": self.metric,
            "quality": chosen.quality,
            "drop": chosen.drop,
            "guards": chosen.guards,
            "details": chosen.details,
            "measurement": chosen.measurement,
            "baseline": {
                "quality": baseline.quality,
                "details": baseline.details,
                "measurement": baseline.measurement,
            },
            "cpu": self.cpu,
            "confirmed": self.confirmed,
        }


@dataclass(frozen=True)
class StudyResult:
    out: Path
    settings: StudySettings
    trials: list[TrialRecord]
    pareto: list[int]
    chosen: TrialRecord | None
    met_budget: bool
    best_dir: Path | None
    # Baseline vs chosen timed again in alternating fresh processes (confirm.py); None when
    # switched off or when the baseline itself was chosen.
    confirmed: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()

    @property
    def baseline(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.is_baseline and t.comparable), None)
