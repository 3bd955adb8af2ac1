"""The int8/int4 kernels behind each quantization mode, timed alone on a decoder's shapes.

    python bench/quant_kernels.py      # -> bench/results/kernels.json (about a minute)

One Linear of SmolLM2-135M's MLP (576 -> 1536 and 1536 -> 576) at batch-1 decode (1 row) and
a 256-token prefill (256 rows), fp32 against: dynamic int8 (fbgemm), static int8 (oneDNN),
weight-only int8 and int4 (aten's packed-weight kernels). Milliseconds per call, medians.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import machine, write_result
from torch import nn

from slimformer.layers.dynamic_int8 import dynamic_int8_layer
from slimformer.layers.weight_only import Int4WeightLinear, Int8WeightLinear
from slimformer.passes.gptq import quantize_rtn
from slimformer.passes.observers import InputStats
from slimformer.passes.quantize_static_int8 import static_int8_layer

SHAPES = ((576, 1536), (1536, 576))
ROWS = (1, 256)


def median_ms(module: nn.Module, x: torch.Tensor, seconds: float = 1.0) -> float:
    for _ in range(3):
        module(x)
    timings: list[float] = []
    start = time.perf_counter()
    while len(timings) < 5 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        module(x)
        timings.append((time.perf_counter() - began) * 1000)
    return statistics.median(timings)


@torch.inference_mode()
def main() -> None:
    torch.manual_seed(0)
    rows = []
    for in_features, out_features in SHAPES:
        linear = nn.Linear(in_features, out_features)
        calibration = torch.randn(512, in_features)
        stats = InputStats(calibration.amin(0), calibration.amax(0), [calibration], 512)
        modes = {
            "fp32": linear,
            "dynamic int8": dynamic_int8_layer(linear, per_channel=True),
            "static int8": static_int8_layer(linear, stats, "minmax"),
            "weight-only int8": Int8WeightLinear.from_quantized(
                quantize_rtn(linear.weight, 8, 0), linear.bias.detach().clone()
            ),
            "weight-only int4 g64": Int4WeightLinear.from_quantized(
                quantize_rtn(linear.weight, 4, 64), linear.bias.detach().clone()
            ),
        }
        for count in ROWS:
            x = torch.randn(count, in_features)
            times = {name: median_ms(module, x) for name, module in modes.items()}
            row = {
                "in_features": in_features,
                "out_features": out_features,
                "rows": count,
                "ms": {k: round(v, 4) for k, v in times.items()},
                "speedup_vs_fp32": {k: round(times["fp32"] / v, 3) for k, v in times.items()},
            }
            rows.append(row)
            print(row)
    path = write_result(
        "kernels",
        {"command": "python bench/quant_kernels.py", "machine": machine(), "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
