"""Static int8 on CPUs whose int8 GEMM sums u8×s8 pairs in 16 bits (no VNNI) and saturates.

Forcing oneDNN down to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`) on a VNNI machine reproduces such a
CPU, but only for a process started with it, so the forced cases run in a subprocess; the
in-process tests hold in whichever mode the suite runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import tiny
import torch
from dispatch import FORCED_AVX2, findings_at
from torch import nn

from slimformer import cpu
from slimformer.checkpoint import load_model, save_model
from slimformer.kernels import exact_weight_bits, int8_gemm_saturates
from slimformer.layers import StaticInt8Linear, codec_for
from slimformer.model import SlimModel
from slimformer.passes import quantize_static_int8 as static_int8
from slimformer.passes.observers import InputStats
from slimformer.passes.quantize_static_int8 import static_int8_layer
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")


# Everything the forced-AVX2 tests check, found in one interpreter (each start costs seconds);
# argv[1] is a model saved with 8-bit weight codes.
FORCED_AVX2_FINDINGS = """
import json, logging, sys
import tiny
import torch
from test_int8_saturation import cosine, skewed_layer_input, stats_of
from test_static_int8 import exact_product
from slimformer import cpu, kernels
from slimformer.checkpoint import load_model
from slimformer.layers import StaticInt8Linear
from slimformer.passes.quantize_static_int8 import static_int8_layer
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

class Collect(logging.Handler):
    messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

logging.getLogger("slimformer").addHandler(Collect())
linear, x = skewed_layer_input()
layer = static_int8_layer(linear, stats_of(x), "minmax")
model = tiny.tiny_bert()
batch = tiny.calibration(model)[0]
quantized = apply_recipe(model, Recipe(steps=(Step("quantize.static_int8", {}),)), [batch])
loaded = load_model(sys.argv[1])
print(json.dumps({
    "saturates": kernels.int8_gemm_saturates(),
    "vnni": cpu.has_vnni(),
    "layer_bits": layer.weight_bits,
    "layer_error": float((layer(x).double() - exact_product(layer, x)).abs().max()),
    "resolved": quantized.recipe.steps[-1].resolved,
    "loaded_bits": sorted({
        m.weight_bits for m in loaded.module.modules() if isinstance(m, StaticInt8Linear)
    }),
    "load_messages": Collect.messages,
    "loaded_cosine": cosine(tiny.output(loaded, batch), tiny.output(model, batch)),
}))
"""


def skewed_layer_input() -> tuple[nn.Linear, torch.Tensor]:
    """A layer and inputs for which 8-bit weight codes put many u8·s8 pairs past 16 bits."""
    torch.manual_seed(0)
    return nn.Linear(64, 48), torch.randn(3, 7, 64).abs() * 2 - 0.2


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


def stats_of(x: torch.Tensor) -> InputStats:
    rows = x.reshape(-1, x.shape[-1])
    return InputStats(rows.amin(0), rows.amax(0), [rows], rows.shape[0])


def quantize_tiny(model: SlimModel) -> SlimModel:
    recipe = Recipe(steps=(Step("quantize.static_int8", {}),))
    return apply_recipe(model, recipe, tiny.calibration(model))


@pytest.fixture(scope="module")
def saved_8_bit_model(tmp_path_factory) -> Path:
    """A tiny BERT quantized as on a VNNI CPU, whichever mode this process runs in."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(static_int8, "exact_weight_bits", lambda: 8)
        quantized = quantize_tiny(tiny.tiny_bert())
    assert quantized.recipe.steps[-1].resolved["weight_bits"] == 8
    return save_model(quantized, tmp_path_factory.mktemp("models") / "8-bit")


@pytest.fixture(scope="module")
def forced_avx2(saved_8_bit_model) -> dict:
    """FORCED_AVX2_FINDINGS from an interpreter started with every dispatch capped at AVX2."""
    return findings_at(FORCED_AVX2, FORCED_AVX2_FINDINGS, str(saved_8_bit_model))


def test_saturation_probe_agrees_with_the_cpus_vnni_flag():
    forced = cpu.forced_caps()
    if "ATEN_CPU_CAPABILITY" in forced and "ONEDNN_MAX_CPU_ISA" not in forced:
        pytest.skip("ATEN_CPU_CAPABILITY alone lowers cpu.has_vnni() but not oneDNN's kernel")
    assert int8_gemm_saturates() is not cpu.has_vnni()


def test_forced_avx2_probe_finds_saturation_and_no_vnni(forced_avx2):
    assert forced_avx2["saturates"] and not forced_avx2["vnni"]


def test_forced_avx2_static_layer_uses_7_bit_weights_and_computes_the_exact_product(forced_avx2):
    assert forced_avx2["layer_bits"] == 7
    assert forced_avx2["layer_error"] < 1e-4


def test_forced_avx2_recipe_records_7_bit_weights_and_why(forced_avx2):
    assert forced_avx2["resolved"]["weight_bits"] == 7
    assert "16 bits" in forced_avx2["resolved"]["why"]


def test_model_saved_with_8_bit_weights_loads_close_to_float_where_the_gemm_saturates(
    forced_avx2,
):
    assert forced_avx2["loaded_bits"] == [7]
    # Said once for the model's 24 layers.
    assert len(forced_avx2["load_messages"]) == 1
    assert "8-bit weight codes" in forced_avx2["load_messages"][0]
    assert forced_avx2["loaded_cosine"] > 0.99


def test_re_rounding_a_layer_to_7_bit_weights_moves_each_weight_at_most_half_a_step():
    linear, x = skewed_layer_input()
    eight = static_int8_layer(linear, stats_of(x), "minmax", weight_bits=8)
    seven = eight.with_weight_bits(7)
    assert seven.weight_bits == 7 and int(seven.weight_int8.abs().max()) == 63
    torch.testing.assert_close(seven.weight_scales, eight.weight_scales * 127 / 63)
    before = eight.weight_int8.float() * eight.weight_scales[:, None]
    after = seven.weight_int8.float() * seven.weight_scales[:, None]
    assert ((after - before).abs() <= seven.weight_scales[:, None] / 2 + 1e-7).all()
    assert cosine(seven(x), linear(x)) > 0.999


def test_7_bit_model_reloads_unchanged_and_silently(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(static_int8, "exact_weight_bits", lambda: 7)
    model = tiny.tiny_llama()
    quantized = quantize_tiny(model)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="slimformer"):
        reloaded = load_model(save_model(quantized, tmp_path / "q7"))
    assert not caplog.records
    layers = [m for m in reloaded.module.modules() if isinstance(m, StaticInt8Linear)]
    assert layers and all(m.weight_bits == 7 for m in layers)
    batch = tiny.calibration(model)[0]
    torch.testing.assert_close(
        tiny.output(reloaded, batch), tiny.output(quantized, batch), rtol=0, atol=0
    )


def test_layer_saved_without_the_bits_marker_is_read_as_8_bit():
    linear, x = skewed_layer_input()
    eight = static_int8_layer(linear, stats_of(x), "minmax", weight_bits=8)
    codec = codec_for(eight)
    tensors, meta = codec.encode(eight)
    del meta["weight_bits"]
    decoded = codec.decode(tensors, meta)
    # Re-rounded to 7 bits exactly where 8-bit codes would saturate.
    assert decoded.weight_bits == exact_weight_bits()
    expected = eight.with_weight_bits(7) if int8_gemm_saturates() else eight
    torch.testing.assert_close(decoded(x), expected(x), rtol=0, atol=0)
