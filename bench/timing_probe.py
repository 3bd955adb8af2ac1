"""How close is early stopping's short timing (evaluate.probe_cost) to the full measurement?

    python bench/timing_probe.py        # -> bench/results/timing_probe.json (~5 min)

For MiniLM in fp32 eager, ONNX Runtime int8 and OpenVINO int8 (the models a default embedding
study times most), five probes and three full measurements each of throughput and batch-1
latency in one process, with the default measurement settings. The ratio probe/full bounds
how far a probe can mislead, which sets tasks/staging.py's PROBE_MARGIN.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from common import machine, write_result

import slimformer
from slimformer.checkpoint import load_model
from slimformer.evaluate import probe_cost
from slimformer.measure import MeasureSettings, measure_loaded, reset_peak_memory, set_threads
from slimformer.recipe import Recipe, Step
from slimformer.tasks import TaskSpec, make_task

RECIPES = {
    "fp32 eager": (),
    "ONNX Runtime int8": (Step("runtime.onnxruntime", {"int8": "dynamic"}),),
    "OpenVINO int8": (Step("runtime.openvino", {"int8": "nncf"}),),
}
FIELDS = ("throughput_per_s", "latency_ms_median")


def main() -> None:
    spec = TaskSpec(name="embedding")
    task = make_task(spec)
    settings = MeasureSettings()
    set_threads(settings.resolved_threads())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, steps in RECIPES.items():
            out = Path(tmp) / label.replace(" ", "-")
            slimformer.apply("default", Recipe(steps=steps, task=spec), out=out)
            model = load_model(out, head=task.head)
            examples = task.examples(model, "timing")
            for field in FIELDS:
                probes = [probe_cost(model, examples, settings, field) for _ in range(5)]
                full = [
                    measure_loaded(model, examples, settings, reset_peak_memory(), out).to_dict()[
                        field
                    ]
                    for _ in range(3)
                ]
                middle = statistics.median(full)
                row = {
                    "model": label,
                    "figure": field,
                    "probes": [round(p, 3) for p in probes],
                    "full": [round(f, 3) for f in full],
                    "probe_over_full_median": [
                        round(min(probes) / middle, 3),
                        round(max(probes) / middle, 3),
                    ],
                }
                print(row, flush=True)
                rows.append(row)
    write_result(
        "timing_probe",
        {
            "command": "python bench/timing_probe.py",
            "machine": machine(),
            "settings": "default MeasureSettings; the probe takes a third of min_seconds",
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
