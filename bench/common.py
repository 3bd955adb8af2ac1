"""What the benchmark scripts share: replaying a recipe the user's way, measuring it in a fresh
process, the baseline's median over a run, ratios, and writing bench/results/NAME.json."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import slimformer
from slimformer.recipe import Recipe, Step
from slimformer.tasks import TaskSpec

RESULTS = Path(__file__).resolve().parent / "results"
LOWER_IS_BETTER = (
    "latency_ms_median",
    "latency_ms_p90",
    "peak_memory_mb",
    "size_mb",
    "parameters",
    "gflops_per_input",
)


def batch_size_for(spec: TaskSpec) -> int:
    # Decoder windows are 256 tokens: batches of 8 keep a throughput run near 10 s.
    return 8 if spec.name == "perplexity" else 32


def measure_recipe(
    model: str, steps: tuple[Step, ...], spec: TaskSpec, workdir: Path, threads: int | None = None
) -> dict:
    """`slimformer.apply` then `slimformer.benchmark` (fresh process) on the saved result."""
    recipe = Recipe(steps=steps, task=spec, seed=0)
    started = time.time()
    applied = slimformer.apply(model, recipe, out=workdir / "model")
    apply_seconds = time.time() - started
    result = slimformer.benchmark(
        workdir / "model", task=spec, batch_size=batch_size_for(spec), threads=threads
    )
    return {
        "recipe": recipe.describe(),
        "quality": result.quality,
        "details": result.details,
        "measurement": result.measurement,
        "apply_seconds": round(apply_seconds, 1),
        "steps": applied.recipe.to_dict()["steps"],
    }


def measure_baseline(model: str, spec: TaskSpec, threads: int | None = None) -> dict:
    result = slimformer.benchmark(
        model, task=spec, batch_size=batch_size_for(spec), threads=threads
    )
    return {"quality": result.quality, "details": result.details, **result.measurement}


def baseline_result(baseline: dict) -> dict:
    """`measure_baseline`'s figures in `measure_recipe`'s shape."""
    measurement = {k: v for k, v in baseline.items() if k not in ("quality", "details")}
    return {
        "quality": baseline["quality"],
        "details": baseline["details"],
        "measurement": measurement,
    }


def summarize(baselines: list[dict], figures: tuple[str, ...]) -> dict:
    """Median of each figure over the baseline's measurements, with their spread."""
    return {key: statistics.median(b[key] for b in baselines) for key in figures} | {
        "spread": {key: [b[key] for b in baselines] for key in figures}
    }


def ratios(baseline: dict, measurement: dict, figures: tuple[str, ...]) -> dict[str, float]:
    """How many times better than the baseline (>1 = better), per figure."""
    out = {}
    for key in figures:
        value = measurement.get(key)
        if value is None or not baseline.get(key):
            continue
        better = baseline[key] / value if key in LOWER_IS_BETTER else value / baseline[key]
        out[key] = round(better, 3)
    return out


def quality_drop(baseline_quality: float, quality: float, bounded: bool) -> float:
    """Points for accuracy-type scores, relative increase for perplexity."""
    return baseline_quality - quality if bounded else quality / baseline_quality - 1


def machine() -> dict[str, Any]:
    """The CPU and the instruction sets that decide which int8/bf16 kernels are fast."""
    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {
        "cpu": model,
        "isa": [f for f in wanted if f in flags],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def trial_summary(t: Any) -> dict:
    """One study trial (a TrialRecord) as a results row."""
    return {
        "trial": t.number,
        "recipe": t.description,
        "state": t.state,
        "duplicate_of": t.duplicate_of,
        "probe_accuracy": t.quality,
        "drop_points": None if t.drop is None else round(t.drop * 100, 2),
        "latency_ms_median": (t.measurement or {}).get("latency_ms_median"),
        "throughput_per_s": (t.measurement or {}).get("throughput_per_s"),
        "error": t.error,
    }


def write_result(name: str, result: dict, folder: Path | None = None) -> Path:
    path = (folder or RESULTS) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def side_by_side_arguments(description: str | None, out: Path) -> argparse.Namespace:
    """The options of a script that times a few rows side by side: readings per row, which rows
    (`--only`, a part of their label, repeatable), where the JSON goes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--only", action="append", default=[], help="rows whose label contains this (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=out)
    return parser.parse_args()


def only_rows(rows: dict[str, Any], only: list[str]) -> dict[str, Any]:
    """The rows whose label contains one of `only`; all of them when it is empty."""
    return {label: row for label, row in rows.items() if not only or any(o in label for o in only)}


def side_by_side_command(script: str, args: argparse.Namespace) -> str:
    """The command line that reproduces a side-by-side run (its rows and readings)."""
    only = "".join(f' --only "{o}"' for o in args.only)
    return f"python bench/{script}{only} --rounds {args.rounds}"
