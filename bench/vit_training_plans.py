"""vit-fashion's own training, step by step as `slimformer assets install vit-fashion` runs it,
with some of its plan's settings changed: test accuracy on all 10,000 test images and the
training seconds (issue 13: >= 88% in under 15 minutes on 2 cores).

    python bench/vit_training_plans.py '{"teacher_epochs": 0}' '{"teacher_epochs": 4}'

Each argument is a JSON object of TrainingPlan fields over the shipped plan (`{}`: the shipped
plan itself). Unlike bench/vit_training_probes.py (fixed wall-clock time, 2,000 test images)
these runs are deterministic: the same plan gives the same weights on one CPU. Each run adds
(or replaces) its row in bench/results/vit_training_plans.json, with the machine.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace

from common import RESULTS, machine, write_result

from slimformer.assets.fashion_mnist import CLASSES, fashion_mnist
from slimformer.assets.vit_fashion import TrainingPlan, ViTShape, accuracy, train_vit_resumable

NAME = "vit_training_plans"


def main() -> None:
    changes = [json.loads(argument) for argument in sys.argv[1:]] or [{}]
    images, labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    path = RESULTS / f"{NAME}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    for change in changes:
        plan = replace(TrainingPlan(), **change)
        log = lambda line: print(line, flush=True)  # noqa: E731
        model, seconds = train_vit_resumable(images, labels, ViTShape(), plan, CLASSES, log)
        row = {
            "changed": change,
            "plan": asdict(plan),
            "shape": asdict(ViTShape()),
            "machine": machine(),
            "training_seconds": round(seconds, 1),
            "test_accuracy": accuracy(model, test_images, test_labels),
        }
        print(json.dumps(row), flush=True)
        # One row per plan and CPU: a rerun replaces its row, other machines' rows stay.
        rows = [r for r in rows if (r["plan"], r["machine"]) != (row["plan"], row["machine"])]
        rows.append(row)
        write_result(NAME, {"command": "python bench/vit_training_plans.py PLAN...", "rows": rows})


if __name__ == "__main__":
    main()
