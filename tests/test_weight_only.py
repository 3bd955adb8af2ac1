"""quantize.weight_only: RTN and GPTQ math, the packed int4/int8 CPU kernels, save and reload."""

from __future__ import annotations

import pytest
import tiny
import torch

from slimformer.checkpoint import load_model, save_model
from slimformer.layers.int4_codes import unpack_int4_codes
from slimformer.layers.weight_only import UNPACK_ROWS, Int4WeightLinear, Int8WeightLinear
from slimformer.passes.gptq import quantize_gptq, quantize_rtn
from slimformer.passes.quantize_weight_only import collect_hessians, fitting_group
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")


def correlated_inputs(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Activations like a transformer's: a few directions carry most of the energy."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(16, columns, generator=generator)
    return torch.randn(rows, 16, generator=generator) @ basis + 0.1 * torch.randn(
        rows, columns, generator=generator
    )


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(((x @ approx.T - x @ weight.T) ** 2).mean())


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (4, 128), (8, 0)])
def test_rtn_round_trip_error_is_at_most_half_a_step(bits, group):
    weight = torch.randn(48, 256)
    q = quantize_rtn(weight, bits, group)
    step = q.scales if bits == 8 else q.scales.repeat_interleave(group, dim=1)
    step = step[:, None] if bits == 8 else step
    assert (q.dequantize() - weight).abs().le(step / 2 + 1e-6).all()
    assert int(q.codes.min()) >= (-127 if bits == 8 else 0)
    assert int(q.codes.max()) <= (127 if bits == 8 else 15)


@pytest.mark.parametrize(
    ("bits", "group", "act_order"), [(4, 32, False), (4, 64, True), (8, 0, False)]
)
def test_gptq_has_lower_layer_output_error_than_rtn(bits, group, act_order):
    weight = torch.randn(64, 256)
    x = correlated_inputs(2048, 256)
    hessian = 2 * x.T @ x / len(x)
    rtn = quantize_rtn(weight, bits, group)
    gptq = quantize_gptq(weight, hessian, bits, group, act_order=act_order)
    assert output_error(x, weight, gptq.dequantize()) < 0.5 * output_error(
        x, weight, rtn.dequantize()
    )


def test_gptq_keeps_groups_on_consecutive_columns_under_act_order():
    weight = torch.randn(32, 128)
    x = correlated_inputs(512, 128)
    q = quantize_gptq(weight, 2 * x.T @ x / len(x), 4, 32, act_order=True)
    assert q.scales.shape == (32, 4) and q.lows.shape == (32, 4)
    # Every code decodes inside its group's [low, high] range.
    decoded = q.dequantize().reshape(32, 4, 32)
    assert (decoded >= q.lows[..., None] - 1e-5).all()


@pytest.mark.parametrize(("bits", "module_type"), [(4, Int4WeightLinear), (8, Int8WeightLinear)])
def test_packed_module_computes_exactly_the_dequantized_product(bits, module_type):
    weight, bias = torch.randn(48, 128), torch.randn(48)
    q = quantize_rtn(weight, bits, 32)
    module = module_type.from_quantized(q, bias)
    x = torch.randn(2, 5, 128)
    expected = x @ q.dequantize().T + bias
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(192, 96), (48, 128), (16, 32), (576, 64)])
def test_int4_unpacking_inverts_the_running_kernels_packing(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_int4_codes(packed, shape[0]), codes.to(torch.uint8))


@pytest.mark.parametrize(
    ("bits", "module_type", "out_features"),
    [(4, Int4WeightLinear, 128), (4, Int4WeightLinear, 48), (8, Int8WeightLinear, 128)],
)
def test_many_rows_unpack_the_weight_and_give_the_kernels_result(bits, module_type, out_features):
    weight, bias = torch.randn(out_features, 256), torch.randn(out_features)
    module = module_type.from_quantized(quantize_rtn(weight, bits, 64), bias)
    x = torch.randn(4 * UNPACK_ROWS, 256)
    kernel_rows = torch.cat([module(x[i : i + 1]) for i in range(len(x))])
    with tiny.OpCounter() as recorder:
        unpacked = module(x)
    assert not any("pack_mm" in op for op in recorder.calls)
    torch.testing.assert_close(unpacked, kernel_rows, rtol=1e-4, atol=1e-4)


