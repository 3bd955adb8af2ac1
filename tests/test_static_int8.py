"""quantize.static_int8 (calibrated uint8 activations × int8 weights on oneDNN) and
quantize.smooth (SmoothQuant's outlier migration) on tiny models."""

from __future__ import annotations

import pytest
import tiny
import torch
from torch import nn

from slimformer.checkpoint import load_model, save_model
from slimformer.errors import SlimformerError
from slimformer.kernels import exact_weight_bits
from slimformer.layers import SmoothedLinear, StaticInt8Linear
from slimformer.passes.observers import (
    InputStats,
    activation_range,
    fake_quantize,
    uint8_params,
)
from slimformer.passes.quantize_static_int8 import static_int8_layer
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")


def run(model, *steps):
    recipe = Recipe(steps=tuple(Step(n, c) for n, c in steps))
    return apply_recipe(model, recipe, tiny.calibration(model, batches=4))


def cosine(a, b):
    return float(nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


def stats_of(x: torch.Tensor) -> InputStats:
    return InputStats(x.amin(0), x.amax(0), [x], x.shape[0])


def test_uint8_quantize_dequantize_error_is_at_most_half_a_step():
    x = torch.randn(1000) * 3
    scale, zero = uint8_params(float(x.min()), float(x.max()))
    assert (fake_quantize(x, scale, zero) - x).abs().max() <= scale / 2 + 1e-6


def test_clipping_observers_beat_minmax_when_one_outlier_stretches_the_range():
    x = torch.randn(4096, 16)
    x[0, 0] = 200.0  # one outlier token
    low, high = float(x.min()), float(x.max())
    errors = {}
    for observer in ("minmax", "percentile", "mse"):
        clipped = activation_range(x, low, high, observer)
        error = (fake_quantize(x, *uint8_params(*clipped)) - x).pow(2)
        errors[observer] = float(error[1:].mean())  # error on the typical tokens
    assert errors["percentile"] < errors["minmax"] / 4
    assert errors["mse"] < errors["minmax"]


def exact_product(layer: StaticInt8Linear, x: torch.Tensor) -> torch.Tensor:
    """What the layer should compute: its integer codes (rounded as it rounds them) multiplied
    exactly, in float64."""
    codes = torch.round(x * layer.input_multiplier) + layer.input_zero_point
    codes = codes.double().clamp(0, 255) - layer.input_zero_point
    weight = layer.weight_int8.double() * layer.weight_scales.double()[:, None]
    return codes @ weight.T * layer.input_scale + layer.bias.double()


def test_static_layer_computes_the_exact_product_of_its_codes_on_this_cpus_kernel():
    # Skewed positive inputs put many u8·s8 pairs past 16 bits with 8-bit weight codes: where
    # the GEMM would saturate them, the layer must have chosen 7-bit ones.
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 7, 64).abs() * 2 - 0.2
    layer = static_int8_layer(linear, stats_of(x.reshape(-1, 64)), "minmax")
    assert layer.weight_bits == exact_weight_bits()
    assert int(layer.weight_int8.abs().max()) == 2 ** (layer.weight_bits - 1) - 1
    torch.testing.assert_close(layer(x).double(), exact_product(layer, x), rtol=1e-5, atol=1e-4)
    assert cosine(layer(x), linear(x)) > 0.999


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_static_int8_model_runs_onednn_int8_and_stays_close(family):
    model = tiny.build(family)
    quantized = run(model, ("quantize.static_int8", {}))
    names = model.adapter.block_linear_names()
    assert all(type(quantized.module.get_submodule(n)) is StaticInt8Linear for n in names)
    batch = tiny.calibration(model)[0]
    with tiny.OpCounter() as counter:
        out = tiny.output(quantized, batch)
    assert counter.calls["qlinear_pointwise.default"] == len(names)
    assert cosine(out, tiny.output(model, batch)) > 0.99


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_smoothing_alone_leaves_the_function_unchanged(family):
    from slimformer.passes import get_pass
    from slimformer.passes.base import PassContext

    model = tiny.build(family)
    smoothed = model.copy()
    get_pass("quantize.smooth")().apply(
        smoothed,
        get_pass("quantize.smooth").make_config({"alpha": 0.8}),
        PassContext(calibration=tiny.calibration(model)),
    )
    assert any(isinstance(m, SmoothedLinear) for m in smoothed.module.modules())
    batch = tiny.calibration(model)[0]
    torch.testing.assert_close(
        tiny.output(smoothed, batch), tiny.output(model, batch), rtol=1e-4, atol=1e-4
    )


def test_smoothing_flattens_an_outlier_channel_and_lowers_static_int8_error():
    torch.manual_seed(0)
    model = tiny.tiny_llama()
    # An outlier channel in the residual stream, as in real LLMs: the input norm's gain on
    # channel 3 of every block is 40x.
    with torch.no_grad():
        for block in model.adapter.blocks():
            block.input_layernorm.weight[3] = 40.0
            block.post_attention_layernorm.weight[3] = 40.0
    batch = tiny.calibration(model)[0]
    reference = tiny.output(model, batch)
    plain = run(model, ("quantize.static_int8", {}))
    smoothed = run(model, ("quantize.smooth", {"alpha": 0.8}), ("quantize.static_int8", {}))
    assert not any(isinstance(m, SmoothedLinear) for m in smoothed.module.modules())
    error_plain = (tiny.output(plain, batch) - reference).pow(2).mean()
    error_smoothed = (tiny.output(smoothed, batch) - reference).pow(2).mean()
    assert error_smoothed < error_plain / 2


def test_smooth_without_static_int8_is_rejected():
    with pytest.raises(SlimformerError, match="needs quantize.static_int8"):
        run(tiny.tiny_bert(), ("quantize.smooth", {}))


def test_static_int8_saves_and_reloads_to_identical_outputs(tmp_path):
    model = tiny.tiny_llama()
    quantized = run(model, ("quantize.smooth", {}), ("quantize.static_int8", {"observer": "mse"}))
    reloaded = load_model(save_model(quantized, tmp_path / "q"))
    batch = tiny.calibration(model)[0]
    torch.testing.assert_close(
        tiny.output(reloaded, batch), tiny.output(quantized, batch), rtol=0, atol=0
    )
    # A copy (the study copies models) re-packs the weights instead of failing on them.
    torch.testing.assert_close(
        tiny.output(quantized.copy(), batch), tiny.output(quantized, batch), rtol=0, atol=0
    )
