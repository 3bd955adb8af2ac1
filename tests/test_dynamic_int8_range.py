"""Dynamic int8's activation range: 8-bit codes where fbgemm's GEMM sums them exactly (VNNI),
7-bit where its u8×s8 pairs would saturate 16 bits, decided by each process at run time.

The in-process tests hold in whichever mode the suite runs (natively, and again with the
dispatch caps of `make test-avx2`); `FBGEMM_ENABLE_INSTRUCTIONS=AVX2` reproduces a CPU without
VNNI for fbgemm, but only in a process started with it, so that case runs in a subprocess.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tiny
import torch
from dispatch import findings_at
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

from slimformer import cpu
from slimformer.checkpoint import load_model, save_model
from slimformer.kernels import (
    FULL_ACTIVATION_RANGE,
    REDUCED_ACTIVATION_RANGE,
    dynamic_int8_gemm_saturates,
    dynamic_int8_linear,
)
from slimformer.layers import codec_for
from slimformer.layers.dynamic_int8 import DynamicInt8Linear, dynamic_int8_layer
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")

STEP = 2.0**-5  # activation scale of the test inputs: a power of two, so codes are exact


def recipe(per_channel: bool) -> Recipe:
    return Recipe(steps=(Step("quantize.dynamic_int8", {"per_channel": per_channel}),))


# Everything the fbgemm-at-AVX2 test checks, found in one interpreter; argv[1] is a tiny BERT
# quantized (per channel) and saved by the parent process, in whichever mode that runs.
FBGEMM_AVX2_FINDINGS = """
import json, sys
import tiny
import torch
from test_dynamic_int8_range import exact_error, grid_input, large_code_layer, recipe
from slimformer import kernels
from slimformer.checkpoint import load_model
from slimformer.pipeline import apply_recipe

layer = large_code_layer(per_channel=False)
x7, x8 = grid_input(127), grid_input(255)
packed = layer._packed_params._packed_params
model = tiny.tiny_bert()
batch = tiny.calibration(model)[0]
quantized = apply_recipe(model, recipe(True))
loaded = load_model(sys.argv[1])
print(json.dumps({
    "saturates": kernels.dynamic_int8_gemm_saturates(),
    "layer_error": exact_error(layer, x7),
    "layer_is_reduced": torch.equal(layer(x7), kernels.dynamic_int8_linear(x7, packed, True)),
    "full_range_error": exact_error(layer, x8, kernels.dynamic_int8_linear(x8, packed, False)),
    "activation_range": quantized.recipe.steps[-1].resolved["activation_range"],
    "loaded_matches_quantized_here": torch.equal(
        tiny.output(loaded, batch), tiny.output(quantized, batch)
    ),
}))
"""


def large_code_layer(per_channel: bool, inner: int = 64, outputs: int = 48) -> DynamicInt8Linear:
    """A layer whose weight codes spread over the whole −127..127 (not a bell curve's few large
    ones), so with 8-bit activation codes many u8·s8 pairs pass 16 bits on a GEMM without VNNI."""
    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(inner, outputs)
    with torch.no_grad():
        linear.weight.uniform_(-1.0, 1.0, generator=generator)
        linear.bias.uniform_(-1.0, 1.0, generator=generator)
    return dynamic_int8_layer(linear, per_channel)


def grid_input(top: int, shape: tuple[int, ...] = (3, 7, 64)) -> torch.Tensor:
    """Inputs the kernel quantizes without rounding when its codes span 0..top: values on a grid
    of STEP spanning exactly top steps with 0 on it (so its own scale is STEP and its zero
    point an integer), mostly near the top code, where u8·s8 pairs are largest."""
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(top * 3 // 4, top + 1, shape, generator=generator)
    flat = codes.view(-1)
    flat[0], flat[1] = 0, top
    zero_point = top // 5
    return (codes - zero_point).float() * STEP


def exact_product(layer: DynamicQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x times the layer's dequantized int8 weight plus its bias, in float64."""
    weight = layer.weight().dequantize().double()
    bias = layer.bias()
    bias = None if bias is None else bias.detach()
    out = x.double() @ weight.T
    return out if bias is None else out + bias.double()


