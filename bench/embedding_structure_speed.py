"""Which structures of all-MiniLM-L6-v2 are fast enough for issue 17's 1.5x the best peer on
this CPU, before any distillation is spent on them? One run, ~6 minutes on 2 cores.

    python bench/embedding_structure_speed.py   # -> bench/results/embedding_structure_speed.json
    python bench/embedding_structure_speed.py --only "pool 2 from block 3" --out X   # + peers

Speed does not depend on the weights, so each structure is built untrained (FFN neurons
removed, tokens pooled) and timed only: no quality is measured or claimed here (what each
costs after distillation: bench/embedding_pooling.py, bench/embedding_curves.py). Every
structure is served by both int8 peers — ONNX Runtime fused + dynamic int8 (the Optimum
recipe; the best peer on CPUs without VNNI) and OpenVINO + NNCF int8 (the best with VNNI) —
and the ratio is taken against the faster of the two peers measured in the same run, so it
reads as issue 17's ratio on whichever CPU runs it. A third serving, OpenVINO int8 with
`snippets=False` (attention and element-wise chains as oneDNN primitives rather than the
kernels OpenVINO generates), is slimformer's setting rather than a peer's: it is never the best
peer, and its rows also read against the unpruned model served the same way, so the structure's
share and the setting's share of a ratio stay apart. One row more serves the pooled model
through ONNX Runtime traced as before 6bdbb3e (no fused attention in any block), for what that
fusion is worth here. Throughput: `evaluate_isolated` timing only, each saved model in a
fresh process (batch 32, movie reviews at their real lengths), `--rounds` rounds in rotating
order, the median.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from common import (
    RESULTS,
    machine,
    only_rows,
    side_by_side_arguments,
    side_by_side_command,
    write_result,
)
from embedding_pooling import ONNXRUNTIME_INT8 as ONNXRUNTIME
from embedding_pooling import ffn, pool

import slimformer
import slimformer.passes.runtime_onnxruntime as runtime_onnxruntime
from slimformer.checkpoint import source_of
from slimformer.evaluate import evaluate_isolated
from slimformer.measure import MeasureSettings
from slimformer.recipe import Recipe, Step
from slimformer.search.confirm import time_alternately
from slimformer.tasks import TaskSpec, reference_state

SPEC = TaskSpec("embedding")
OPENVINO = Step("runtime.openvino", {"int8": "nncf"})
NO_SNIPPETS = Step("runtime.openvino", {"int8": "nncf", "snippets": False})
PEERS = {"ONNX Runtime int8": ONNXRUNTIME, "OpenVINO int8": OPENVINO}
ENGINES = PEERS | {"OpenVINO int8 without snippets": NO_SNIPPETS}
UNFUSED = "FFN 0.7 + pool 2 from block 3, ONNX Runtime int8 without fused attention"


ONE_LAYER = Step("prune.layers", {"count": 1})
STRUCTURES = {
    "peer": [],
    "FFN 0.7": [ffn(0.7)],
    "FFN 0.7 + pool 2 from block 3": [ffn(0.7), pool(2, 3)],
    "FFN 0.7 + pool 2 from block 2": [ffn(0.7), pool(2, 2)],
    "FFN 0.7 + pool 2 from block 1": [ffn(0.7), pool(2, 1)],
    "FFN 0.5 + pool 2 from block 3": [ffn(0.5), pool(2, 3)],
    "FFN 0.5 + pool 2 from block 2": [ffn(0.5), pool(2, 2)],
    "1 layer removed": [ONE_LAYER],
    "2 layers removed": [Step("prune.layers", {"count": 2})],
    "1 layer removed + FFN 0.7": [ONE_LAYER, ffn(0.7)],
    "1 layer removed + FFN 0.5": [ONE_LAYER, ffn(0.5)],
    "1 layer removed + FFN 0.7 + pool 2 from block 3": [ONE_LAYER, ffn(0.7), pool(2, 3)],
    "1 layer removed + pool 2 from block 2": [ONE_LAYER, pool(2, 2)],
    "heads 0.5": [Step("prune.heads", {"keep": 0.5})],
    "1 layer removed + heads 0.75": [ONE_LAYER, Step("prune.heads", {"keep": 0.75})],
}


def rows() -> dict[str, tuple[list[Step], str, bool]]:
    """Every structure on each engine: (steps, the engine, whether ONNX Runtime's attention
    is fused)."""
    built = {
        f"{structure}, {engine}": ([*steps, step], engine, True)
        for structure, steps in STRUCTURES.items()
        for engine, step in ENGINES.items()
    }
    pooled = STRUCTURES["FFN 0.7 + pool 2 from block 3"]
    return built | {UNFUSED: ([*pooled, ONNXRUNTIME], "ONNX Runtime int8", False)}


def build(steps: list[Step], fused: bool, out: Path) -> None:
    # Unfused: the export as it was before 6bdbb3e, token-reduced attention traced as SDPA,
    # which ONNX Runtime's optimizer does not fuse.
    unfused = mock.patch.object(
        runtime_onnxruntime, "traced_for_onnxruntime", contextlib.nullcontext
    )
    with contextlib.nullcontext() if fused else unfused:
        slimformer.apply("default", Recipe(steps=tuple(steps), task=SPEC), out=out)


def main() -> None:
    args = side_by_side_arguments(__doc__, RESULTS / "embedding_structure_speed.json")
    started = time.time()
    every = rows()
    wanted = only_rows(every, args.only)  # and the peers always, for the ratios
    chosen = {
        label: row for label, row in every.items() if label in wanted or label.startswith("peer, ")
    }
    settings = MeasureSettings(batch_size=32)
    with tempfile.TemporaryDirectory(prefix="slimformer-structure-speed-") as tmp:
        root = Path(tmp)
        folders = {}
        for index, (label, (steps, _, fused)) in enumerate(chosen.items()):
            folders[label] = root / f"row-{index}"
            build(steps, fused, folders[label])
            print(f"{label}: built ({time.time() - started:.0f} s)", flush=True)
        state = reference_state(source_of(next(iter(folders.values()))), SPEC)

        def evaluate(folder: Path, workdir: Path, score: bool = False, **_: object):
            return evaluate_isolated(folder, SPEC, state, settings, workdir, score=False)

        measured, cpu = time_alternately(folders, evaluate, root, args.rounds, "timing")
    medians = {
        label: statistics.median(m["throughput_per_s"] for m in readings)
        for label, readings in measured.items()
    }
    unpruned = {
        engine: medians[f"peer, {engine}"] for engine in ENGINES if f"peer, {engine}" in medians
    }
    peers = {engine: rate for engine, rate in unpruned.items() if engine in PEERS}
    best_peer = max(peers, key=peers.get) if peers else None
    results = {}
    for label, (steps, engine, fused) in chosen.items():
        rate = medians[label]
        results[label] = {
            "recipe": " + ".join(f"{s.pass_name}({s.config})" for s in steps),
            "engine": engine,
            "attention_fused_in_onnxruntime": fused if engine == "ONNX Runtime int8" else None,
            "sentences_per_s": round(rate, 1),
            "readings": [round(m["throughput_per_s"], 1) for m in measured[label]],
            "vs_best_peer": round(rate / peers[best_peer], 3) if best_peer else None,
            "vs_unpruned_same_serving": (
                round(rate / unpruned[engine], 3) if engine in unpruned else None
            ),
        }
        row = results[label]
        print(
            f"{label:72s} {rate:7.1f}/s  {row['vs_best_peer'] or float('nan'):.2f}x the best "
            f"peer, {row['vs_unpruned_same_serving'] or float('nan'):.2f}x unpruned, same serving",
            flush=True,
        )
    result = {
        "command": side_by_side_command("embedding_structure_speed.py", args),
        "machine": machine(),
        "measured_on": cpu,
        "workload": "all-MiniLM-L6-v2 structures, untrained (speed only, no quality), on the "
        "embedding task's movie-review sentences at batch 32 and their real lengths (~27 "
        "tokens)",
        "best_peer": best_peer,
        "rows": results,
        "wall_seconds": round(time.time() - started),
    }
    print(f"wrote {write_result(args.out.stem, result, args.out.parent)}")


if __name__ == "__main__":
    main()
