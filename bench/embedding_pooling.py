"""Token pooling on all-MiniLM-L6-v2's sentences, served by ONNX Runtime int8: does it reach
issue 17's 1.5x the best peer within a point on both domains? One run.

    python bench/embedding_pooling.py       # -> bench/results/embedding_pooling.json (~50 min)
    python bench/embedding_pooling.py --only peer --only FFN --out DIR/x.json   # some rows

`reduce.tokens mode=pool` on text sums each run of `window` consecutive tokens into one from
block `start` on (the padding mask pooled alike), and a pooled encoder exports, so every row is
served by ONNX Runtime fused + dynamic int8, the best peer on the embedding task
(bench/results/embedding_transfer.json). Rows: that peer alone; pooling 2 tokens from block 3
and from block 2, distilled 200 steps; the embedding warm start (30% of the FFN neurons
removed, distilled 200 steps); the same FFN cut with pooling from block 3 and from block 2, and
half the FFN neurons removed with pooling from block 3, distilled 400 steps. Every distillation
is the warm start's (1e-4, half the steps on the general corpus, similarity and hidden-state
matching). Quality: the movie-review probe's drop and the transfer domain's (tweets and
editorials, not trained on), and recall@10 of the original's neighbours (the default guard
asks 0.6), each against the fp32 original. Throughput: `slimformer.benchmark` of each saved
model in a fresh process (batch 32, movie reviews at their real lengths), `--rounds` rounds in
rotating order, the median; ratios against the peer row of the same run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from common import (
    RESULTS,
    machine,
    only_rows,
    side_by_side_arguments,
    side_by_side_command,
    write_result,
)
from embedding_transfer import figures

import slimformer
from slimformer.api import BenchResult
from slimformer.recipe import Recipe, Step
from slimformer.search.confirm import time_alternately
from slimformer.tasks import TaskSpec

SPEC = TaskSpec("embedding")
ONNXRUNTIME_INT8 = Step("runtime.onnxruntime", {"optimize": True, "int8": "dynamic"})


def distill(steps: int) -> Step:
    """The embedding warm start's distillation (search/portfolio.py), `steps` long."""
    config = {"lr": 1e-4, "general_fraction": 0.5, "similarity_weight": 1.0, "hidden_weight": 1.0}
    return Step("recover.distill", {"steps": steps, **config})


def pool(window: int, start: int) -> Step:
    return Step("reduce.tokens", {"mode": "pool", "window": window, "start": start})


def ffn(keep: float) -> Step:
    return Step("prune.ffn", {"keep": keep})


ROWS = {
    "ONNX Runtime fused + int8 (peer)": [],
    "pool 2 from block 3, distilled 200": [pool(2, 3), distill(200)],
    "pool 2 from block 2, distilled 200": [pool(2, 2), distill(200)],
    "FFN 0.7, distilled 200 (warm start)": [ffn(0.7), distill(200)],
    "FFN 0.7 + pool 2 from block 3, distilled 400": [ffn(0.7), pool(2, 3), distill(400)],
    "FFN 0.7 + pool 2 from block 2, distilled 400": [ffn(0.7), pool(2, 2), distill(400)],
    "FFN 0.5 + pool 2 from block 3, distilled 400": [ffn(0.5), pool(2, 3), distill(400)],
}


def main() -> None:
    args = side_by_side_arguments(__doc__, RESULTS / "embedding_pooling.json")
    started = time.time()
    chosen = only_rows(ROWS, args.only)
    rows = {label: [*steps, ONNXRUNTIME_INT8] for label, steps in chosen.items()}
    original = slimformer.benchmark("default", task=SPEC)
    baseline = figures(original.quality, original.details, None)
    scores: dict[str, dict] = {}

    def evaluate(folder: Path, workdir: Path, score: bool) -> BenchResult:
        """One reading; the scores (the same every reading) are kept from it."""
        result = slimformer.benchmark(folder, task=SPEC)
        scores[folder.name] = figures(result.quality, result.details, baseline)
        return result

    with tempfile.TemporaryDirectory(prefix="slimformer-embedding-pooling-") as tmp:
        root = Path(tmp)
        folders = {}
        for index, (label, steps) in enumerate(rows.items()):
            folders[label] = root / f"row-{index}"
            slimformer.apply("default", Recipe(steps=tuple(steps), task=SPEC), out=folders[label])
            print(f"{label}: built ({time.time() - started:.0f} s)", flush=True)
        measured, _ = time_alternately(folders, evaluate, root, args.rounds, "timing")
    peer = statistics.median(m["throughput_per_s"] for m in measured[next(iter(folders))])
    results = {}
    for label, steps in rows.items():
        readings = [m["throughput_per_s"] for m in measured[label]]
        results[label] = {
            "recipe": " + ".join(f"{s.pass_name}({s.config})" for s in steps),
            **scores[folders[label].name],
            "sentences_per_s": statistics.median(readings),
            "readings": readings,
            "vs_peer": round(statistics.median(readings) / peer, 3),
        }
        row = results[label]
        print(
            f"{label:48s} drop {row['drop_points']:+.2f} / transfer "
            f"{row['transfer_drop_points']:+.2f} pt, recall@10 {row['recall@10']:.3f}, "
            f"{row['vs_peer']:.2f}x the peer",
            flush=True,
        )
    result = {
        "command": side_by_side_command("embedding_pooling.py", args),
        "machine": machine(),
        "workload": "all-MiniLM-L6-v2, the embedding task: 2,000 held-out movie-review "
        "sentences scored, 2,000 tweets and editorials as the transfer check; "
        "throughput at batch 32 on movie reviews at real lengths (~27 tokens)",
        "rows": results,
        "wall_seconds": round(time.time() - started),
    }
    print(f"wrote {write_result(args.out.stem, result, args.out.parent)}")


if __name__ == "__main__":
    main()
