"""Staged scoring: a candidate's quality first estimated on a seeded subset of the scored split,
with a one-sided confidence bound on its drop against the original model, so that a candidate
clearly over budget stops before the rest of its evaluation (the full split, the timing).

The comparison is paired: for each example of the subset, the candidate's figure against the
original's on the same example (an accuracy: whether each got it right; perplexity: the
window's log-loss), from the original's values the task's reference state holds. Most examples
agree, so the per-example differences vary far less than either model's figures do, and a few
hundred examples bound the drop to about a point.

The bound is on the drop over the *whole* scored split (what the study compares), of which the
subset is a simple random sample drawn without replacement: hence the finite-population
correction. The subset mean of bounded per-example differences is close to normal at a few
hundred examples; Student's t covers the small samples of per-window perplexity.

Confidence 97.5 % one-sided: a candidate exactly at the budget is stopped at most 2.5 % of the
time, and one that would meet it, less (its true drop is further from the bound). A study of a
few dozen trials then loses well under one good candidate to a wrong stop, and any it loses
sat at the budget's edge, where the full-split figure itself is within noise of the budget.
When several figures are checked (the score and a guard's drop), the level is split among them
(Bonferroni), so the chance of any wrong stop stays within 2.5 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SUBSET_FRACTION = 0.25
CONFIDENCE = 0.975
TOLERANCE = 1e-12  # as the guards': a bound exactly at the budget is not over it


@dataclass(frozen=True)
class Paired:
    """One figure on the subset: per-example drops of the candidate against the original."""

    drops: np.ndarray  # original's value − candidate's (higher-is-better figures), per example
    population: int  # examples in the whole scored split
    # Per-example log-loss differences: the figure's drop is relative, exp(mean) − 1 (perplexity).
    relative: bool = False


@dataclass(frozen=True)
class Staged:
    """What a task scored on the subset: the paired figures. A candidate that passes is
    scored again on the whole split, not on the rest alone: a model whose outputs depend on
    the batch (dynamic int8 scales activations per batch, padding follows the longest input)
    would otherwise record a figure the same model scored without early stopping does not
    (0.20 and 0.55 pt for one ONNX Runtime int8 model, bench/results/search_efficiency.json)."""

    figures: dict[str, Paired]


def subset(population: int, seed: int, minimum: int) -> np.ndarray | None:
    """The sorted indices of the subset scored first: a fixed share of the split, at least
    `minimum` examples; None when that leaves too little of the split to save."""
    size = max(minimum, math.ceil(SUBSET_FRACTION * population))
    if size * 2 > population:
        return None
    picked = np.random.default_rng(seed).choice(population, size, replace=False)
    return np.sort(picked)


def _mean_error(drops: np.ndarray) -> float:
    """The standard error of the mean of per-example drops; infinite for one example."""
    if len(drops) < 2:
        return math.inf
    return float(drops.std(ddof=1)) / math.sqrt(len(drops))


def paired_standard_error(original: np.ndarray, candidate: np.ndarray) -> float:
    """The standard error of the mean drop (original − candidate per example) as an estimate
    of the drop on the population the examples were drawn from; 0 for one example."""
    drops = np.asarray(original, dtype=np.float64) - np.asarray(candidate, dtype=np.float64)
    return _mean_error(drops) if len(drops) > 1 else 0.0


def drop_bound(sample: Paired, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The subset's estimate of the whole split's drop, and its one-sided lower bound."""
    drops = np.asarray(sample.drops, dtype=np.float64)
    n = len(drops)
    mean = float(drops.mean())
    finite = math.sqrt(max(0.0, (sample.population - n) / max(1, sample.population - 1)))
    error = _mean_error(drops) * finite
    # Imported here: scipy.stats costs 1-2 s of start-up in every CLI and trial process.
    from scipy.stats import t as student_t

    bound = mean - float(student_t.ppf(confidence, max(1, n - 1))) * error if error else mean
    if sample.relative:
        return math.expm1(mean), math.expm1(bound)
    return mean, bound