def weight_only(model, **config):
    recipe = Recipe(steps=(Step("quantize.weight_only", {"group_size": 32, **config}),))
    return apply_recipe(model, recipe, tiny.calibration(model))


@pytest.mark.parametrize(
    ("bits", "kernel", "module_type"),
    [
        (4, "_weight_int4pack_mm_for_cpu.default", Int4WeightLinear),
        (8, "_weight_int8pack_mm.default", Int8WeightLinear),
    ],
)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_quantized_model_runs_the_packed_kernel_and_stays_close(family, bits, kernel, module_type):
    model = tiny.build(family)
    quantized = weight_only(model, bits=bits, method="gptq")
    names = model.adapter.block_linear_names()
    assert all(type(quantized.module.get_submodule(n)) is module_type for n in names)
    assert not any(
        type(m) is torch.nn.Linear for n, m in quantized.module.named_modules() if n in names
    )
    batch = {k: v[:1, :8] for k, v in tiny.calibration(model)[0].items()}  # decode-sized
    with tiny.OpCounter() as recorder:
        out = tiny.output(quantized, batch)
    # One packed-kernel call per quantized Linear: none of them fell back to a float matmul.
    assert recorder.calls[kernel] == len(names)
    reference = tiny.output(model, batch)
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    assert cosine > (0.999 if bits == 8 else 0.95)


def test_int4_groups_shrink_to_fit_widths_the_requested_group_does_not_divide():
    assert fitting_group(576, 128) == 64  # SmolLM2's hidden size
    assert fitting_group(1536, 128) == 128
    assert fitting_group(48, 128) is None  # not a multiple of the kernel's smallest group
    model = tiny.tiny_llama()  # 32- and 64-wide inputs
    quantized = weight_only(model, bits=4, group_size=128, method="rtn")
    step = quantized.recipe.steps[-1]
    assert step.resolved["quantized_layers"] == len(model.adapter.block_linear_names())
    assert set(step.resolved["smaller_groups"].values()) == {32, 64}
    for name, group in step.resolved["smaller_groups"].items():
        assert quantized.module.get_submodule(name).group_size == group


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_weights_save_and_reload_to_identical_outputs(bits, tmp_path):
    model = tiny.tiny_llama()
    quantized = weight_only(model, bits=bits, method="rtn")
    save_model(quantized, tmp_path / "q")
    reloaded = load_model(tmp_path / "q")
    batch = tiny.calibration(model)[0]
    torch.testing.assert_close(
        tiny.output(reloaded, batch), tiny.output(quantized, batch), rtol=0, atol=0
    )
    packed = [
        m for m in reloaded.module.modules() if isinstance(m, (Int4WeightLinear, Int8WeightLinear))
    ]
    assert packed and all(not any(True for _ in m.parameters()) for m in packed)


def test_gptq_on_a_tiny_llama_beats_rtn_on_each_layers_real_inputs():
    model = tiny.tiny_llama()
    calibration = tiny.calibration(model, batches=4)
    layers = model.adapter.block_linears(0)
    hessians = collect_hessians(model, 0, layers, calibration)
    for name, linear in layers.items():
        # H = 2·XᵀX/n, so the output error of Δ is trace(Δ H Δᵀ)/2 per input.
        def error(approx, weight=linear.weight.detach(), h=hessians[name]):
            delta = approx - weight
            return float(torch.trace(delta @ h @ delta.T))

        rtn = quantize_rtn(linear.weight, 4, 32).dequantize()
        gptq = quantize_gptq(linear.weight, hessians[name], 4, 32).dequantize()
        assert error(gptq) < error(rtn), name


def test_gptq_handles_a_rank_deficient_hessian_and_dead_inputs():
    weight = torch.randn(16, 64)
    x = correlated_inputs(8, 64)  # fewer calibration rows than input columns
    x[:, 5] = 0.0  # an input channel that never fires
    q = quantize_gptq(weight, 2 * x.T @ x / len(x), 4, 32)
    assert torch.isfinite(q.dequantize()).all()
    assert output_error(x, weight, q.dequantize()) < output_error(
        x, weight, quantize_rtn(weight, 4, 32).dequantize()
    )
