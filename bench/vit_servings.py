"""Which way of serving a pruned, distilled vit-fashion is fastest on this CPU? One run.

    python bench/vit_servings.py     # -> bench/results/vit_servings.json (~20 min on 2 cores)
    python bench/vit_servings.py --out bench/results/vit_servings_avx2_epyc.json

Answers the question the local search's ranking of deployments rests on (search/neighbours.py):
a deployment's speed on the unpruned model says little about its speed on a structured one.
Rows: ToMe as its authors apply it (eager attention, constant r: bench/peers_vision.py's row
and its r, 39 for vit-fashion; the best peer on an AVX2-only EPYC), the same merging served by
OpenVINO f32, and the FFN pruned to 35% of its neurons and distilled (800 steps at 3e-4,
similarity matching: the recipe an AVX2 EPYC study found within the point) served by OpenVINO
f32, with token merging (that r, and r=20) or pruning (keep 0.7 from the second block, not
distilled again) on top, and the FFN cut and that token pruning distilled together (1,600 steps).
Accuracy and images/s: `slimformer.benchmark` of each saved model in a fresh process (the
task's 2,000 scored test images; batch 32), three rounds in rotating order, the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, machine
from peers_vision import tome_r, tome_steps

import slimformer
from slimformer.recipe import Recipe, Step
from slimformer.search.confirm import time_alternately
from slimformer.tasks import TaskSpec

SPEC = TaskSpec("image-classification")
OPENVINO_F32 = Step("runtime.openvino", {"int8": "none"})
FFN = Step("prune.ffn", {"keep": 0.35, "criterion": "activation", "allocation": "global"})
DISTILL = Step(
    "recover.distill", {"steps": 800, "lr": 3e-4, "similarity_weight": 10.0, "hidden_weight": 0.0}
)
PRUNE_07 = Step("reduce.tokens", {"mode": "prune", "keep": 0.7, "start": 1})
# Token pruning distilled with the FFN cut: the distilled token recipe's distillation (1,600
# steps at 3e-4 matching the final hidden states), read from its file.
_, DISTILL_LONG, _ = Recipe.load(
    Path(__file__).resolve().parents[1] / "recipes" / "vit-tokens-distilled.yaml"
).steps


def tome(r: int, attention: str = "sdpa") -> Step:
    """ToMe's constant merging from the first block, as bench/peers_vision.py's rows run it."""
    [(name, config)] = tome_steps(r, attention)
    return Step(name, config)


def build(folder: Path, source: str, steps: list[Step]) -> Path:
    started = time.time()
    slimformer.apply(source, Recipe(steps=tuple(steps), task=SPEC), out=folder)
    print(f"{folder.name}: built in {time.time() - started:.0f} s", flush=True)
    return folder


def measure_rows(
    folders: dict[str, Path], steps: dict[str, list[Step]], root: Path, rounds: int
) -> dict[str, dict]:
    """Accuracy and images/s of each saved model (`slimformer.benchmark` in a fresh process,
    batch 32), `rounds` rotating readings; ratios against the first row."""
    accuracy: dict[str, float] = {}

    def evaluate(folder: Path, workdir: Path, score: bool):
        result = slimformer.benchmark(folder, task=SPEC, batch_size=32)
        accuracy[folder.name] = result.quality
        return result

    measured, _ = time_alternately(folders, evaluate, root, rounds, "timing")
    peer = statistics.median(m["throughput_per_s"] for m in measured[next(iter(folders))])
    results = {}
    for label, folder in folders.items():
        readings = [m["throughput_per_s"] for m in measured[label]]
        results[label] = {
            "recipe": " + ".join(f"{s.pass_name}({s.config})" for s in steps[label]),
            "accuracy": accuracy[folder.name],
            "images_per_s": statistics.median(readings),
            "readings": readings,
            "vs_peer": round(statistics.median(readings) / peer, 3),
        }
        print(f"{label:72s} {accuracy[folder.name]:.4f} {results[label]['vs_peer']:.2f}x")
    return results


def write_rows(out: Path, command: str, results: dict[str, dict], started: float) -> None:
    """The rows of a vit-fashion serving comparison as bench/results JSON."""
    out.write_text(
        json.dumps(
            {
                "command": command,
                "machine": machine(),
                "workload": "vit-fashion, the image task's 2,000 scored test images, batch 32",
                "rows": results,
                "wall_seconds": round(time.time() - started),
            },
            indent=2,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "vit_servings.json")
    args = parser.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="slimformer-vit-servings-") as tmp:
        root = Path(tmp)
        r = tome_r(slimformer.load("vit-fashion").config)  # 39 for vit-fashion
        ffn = str(build(root / "ffn-distilled", "vit-fashion", [FFN, DISTILL]))
        both = str(
            build(root / "ffn-tokens-distilled", "vit-fashion", [FFN, PRUNE_07, DISTILL_LONG])
        )
        rows = {
            f"ToMe r={r}, eager attention (peer)": ("vit-fashion", [tome(r, "eager")]),
            f"ToMe r={r} + OpenVINO f32": ("vit-fashion", [tome(r), OPENVINO_F32]),
            "FFN 0.35 distilled + OpenVINO f32": (ffn, [OPENVINO_F32]),
            f"FFN 0.35 distilled + ToMe r={r} + OpenVINO f32": (ffn, [tome(r), OPENVINO_F32]),
            f"FFN 0.35 distilled + ToMe r={r} (PyTorch)": (ffn, [tome(r)]),
            "FFN 0.35 distilled + prune keep 0.7 + OpenVINO f32": (ffn, [PRUNE_07, OPENVINO_F32]),
            "FFN 0.35 distilled + ToMe r=20 + OpenVINO f32": (ffn, [tome(20), OPENVINO_F32]),
            "FFN 0.35 + prune keep 0.7, distilled together + OpenVINO f32": (both, [OPENVINO_F32]),
        }
        folders = {
            label: build(root / f"row-{index}", source, steps)
            for index, (label, (source, steps)) in enumerate(rows.items())
        }
        results = measure_rows(
            folders, {label: steps for label, (_, steps) in rows.items()}, root, args.rounds
        )
    write_rows(args.out, "python bench/vit_servings.py", results, started)


if __name__ == "__main__":
    main()
