"""runtime.batching: padded, bucketed and padding-free (unpadded) execution."""

from __future__ import annotations

import pytest
import tiny
import torch

from slimformer.checkpoint import load_model, save_model
from slimformer.engines.unpadded import UnpaddedEncoder
from slimformer.errors import SlimformerError
from slimformer.measure import MeasureSettings, time_throughput
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step
from slimformer.tasks.base import collate

pytestmark = pytest.mark.usefixtures("single_thread")


def with_steps(model, *steps):
    recipe = Recipe(steps=tuple(Step(name, config) for name, config in steps))
    return apply_recipe(model, recipe, tiny.calibration(model))


def padded_batch(model):
    """Sentences of very different lengths in one batch: most positions are padding."""
    examples = [model.tokenizer(text)["input_ids"] for text in tiny.SENTENCES]
    return collate(model, examples)


def assert_equal_at_real_positions(expected, got, mask, atol=1e-5):
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=atol)
    assert got[~real].abs().max() == 0  # pads are not computed


def test_unpadded_equals_padded_outputs_on_real_tokens():
    model = tiny.build("bert")
    unpadded = with_steps(model, ("runtime.batching", {"mode": "unpadded"}))
    assert isinstance(unpadded.module, UnpaddedEncoder)
    batch = padded_batch(model)
    assert_equal_at_real_positions(
        tiny.output(model, batch), tiny.output(unpadded, batch), batch["attention_mask"]
    )


def test_unpadded_runs_pruned_and_int8_layers_on_packed_tokens(tmp_path):
    model = tiny.build("bert")
    compressed = with_steps(
        model,
        ("prune.heads", {"keep": 0.5, "criterion": "magnitude", "allocation": "global"}),
        ("quantize.dynamic_int8", {}),
    )
    unpadded = apply_recipe(
        compressed,
        Recipe(steps=(Step("runtime.batching", {"mode": "unpadded"}),)),
        tiny.calibration(model),
    )
    batch = padded_batch(model)
    expected = tiny.output(compressed, batch)
    # Dynamic int8 scales activations by their batch-wide range; without the pad rows that
    # range differs slightly, so outputs agree to int8 noise rather than to float rounding.
    mask = batch["attention_mask"]
    assert_equal_at_real_positions(expected, tiny.output(unpadded, batch), mask, atol=3e-3)
    save_model(unpadded, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.module, UnpaddedEncoder) and loaded.batching == "unpadded"
    torch.testing.assert_close(tiny.output(loaded, batch), tiny.output(unpadded, batch))


@pytest.mark.parametrize("family", ["llama", "vit"])
def test_unpadded_is_refused_clearly_where_it_does_not_apply(family):
    with pytest.raises(SlimformerError, match="unpadded"):
        with_steps(tiny.build(family), ("runtime.batching", {"mode": "unpadded"}))


def test_unpadded_model_cannot_be_exported_to_onnxruntime():
    with pytest.raises(SlimformerError, match="unpadded batching runs in PyTorch only"):
        with_steps(
            tiny.build("bert"),
            ("runtime.batching", {"mode": "unpadded"}),
            ("runtime.onnxruntime", {}),
        )


@pytest.mark.parametrize(("mode", "sorted_batches"), [("bucketed", True), ("padded", False)])
def test_throughput_batches_follow_the_batching_mode(mode, sorted_batches):
    model = with_steps(tiny.build("bert"), ("runtime.batching", {"mode": mode}))
    # Lengths alternate long/short in arrival order.
    examples = [list(range(100, 100 + n)) for n in (30, 3, 28, 4, 26, 5, 24, 6)]
    seen: list[list[int]] = []
    model.module.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"].sum(1).tolist()),
        with_kwargs=True,
    )
    settings = MeasureSettings(batch_size=2, min_seconds=0.0, throughput_inputs=8)
    time_throughput(model, examples, settings)
    batches = {tuple(b) for b in seen}
    if sorted_batches:
        assert (3, 4) in batches and (28, 30) in batches
    else:
        assert (30, 3) in batches and (24, 6) in batches
