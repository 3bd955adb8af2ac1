"""Low-rank factorization (`factorize.lowrank`): what each method costs at each budget, and
whether the study does better with it.

    python bench/lowrank.py                 # everything -> bench/results/lowrank.json
    python bench/lowrank.py --parts minilm  # one part -> bench/results/lowrank_minilm.json
    python bench/lowrank.py --quick         # smoke run -> bench/results/lowrank_quick.json

- minilm: the embedding task, each method (svd, asvd, whiten, fisher) at 10/20/30/40% of the
  attention and FFN weights removed (uniform allocation, the default), without and with 100
  distillation steps: probe accuracy, batch-1 latency, throughput; whitening with the global
  allocation too. These rows switch the speed check off, so each removes its budget and shows
  what that fraction costs and gains; `whiten + speed check` rows show what the pass does by
  default (matrices whose pair is not faster here stay dense).
- smollm2: held-out Wikipedia perplexity at 10/20% removed per method, uniform ranks, and
  whitening with the global allocation too (SVD-LLM reports whitening far ahead of plain SVD
  on LLaMA).
- study: `optimize default --max-drop 1%` over pruning, distillation, int8 and the runtimes,
  once without and once with `factorize.lowrank`, the same time budget each; the chosen
  models side by side.

Rows are replayed with `slimformer.apply` and measured by `slimformer.benchmark` in fresh
processes; the baseline is measured at the start, middle and end and ratios use its median.
The GEMM timing cache is emptied first, so every speed decision is measured in this run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import (
    machine,
    measure_baseline,
    measure_recipe,
    quality_drop,
    ratios,
    summarize,
    trial_summary,
    write_result,
)

import slimformer
from slimformer.files import cache_dir
from slimformer.passes.lowrank_timing import CACHE_FILE
from slimformer.recipe import Step
from slimformer.tasks import TaskSpec

METHODS = ("svd", "asvd", "whiten", "fisher")
DISTILL = {"steps": 100, "lr": 1e-4, "time_budget_s": 540.0}
MINILM_FIGURES = (
    "latency_ms_median",
    "latency_ms_p90",
    "throughput_per_s",
    "parameters",
    "gflops_per_input",
)
SMOLLM2_FIGURES = (
    "latency_ms_median",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "parameters",
    "gflops_per_input",
)
# Both studies search these; the second adds factorize.lowrank.
STUDY_PASSES = (
    "prune.ffn",
    "prune.heads",
    "recover.distill",
    "quantize.dynamic_int8",
    "runtime.onnxruntime",
    "runtime.openvino",
)


def lowrank(method: str, budget: float, **extra: Any) -> Step:
    return Step("factorize.lowrank", {"method": method, "budget": budget, **extra})


def minilm_rows(quick: bool) -> dict[str, tuple[Step, ...]]:
    methods = ("svd", "whiten") if quick else METHODS
    budgets = (0.3,) if quick else (0.1, 0.2, 0.3, 0.4)
    rows: dict[str, tuple[Step, ...]] = {}
    for budget in budgets:
        for method in methods:
            steps = (lowrank(method, budget, speed_check=False),)
            rows[f"{method} {budget:.0%}"] = steps
            if not quick:
                rows[f"{method} {budget:.0%} + distill 100"] = steps + (
                    Step("recover.distill", DISTILL),
                )
        if not quick:
            rows[f"whiten {budget:.0%} global"] = (
                lowrank("whiten", budget, allocation="global", speed_check=False),
            )
        rows[f"whiten {budget:.0%} + speed check"] = (lowrank("whiten", budget),)
    return rows


def smollm2_rows(quick: bool) -> dict[str, tuple[Step, ...]]:
    methods = ("svd", "whiten") if quick else METHODS
    budgets = (0.2,) if quick else (0.1, 0.2)
    rows = {}
    for budget in budgets:
        for method in methods:
            # The global allocation only for whitening: on MiniLM it lost to uniform at every
            # budget (lowrank_minilm.json), and each SmolLM2 row costs minutes.
            for allocation in ("uniform", "global") if method == "whiten" else ("uniform",):
                steps = (lowrank(method, budget, allocation=allocation, speed_check=False),)
                rows[f"{method} {budget:.0%} {allocation}"] = steps
    return rows


def measure_rows(
    model: str,
    spec: TaskSpec,
    rows: dict[str, tuple[Step, ...]],
    figures: tuple[str, ...],
    bounded: bool,
    threads: int | None,
) -> dict:
    baselines = [measure_baseline(model, spec, threads)]
    results = []
    with tempfile.TemporaryDirectory(prefix="slimformer-lowrank-bench-") as tmp:
        for index, (label, steps) in enumerate(rows.items()):
            if index == len(rows) // 2:
                baselines.append(measure_baseline(model, spec, threads))
            measured = measure_recipe(model, steps, spec, Path(tmp) / f"r{index}", threads)
            factorize = next(
                s["resolved"] for s in measured["steps"] if s["pass"] == "factorize.lowrank"
            )
            measured |= {
                "row": label,
                "drop": quality_drop(baselines[0]["quality"], measured["quality"], bounded),
                "removed_fraction": factorize.get("removed_fraction", 0.0),
                "factorized": factorize.get("factorized", 0),
            }
            results.append(measured)
            m = measured["measurement"]
            print(
                f"{label:<32} quality={measured['quality']:.4f} drop={measured['drop']:+.4f} "
                f"removed={measured['removed_fraction']:.3f} "
                + " ".join(f"{k}={m.get(k)}" for k in figures),
                flush=True,
            )
    baselines.append(measure_baseline(model, spec, threads))
    baseline = summarize(baselines, figures) | {"quality": baselines[0]["quality"]}
    for result in results:
        result["ratio_to_baseline"] = ratios(baseline, result["measurement"], figures)
    return {"model": model, "task": spec.name, "baseline": baseline, "rows": results}


def study(name: str, passes: tuple[str, ...], time_budget: str, out: Path) -> dict:
    result = slimformer.optimize(
        "default",
        task="embedding",
        max_drop="1%",
        trials=200,
        time_budget=time_budget,
        out=out / name,
        overwrite=True,
        passes=list(passes),
    )
    chosen = result.chosen
    return {
        "passes": list(passes),
        "chosen": None
        if chosen is None
        else {
            "trial": chosen.number,
            "recipe": chosen.description,
            "probe_accuracy": chosen.quality,
            "drop_points": round(chosen.drop * 100, 2),
            "measurement": chosen.measurement,
        },
        "met_max_drop": result.met_budget,
        "trials": [trial_summary(t) for t in result.trials],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parts", default="minilm,smollm2,study")
    parser.add_argument("--quick", action="store_true", help="two methods, one budget")
    parser.add_argument("--study-budget", default="30m", help="time budget of each study")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-lowrank"))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of the measured rows (default: every core, as users run)",
    )
    args = parser.parse_args()
    parts = args.parts.split(",")
    if args.quick and "study" in parts:
        parts.remove("study")  # two 30-minute studies are no smoke run

    if args.threads:
        torch.set_num_threads(args.threads)  # the speed check times at the served threads
    started = time.time()
    (cache_dir() / CACHE_FILE).unlink(missing_ok=True)
    result: dict[str, Any] = {
        "command": "python bench/lowrank.py"
        + (f" --parts {args.parts}" if args.parts != "minilm,smollm2,study" else "")
        + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else ""),
        "machine": machine(),
    }
    if "minilm" in parts:
        result["minilm"] = measure_rows(
            "default",
            TaskSpec(name="embedding"),
            minilm_rows(args.quick),
            MINILM_FIGURES,
            True,
            args.threads,
        )
    if "smollm2" in parts:
        result["smollm2"] = measure_rows(
            "smollm2",
            TaskSpec(name="perplexity"),
            smollm2_rows(args.quick),
            SMOLLM2_FIGURES,
            False,
            args.threads,
        )
    if "study" in parts:
        without = study("without", STUDY_PASSES, args.study_budget, args.out)
        with_lowrank = study(
            "with", STUDY_PASSES + ("factorize.lowrank",), args.study_budget, args.out
        )
        result["study"] = {"without_lowrank": without, "with_lowrank": with_lowrank}
        for label, block in result["study"].items():
            chosen = block["chosen"] or {}
            print(
                label, chosen.get("recipe"), chosen.get("measurement", {}).get("latency_ms_median")
            )
    result["wall_seconds"] = round(time.time() - started, 1)
    name = "lowrank" + ("_quick" if args.quick else "")
    if args.parts != "minilm,smollm2,study":
        name += "_" + "_".join(args.parts.split(","))  # a part alone: its own file
    path = write_result(name, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
