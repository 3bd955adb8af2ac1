"""The default job's benchmark: baseline vs the chosen model, side by side, from one run.

Runs `optimize` on the default model and task, then measures the fp32 baseline and the chosen
model alternately (each in a fresh process, several rounds, median per figure) at the real
sentence lengths and at a fixed 128 tokens, and writes bench/results/default_job.json.

    make bench        # or: .venv/bin/python bench/default_job.py [--trials N]

    # the study with structured pruning, distillation and int8 (issue 3's figure):
    python bench/default_job.py --name study_prune_distill_int8 --trials 24 --time-budget 30m \
        --passes prune.ffn,prune.heads,recover.distill,quantize.dynamic_int8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import machine, ratios, trial_summary, write_result

import slimformer
from slimformer.report import RichReporter

FIGURES = (
    "latency_ms_median",
    "latency_ms_p90",
    "throughput_per_s",
    "peak_memory_mb",
    "size_mb",
    "parameters",
    "gflops_per_input",
)


def median_or_none(values: list) -> float | None:
    """None where a figure is not measured (FLOPs inside ONNX Runtime or OpenVINO)."""
    return None if None in values else statistics.median(values)


def measure(model: str, rounds: int, seq_len: int | None) -> dict:
    """Median of each figure over `rounds` fresh-process benchmarks."""
    runs = [slimformer.benchmark(model, seq_len=seq_len) for _ in range(rounds)]
    return {
        "quality": runs[0].quality,
        "details": runs[0].details,
        "measurement": {key: median_or_none([r.measurement[key] for r in runs]) for key in FIGURES}
        | {k: runs[0].measurement[k] for k in ("threads", "batch_size", "mean_tokens")},
        "rounds": [r.measurement for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-default"))
    parser.add_argument(
        "--passes",
        default="prune.layers,quantize.dynamic_int8",
        help="passes the study searches (the first slice's pair by default, so the figures "
        "stay comparable run to run)",
    )
    parser.add_argument("--time-budget", default=None, help="stop the study after e.g. 45m")
    parser.add_argument(
        "--name", default="default_job", help="results file: bench/results/NAME.json"
    )
    args = parser.parse_args()

    started = time.time()
    with RichReporter() as reporter:
        study = slimformer.optimize(
            "default",
            task="embedding",
            max_drop="1%",
            trials=args.trials,
            time_budget=args.time_budget,
            out=args.out,
            overwrite=True,
            passes=args.passes.split(","),
            reporter=reporter,
        )
    assert study.best_dir is not None and study.chosen is not None
    side_by_side = {}
    for label, seq_len in (("real_lengths", None), ("fixed_128_tokens", 128)):
        baseline = measure("default", args.rounds, seq_len)
        chosen = measure(str(study.best_dir), args.rounds, seq_len)
        side_by_side[label] = {
            "baseline": baseline,
            "chosen": chosen,
            "ratio_chosen_over_baseline": ratios(
                baseline["measurement"], chosen["measurement"], FIGURES
            ),
            "probe_accuracy_drop_points": round((baseline["quality"] - chosen["quality"]) * 100, 2),
        }
    result = {
        "job": "slimformer optimize default --task embedding --max-drop 1% "
        f"--trials {args.trials} --passes {args.passes}"
        + (f" --time-budget {args.time_budget}" if args.time_budget else ""),
        "command": f"python bench/default_job.py --trials {args.trials} --rounds {args.rounds} "
        f"--passes {args.passes} --name {args.name}"
        + (f" --time-budget {args.time_budget}" if args.time_budget else ""),
        "machine": machine(),
        "chosen": {
            "trial": study.chosen.number,
            "recipe": study.chosen.description,
            "met_max_drop": study.met_budget,
        },
        "pareto_front": [
            {
                "trial": t.number,
                "recipe": t.description,
                "probe_accuracy": t.quality,
                "drop_points": round(t.drop * 100, 2),
                "latency_ms_median": t.measurement["latency_ms_median"],
                "throughput_per_s": t.measurement["throughput_per_s"],
            }
            for t in study.trials
            if t.number in study.pareto
        ],
        "trials": [trial_summary(t) for t in study.trials],
        "side_by_side": side_by_side,
        "wall_seconds": round(time.time() - started, 1),
    }
    path = write_result(args.name, result)
    for label, block in side_by_side.items():
        print(
            label,
            json.dumps(block["ratio_chosen_over_baseline"]),
            "drop",
            block["probe_accuracy_drop_points"],
            "pt",
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