def verdict(
    staged: Staged, allowed: Mapping[str, float], confidence: float = CONFIDENCE
) -> dict[str, Any] | None:
    """Whether the candidate is over budget with `confidence`: each figure the subset scored
    that has an allowed drop (`allowed`: the score's --max-drop, guards' drop limits) is
    bounded, at a level split among them. None when the subset scored none of them."""
    checked = [name for name in staged.figures if name in allowed]
    if not checked:
        return None
    level = 1 - (1 - confidence) / len(checked)
    figures: dict[str, dict[str, float]] = {}
    over = []
    for name in checked:
        estimate, bound = drop_bound(staged.figures[name], level)
        figures[name] = {
            "estimate": round(estimate, 6),
            "bound": round(bound, 6),
            "allowed": allowed[name],
            "examples": len(staged.figures[name].drops),
            "population": staged.figures[name].population,
        }
        if bound > allowed[name] + TOLERANCE:
            over.append(name)
    reason = "; ".join(
        f"{name} drop {_shown(figures[name]['estimate'], staged.figures[name])} on "
        f"{figures[name]['examples']} of {figures[name]['population']} examples, at least "
        f"{_shown(figures[name]['bound'], staged.figures[name])} with {confidence:.1%} "
        f"confidence, over the {_shown(figures[name]['allowed'], staged.figures[name])} allowed"
        for name in over
    )
    return {"over": bool(over), "confidence": confidence, "figures": figures, "reason": reason}


def _shown(drop: float, sample: Paired) -> str:
    """A drop as the rest of the output shows it: percent for relative figures (perplexity),
    points for the others (accuracies, fractions of 1)."""
    return f"{drop:.2%}" if sample.relative else f"{drop * 100:.2f} pt"


# A short timing (a third of the full one's time) is noisier than the full one: on an AVX2-only
# EPYC single probes read 0.80-1.08x the median full throughput and 0.92-1.17x the full latency
# (MiniLM fp32, ONNX Runtime int8, OpenVINO int8; bench/timing_probe.py), and full readings
# themselves spread up to 15 %. A candidate counts as slower than a finished trial only beyond
# this margin.
PROBE_MARGIN = 0.5


def dominated(
    staged: Staged,
    screening: dict[str, Any],
    figure: str,
    probe: float,
    front: list[dict[str, Any]],
    higher_is_better: bool,
    margin: float = PROBE_MARGIN,
) -> dict[str, Any] | None:
    """The measured trial that beats a candidate on both objectives, or None.

    `probe`: the candidate's cost from a short timing; `front`: finished trials within budget
    measured on this machine ({"trial", "drop", "cost"}). A trial dominates when its measured
    drop is no larger than the least drop the candidate's subset allows at the screening's
    confidence (the bound `verdict` computed) and its cost is better than the probe's by more
    than `margin`: the candidate could then never be on the front, so the rest of its
    evaluation is skipped."""
    if figure not in screening.get("figures", {}) or figure not in staged.figures:
        return None
    least_drop = screening["figures"][figure]["bound"]
    for point in sorted(front, key=lambda p: p["drop"]):
        if point["drop"] > least_drop:
            break
        cheaper = (
            point["cost"] > probe * (1 + margin)
            if higher_is_better
            else point["cost"] * (1 + margin) < probe
        )
        if cheaper:
            sample = staged.figures[figure]
            reason = (
                f"dominated by trial {point['trial']}: a short timing gave {probe:.4g} against "
                f"its {point['cost']:.4g} (beyond the {margin:.0%} margin), and its drop "
                f"{_shown(point['drop'], sample)} is no larger than this one's "
                f"{_shown(least_drop, sample)} at least"
            )
            return {
                "trial": point["trial"],
                "cost": point["cost"],
                "probe": probe,
                "reason": reason,
            }
    return None
