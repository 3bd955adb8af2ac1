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

Dynamic int8 layers (`quantize.dynamic_int8`) run fbgemm's GEMM instead
(`quantized::linear_dynamic`), which has the same u8×s8 pair sums but quantizes the activations
itself, per tensor and per call. Its `reduce_range` narrows those codes to 0..127, which torch's
dynamic Linear always asks for: needed only without VNNI, and it costs accuracy (every
all-MiniLM-L6-v2 block Linear quantized, mean cosine to the float embeddings: 0.933 with 7-bit
activation codes against 0.958 with 8-bit ones, per-tensor weights; 0.972 against 0.992 per
channel). fbgemm picks its kernels on its own: it ignores both caps above and obeys
`FBGEMM_ENABLE_INSTRUCTIONS`, so `dynamic_int8_gemm_saturates` probes it separately.
"""

from __future__ import annotations

import functools
import warnings

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
FULL_ACTIVATION_RANGE = "full (8-bit)"
REDUCED_ACTIVATION_RANGE = (
    "reduced (7-bit): this CPU's int8 GEMM sums u8×s8 pairs in 16 bits (no VNNI), so 8-bit "
    "activation codes would saturate"
)


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


def dynamic_int8_linear(
    x: torch.Tensor, packed_params: torch.ScriptObject, reduce_range: bool
) -> torch.Tensor:
    """x × weightᵀ + bias in float32 on fbgemm's u8×s8 GEMM, x quantized per tensor on the way in
    from its own min and max (made to include 0) to codes 0..255, or 0..127 with
    `reduce_range`."""
    return torch.ops.quantized.linear_dynamic(x, packed_params, reduce_range)


@functools.cache
def dynamic_int8_gemm_saturates() -> bool:
    """Whether fbgemm's dynamic int8 linear loses products to 16-bit saturation with full-range
    (8-bit) activation codes, in this process: inputs spanning exactly 0..255 (so the kernel's
    own activation scale is 1 and its zero point 0: codes equal values, nearly all 255) times
    weight codes of 127, whose exact sums fit float32, compared with float64 sums."""
    for rows, inner, outputs in _PROBE_SHAPES:
        x = torch.full((rows, inner), 255.0)
        x[0, 0] = 0.0
        weight = torch.full((outputs, inner), 127, dtype=torch.int8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors' deprecation notice
            quantized = torch._make_per_tensor_quantized_tensor(weight, 1.0, 0)
            # How torch's dynamic Linear packs its weight (`set_weight_bias`).
            packed = torch.ops.quantized.linear_prepack(quantized, None)
        result = dynamic_int8_linear(x, packed, reduce_range=False).double()
        exact = x.double() @ weight.double().T
        if not torch.allclose(result, exact, rtol=1e-6, atol=0.0):
            return True
    return False
