"""Quantization modes side by side, each against the fp32 baseline of the same run.

    python bench/quantization.py smollm2   # -> bench/results/quantization_smollm2.json
    python bench/quantization.py minilm    # -> bench/results/quantization_minilm.json
    python bench/quantization.py minilm --quick

SmolLM2-135M: held-out Wikipedia perplexity, batch-1 prefill and decode tokens/s, peak memory
and size for dynamic int8, weight-only int8 and int4 (round-to-nearest vs GPTQ, groups of 32
and 128). MiniLM: probe accuracy, fidelity, latency and throughput of the int8 modes, with and
without the sensitivity-driven float layers. Rows are replayed with `slimformer.apply` and
measured by `slimformer.benchmark` in fresh processes; the baseline is measured at the start,
middle and end and its median is the reference.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

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

ROWS = {
    "smollm2": {
        "dynamic int8 (per-channel)": [("quantize.dynamic_int8", {"per_channel": True})],
        "weight-only int8 RTN": [("quantize.weight_only", {"bits": 8, "method": "rtn"})],
        "int4 RTN g128": [
            ("quantize.weight_only", {"bits": 4, "group_size": 128, "method": "rtn"})
        ],
        "int4 GPTQ g128": [
            ("quantize.weight_only", {"bits": 4, "group_size": 128, "method": "gptq"})
        ],
        "int4 RTN g32": [("quantize.weight_only", {"bits": 4, "group_size": 32, "method": "rtn"})],
        "int4 GPTQ g32": [
            ("quantize.weight_only", {"bits": 4, "group_size": 32, "method": "gptq"})
        ],
        "bf16": [("cast.half", {"dtype": "bfloat16"})],
    },
    "minilm": {
        "dynamic int8": [("quantize.dynamic_int8", {})],
        "dynamic int8 + 2 sensitive float": [("quantize.dynamic_int8", {"keep_sensitive": 2})],
        "dynamic int8 per-channel": [("quantize.dynamic_int8", {"per_channel": True})],
        "static int8 minmax": [("quantize.static_int8", {"observer": "minmax"})],
        "static int8 percentile": [("quantize.static_int8", {"observer": "percentile"})],
        "static int8 mse": [("quantize.static_int8", {"observer": "mse"})],
        "smoothed (a=0.5) static int8 mse": [
            ("quantize.smooth", {"alpha": 0.5}),
            ("quantize.static_int8", {"observer": "mse"}),
        ],
        "smoothed (a=0.8) static int8 mse": [
            ("quantize.smooth", {"alpha": 0.8}),
            ("quantize.static_int8", {"observer": "mse"}),
        ],
        "smoothed (a=0.5) static int8 mse + 2 sensitive float": [
            ("quantize.smooth", {"alpha": 0.5}),
            ("quantize.static_int8", {"observer": "mse", "keep_sensitive": 2}),
        ],
        "weight-only int8 GPTQ": [("quantize.weight_only", {"bits": 8, "method": "gptq"})],
        "int4 GPTQ g32": [
            ("quantize.weight_only", {"bits": 4, "group_size": 32, "method": "gptq"})
        ],
        "bf16": [("cast.half", {"dtype": "bfloat16"})],
    },
}
QUICK = {
    "smollm2": ("int4 RTN g128", "int4 GPTQ g128"),
    "minilm": ("dynamic int8", "smoothed (a=0.5) static int8 mse"),
}
FIGURES = {
    "smollm2": (
        "latency_ms_median",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_memory_mb",
        "size_mb",
    ),
    "minilm": (
        "latency_ms_median",
        "latency_ms_p90",
        "throughput_per_s",
        "peak_memory_mb",
        "size_mb",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=tuple(ROWS))
    parser.add_argument("--quick", action="store_true", help="two rows (smoke run)")
    args = parser.parse_args()

    started = time.time()
    model, spec, bounded = (
        ("smollm2", TaskSpec(name="perplexity"), False)
        if args.model == "smollm2"
        else ("default", TaskSpec(name="embedding"), True)
    )
    figures = FIGURES[args.model]
    rows = {
        label: steps
        for label, steps in ROWS[args.model].items()
        if not args.quick or label in QUICK[args.model]
    }
    baselines = [measure_baseline(model, spec)]
    results = []
    with tempfile.TemporaryDirectory(prefix="slimformer-quant-bench-") as tmp:
        for index, (label, steps) in enumerate(rows.items()):
            if index == len(rows) // 2:
                baselines.append(measure_baseline(model, spec))
            measured = measure_recipe(
                model, tuple(Step(n, c) for n, c in steps), spec, Path(tmp) / f"r{index}"
            )
            measured["mode"] = label
            measured["drop"] = quality_drop(baselines[0]["quality"], measured["quality"], bounded)
            results.append(measured)
            m = measured["measurement"]
            print(
                f"{label:<45} quality={measured['quality']:.4f} drop={measured['drop']:+.4f} "
                + " ".join(f"{k}={m.get(k)}" for k in figures)
            )
    baselines.append(measure_baseline(model, spec))
    baseline = summarize(baselines, figures) | {"quality": baselines[0]["quality"]}
    for result in results:
        result["ratio_to_baseline"] = ratios(baseline, result["measurement"], figures)
    command = f"python bench/quantization.py {args.model}" + (" --quick" if args.quick else "")
    path = write_result(
        f"quantization_{args.model}" + ("_quick" if args.quick else ""),
        {
            "model": model,
            "task": spec.name,
            "command": command,
            "machine": machine(),
            "baseline": baseline,
            "rows": results,
            "wall_seconds": round(time.time() - started, 1),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
