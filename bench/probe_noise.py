"""How far can a probe drop move by chance? The embedding task's budget and its transfer guard
read a probe's accuracy on 2,000 sentences; this measures the standard error of those drops.
One run, ~3 minutes on 2 cores.

    python bench/probe_noise.py     # -> bench/results/probe_noise.json

A student that the studies meet (30% of the FFN removed, 2 tokens pooled into 1 from block 3,
the warm start's 200 distillation steps) is scored sentence by sentence in fp32 and served by
ONNX Runtime int8, against the original: for each pair, the drop in points and its paired
standard error (the per-sentence differences of right and wrong answers, over the square root
of their count), and the share of sentences on which the two disagree.
"""

from __future__ import annotations

import time

import numpy as np
from common import machine, write_result
from embedding_pooling import ONNXRUNTIME_INT8, distill, ffn, pool

import slimformer
from slimformer.recipe import Recipe
from slimformer.tasks import TaskSpec, make_task
from slimformer.tasks.embedding import _probe, embed
from slimformer.tasks.geometry import probe_correct
from slimformer.tasks.staging import paired_standard_error

SPEC = TaskSpec("embedding")
STUDENT = (ffn(0.7), pool(2, 3), distill(200))


def paired(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    """The drop from `first`'s right answers to `second`'s, in points, with its standard error."""
    difference = first - second
    return {
        "drop_points": round(100 * float(difference.mean()), 2),
        "standard_error_points": round(100 * paired_standard_error(first, second), 2),
        "disagreeing_share": round(float(np.mean(difference != 0)), 3),
        "sentences": len(difference),
    }


def main() -> None:
    started = time.time()
    task = make_task(SPEC)
    original = slimformer.load("default")
    state = task.prepare(original)
    transfer = task._builtin["transfer_test"]
    splits = {
        "movie reviews": ("probe_", task.texts("test"), task.labels("test")),
        "transfer": (
            "transfer_probe_",
            [text for text, _ in transfer],
            np.array([label for _, label in transfer]),
        ),
    }
    student = slimformer.apply(original, Recipe(steps=STUDENT, task=SPEC))
    served = slimformer.apply(student, Recipe(steps=(ONNXRUNTIME_INT8,), task=SPEC))
    models = {"original": original, "student fp32": student, "student int8": served}
    rows = {}
    for split, (probe, texts, labels) in splits.items():
        right = {
            name: probe_correct(_probe(state, probe), embed(model, texts, task.seq_len), labels)
            for name, model in models.items()
        }
        for first, second in (
            ("original", "student fp32"),
            ("original", "student int8"),
            ("student fp32", "student int8"),
        ):
            row = paired(right[first], right[second])
            rows[f"{split}: {first} -> {second}"] = row
            print(
                f"{split:14s} {first:>12s} -> {second:12s} {row['drop_points']:+.2f} pt "
                f"(standard error {row['standard_error_points']:.2f}), disagreeing on "
                f"{row['disagreeing_share']:.1%}",
                flush=True,
            )
    result = {
        "command": "python bench/probe_noise.py",
        "machine": machine(),
        "student": " + ".join(f"{s.pass_name}({s.config})" for s in STUDENT),
        "rows": rows,
        "wall_seconds": round(time.time() - started),
    }
    print(f"wrote {write_result('probe_noise', result)}")


if __name__ == "__main__":
    main()
