"""Which technique pays off on which instruction sets: every row measured natively and with
the dispatch forced down to AVX2, each against the fp32 baseline of its own dispatch level.

    python bench/isa.py            # -> bench/results/isa.json (about 45 minutes on 2 cores)
    python bench/isa.py --quick    # two rows, both levels (smoke run)

MiniLM on the embedding task (movie-review sentences at real lengths): probe accuracy,
fidelity, batch-1 latency and batch-32 throughput of the int8, int4 and bf16 modes in PyTorch,
ONNX Runtime and OpenVINO. The forced level runs in a child process started with
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2
OV_CPU_MAX_ISA=AVX2`, so everything it starts inherits them. Those caps reach PyTorch's own
kernels (int4 packing), oneDNN (static int8, bf16 matmuls), fbgemm (dynamic int8) and
OpenVINO's CPU plugin; ONNX Runtime's MLAS reads the CPU's features itself and is not
lowered, so its figures under "avx2" are still this CPU's (each row names its engine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, measure_baseline, measure_recipe, ratios, summarize, write_result

from slimformer.cpu import fingerprint
from slimformer.recipe import Step
from slimformer.tasks import TaskSpec

FORCED_AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "OV_CPU_MAX_ISA": "AVX2",
}
# label -> (steps, the engine whose kernels run it, whether the forced caps reach that engine)
ROWS: dict[str, tuple[list[tuple[str, dict]], str, bool]] = {
    "PyTorch dynamic int8": ([("quantize.dynamic_int8", {})], "fbgemm", True),
    "PyTorch static int8 (MSE observer)": (
        [("quantize.static_int8", {"observer": "mse"})],
        "oneDNN",
        True,
    ),
    "PyTorch weight-only int8": (
        [("quantize.weight_only", {"bits": 8, "method": "rtn"})],
        "aten",
        True,
    ),
    "PyTorch weight-only int4 g32": (
        [("quantize.weight_only", {"bits": 4, "group_size": 32, "method": "rtn"})],
        "aten",
        True,
    ),
    "PyTorch bf16": ([("cast.half", {"dtype": "bfloat16"})], "oneDNN/aten", True),
    "ONNX Runtime fp32 (fused)": ([("runtime.onnxruntime", {})], "ONNX Runtime MLAS", False),
    "ONNX Runtime dynamic int8": (
        [("runtime.onnxruntime", {"int8": "dynamic"})],
        "ONNX Runtime MLAS",
        False,
    ),
    "OpenVINO f32": ([("runtime.openvino", {})], "OpenVINO CPU plugin", True),
    "OpenVINO NNCF int8": ([("runtime.openvino", {"int8": "nncf"})], "OpenVINO CPU plugin", True),
    "OpenVINO bf16": (
        [("runtime.openvino", {"precision": "bf16"})],
        "OpenVINO CPU plugin",
        True,
    ),
}
QUICK = ("PyTorch static int8 (MSE observer)", "PyTorch weight-only int4 g32")
FIGURES = ("latency_ms_median", "latency_ms_p90", "throughput_per_s", "peak_memory_mb")


def measure_level(rows: list[str]) -> dict:
    """Every row at this process's dispatch level, the baseline before, between and after."""
    spec = TaskSpec(name="embedding")
    baselines = [measure_baseline("default", spec)]
    results = []
    with tempfile.TemporaryDirectory(prefix="slimformer-isa-bench-") as tmp:
        for index, label in enumerate(rows):
            if index == len(rows) // 2:
                baselines.append(measure_baseline("default", spec))
            steps, engine, reached = ROWS[label]
            try:
                row = measure_recipe(
                    "default", tuple(Step(n, c) for n, c in steps), spec, Path(tmp) / f"r{index}"
                )
            except Exception as error:  # a mode this level cannot run is a result too
                row = {"recipe": label, "error": f"{type(error).__name__}: {error}"[:300]}
            row |= {"mode": label, "engine": engine, "caps_reach_engine": reached}
            results.append(row)
            print(f"{label:<40} {row.get('quality')} {row.get('measurement', row.get('error'))}")
    baselines.append(measure_baseline("default", spec))
    baseline = summarize(baselines, FIGURES) | {"quality": baselines[0]["quality"]}
    for row in results:
        if "measurement" in row:
            row["drop_points"] = round((baseline["quality"] - row["quality"]) * 100, 2)
            row["ratio_to_baseline"] = ratios(baseline, row["measurement"], FIGURES)
    return {"cpu": fingerprint().to_dict(), "baseline": baseline, "rows": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two rows (smoke run)")
    parser.add_argument("--level-worker", help=argparse.SUPPRESS)  # internal: JSON out path
    args = parser.parse_args()
    rows = [r for r in ROWS if not args.quick or r in QUICK]
    if args.level_worker:
        Path(args.level_worker).write_text(json.dumps(measure_level(rows)))
        return

    started = time.time()
    levels = {}
    with tempfile.TemporaryDirectory(prefix="slimformer-isa-") as tmp:
        for level, forced in (("native", {}), ("avx2", FORCED_AVX2)):
            out = Path(tmp) / f"{level}.json"
            env = {k: v for k, v in os.environ.items() if k not in FORCED_AVX2} | forced
            command = [sys.executable, __file__, "--level-worker", str(out)]
            subprocess.run(command + (["--quick"] if args.quick else []), env=env, check=True)
            levels[level] = json.loads(out.read_text())
    name = "isa_quick" if args.quick else "isa"
    path = write_result(
        name,
        {
            "model": "default",
            "task": "embedding",
            "command": "python bench/isa.py" + (" --quick" if args.quick else ""),
            "machine": machine(),
            "forced_avx2": FORCED_AVX2,
            "levels": levels,
            "wall_seconds": round(time.time() - started, 1),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
