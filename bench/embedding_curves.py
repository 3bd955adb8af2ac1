"""How far can structure go on the sentence encoder before the transfer domain gives way?

For each structure (pruned FFN neurons, removed layers, ...) on all-MiniLM-L6-v2: apply it, then
distil it (`recover.distill` with the general-corpus mix and hidden/similarity matching, the
warm-start recipe's settings) and, at each mark of the step count, score the student in fp32 and
served int8 by `--engine` (OpenVINO + NNCF, the best peer on CPUs with VNNI; ONNX Runtime fused +
dynamic int8, the best peer without): probe drop on the scored and the transfer domain, recall@10
of the original's neighbours, cosine fidelity. Then time each structure served by that engine's
int8 against the same engine's int8 of the unpruned model (the best peer of
bench/embedding_transfer.py), one reading each, in the same run. Answers issue 17's question:
which structure reaches 1.5x the best peer while staying within a point on both domains?

    python bench/embedding_curves.py                    # every structure, ~60 min on 2 idle cores
    python bench/embedding_curves.py --only ffn0.7      # one structure; merged into the results
    python bench/embedding_curves.py --speed-only       # only the throughput rows
    python bench/embedding_curves.py --only layers-2 --marks 400,800,1200 --lr 3e-4 \
        --out bench/results/embedding_structure_curves_layers2_lr3e-4.json   # a variant
    python bench/embedding_curves.py --only layers-2 --layer-weight 1 \
        --out bench/results/embedding_structure_curves_layers2_layer_matching.json
    python bench/embedding_curves.py --only layers-2 --neighbour-weight 1 \
        --out bench/results/embedding_structure_curves_layers2_neighbours.json
    python bench/embedding_curves.py --only layers-2 --marks 400,800 --lr 3e-4 \
        --similarity-weight 10 --quality-only \
        --engine openvino_no_snippets \
        --out bench/results/embedding_structure_curves_layers2_lr3e-4_similarity10_amx_xeon.json
    python bench/embedding_curves.py --only layers-2 --marks 1600 --lr 3e-4 \
        --lr-schedule cosine --precision bfloat16 --quality-only --engine openvino_no_snippets \
        --out bench/results/embedding_structure_curves_layers2_cosine_amx_xeon.json
    python bench/embedding_curves.py --only ffn0.7+pool@3 --marks 200,400,800 \
        --engine onnxruntime --out bench/results/embedding_structure_curves_pooled_onnxruntime.json
    python bench/embedding_curves.py --only ffn0.7+pool@3 --marks 200,400,800 --int8-aware \
        --engine onnxruntime --out bench/results/embedding_structure_curves_pooled_int8_aware.json
    python bench/embedding_curves.py --only ffn0.7+pool@3 --marks 200,400,800,1600 \
        --precision bfloat16 --engine onnxruntime \
        --out bench/results/embedding_structure_curves_pooled_onnxruntime_bf16_amx_xeon.json

Results accumulate in bench/results/embedding_structure_curves.json (one entry per structure,
replaced when rerun), with the machine of each part.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine

import slimformer
from slimformer.passes.base import PassContext
from slimformer.passes.recover_distill import PRECISIONS, Distill, DistillConfig
from slimformer.recipe import Recipe, Step
from slimformer.tasks import TaskSpec, make_task

SPEC = TaskSpec(name="embedding")
OUT = RESULTS / "embedding_structure_curves.json"
DISTILL = {"lr": 1e-4, "general_fraction": 0.5, "similarity_weight": 1.0, "hidden_weight": 1.0}
STRUCTURES: dict[str, list[tuple[str, dict]]] = {
    "ffn0.7": [("prune.ffn", {"keep": 0.7})],
    "ffn0.5+heads0.5": [("prune.ffn", {"keep": 0.5}), ("prune.heads", {"keep": 0.5})],
    "ffn0.3": [("prune.ffn", {"keep": 0.3})],
    "layers-2": [("prune.layers", {"count": 2})],
    "layers-1+ffn0.5": [("prune.layers", {"count": 1}), ("prune.ffn", {"keep": 0.5})],
    "ffn0.7+pool@3": [
        ("prune.ffn", {"keep": 0.7}),
        ("reduce.tokens", {"mode": "pool", "window": 2, "start": 3}),
    ],
}
INT8 = {
    "openvino": Step("runtime.openvino", {"int8": "nncf"}),
    "onnxruntime": Step("runtime.onnxruntime", {"optimize": True, "int8": "dynamic"}),
    # OpenVINO's attention and element-wise chains as oneDNN primitives: faster on AMX CPUs
    # (bench/results/embedding_structure_speed_snippets_amx_xeon.json).
    "openvino_no_snippets": Step("runtime.openvino", {"int8": "nncf", "snippets": False}),
}


def drops(score, baseline) -> dict:
    d = score.details
    return {
        "drop_pt": round((baseline.value - score.value) * 100, 2),
        "transfer_drop_pt": round(
            (baseline.details["transfer_probe_accuracy"] - d["transfer_probe_accuracy"]) * 100, 2
        ),
        "recall@10": round(d["recall@10"], 3),
        "transfer_recall@10": round(d["transfer_recall@10"], 3),
        "cosine_fidelity": round(d["cosine_fidelity"], 3),
        "transfer_cosine_fidelity": round(d["transfer_cosine_fidelity"], 3),
    }


def curve(
    structure: list[tuple[str, dict]], marks: list[int], distill: dict, engine: str
) -> list[dict]:
    task = make_task(SPEC)
    original = slimformer.load("default")
    state = task.prepare(original)
    baseline = task.score(original, state)
    steps = tuple(Step(name, config) for name, config in structure)
    model = slimformer.apply(original, Recipe(steps=steps, task=SPEC))
    training, general = task.training_batches(original), task.general_batches(original)
    rows, done, started = [], 0, time.time()
    for index, mark in enumerate(marks):
        # Distillation continues from the previous mark (a fresh optimizer each chunk).
        config = DistillConfig(**distill, steps=mark - done, time_budget_s=1e9)
        context = PassContext(
            training=training, general=general, teacher=original, seed=100 + index
        )
        report = Distill().apply(model, config, context)
        done = mark
        served = slimformer.apply(model, Recipe(steps=(INT8[engine],), task=SPEC))
        rows.append(
            {
                "steps": done,
                "seconds": round(time.time() - started),
                "held_out_loss": report["held_out_loss_after"],
                "precision": report["precision"],
                "fp32": drops(task.score(model, state), baseline),
                f"{engine}_int8": drops(task.score(served, state), baseline),
                "load_average_1min": round(os.getloadavg()[0], 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def throughput(structure: list[tuple[str, dict]], engine: str, workdir: Path) -> float:
    steps = tuple(Step(name, config) for name, config in structure) + (INT8[engine],)
    slimformer.apply("default", Recipe(steps=steps, task=SPEC), out=workdir)
    return slimformer.benchmark(workdir, task=SPEC).measurement["throughput_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(STRUCTURES), default=list(STRUCTURES))
    parser.add_argument("--marks", default="200,400", help="distillation steps to score at")
    parser.add_argument("--speed-only", action="store_true")
    parser.add_argument(
        "--quality-only", action="store_true", help="no throughput rows (timed elsewhere)"
    )
    parser.add_argument("--lr", type=float, default=DISTILL["lr"], help="distillation's lr")
    parser.add_argument(
        "--layer-weight",
        type=float,
        default=0.0,
        help="distillation's layer-to-layer matching (recover.distill layer_weight)",
    )
    parser.add_argument(
        "--neighbour-weight",
        type=float,
        default=0.0,
        help="distillation's neighbour-distribution matching (recover.distill neighbour_weight)",
    )
    parser.add_argument(
        "--similarity-weight",
        type=float,
        default=DISTILL["similarity_weight"],
        help="distillation's similarity-matrix matching (recover.distill similarity_weight)",
    )
    parser.add_argument(
        "--general-fraction",
        type=float,
        default=DISTILL["general_fraction"],
        help="distillation's share of steps on the general corpus (recover.distill)",
    )
    parser.add_argument(
        "--int8-aware",
        action="store_true",
        help="distil through int8 rounding (recover.distill int8_aware)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="distillation's arithmetic (recover.distill precision; auto: bf16 where native)",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="recover.distill lr_schedule; a cosine decays over each mark's steps anew, so "
        "give one mark per run",
    )
    parser.add_argument(
        "--engine", choices=list(INT8), default="openvino", help="the int8 engine scored and timed"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="a variant's own results file")
    args = parser.parse_args()
    out = args.out
    distill = DISTILL | {
        "lr": args.lr,
        "similarity_weight": args.similarity_weight,
        "general_fraction": args.general_fraction,
    }
    if args.layer_weight:
        distill["layer_weight"] = args.layer_weight
    if args.neighbour_weight:
        distill["neighbour_weight"] = args.neighbour_weight
    if args.int8_aware:
        distill["int8_aware"] = True
    if args.precision != "auto":
        distill["precision"] = args.precision
    if args.lr_schedule != "constant":
        distill["lr_schedule"] = args.lr_schedule
    if (distill != DISTILL or args.engine != "openvino") and out == OUT:
        parser.error("other distillation settings or engines need their own --out file")
    results = json.loads(out.read_text()) if out.exists() else {"structures": {}}
    results["distill"] = distill
    if not args.speed_only:
        for name in args.only:
            marks = [int(m) for m in args.marks.split(",")]
            rows = curve(STRUCTURES[name], marks, results["distill"], args.engine)
            results["structures"][name] = {"structure": STRUCTURES[name], "curve": rows}
            results["curves_machine"] = machine()
            out.write_text(json.dumps(results, indent=1) + "\n")
    if args.quality_only:
        return
    served = f"{args.engine}_int8"
    with tempfile.TemporaryDirectory() as tmp:
        peer = throughput([], args.engine, Path(tmp) / "peer")
        speed = {f"{served}_unpruned_per_s": round(peer, 1), "load_average_1min": []}
        for name in args.only:
            rate = throughput(STRUCTURES[name], args.engine, Path(tmp) / name)
            entry = results["structures"].setdefault(name, {"structure": STRUCTURES[name]})
            entry[f"{served}_per_s"] = round(rate, 1)
            entry[f"vs_{served}_unpruned"] = round(rate / peer, 3)
            speed["load_average_1min"].append(round(os.getloadavg()[0], 2))
            print(f"{name:<20} {rate:8.1f}/s  {rate / peer:.2f}x", flush=True)
    results["speed"] = speed | {"machine": machine()}
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
