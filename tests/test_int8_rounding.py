"""recover.distill int8_aware: training through the rounding dynamic int8 serving applies
(passes/int8_rounding.py), on this CPU's weight range (7-bit without VNNI: the forced-AVX2 run
of `make test` covers that range)."""

from __future__ import annotations

import pytest
import tiny
import torch

from slimformer.passes.int8_rounding import int8_rounding
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")


def test_int8_rounding_imitates_onnx_runtimes_dynamic_int8():
    # The point of int8-aware distillation: the student trains on the outputs int8 serving
    # will give. Through the rounding, PyTorch's outputs must sit far closer to ONNX Runtime's
    # dynamic int8 than the float outputs do (unfused: the fused embedding LayerNorm's own
    # rounding is not imitated).
    model = tiny.tiny_bert()
    batch = tiny.calibration(model)[0]
    step = Step("runtime.onnxruntime", {"optimize": False, "int8": "dynamic"})
    served = apply_recipe(model, Recipe(steps=(step,)), tiny.calibration(model))
    with torch.no_grad():
        float_out = tiny.output(model, batch)
        with int8_rounding(model.module) as count:
            rounded = tiny.output(model, batch)
        int8_out = tiny.output(served, batch)
    assert count > 0
    rounded_error = (rounded - int8_out).abs().max()
    float_error = (float_out - int8_out).abs().max()
    assert rounded_error < float_error / 20, (rounded_error, float_error)


def test_int8_aware_distillation_trains_the_float_weights_and_leaves_plain_linears():
    model = tiny.tiny_bert()
    recipe = Recipe(
        steps=(
            Step("prune.ffn", {"keep": 0.5, "criterion": "magnitude"}),
            Step("recover.distill", {"steps": 60, "lr": 1e-4, "int8_aware": True}),
        ),
        seed=3,
    )
    distilled = apply_recipe(
        model, recipe, tiny.calibration(model), training=tiny.calibration(model, batches=6)
    )
    resolved = distilled.recipe.steps[-1].resolved
    assert resolved["steps"] == 60
    assert resolved["held_out_loss_after"] < resolved["held_out_loss_before"]
    linears = [m for m in distilled.module.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and not any(hasattr(m, "parametrizations") for m in linears)
    assert all(type(m.weight) is torch.nn.Parameter for m in linears)
    pruned = apply_recipe(model, Recipe(steps=recipe.steps[:1], seed=3), tiny.calibration(model))
    moved = [
        not torch.equal(a, b)
        for a, b in zip(pruned.module.parameters(), distilled.module.parameters(), strict=True)
    ]
    assert any(moved)


def test_int8_aware_distillation_keeps_a_decoders_tied_lm_head_tied():
    # The tied head is one Parameter behind an Embedding and a Linear, each rounded its way.
    model = tiny.tiny_llama()
    recipe = Recipe(
        steps=(Step("recover.distill", {"steps": 10, "lr": 1e-4, "int8_aware": True}),), seed=3
    )
    distilled = apply_recipe(
        model, recipe, tiny.calibration(model), training=tiny.calibration(model, batches=6)
    )
    module = distilled.module
    assert module.lm_head.weight is module.model.embed_tokens.weight
    assert not torch.equal(module.lm_head.weight, model.module.lm_head.weight)
