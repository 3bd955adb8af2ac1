"""How long is a distillation step, in each arithmetic `recover.distill precision` offers?
One run, ~4 minutes on 2 cores.

    python bench/distill_speed.py      # -> bench/results/distill_speed.json

The student the embedding studies train (all-MiniLM-L6-v2, 30% of the FFN removed, 2 tokens
pooled into 1 from block 3) is distilled with the warm start's settings (half the steps on
Wikipedia, hidden-state and similarity matching) for `--steps` steps at a time, in float32 and
in bfloat16 autocast, and once more in float32 with AdamW's per-tensor loop (the optimizer as it
was before 2026-12-05: `fused` off); `--rounds` rounds in rotating order, the median seconds per
step (the pass's own `seconds`: training only, not its held-out loss). Whether the two
precisions train as well is bench/embedding_curves.py's question (`--precision`); this is only
their cost. bfloat16 runs on any CPU, emulated where it has no bf16 instructions (where `auto`
trains in float32).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
from common import RESULTS, machine, write_result
from embedding_pooling import ffn, pool

import slimformer
from slimformer import cpu
from slimformer.passes.base import PassContext
from slimformer.passes.recover_distill import Distill, DistillConfig
from slimformer.recipe import Recipe
from slimformer.tasks import TaskSpec, make_task

SPEC = TaskSpec("embedding")
WARM_START = {"lr": 1e-4, "general_fraction": 0.5, "similarity_weight": 1.0, "hidden_weight": 1.0}
ROWS = {
    "float32": ("float32", True),
    "bfloat16": ("bfloat16", True),
    "float32, AdamW per-tensor loop": ("float32", False),
}


ADAMW = torch.optim.AdamW


def per_tensor_adamw(*args, **kwargs) -> torch.optim.Optimizer:
    return ADAMW(*args, **kwargs | {"fused": False})


def seconds_per_step(model, context: PassContext, precision: str, fused: bool, steps: int):
    config = DistillConfig(**WARM_START, steps=steps, precision=precision, time_budget_s=1e9)
    loop = mock.patch.object(torch.optim, "AdamW", per_tensor_adamw)
    with contextlib.nullcontext() if fused else loop:
        report = Distill().apply(model.copy(), config, context)
    return report["seconds"] / report["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "distill_speed.json")
    args = parser.parse_args()
    started = time.time()
    torch.set_num_threads(cpu.fingerprint().cores)
    task = make_task(SPEC)
    original = slimformer.load("default")
    student = slimformer.apply(original, Recipe(steps=(ffn(0.7), pool(2, 3)), task=SPEC))
    context = PassContext(
        training=task.training_batches(original),
        general=task.general_batches(original),
        teacher=original,
        seed=0,
    )
    seconds_per_step(student, context, "float32", True, 5)  # warm-up
    readings: dict[str, list[float]] = {label: [] for label in ROWS}
    labels = list(ROWS)
    for round_ in range(args.rounds):
        for label in labels[round_ % len(labels) :] + labels[: round_ % len(labels)]:
            precision, fused = ROWS[label]
            readings[label].append(seconds_per_step(student, context, precision, fused, args.steps))
            print(f"round {round_}: {label}: {readings[label][-1] * 1000:.0f} ms/step", flush=True)
    medians = {label: statistics.median(values) for label, values in readings.items()}
    reference = medians["float32, AdamW per-tensor loop"]
    rows = {
        label: {
            "ms_per_step": round(medians[label] * 1000, 1),
            "readings_ms": [round(v * 1000, 1) for v in readings[label]],
            "speedup_vs_float32_loop": round(reference / medians[label], 2),
        }
        for label in ROWS
    }
    result = {
        "command": f"python bench/distill_speed.py --steps {args.steps} --rounds {args.rounds} "
        f"--out bench/results/{args.out.name}",
        "machine": machine(),
        "native_bf16": cpu.has_native_bf16(),
        "workload": "recover.distill of all-MiniLM-L6-v2 with FFN 0.7 and tokens pooled from "
        "block 3, batch 32 of movie-review and Wikipedia sentences, the warm start's losses",
        "rows": rows,
        "wall_seconds": round(time.time() - started),
    }
    for label, row in rows.items():
        print(f"{label:34s} {row['ms_per_step']:7.1f} ms/step  {row['speedup_vs_float32_loop']}x")
    print(f"wrote {write_result(args.out.stem, result, args.out.parent)}")


if __name__ == "__main__":
    main()
