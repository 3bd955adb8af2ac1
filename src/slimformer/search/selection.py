"""Which trials are worth keeping: the Pareto front of quality and cost, and the choice."""

from __future__ import annotations

from slimformer.figures import OBJECTIVES
from slimformer.search.records import TrialRecord, find

# The run-off (runner.py): within-budget trials whose single in-study reading is within this
# factor of the chosen one's are timed again before the choice is final. One reading spreads
# that much on a busy 2-core machine: the same OpenVINO int8 recipe read 828/s in one study and
# 1293/s in another (bench/results/search_efficiency.json). Not only the front's: a trial
# within the budget competes on cost alone, and one whose reading came out low is dominated
# by the chosen one until timed again (vit-fashion's distilled half-token recipe read 867
# images/s beside OpenVINO int8 alone's 1,003 in-study, 1.32x it side by side:
# bench/results/peers_vision_amx_xeon.json, vit_tokens_openvino.json).
RUNOFF_SPAN = 1.6
RUNOFF_SIZE = 3  # the chosen one and at most two more


def pareto_front(records: list[TrialRecord], direction: str, objective: str) -> list[int]:
    """Trial numbers not dominated in (quality, cost); duplicates of earlier trials, and
    trials measured on another machine, left out."""
    sign_q = 1 if direction == "maximize" else -1
    sign_c = 1 if OBJECTIVES[objective][1] == "maximize" else -1
    points = [
        (r.number, sign_q * r.quality, sign_c * r.cost(objective)) for r in records if r.comparable
    ]
    front = []
    for number, q, c in points:
        dominated = any(
            (q2 >= q and c2 >= c) and (q2 > q or c2 > c) for n2, q2, c2 in points if n2 != number
        )
        if not dominated:
            front.append(number)
    return sorted(front)


def choose(
    records: list[TrialRecord], front: list[int], direction: str, objective: str
) -> tuple[TrialRecord | None, bool]:
    """The cheapest trial within the budget; else the best-quality optimized frontier point.
    Returns the trial (None without a finished baseline) and whether it met the budget."""
    sign_c = -1 if OBJECTIVES[objective][1] == "maximize" else 1
    complete = [r for r in records if r.comparable]
    baseline = next((r for r in complete if r.is_baseline), None)
    if baseline is None:
        return None, False
    feasible = [r for r in complete if r.feasible]
    best = min(feasible, key=lambda r: (sign_c * r.cost(objective), r.drop, r.number))
    if not best.is_baseline:
        return best, True
    optimized = [find(records, n) for n in front if not find(records, n).is_baseline]
    if not optimized:
        return baseline, False
    sign_q = -1 if direction == "maximize" else 1
    return min(optimized, key=lambda r: (sign_q * r.quality, r.number)), False


def runoff_contenders(
    records: list[TrialRecord], chosen: TrialRecord, objective: str
) -> list[TrialRecord]:
    """The chosen trial and the other optimized, within-budget trials whose cost is within
    RUNOFF_SPAN of its own, closest first; at most RUNOFF_SIZE."""
    maximize = OBJECTIVES[objective][1] == "maximize"
    best = chosen.cost(objective)

    def gap(record: TrialRecord) -> float:
        cost = record.cost(objective)
        return best / cost if maximize else cost / best

    others = [
        r
        for r in records
        if r.comparable and r.feasible and not r.is_baseline and r.number != chosen.number
    ]
    close = sorted((r for r in others if gap(r) <= RUNOFF_SPAN), key=gap)
    return [chosen, *close][:RUNOFF_SIZE]
