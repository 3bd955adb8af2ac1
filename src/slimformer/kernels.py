"""The int8 GEMM that static int8 layers run, and whether it is exact on this CPU.

oneDNN's u8×s8 GEMM (`onednn::qlinear_pointwise`) multiplies uint8 activation codes by int8
weight codes. With VNNI (vpdpbusd) the products are summed in 32 bits: exact. Without it
(AVX2, or AVX-512 without VNNI) the kernel uses vpmaddubsw, which adds each *pair* of u8·s8
products into a signed 16-bit lane and saturates: 2·255·127 = 64770 > 32767. There, weights
get 7-bit codes (−63..63, as ONNX Runtime's `reduce_range` does): 2·255·63 = 32130 fits.
Narrowing the activations instead (0..127, fbgemm's `reduce_range`) would fit as well, but a
per-tensor activation scale is what int8 already struggles with in transformers: on
all-MiniLM-L6-v2 embeddings 7-bit activations lose over ten times the fidelity that 7-bit
per-channel weights lose (mean cosine to the float model 0.975 against 0.991; 0.993 at 8 bits).

Which code path oneDNN takes depends on the CPU and on `ONEDNN_MAX_CPU_ISA`, not on
`ATEN_CPU_CAPABILITY`, so instead of inferring it from CPU flags `int8_gemm_saturates` asks the
kernel itself, once per process, with a GEMM in which every pair of products overflows 16 bits.
"""

from __future__ import annotations

import functools

import torch

FULL_WEIGHT_BITS = 8  # codes −127..127
SATURATION_SAFE_WEIGHT_BITS = 7  # codes −63..63
SATURATION_REASON = (
    "this CPU's int8 GEMM sums u8×s8 pairs in 16 bits (no VNNI), so 8-bit weight codes "
    "would saturate"
)
# (rows, inner, outputs): one row as in decoding and a block of rows as in a prefill, in case
# oneDNN picks a different kernel for each.
_PROBE_SHAPES = ((1, 64, 16), (32, 256, 64))


def pack_int8_weight(weight_int8: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of an int8 [out, in] weight (an opaque tensor, never saved)."""
    return torch.ops.onednn.qlinear_prepack(weight_int8, None)


def int8_linear(
    codes: torch.Tensor,
    input_scale: float,
    input_zero_point: int,
    packed_weight: torch.Tensor,
    weight_scales: torch.Tensor,
    weight_zero_points: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """(codes − zero point)·scale × (weight codes · weight scales)ᵀ + bias, in float32, on
    oneDNN's u8×s8 GEMM."""
    return torch.ops.onednn.qlinear_pointwise(
        codes,
        input_scale,
        input_zero_point,
        packed_weight,
        weight_scales,
        weight_zero_points,
        bias,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


@functools.cache
def int8_gemm_saturates() -> bool:
    """Whether this process's u8×s8 GEMM loses products to 16-bit saturation: activation codes
    of 255 times weight codes of 127, whose exact sums fit float32, compared with the kernel's."""
    for rows, inner, outputs in _PROBE_SHAPES:
        codes = torch.full((rows, inner), 255, dtype=torch.uint8)
        weight = torch.full((outputs, inner), 127, dtype=torch.int8)
        result = int8_linear(
            codes,
            1.0,
            0,
            pack_int8_weight(weight),
            torch.ones(outputs),
            torch.zeros(outputs, dtype=torch.int64),
            None,
        )
        if not torch.equal(result, torch.full_like(result, float(inner * 255 * 127))):
            return True
    return False


def exact_weight_bits() -> int:
    """The widest weight codes the int8 GEMM sums exactly here (with uint8 activations):
    8 with VNNI, else 7."""
    return SATURATION_SAFE_WEIGHT_BITS if int8_gemm_saturates() else FULL_WEIGHT_BITS
