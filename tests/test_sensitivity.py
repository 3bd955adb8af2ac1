"""Per-layer quantization sensitivity and the mixed-precision plans built on it."""

from __future__ import annotations

import pytest
import tiny
import torch
from torch import nn

from slimformer.layers.dynamic_int8 import dynamic_int8_layer
from slimformer.passes.sensitivity import rank_layers
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")


def plant_fragile_layer(model, name: str) -> None:
    """One outlier weight (~150 standard deviations): a per-tensor int8 scale then rounds
    most other weights of that layer to zero, while the float model barely changes."""
    with torch.no_grad():
        model.module.get_submodule(name).weight[0, 0] = 3.0


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sensitivity_ranks_a_deliberately_fragile_layer_first(family):
    model = tiny.build(family)
    names = model.adapter.block_linear_names()
    fragile = model.adapter.block_linear_names(("ffn_out",))[1]
    plant_fragile_layer(model, fragile)
    ranking = rank_layers(
        model, names, lambda n, linear: dynamic_int8_layer(linear, False), tiny.calibration(model)
    )
    assert ranking[0][0] == fragile
    assert ranking[0][1] < ranking[1][1] - 6  # by a wide margin: 4x the noise power
    # Probing leaves the model as it was.
    assert all(type(model.module.get_submodule(n)) is nn.Linear for n in names)


def test_dynamic_int8_keeps_the_most_sensitive_layers_in_float():
    model = tiny.tiny_bert()
    names = model.adapter.block_linear_names()
    plant_fragile_layer(model, names[5])
    recipe = Recipe(steps=(Step("quantize.dynamic_int8", {"keep_sensitive": 1}),))
    quantized = apply_recipe(model, recipe, tiny.calibration(model))
    assert list(quantized.recipe.steps[-1].resolved["kept_sensitive"]) == [names[5]]
    assert type(quantized.module.get_submodule(names[5])) is nn.Linear
    assert sum(type(quantized.module.get_submodule(n)) is nn.Linear for n in names) == 1


def test_weight_only_keep_sensitive_leaves_that_many_layers_float():
    model = tiny.tiny_llama()
    recipe = Recipe(
        steps=(
            Step(
                "quantize.weight_only",
                {"bits": 4, "group_size": 32, "method": "rtn", "keep_sensitive": 2},
            ),
        )
    )
    quantized = apply_recipe(model, recipe, tiny.calibration(model))
    resolved = quantized.recipe.steps[-1].resolved
    float_layers = [n for n, reason in resolved["kept_float"].items() if "sensitive" in reason]
    assert len(float_layers) == 2
    assert resolved["quantized_layers"] == len(model.adapter.block_linear_names()) - 2
