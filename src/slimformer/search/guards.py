"""Guards: conditions on the figures a task reports that a trial must meet beside --max-drop.

A guard is a line of text, given with `--guard` (repeatable) or declared by the task as a
default (`Task.default_guards`):

    cosine_fidelity>=0.95                 a figure at or above a threshold
    recall@10>=90%                        the same, as a percentage
    drop(transfer_probe_accuracy)<=1%     how much worse than the baseline it may get
                                          (like --max-drop: points for fractions)

Any figure of `Task.reported_figures()` may be named: the score, or one of its details. The
details the tasks report are fractions where higher is better, so a detail's drop is the
baseline's value minus the trial's; the score's drop is the trial's drop.

Every guard becomes an Optuna constraint beside `max_drop` (a value ≤ 0 = met), so the sampler
learns where feasible recipes are; a trial is feasible when its drop is within --max-drop and
every guard holds, and only feasible trials can be chosen (selection.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from slimformer.errors import SlimformerError

TOLERANCE = 1e-12  # a figure exactly at its threshold meets it, whatever the float rounding
MAX_DROP = "max_drop"  # the budget's constraint, beside one per guard
_GUARD = re.compile(
    r"^\s*(?:drop\(\s*(?P<dropped>[^()\s]+)\s*\)|(?P<figure>[^<>=()\s]+))"
    r"\s*(?P<op><=|>=)\s*(?P<amount>\S+?)\s*$"
)
SYNTAX = "FIGURE>=VALUE, FIGURE<=VALUE or drop(FIGURE)<=AMOUNT, e.g. cosine_fidelity>=0.95"


class Limits(Protocol):
    """What a study allows (its StudySettings)."""

    @property
    def max_drop(self) -> float: ...
    @property
    def guards(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Guard:
    figure: str
    op: str  # ">=" | "<="
    threshold: float
    of_drop: bool = False  # the figure's drop from the baseline, not the figure itself

    def __str__(self) -> str:
        subject = f"drop({self.figure})" if self.of_drop else self.figure
        return f"{subject}{self.op}{self.threshold:.10g}"

    def display(self) -> str:
        """For people: "drop(transfer_probe_accuracy) ≤ 0.01"."""
        return str(self).replace(">=", " ≥ ").replace("<=", " ≤ ")

    def value(self, figures: Mapping[str, float], drops: Mapping[str, float]) -> float:
        source = drops if self.of_drop else figures
        if self.figure not in source:
            raise SlimformerError(f"guard {self}: the task reported no figure '{self.figure}'")
        return float(source[self.figure])

    def violation(self, figures: Mapping[str, float], drops: Mapping[str, float]) -> float:
        """How far the trial is from meeting the guard: ≤ 0 when it is met."""
        value = self.value(figures, drops)
        return value - self.threshold if self.op == "<=" else self.threshold - value


def parse_guard(text: str) -> Guard:
    match = _GUARD.match(str(text))
    if match is None:
        raise SlimformerError(f"--guard must look like {SYNTAX}; got '{text}'")
    amount = match["amount"]
    try:
        threshold = float(amount[:-1]) / 100 if amount.endswith("%") else float(amount)
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold):
        raise SlimformerError(f"--guard '{text}': '{amount}' is not a number (or a percentage)")
    if match["dropped"] and match["op"] != "<=":
        raise SlimformerError(f"--guard '{text}': a drop is limited from above: drop(...)<=AMOUNT")
    return Guard(
        figure=match["dropped"] or match["figure"],
        op=match["op"],
        threshold=threshold,
        of_drop=bool(match["dropped"]),
    )


def resolve_guards(given: Sequence[str], defaults: Sequence[str]) -> tuple[str, ...]:
    """The user's guards, then the task's defaults that none of them replaces (a guard on the
    same figure, or the same figure's drop), in canonical form and without repeats."""
    chosen = [parse_guard(text) for text in given]
    named = {(g.figure, g.of_drop) for g in chosen}
    kept = [g for g in map(parse_guard, defaults) if (g.figure, g.of_drop) not in named]
    return tuple(dict.fromkeys(str(g) for g in chosen + kept))


def check_guards(guards: Sequence[str], reported: Sequence[str], task: str) -> None:
    """Refuse a guard naming a figure the task does not report, before any trial runs."""
    for guard in map(parse_guard, guards):
        if guard.figure not in reported:
            raise SlimformerError(
                f"--guard '{guard}': the {task} task reports no figure '{guard.figure}'; it "
                f"reports: {', '.join(reported)}"
            )


# --- a trial's constraints --------------------------------------------------------------------
def figure_drops(
    metric: str, drop: float, details: Mapping[str, float], baseline: Mapping[str, float]
) -> dict[str, float]:
    """Each figure's drop from the baseline: the score's own drop, details' differences."""
    return {metric: drop} | {
        name: baseline[name] - value for name, value in details.items() if name in baseline
    }


def constraints(
    max_drop: float,
    guards: Sequence[str],
    figures: Mapping[str, float],
    drops: Mapping[str, float],
    metric: str,
) -> dict[str, float]:
    """Optuna's constraint values of one trial, by name: the budget's, then each guard's."""
    values = {MAX_DROP: drops[metric] - max_drop}
    for guard in map(parse_guard, guards):
        values[f"guard {guard}"] = guard.violation(figures, drops)
    return values


def judge(
    trial: Any,
    settings: Limits,
    metric: str,
    quality: float,
    drop: float,
    details: Mapping[str, float],
    baseline: Mapping[str, float],
) -> None:
    """Constrain a scored trial by `settings`' max_drop and guards (`baseline`: the baseline
    trial's details, or the trial's own when it is the baseline)."""
    drops = figure_drops(metric, drop, details, baseline)
    figures = {metric: quality, **details}
    record(trial, constraints(settings.max_drop, settings.guards, figures, drops, metric))


def record(trial: Any, values: Mapping[str, float]) -> None:
    """Set a trial's constraints and what the records read back: feasible, and per guard
    whether it was met."""
    for name, value in values.items():
        trial.set_constraint(name, value)
    trial.set_user_attr("constraints", dict(values))
    trial.set_user_attr("feasible", all(v <= TOLERANCE for v in values.values()))
    trial.set_user_attr(
        "guards",
        {
            name.removeprefix("guard "): value <= TOLERANCE
            for name, value in values.items()
            if name != MAX_DROP
        },
    )