def exact_error(layer: DynamicQuantLinear, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """The largest deviation of y (default: the layer's output) from exact_product, relative to
    the largest sum of magnitudes added up (float32 rounding of the output is ~1e-7 of that)."""
    y = layer(x) if y is None else y
    magnitude = x.double().abs() @ layer.weight().dequantize().double().abs().T
    return float((y.double() - exact_product(layer, x)).abs().max() / magnitude.max())


def this_process_top_code() -> int:
    return 127 if dynamic_int8_gemm_saturates() else 255


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    quantized = apply_recipe(tiny.tiny_bert(), recipe(True))
    return save_model(quantized, tmp_path_factory.mktemp("models") / "int8")


@pytest.fixture(scope="module")
def fbgemm_at_avx2(saved_model) -> dict:
    """FBGEMM_AVX2_FINDINGS from an interpreter whose fbgemm is capped at AVX2 (no VNNI)."""
    caps = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    return findings_at(caps, FBGEMM_AVX2_FINDINGS, str(saved_model))


# --- in this process, whichever mode it runs in ----------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 64), (40, 64)])
def test_layer_computes_the_exact_product_of_its_own_quantization(per_channel, shape):
    layer = large_code_layer(per_channel)
    x = grid_input(this_process_top_code(), shape)
    # Saturated pairs would be off by thousands of codes; 7-bit activations on this 8-bit grid
    # by about a hundredth.
    assert exact_error(layer, x) < 1e-5


def test_layer_runs_the_activation_range_the_probe_picks():
    layer = large_code_layer(per_channel=True)
    x = torch.randn(5, 64)
    packed = layer._packed_params._packed_params
    expected = dynamic_int8_linear(x, packed, reduce_range=dynamic_int8_gemm_saturates())
    assert torch.equal(layer(x), expected)


def test_probe_agrees_with_fbgemms_instruction_set():
    forced = cpu.forced_caps()
    if forced and "FBGEMM_ENABLE_INSTRUCTIONS" not in forced:
        pytest.skip("the other caps lower cpu.has_vnni() but not fbgemm's kernels")
    isa = cpu.fingerprint().isa
    if "avx_vnni" in isa and "avx512_vnni" not in isa:
        pytest.skip("fbgemm's VNNI kernels are AVX-512 ones; AVX-VNNI alone is not asserted")
    assert dynamic_int8_gemm_saturates() is not cpu.has_vnni()


def test_full_range_is_more_accurate_than_torchs_fixed_7_bits_where_it_is_exact():
    if dynamic_int8_gemm_saturates():
        pytest.skip("8-bit activation codes saturate here")
    torch.manual_seed(2)
    linear = nn.Linear(64, 48)
    x = torch.randn(16, 64)
    ours = dynamic_int8_layer(linear, per_channel=True)
    torchs = DynamicQuantLinear(64, 48)
    torchs.set_weight_bias(ours.weight(), ours.bias())
    with torch.no_grad():
        reference = linear(x)
        assert (ours(x) - reference).abs().mean() < 0.75 * (torchs(x) - reference).abs().mean()


def test_pass_records_the_activation_range_and_uses_the_new_layers():
    model = tiny.tiny_bert()
    quantized = apply_recipe(model, recipe(False))
    resolved = quantized.recipe.steps[-1].resolved
    expected = REDUCED_ACTIVATION_RANGE if dynamic_int8_gemm_saturates() else FULL_ACTIVATION_RANGE
    assert resolved["activation_range"] == expected
    layers = [m for m in quantized.module.modules() if isinstance(m, DynamicQuantLinear)]
    assert layers and all(type(m) is DynamicInt8Linear for m in layers)


def test_deep_copies_keep_the_class_and_the_outputs():
    model = tiny.tiny_llama()
    quantized = apply_recipe(model, recipe(True))
    copied = copy.deepcopy(quantized)
    assert {type(m) for m in copied.module.modules()} == {
        type(m) for m in quantized.module.modules()
    }
    batch = tiny.calibration(model)[0]
    assert torch.equal(tiny.output(copied, batch), tiny.output(quantized, batch))


# --- saving -------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_save_and_load_round_trip_is_bit_identical(family, per_channel, tmp_path):
    model = tiny.build(family)
    quantized = apply_recipe(model, recipe(per_channel))
    loaded = load_model(save_model(quantized, tmp_path / "int8"), head=tiny.HEADS[family])
    layers = [m for m in loaded.module.modules() if isinstance(m, DynamicQuantLinear)]
    assert layers and all(type(m) is DynamicInt8Linear for m in layers)
    for batch in tiny.calibration(model):
        assert torch.equal(tiny.output(loaded, batch), tiny.output(quantized, batch))


def test_saved_form_is_unchanged_and_torchs_layers_decode_into_the_new_class():
    layer = large_code_layer(per_channel=True)
    codec = codec_for(layer)
    assert codec is not None and codec.kind == "dynamic_int8_linear"
    tensors, meta = codec.encode(layer)
    assert set(tensors) == {"weight_int8", "bias", "scale", "zero_point"}
    assert set(meta) == {"in_features", "out_features", "qscheme", "axis"}
    # What a file saved before DynamicInt8Linear holds: torch's layer, encoded the same way.
    old = DynamicQuantLinear(64, 48)
    old.set_weight_bias(layer.weight(), layer.bias())
    old_tensors, old_meta = codec.encode(old)
    assert old_meta == meta
    assert all(torch.equal(old_tensors[k], tensors[k]) for k in tensors)
    decoded = codec.decode(old_tensors, old_meta)
    assert type(decoded) is DynamicInt8Linear
    x = torch.randn(4, 64)
    assert torch.equal(decoded(x), layer(x))


# --- fbgemm capped at AVX2, in a subprocess -------------------------------------------------
def test_fbgemm_at_avx2_saturates_and_the_layers_stay_exact_with_7_bit_activations(
    fbgemm_at_avx2,
):
    assert fbgemm_at_avx2["saturates"]
    assert fbgemm_at_avx2["layer_is_reduced"]
    assert fbgemm_at_avx2["layer_error"] < 1e-5
    # What torch's range would cost there if chosen by the CPU it was quantized on.
    assert fbgemm_at_avx2["full_range_error"] > 1e-2
    assert fbgemm_at_avx2["activation_range"] == REDUCED_ACTIVATION_RANGE


def test_model_saved_in_this_mode_runs_there_as_if_quantized_there(fbgemm_at_avx2):
    assert fbgemm_at_avx2["loaded_matches_quantized_here"]
