"""Token pooling on vit-fashion: how much speed, how much accuracy, against ToMe. One run.

    python bench/vit_pooling.py     # -> bench/results/vit_pooling.json (~20 min on 2 cores)
    python bench/vit_pooling.py --only peer --only "block 1, distilled 800" --rounds 5 \
        --out bench/results/vit_pooling_ffn_cut_avx2_epyc.json   # FFN cuts + pooling, 15 min

`reduce.tokens mode=pool` averages each 2x2 (or 3x3) square of patches once, so the blocks after
it see a quarter (a ninth) of the tokens with no matching to pay for, and needs distillation
after it. Rows: ToMe as its authors apply it (eager attention, constant r: bench/peers_vision.py's
row and r, the best peer on an AVX2-only EPYC); the image study's merging warm start (FFN cut to
35% + that ToMe, distilled 800 steps) on OpenVINO f32; pooling 2x2 after the first block's
attention, distilled 800 and 3,200 steps; the FFN cut to 35% and to 25% with pooling 2x2 in the
second block; pooling 3x3 in the second block; ONNX Runtime fused + int8 (bench/peers_vision.py's
row, the best peer in one of its runs). Every pooled row is served by OpenVINO f32 and distilled
as the warm start is (3e-4, similarity matching). Accuracy and images/s: `slimformer.benchmark`
of each saved model in a fresh process (the task's 2,000 scored test images; batch 32), `--rounds`
rounds in rotating order, the median; ratios against the first row of the same run.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import RESULTS, only_rows, side_by_side_arguments, side_by_side_command
from vit_servings import DISTILL, FFN, OPENVINO_F32, build, measure_rows, tome, write_rows

from slimformer.recipe import Step

DISTILL_LONG = replace(DISTILL, config=DISTILL.config | {"steps": 3200})
FFN_QUARTER = replace(FFN, config=FFN.config | {"keep": 0.25})
ONNXRUNTIME_INT8 = Step("runtime.onnxruntime", {"optimize": True, "int8": "dynamic"})


def pool(window: int, start: int) -> Step:
    return Step("reduce.tokens", {"mode": "pool", "window": window, "start": start})


def main() -> None:
    args = side_by_side_arguments(__doc__, RESULTS / "vit_pooling.json")
    started = time.time()
    r = 39  # bench/peers_vision.py's tome_r for vit-fashion
    rows = {
        f"ToMe r={r}, eager attention (peer)": [tome(r, "eager")],
        f"FFN 0.35 + ToMe r={r}, distilled 800 steps + OpenVINO f32 (warm start)": [
            FFN,
            tome(r),
            DISTILL,
            OPENVINO_F32,
        ],
        "pool 2x2 in block 0, distilled 800 steps + OpenVINO f32": [
            pool(2, 0),
            DISTILL,
            OPENVINO_F32,
        ],
        "pool 2x2 in block 0, distilled 3,200 steps + OpenVINO f32": [
            pool(2, 0),
            DISTILL_LONG,
            OPENVINO_F32,
        ],
        "FFN 0.35 + pool 2x2 in block 1, distilled 800 steps + OpenVINO f32": [
            FFN,
            pool(2, 1),
            DISTILL,
            OPENVINO_F32,
        ],
        "FFN 0.25 + pool 2x2 in block 1, distilled 800 steps + OpenVINO f32": [
            FFN_QUARTER,
            pool(2, 1),
            DISTILL,
            OPENVINO_F32,
        ],
        "pool 3x3 in block 1, distilled 800 steps + OpenVINO f32": [
            pool(3, 1),
            DISTILL,
            OPENVINO_F32,
        ],
        "ONNX Runtime fused + int8 (peer)": [ONNXRUNTIME_INT8],
    }
    rows = only_rows(rows, args.only)
    with tempfile.TemporaryDirectory(prefix="slimformer-vit-pooling-") as tmp:
        root = Path(tmp)
        folders = {
            label: build(root / f"row-{index}", "vit-fashion", steps)
            for index, (label, steps) in enumerate(rows.items())
        }
        results = measure_rows(folders, rows, root, args.rounds)
    write_rows(args.out, side_by_side_command("vit_pooling.py", args), results, started)


if __name__ == "__main__":
    main()
