"""How much each int8 design choice costs in embedding fidelity, on the real MiniLM.

    python bench/int8_fidelity.py            # -> bench/results/int8_fidelity.json (~3 min)

The choices slimformer makes per CPU (see src/slimformer/kernels.py) rest on these figures:
- dynamic int8 (fbgemm): 8-bit activation codes where the int8 GEMM sums them exactly (VNNI),
  7-bit elsewhere; per-tensor or per-channel weight scales;
- static int8 (oneDNN): 8-bit weight codes where exact, 7-bit elsewhere;
- ONNX Runtime int8: `reduce_range` (7-bit weights) without VNNI; per-channel by default.

Each row forces one choice and reports the mean cosine between the candidate's and the fp32
model's sentence embeddings over held-out movie-review sentences. A forced choice is exact
only where the GEMM sums its codes exactly: 7-bit codes everywhere, 8-bit codes only where the
probe says the kernel does not saturate (`exact` in each row). On a CPU with VNNI every row is
exact, so the rows isolate the rounding loss of the narrower codes; elsewhere the 8-bit rows
also carry the kernel's saturation, which is why slimformer does not use them there.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
from common import machine, write_result

import slimformer
from slimformer import cpu, kernels
from slimformer.layers import dynamic_int8
from slimformer.passes import quantize_static_int8
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step
from slimformer.tasks import TaskSpec, make_task
from slimformer.tasks.embedding import embed, normalize

SEQ_LEN = 128


@contextmanager
def dynamic_activation_bits(bits: int) -> Iterator[None]:
    with mock.patch.object(dynamic_int8, "dynamic_int8_gemm_saturates", lambda: bits == 7):
        yield


@contextmanager
def static_weight_bits(bits: int) -> Iterator[None]:
    with mock.patch.object(quantize_static_int8, "exact_weight_bits", lambda: bits):
        yield


@contextmanager
def onnxruntime_weight_bits(bits: int) -> Iterator[None]:
    # The pass asks for 7-bit weights (reduce_range) exactly when the CPU lacks VNNI.
    with mock.patch.object(cpu, "has_vnni", lambda: bits == 8):
        yield


def rows() -> list[tuple[str, list[tuple[str, dict]], Callable, int, bool]]:
    """(label, recipe steps, forcing context, bits, exact here)."""
    dynamic_exact = {8: not kernels.dynamic_int8_gemm_saturates(), 7: True}
    static_exact = {8: not kernels.int8_gemm_saturates(), 7: True}
    ort_exact = {8: cpu.has_vnni(), 7: True}  # MLAS reads the CPU itself
    out = []
    for per_channel in (False, True):
        scales = "per-channel" if per_channel else "per-tensor"
        for bits in (8, 7):
            out.append(
                (
                    f"dynamic int8 {scales}, {bits}-bit activations",
                    [("quantize.dynamic_int8", {"per_channel": per_channel})],
                    dynamic_activation_bits,
                    bits,
                    dynamic_exact[bits],
                )
            )
    for bits in (8, 7):
        out.append(
            (
                f"static int8 MSE, {bits}-bit weights",
                [("quantize.static_int8", {"observer": "mse"})],
                static_weight_bits,
                bits,
                static_exact[bits],
            )
        )
    for per_channel in (False, True):
        scales = "per-channel" if per_channel else "per-tensor"
        for bits in (8, 7):
            out.append(
                (
                    f"ONNX Runtime int8 {scales}, {bits}-bit weights",
                    [("runtime.onnxruntime", {"int8": "dynamic", "per_channel": per_channel})],
                    onnxruntime_weight_bits,
                    bits,
                    ort_exact[bits],
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1000)
    args = parser.parse_args()

    reference = slimformer.load("default")
    task = make_task(TaskSpec("embedding"))
    calibration = task.calibration_batches(reference)
    sentences = task.texts("test")[: args.sentences]
    want = normalize(embed(reference, sentences, SEQ_LEN))
    results = []
    for label, steps, forcing, bits, exact in rows():
        with forcing(bits):
            recipe = Recipe(steps=tuple(Step(name, config) for name, config in steps))
            candidate = apply_recipe(reference, recipe, calibration)
            got = normalize(embed(candidate, sentences, SEQ_LEN))
        fidelity = float(np.mean(np.sum(want * got, axis=1)))
        results.append({"mode": label, "bits": bits, "exact": exact, "fidelity": fidelity})
        print(f"{label:48s} fidelity {fidelity:.4f}{'' if exact else '  (kernel saturates)'}")
    path = write_result(
        "int8_fidelity",
        {
            "machine": machine(),
            "int8_gemm_saturates": kernels.int8_gemm_saturates(),
            "dynamic_int8_gemm_saturates": kernels.dynamic_int8_gemm_saturates(),
            "sentences": len(sentences),
            "rows": results,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
