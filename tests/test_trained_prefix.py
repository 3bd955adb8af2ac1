"""Trained prefixes (trained_prefix.py): a build keeps its model as it stood after training, and
a later build that starts with the same steps loads it and gives the same candidate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from slimformer.recipe import Recipe, Step
from slimformer.taskspec import TaskSpec
from slimformer.trained_prefix import prefix_key, split_at_training

PRUNE = Step("prune.heads", {"keep": 0.5, "criterion": "magnitude"})
DISTILL = Step("recover.distill", {"steps": 4})
INT8 = Step("quantize.dynamic_int8", {})


def test_a_recipe_splits_after_its_last_training_pass():
    assert split_at_training((PRUNE, DISTILL, INT8)) == ((PRUNE, DISTILL), (INT8,))
    assert split_at_training((PRUNE, INT8)) == ((), (PRUNE, INT8))
    assert split_at_training((PRUNE, DISTILL)) == ((PRUNE, DISTILL), ())


def test_a_prefix_is_the_same_spelled_with_its_defaults_and_another_with_other_settings():
    task = TaskSpec("embedding").to_dict()
    short = prefix_key("m", task, (PRUNE, DISTILL), 0)
    spelled = Step("recover.distill", {"steps": 4, "lr": 5e-5, "hidden_weight": 0.0})
    assert prefix_key("m", task, (PRUNE, spelled), 0) == short
    assert prefix_key("m", task, (PRUNE, Step("recover.distill", {"steps": 5})), 0) != short
    assert prefix_key("m", task, (PRUNE, DISTILL), 1) != short
    assert prefix_key("other", task, (PRUNE, DISTILL), 0) != short


def _build(tiny_encoder: Path, tmp_path: Path, recipe: Recipe, name: str, **kwargs):
    from slimformer.build import build_isolated

    return build_isolated(
        tiny_encoder,
        TaskSpec("embedding"),
        recipe,
        tmp_path / name,
        tmp_path / f"work-{name}",
        batches=tmp_path / "batches.safetensors",
        threads=1,
        **kwargs,
    )


@pytest.fixture()
def batches(tiny_encoder: Path, tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    import tiny

    from slimformer.build import save_batches
    from slimformer.checkpoint import load_model

    model = load_model(tiny_encoder)
    calibration, training = (tiny.calibration(model, batches=4) for _ in range(2))
    save_batches(tmp_path / "batches.safetensors", calibration, training)
    return calibration


def _untimed(recipe: Recipe) -> Recipe:
    """`recipe` without the seconds its passes recorded."""
    steps = tuple(
        dataclasses.replace(s, resolved={k: v for k, v in s.resolved.items() if k != "seconds"})
        for s in recipe.steps
    )
    return dataclasses.replace(recipe, steps=steps)


def test_a_build_from_a_kept_trained_prefix_gives_the_model_an_unbroken_build_gives(
    tiny_encoder, tmp_path, batches
):
    import tiny

    from slimformer.checkpoint import load_model
    from slimformer.search.candidates import ModelBuilder

    kept = tmp_path / "trained"
    first = _build(tiny_encoder, tmp_path, Recipe(steps=(PRUNE, DISTILL)), "first", reuse=kept)
    assert first.reused == () and "recover.distill" in first.pass_seconds
    assert len(list(kept.iterdir())) == 1
    served = Recipe(steps=(PRUNE, DISTILL, INT8))
    # What the study's time budget counts for that trial: only the passes left to run.
    builder = ModelBuilder(str(tiny_encoder), TaskSpec("embedding"), tmp_path / "b", reuse=kept)
    assert builder.passes_to_run(served) == ["quantize.dynamic_int8"]
    assert ModelBuilder(str(tiny_encoder), TaskSpec("embedding"), tmp_path / "b").passes_to_run(
        served
    ) == ["prune.heads", "recover.distill", "quantize.dynamic_int8"]
    again = _build(tiny_encoder, tmp_path, served, "again", reuse=kept)
    assert again.reused == ("prune.heads", "recover.distill")
    assert list(again.pass_seconds) == ["quantize.dynamic_int8"]  # only the rest ran
    unbroken = _build(tiny_encoder, tmp_path, served, "unbroken")
    assert unbroken.reused == ()
    # The decisions the prefix resolved are kept (all but how long its training took, which
    # differs between the two builds by a tenth of a second now and then).
    assert _untimed(again.recipe) == _untimed(unbroken.recipe)
    reused, built = load_model(tmp_path / "again"), load_model(tmp_path / "unbroken")
    for batch in batches:
        assert torch.equal(tiny.output(reused, batch), tiny.output(built, batch))


def test_a_distillation_stopped_at_the_deadline_is_not_kept_for_later_trials(
    tiny_encoder, tmp_path, batches
):
    import time

    kept = tmp_path / "trained"
    built = _build(
        tiny_encoder,
        tmp_path,
        Recipe(steps=(PRUNE, DISTILL, INT8)),
        "late",
        reuse=kept,
        passes_deadline=time.time() - 1,  # the study's deadline has passed: no step trains
    )
    assert built.recipe.steps[1].resolved["stopped"]
    assert not kept.exists() or not any(kept.iterdir())
