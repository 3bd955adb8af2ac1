"""slimformer against what users serve today, on the default embedding workload, in one run.

    python bench/peers.py                        # study + peers -> bench/results/peers.json
    python bench/peers.py --chosen runs/peers/best   # reuse a finished study's chosen model
    python bench/peers.py --quick --out DIR      # reduced: two peers, no study (the suite)

Workload: all-MiniLM-L6-v2 on the movie-review sentences at their real lengths; batch-1
latency and throughput at batch 32. Peers batch the way their users do (sentence-transformers
sorts by length and pads to the longest in each batch = `bucketed`). Every row is replayed with
`slimformer.apply` and measured by `slimformer.benchmark` in a fresh process.

Rows: PyTorch fp32 eager; PyTorch dynamic int8 (torch.ao `quantize_dynamic` on every block
Linear); the Optimum recipe (ONNX export + ONNX Runtime transformer optimizer + ORT dynamic
int8, done with onnxruntime directly: Optimum's exporter pins an older transformers); OpenVINO
with NNCF int8; and slimformer's chosen model from `optimize --max-drop 1%` with the runtimes
in the search. Also fp32 eager under padded / bucketed / unpadded batching, and the machine's
measured matmul peaks so each engine's achieved GFLOP/s can be read against them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    baseline_result,
    machine,
    measure_baseline,
    measure_recipe,
    trial_summary,
    write_result,
)

import slimformer
from slimformer.recipe import Recipe, Step
from slimformer.tasks import TaskSpec

SPEC = TaskSpec(name="embedding")
PEERS = {
    "PyTorch fp32 eager": (),
    "PyTorch dynamic int8": (("quantize.dynamic_int8", {}),),
    "Optimum recipe: ONNX Runtime + fusions + dynamic int8": (
        ("runtime.onnxruntime", {"optimize": True, "int8": "dynamic"}),
    ),
    "OpenVINO + NNCF int8": (("runtime.openvino", {"int8": "nncf"}),),
}
QUICK_PEERS = ("PyTorch fp32 eager", "Optimum recipe: ONNX Runtime + fusions + dynamic int8")
BATCHING = {
    f"fp32 eager, {mode}": (("runtime.batching", {"mode": mode}),)
    for mode in ("padded", "bucketed", "unpadded")
}
STUDY_PASSES = (
    "prune.ffn,prune.heads,recover.distill,quantize.dynamic_int8,"
    "runtime.onnxruntime,runtime.openvino,runtime.batching"
)
# Starting points the study measures first (then its sampler explores): issue 3's best
# structure (FFN and heads halved, distilled) served int8 by OpenVINO and by ONNX Runtime.
HALVED_AND_DISTILLED = (
    ("prune.ffn", {"keep": 0.5, "criterion": "activation"}),
    ("prune.heads", {"keep": 0.5, "criterion": "activation"}),
    ("recover.distill", {"steps": 400, "lr": 1e-4}),
)
STARTS = (
    (*HALVED_AND_DISTILLED, ("runtime.openvino", {"int8": "nncf"})),
    (*HALVED_AND_DISTILLED, ("runtime.onnxruntime", {"optimize": True, "int8": "dynamic"})),
)


def timed_ms(run, seconds: float = 1.0) -> float:
    run()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        run()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def machine_limits(size: int = 2048) -> dict:
    """Peak matmul rates on this machine with the thread count the rows use."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    torch.manual_seed(0)
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp32_ms = timed_ms(lambda: torch.mm(a, b))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "int8_peak",
        [
            helper.make_tensor_value_info("a", TensorProto.UINT8, [size, size]),
            helper.make_tensor_value_info("b", TensorProto.INT8, [size, size]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every ONNX Runtime release reads
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(
        model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    feed = {
        "a": np.random.randint(0, 255, (size, size), dtype=np.uint8),
        "b": np.random.randint(-127, 127, (size, size), dtype=np.int8),
    }
    int8_ms = timed_ms(lambda: session.run(None, feed))
    ops = 2 * size**3
    return {
        "matmul_size": size,
        "threads": torch.get_num_threads(),
        "fp32_gflops_torch": round(ops / fp32_ms / 1e6, 1),
        "int8_gops_onnxruntime_matmulinteger": round(ops / int8_ms / 1e6, 1),
    }


def runs_int8(step: dict) -> bool:
    config = step.get("config") or {}
    return (
        step["pass"] in ("quantize.dynamic_int8", "quantize.static_int8")
        or config.get("int8", "none") != "none"
    )


def row(label: str, kind: str, measured: dict, baseline_gflops: float | None) -> dict:
    m = measured["measurement"]
    # Engines that do not change the architecture do the baseline's FLOPs per input.
    gflops = m.get("gflops_per_input") or (baseline_gflops if kind != "chosen" else None)
    return {
        "label": label,
        "kind": kind,
        "recipe": measured.get("recipe", "baseline"),
        "probe_accuracy": measured["quality"],
        "fidelity": measured["details"].get("cosine_fidelity"),
        "latency_ms_median": m["latency_ms_median"],
        "latency_ms_p90": m["latency_ms_p90"],
        "throughput_per_s": m["throughput_per_s"],
        "peak_memory_mb": m["peak_memory_mb"],
        "size_mb": m["size_mb"],
        "runtime": m.get("runtime"),
        "batching": m.get("batching"),
        "achieved_gflops": round(gflops * m["throughput_per_s"], 1) if gflops else None,
        "steps": measured.get("steps"),
    }


def run_study(budget: str, out: Path) -> Path:
    from slimformer.report import RichReporter

    starts = [Recipe(steps=tuple(Step(n, c) for n, c in s), task=SPEC) for s in STARTS]
    with RichReporter() as reporter:
        study = slimformer.optimize(
            "default",
            task=SPEC,
            max_drop="1%",
            objective="throughput",
            trials=None,
            time_budget=budget,
            out=out,
            overwrite=True,
            passes=STUDY_PASSES.split(","),
            starts=starts,
            reporter=reporter,
        )
    if study.best_dir is None:
        raise SystemExit("the study chose no model")
    return study.out


def study_summary(run_dir: Path) -> dict:
    from slimformer.search.run_folder import read_run

    settings, records = read_run(run_dir)
    pareto_file = run_dir / "pareto.json"
    return {
        "pareto": json.loads(pareto_file.read_text()) if pareto_file.is_file() else None,
        "command": f"slimformer optimize default --task embedding --max-drop 1% "
        f"--objective {settings.objective} --passes {','.join(settings.passes)} "
        f"(+ {len(settings.starts)} start recipes)",
        "trials": [trial_summary(t) for t in records],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two peers, no study, no batching")
    parser.add_argument("--chosen", type=Path, help="a saved model to stand for slimformer's")
    parser.add_argument("--study-budget", default="40m", help="time for the study")
    parser.add_argument("--study-out", type=Path, default=Path("runs/peers"))
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args()

    started = time.time()
    study = None
    chosen_dir = args.chosen
    if not args.quick and chosen_dir is None:
        run_study(args.study_budget, args.study_out)
        chosen_dir = args.study_out / "best"
    if chosen_dir is not None and (chosen_dir.parent / "run.json").is_file():
        study = study_summary(chosen_dir.parent)

    baseline = measure_baseline("default", SPEC)
    baseline_gflops = baseline["gflops_per_input"]
    rows = [row("PyTorch fp32 eager", "peer", {**baseline_result(baseline)}, baseline_gflops)]
    peers = {k: v for k, v in PEERS.items() if not args.quick or k in QUICK_PEERS}
    extra = {} if args.quick else BATCHING
    with tempfile.TemporaryDirectory(prefix="slimformer-peers-") as tmp:
        for index, (label, steps) in enumerate({**peers, **extra}.items()):
            if not steps:
                continue
            measured = measure_recipe(
                "default", tuple(Step(n, c) for n, c in steps), SPEC, Path(tmp) / f"r{index}"
            )
            kind = "peer" if label in peers else "batching"
            rows.append(row(label, kind, measured, baseline_gflops))
            print(label, rows[-1]["throughput_per_s"], rows[-1]["probe_accuracy"])
    if chosen_dir is not None:
        result = slimformer.benchmark(chosen_dir, task=SPEC)
        measured = {
            "recipe": slimformer.load(chosen_dir).recipe.describe(),
            "quality": result.quality,
            "details": result.details,
            "measurement": result.measurement,
        }
        rows.append(row("slimformer chosen (optimize --max-drop 1%)", "chosen", measured, None))
    peer_rows = [r for r in rows if r["kind"] == "peer"]
    best = max(peer_rows, key=lambda r: r["throughput_per_s"])
    fastest = min(peer_rows, key=lambda r: r["latency_ms_median"])
    for r in rows:
        r["throughput_vs_best_peer"] = round(r["throughput_per_s"] / best["throughput_per_s"], 3)
        r["latency_vs_fastest_peer"] = round(
            fastest["latency_ms_median"] / r["latency_ms_median"], 3
        )
        r["throughput_vs_fp32"] = round(r["throughput_per_s"] / rows[0]["throughput_per_s"], 3)
        r["drop_points"] = round((rows[0]["probe_accuracy"] - r["probe_accuracy"]) * 100, 2)
    limits = machine_limits()
    for r in rows:
        if r["achieved_gflops"]:
            # Against the peak of the arithmetic the engine runs: int8 rows vs int8 matmul.
            int8 = any(runs_int8(step) for step in r["steps"] or ())
            peak = limits["int8_gops_onnxruntime_matmulinteger" if int8 else "fp32_gflops_torch"]
            r["achieved_fraction_of_peak"] = round(r["achieved_gflops"] / peak, 3)
            r["peak_compared"] = "int8" if int8 else "fp32"
    command = "python bench/peers.py" + (
        " --quick" if args.quick else f" --study-budget {args.study_budget}"
    )
    path = write_result(
        "peers" + ("_quick" if args.quick else ""),
        {
            "command": command,
            "machine": machine(),
            "machine_limits": limits,
            "workload": "all-MiniLM-L6-v2, movie-review sentences at real lengths, batch-1 "
            "latency and batch-32 throughput; peers bucketed like sentence-transformers",
            "best_peer": best["label"],
            "rows": rows,
            "study": study,
            "wall_seconds": round(time.time() - started, 1),
        },
        args.out,
    )
    for r in rows:
        print(
            f"{r['label']:<55} acc={r['probe_accuracy']:.4f} ({r['drop_points']:+.2f} pt) "
            f"b1={r['latency_ms_median']:.2f}ms thr={r['throughput_per_s']:.1f}/s "
            f"x best peer {r['throughput_vs_best_peer']}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
