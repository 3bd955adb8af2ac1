"""Confirmed ratios: the baseline and the chosen model timed again, alternately, in fresh
processes, so that a printed "2× faster" does not rest on one baseline measurement.

Each round times both models in new child processes, the order alternating between rounds
(baseline first, then chosen first) so that a machine growing busier or quieter during the
rounds does not favour one side. A round's ratio compares the two measurements of that
round; the confirmed figure is the median of the per-round ratios, with their min and max.
The figures confirmed are figures.CONFIRMED_FIGURES; `evaluate` is the study's evaluator
(fresh child processes, search/candidates.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimformer.figures import CONFIRMED_FIGURES, improvement

if TYPE_CHECKING:
    from slimformer.search.candidates import Evaluator

# Rounds whose ratios differ more than this (max/min) mean the machine's load changed while
# they ran: the figures are then reported with a warning.
UNSTEADY_SPREAD = 1.5


def unsteady(confirmed: dict[str, Any]) -> str | None:
    """A one-line warning when the rounds disagree so much that the machine was busy."""
    wide = [
        f"{figure} {r['min']:.2f}–{r['max']:.2f}×"
        for figure, r in confirmed["ratios"].items()
        if r["min"] > 0 and r["max"] / r["min"] > UNSTEADY_SPREAD
    ]
    if not wide:
        return None
    return (
        f"the confirmation rounds disagree ({', '.join(wide)}): other work on this machine "
        "was competing for its cores; measure again on an idle machine before relying on them"
    )


def time_alternately(
    folders: dict[str, Path],
    evaluate: Evaluator,
    workdir: Path,
    rounds: int,
    what: str,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any] | None]:
    """Time each model `rounds` times in fresh processes, the order rotating between rounds
    (with two models: alternating), so that no model always goes first; every model's
    measurements by its name, and the CPU the last timing reported. `what`: the stage's name
    in the messages (`on_stage`)."""
    names = list(folders)
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    cpu = None
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if on_stage:
                on_stage(f"{what}: round {index + 1}/{rounds}, {name}")
            result = evaluate(folders[name], workdir / f"round-{index + 1}-{name}", score=False)
            measured[name].append(result.measurement)
            cpu = result.cpu or cpu
    return measured, cpu


def confirm_ratios(
    baseline_dir: Path,
    chosen_dir: Path,
    evaluate: Evaluator,
    workdir: Path,
    rounds: int,
    on_stage: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time baseline and chosen `rounds` times each, alternating; return per-figure ratios
    (median, min, max, every round's) and both sides' per-round measurements."""
    sides = {"baseline": baseline_dir, "chosen": chosen_dir}
    measured, cpu = time_alternately(sides, evaluate, workdir, rounds, "confirming", on_stage)
    # Figures this model has (decoding speed: causal LMs only) in every round.
    present = {
        figure: spec
        for figure, spec in CONFIRMED_FIGURES.items()
        if all(m.get(spec[0]) is not None for side in sides for m in measured[side])
    }
    ratios = {}
    for figure, (key, lower_is_better) in present.items():
        per_round = [
            improvement(b.get(key), c.get(key), lower_is_better)
            for b, c in zip(measured["baseline"], measured["chosen"], strict=True)
        ]
        ratios[figure] = {
            "median": round(statistics.median(per_round), 3),
            "min": round(min(per_round), 3),
            "max": round(max(per_round), 3),
            "per_round": [round(r, 3) for r in per_round],
        }
    medians = {
        side: {
            key: statistics.median(m[key] for m in measured[side]) for key, _ in present.values()
        }
        for side in sides
    }
    return {
        "rounds": rounds,
        "order": "alternating, fresh process per measurement",
        "ratios": ratios,
        "medians": medians,
        "baseline": measured["baseline"],
        "chosen": measured["chosen"],
        "cpu": cpu,
    }
