"""The time budget as a deadline: `--time-budget` bounds the whole study, not only when trials
start. Only the final confirmation of the chosen model's ratios comes after it.

Four things hold the deadline:

- A trial that cannot finish in the time left is not started. What it needs is estimated from
  the trials measured so far (each records its `timings`): the median time a build takes
  before its passes (child start, loading), each of its passes' median time in earlier
  trials, and the room kept after the passes (below). A pass whose time grows with a
  setting (`Pass.work`: a distillation's steps) is estimated per unit of it instead, so a
  50-step distillation is not taken for the 200-step ones before it. A pass not run yet
  counts as free: its first run teaches its cost, and the limits below bound what that
  first run can overrun.
- A trial's passes must be done early enough to leave time to save and evaluate the candidate
  (`passes_deadline`: `MARGIN` times the median save and evaluation, and `AFTER_PASSES_S`,
  before the end of the time for trials). Long passes check it: distillation stops and keeps
  what it trained; GPTQ, static int8 and NNCF calibration fail their trial ("stopped at the
  study's deadline").
- At the end of the time for trials, a build or evaluation child still running is killed.
- The last `FINISH_S` seconds of the budget are for saving best/ and the run's outputs.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from slimformer.passes import get_pass
from slimformer.pipeline import step_config
from slimformer.recipe import Step

# A trial's: build_s, evaluate_s, load_s, save_s, passes {name: s}, work {name: units}.
Timings = Mapping[str, Any]
# The end of the budget kept for saving best/ and the run's outputs (trials end before it).
FINISH_S = 5.0
MARGIN = 1.5  # the save and evaluation a trial's passes leave room for, times their median
# And for the rest of the build child's work (the passes' own wrap-up, its exit), and the
# study's bookkeeping between the two children.
AFTER_PASSES_S = 5.0


class TimeBudget:
    def __init__(self, seconds: float | None, started: float | None = None):
        """`seconds` from `started` (epoch seconds, default now); None: no deadline."""
        start = time.time() if started is None else started
        self.end = None if seconds is None else start + seconds
        # Every trial is over by then (a child still running is killed).
        self.trials_end = None if self.end is None else self.end - FINISH_S

    def left(self) -> float:
        """Seconds left for trials (infinite without a deadline)."""
        return math.inf if self.trials_end is None else self.trials_end - time.time()

    def passes_deadline(self, history: Iterable[Timings]) -> float | None:
        """When a trial's passes must stop to leave time to save and evaluate the candidate."""
        if self.trials_end is None:
            return None
        return self.trials_end - after_passes(history)


def work(steps: Iterable[Step]) -> dict[str, float]:
    """The work of each step whose pass measures it (`Pass.work`), by pass name."""
    units: dict[str, float] = {}
    for step in steps:
        amount = get_pass(step.pass_name).work(step_config(step))
        if amount is not None:
            units[step.pass_name] = units.get(step.pass_name, 0.0) + amount
    return units


def estimate(
    pass_names: Sequence[str],
    history: Iterable[Timings],
    planned: Mapping[str, float] | None = None,
) -> float:
    """Seconds a trial of these passes needs, from the timings of earlier trials: before its
    passes, for each of them, and after them (`after_passes`). 0 before any trial.
    `planned`: the work of the passes that measure it (`work`); such a pass is estimated at
    the median seconds per unit of its earlier runs that recorded theirs."""
    history = list(history)
    builds = [t for t in history if "build_s" in t]
    if not builds:
        return 0.0
    per_pass: dict[str, list[float]] = {}
    per_unit: dict[str, list[float]] = {}
    for timings in builds:
        done = timings.get("work", {})
        for name, seconds in timings.get("passes", {}).items():
            per_pass.setdefault(name, []).append(seconds)
            if done.get(name, 0) > 0:
                per_unit.setdefault(name, []).append(seconds / done[name])
    before_passes = _median(
        max(0.0, t["build_s"] - sum(t.get("passes", {}).values()) - t.get("save_s", 0.0))
        for t in builds
    )
    planned = planned or {}
    passes = 0.0
    for name in pass_names:
        if name in planned and name in per_unit:
            passes += statistics.median(per_unit[name]) * planned[name]
        elif name in per_pass:
            passes += statistics.median(per_pass[name])
    return before_passes + passes + after_passes(history)


def after_passes(history: Iterable[Timings]) -> float:
    """The room a trial's passes leave: saving and evaluating the candidate (their medians,
    with a margin), and the rest of the build child's work."""
    history = list(history)
    save = _median(t.get("save_s") for t in history)
    evaluate = _median(t.get("evaluate_s") for t in history)
    return MARGIN * (save + evaluate) + AFTER_PASSES_S


def _median(values: Iterable[float | None]) -> float:
    """The median of the values given (None: not measured); 0 when there are none."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else 0.0
