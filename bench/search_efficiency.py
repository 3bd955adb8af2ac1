"""Do early stopping and reused training spend a study's hours better? The default study, twice.

    python bench/search_efficiency.py                  # -> bench/results/search_efficiency.json
    python bench/search_efficiency.py --quick          # a check: 5-minute studies, two peers

`optimize default --max-drop 1% --objective throughput --time-budget 20m` runs once with
`--no-early-stop --no-reuse-trained` (every candidate built from the original, timed and scored
in full) and once as by default (multi-fidelity trials: a candidate a subset of the scored split
shows over budget with 97.5 % confidence stops before its timing; a distillation falling behind
is stopped by the pruner; a trial that starts with the steps of an earlier trial's training
loads the model that trial kept instead of training again), one after the other on the same
machine with the same wall-clock budget; the local search is on in both. Recorded for each:
the trials evaluated (complete and pruned, repeats of measured recipes not counted) per hour
of the budget, how many were pruned and how, and the chosen model's throughput and drop as
`slimformer.benchmark` measures its saved folder in a fresh process. The peers (peers.py's
rows) are measured in the same run, so the chosen throughput is compared with the best peer's
at the same time on the same cores.

Target (issue 15, item 1): at least 2x the trials evaluated per hour by default, and
the default run's chosen model at least 1.5x the best peer's throughput within 1 point.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, trial_summary, write_result
from peers import PEERS, QUICK_PEERS

import slimformer
from slimformer.recipe import Recipe, Step
from slimformer.search.settings import parse_duration
from slimformer.tasks import TaskSpec

SPEC = TaskSpec(name="embedding")
MAX_DROP = 0.01
TARGET_TRIALS_RATIO = 2.0
TARGET_VS_BEST_PEER = 1.5
# Each study's switches: all of the search's economies off, then as by default.
MODES = {
    "no_early_stop_no_reuse": {"early_stop": False, "reuse_trained": False},
    "default": {"early_stop": True, "reuse_trained": True},
}


def run_study(out: Path, budget: str, switches: dict[str, bool], confirm: int) -> dict[str, Any]:
    from slimformer.report import RichReporter

    began = time.time()
    with RichReporter() as reporter:
        result = slimformer.optimize(
            "default",
            task=SPEC,
            max_drop=f"{MAX_DROP:.0%}",
            objective="throughput",
            trials=None,
            time_budget=budget,
            out=out,
            overwrite=True,
            reporter=reporter,
            confirm_rounds=confirm,
            **switches,
        )
    wall = time.time() - began
    first = [t for t in result.trials if t.duplicate_of is None]
    evaluated = [t for t in first if t.state in ("complete", "pruned")]
    pruned = [t for t in first if t.state == "pruned"]
    hours = parse_duration(budget) / 3600
    reused = [t for t in evaluated if (t.timings or {}).get("reused")]
    summary: dict[str, Any] = {
        **switches,
        "study_wall_seconds": round(wall, 1),
        "trials_evaluated": len(evaluated),
        "trials_evaluated_per_hour": round(len(evaluated) / hours, 2),
        "trials_complete": len(evaluated) - len(pruned),
        "trials_pruned": len(pruned),
        "pruned_by": {
            how: sum(1 for t in pruned if (t.early_stop or {}).get("by") == how)
            for how in ("subset", "distillation")
        },
        "trials_reusing_a_trained_model": len(reused),
        "trials_failed": sum(1 for t in first if t.state == "failed"),
        "trials": [trial_summary(t) | {"early_stop": t.early_stop} for t in result.trials],
        "met_budget": result.met_budget,
        "chosen": None,
    }
    if result.chosen is not None and result.best_dir is not None:
        measured = slimformer.benchmark(result.best_dir, task=SPEC)
        baseline = result.baseline
        summary["chosen"] = {
            "trial": result.chosen.number,
            "recipe": result.chosen.description,
            "drop_points_in_study": round((result.chosen.drop or 0.0) * 100, 2),
            "probe_accuracy": measured.quality,
            "drop_points": round((baseline.quality - measured.quality) * 100, 2),
            "throughput_per_s": measured.measurement["throughput_per_s"],
            "measurement": measured.measurement,
            "confirmed": result.confirmed,
            "load_average_1min_after": round(os.getloadavg()[0], 2),
        }
    return summary


def measure_peers(workdir: Path, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for index, (label, pairs) in enumerate(PEERS.items()):
        if quick and label not in QUICK_PEERS:
            continue
        folder = workdir / f"peer-{index}"
        steps = tuple(Step(name, dict(config)) for name, config in pairs)
        slimformer.apply("default", Recipe(steps=steps, task=SPEC), out=folder)
        measured = slimformer.benchmark(folder, task=SPEC)
        rows.append(
            {
                "label": label,
                "probe_accuracy": measured.quality,
                "throughput_per_s": measured.measurement["throughput_per_s"],
                "measurement": measured.measurement,
            }
        )
        print(f"{label:<60} {rows[-1]['throughput_per_s']:.1f}/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--time-budget", default=None, help="each study's (default 20m)")
    parser.add_argument(
        "--quick", action="store_true", help="a check: 5m studies (unless told), two peers"
    )
    parser.add_argument("--confirm-rounds", type=int, default=3)
    parser.add_argument("--runs", type=Path, default=Path("runs/search-efficiency"))
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args()
    # The baseline alone (timing and scoring MiniLM) takes over 2 minutes on a busy machine.
    budget = args.time_budget or ("5m" if args.quick else "20m")
    confirm = 0 if args.quick else args.confirm_rounds
    started = time.time()
    studies = {
        name: run_study(args.runs / name, budget, switches, confirm)
        for name, switches in MODES.items()
    }
    with tempfile.TemporaryDirectory(prefix="slimformer-efficiency-") as tmp:
        peers = measure_peers(Path(tmp), args.quick)
    best = max(peers, key=lambda r: r["throughput_per_s"])
    for study in studies.values():
        chosen = study["chosen"]
        if chosen is not None:
            chosen["throughput_vs_best_peer"] = round(
                chosen["throughput_per_s"] / best["throughput_per_s"], 3
            )
    off, on = studies["no_early_stop_no_reuse"], studies["default"]
    ratio = on["trials_evaluated_per_hour"] / max(off["trials_evaluated_per_hour"], 1e-9)
    chosen = on["chosen"] or {}
    result = {
        "command": " ".join(["python bench/search_efficiency.py", *sys.argv[1:]]),
        "machine": machine(),
        "workload": "all-MiniLM-L6-v2, the default embedding study: `optimize default "
        f"--max-drop 1% --objective throughput --time-budget {budget}`, once with "
        "--no-early-stop --no-reuse-trained, then by default; throughput at batch 32 on movie "
        "reviews at real lengths, by slimformer.benchmark in a fresh process",
        "studies": studies,
        "peers": peers,
        "best_peer": best["label"],
        "trials_per_hour_ratio": round(ratio, 2),
        "target": {
            "trials_per_hour_ratio_at_least": TARGET_TRIALS_RATIO,
            "throughput_vs_best_peer_at_least": TARGET_VS_BEST_PEER,
            "drop_points_at_most": MAX_DROP * 100,
        },
        "meets_target": bool(
            ratio >= TARGET_TRIALS_RATIO
            and chosen.get("throughput_vs_best_peer", 0) >= TARGET_VS_BEST_PEER
            and chosen.get("drop_points", 100) <= MAX_DROP * 100 + 1e-9
        ),
        "wall_seconds": round(time.time() - started, 1),
    }
    path = write_result("search_efficiency" + ("_quick" if args.quick else ""), result, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
