"""Structured pruning with and without distillation: what each kept fraction and criterion costs.

    python bench/structured_pruning.py minilm     # -> bench/results/pruning_minilm.json
    python bench/structured_pruning.py smollm2    # -> bench/results/pruning_smollm2.json
    python bench/structured_pruning.py minilm --quick   # a small grid, for a smoke run

Every row is a recipe replayed by `slimformer.apply` (the user's path), saved, then scored and
timed by `slimformer.benchmark` in a fresh process. The fp32 baseline is measured at the start,
middle and end of the same run and ratios use its median, so drift of the machine during the
run shows up in the baseline's spread (recorded) rather than in one row's ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    machine,
    measure_baseline,
    measure_recipe,
    quality_drop,
    ratios,
    summarize,
    write_result,
)

from slimformer.recipe import Step
from slimformer.tasks import TaskSpec

ROOT = Path(__file__).resolve().parent
CRITERIA = ("magnitude", "activation", "taylor", "fisher")
LAYER_CRITERIA = ("block_influence", "removal_change")


@dataclass(frozen=True)
class Row:
    label: str  # the structure, e.g. "ffn keep 0.5"
    steps: tuple[Step, ...]
    criterion: str
    distilled: bool


def structure(label: str, criterion: str, *steps: tuple[str, dict[str, Any]]) -> Row:
    return Row(label, tuple(Step(name, config) for name, config in steps), criterion, False)


def with_distillation(row: Row, distill: dict[str, Any]) -> Row:
    return Row(row.label, row.steps + (Step("recover.distill", distill),), row.criterion, True)


def minilm_grid(quick: bool) -> list[Row]:
    fractions = (0.5,) if quick else (0.75, 0.5)
    criteria = ("activation", "taylor") if quick else CRITERIA
    rows = []
    for keep in fractions:
        rows += [
            structure(f"ffn keep {keep}", c, ("prune.ffn", {"keep": keep, "criterion": c}))
            for c in criteria
        ]
        rows += [
            structure(f"heads keep {keep}", c, ("prune.heads", {"keep": keep, "criterion": c}))
            for c in criteria
        ]
    for count in (1,) if quick else (1, 2):
        rows += [
            structure(f"layers -{count}", c, ("prune.layers", {"count": count, "criterion": c}))
            for c in LAYER_CRITERIA
        ]
    # Combinations aimed at the >=1.5x throughput target; FFN dominates MiniLM's FLOPs.
    rows.append(
        structure(
            "ffn keep 0.5 + heads keep 0.5",
            "activation",
            ("prune.ffn", {"keep": 0.5, "criterion": "activation"}),
            ("prune.heads", {"keep": 0.5, "criterion": "activation"}),
        )
    )
    if not quick:
        rows.append(
            structure(
                "ffn keep 0.4 (global) + heads keep 0.75",
                "activation",
                ("prune.ffn", {"keep": 0.4, "criterion": "activation", "allocation": "global"}),
                ("prune.heads", {"keep": 0.75, "criterion": "activation"}),
            )
        )
        rows.append(
            structure(
                "layers -1 + ffn keep 0.5",
                "activation",
                ("prune.layers", {"count": 1, "criterion": "block_influence"}),
                ("prune.ffn", {"keep": 0.5, "criterion": "activation"}),
            )
        )
    return rows


def smollm2_grid(quick: bool) -> list[Row]:
    # SmolLM2-135M has 30 blocks: 10/20/30% = 3/6/9 blocks; FFN keep 0.9/0.8/0.7.
    percents = (20,) if quick else (10, 20, 30)
    rows = []
    for percent in percents:
        rows.append(
            structure(
                f"layers -{percent}%",
                "block_influence",
                ("prune.layers", {"count": percent * 30 // 100, "criterion": "block_influence"}),
            )
        )
        keep = round(1 - percent / 100, 2)
        rows.append(
            structure(
                f"ffn -{percent}%",
                "activation",
                ("prune.ffn", {"keep": keep, "criterion": "activation"}),
            )
        )
    return rows


def best_per_structure(results: list[dict]) -> dict[str, dict]:
    """The criterion that kept the most quality for each structure (before distillation)."""
    best: dict[str, dict] = {}
    for result in results:
        current = best.get(result["structure"])
        if current is None or result["drop"] < current["drop"]:
            best[result["structure"]] = result
    return best


def run_row(
    model: str, row: Row, spec: TaskSpec, workdir: Path, baseline_quality: float, bounded: bool
) -> dict:
    measured = measure_recipe(model, row.steps, spec, workdir)
    distill = next((s["resolved"] for s in measured["steps"] if s["pass"] == "recover.distill"), {})
    return {
        "structure": row.label,
        "criterion": row.criterion,
        "distilled": row.distilled,
        "drop": quality_drop(baseline_quality, measured["quality"], bounded),
        "distill": distill,
        **measured,
    }


def run(
    model: str,
    spec: TaskSpec,
    grid: list[Row],
    distill: dict[str, Any],
    distill_rows: Callable[[list[dict]], list[Row]],
    bounded: bool,
    figures: tuple[str, ...],
    log: Callable[[str], None],
) -> dict:
    baselines = [measure_baseline(model, spec)]
    baseline_quality = baselines[0]["quality"]
    log(f"baseline quality {baseline_quality:.4f}")
    results = []
    with tempfile.TemporaryDirectory(prefix="slimformer-prune-bench-") as tmp:
        for index, row in enumerate(grid):
            results.append(
                run_row(model, row, spec, Path(tmp) / f"r{index}", baseline_quality, bounded)
            )
            log(_line(results[-1]))
        baselines.append(measure_baseline(model, spec))
        for index, row in enumerate(distill_rows(results)):
            row = with_distillation(row, distill)
            results.append(
                run_row(model, row, spec, Path(tmp) / f"d{index}", baseline_quality, bounded)
            )
            log(_line(results[-1]))
    baselines.append(measure_baseline(model, spec))
    baseline = summarize(baselines, figures)
    for result in results:
        result["ratio_to_baseline"] = ratios(baseline, result["measurement"], figures)
    return {"baseline": baseline | {"quality": baseline_quality}, "rows": results}


def _line(result: dict) -> str:
    m = result["measurement"]
    return (
        f"{result['structure']:<40} {result['criterion']:<16} distilled={result['distilled']!s:<5} "
        f"quality={result['quality']:.4f} drop={result['drop']:+.4f} "
        f"lat={m['latency_ms_median']:.2f}ms thr={m['throughput_per_s']:.1f}/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=("minilm", "smollm2"))
    parser.add_argument("--quick", action="store_true", help="a small grid (smoke run)")
    parser.add_argument("--distill-steps", type=int, default=None)
    parser.add_argument("--distill-seconds", type=float, default=None)
    args = parser.parse_args()

    started = time.time()
    if args.model == "minilm":
        model, spec, bounded = "default", TaskSpec(name="embedding"), True
        grid = minilm_grid(args.quick)
        distill = {
            "steps": args.distill_steps or (20 if args.quick else 300),
            "lr": 1e-4,
            "time_budget_s": args.distill_seconds or 540.0,
        }
        figures = (
            "latency_ms_median",
            "latency_ms_p90",
            "throughput_per_s",
            "peak_memory_mb",
            "size_mb",
            "parameters",
        )

        def distill_rows(results: list[dict]) -> list[Row]:
            # Distil the best criterion of every structure: the search would pick it too.
            best = best_per_structure(results)
            return [r for r in grid if best[r.label]["criterion"] == r.criterion]
    else:
        model, spec, bounded = "smollm2", TaskSpec(name="perplexity"), False
        grid = smollm2_grid(args.quick)
        distill = {
            "steps": args.distill_steps or (10 if args.quick else 400),
            "lr": 1e-4,
            "time_budget_s": args.distill_seconds or (60.0 if args.quick else 300.0),
        }
        figures = (
            "latency_ms_median",
            "throughput_per_s",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "peak_memory_mb",
            "size_mb",
            "parameters",
        )

        def distill_rows(results: list[dict]) -> list[Row]:
            return list(grid)

    result = run(model, spec, grid, distill, distill_rows, bounded, figures, print)
    result |= {
        "model": model,
        "task": spec.name,
        "distillation": distill,
        "command": f"python bench/structured_pruning.py {args.model}"
        + (" --quick" if args.quick else "")
        + (f" --distill-steps {args.distill_steps}" if args.distill_steps else "")
        + (f" --distill-seconds {args.distill_seconds:g}" if args.distill_seconds else ""),
        "machine": machine(),
        "wall_seconds": round(time.time() - started, 1),
    }
    path = write_result(f"pruning_{args.model}" + ("_quick" if args.quick else ""), result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
