"""recover.distill: the original teaches the pruned model; held-out distillation loss falls."""

from __future__ import annotations

import pytest
import tiny
import torch

from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")


def training_batches(model):
    return tiny.calibration(model, batches=6)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_distillation_lowers_held_out_loss_after_pruning(family):
    model = tiny.build(family)
    recipe = Recipe(
        steps=(
            Step("prune.ffn", {"keep": 0.5, "criterion": "magnitude"}),
            Step("recover.distill", {"steps": 100, "lr": 1e-4, "hidden_weight": 1.0}),
        ),
        seed=3,
    )
    calibration = tiny.calibration(model)
    distilled = apply_recipe(model, recipe, calibration, training=training_batches(model))
    resolved = distilled.recipe.steps[-1].resolved
    assert resolved["steps"] == 100
    assert resolved["held_out_loss_after"] < resolved["held_out_loss_before"]


def test_distillation_is_deterministic_for_a_seed():
    model = tiny.build("bert")
    recipe = Recipe(
        steps=(
            Step("prune.heads", {"keep": 0.5, "criterion": "magnitude"}),
            Step("recover.distill", {"steps": 50}),
        ),
        seed=1,
    )
    calibration = tiny.calibration(model)
    a = apply_recipe(model, recipe, calibration, training=training_batches(model))
    b = apply_recipe(model, recipe, calibration, training=training_batches(model))
    batch = calibration[0]
    assert torch.equal(tiny.output(a, batch), tiny.output(b, batch))
    assert not torch.equal(tiny.output(a, batch), tiny.output(model, batch))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_distillation_stopped_early_records_the_steps_it_trained_so_the_recipe_replays_it(
    schedule,
):
    model = tiny.build("bert")
    calibration, training = tiny.calibration(model), training_batches(model)
    planned = 100_000
    asked = Recipe(
        steps=(
            Step("prune.heads", {"keep": 0.5, "criterion": "magnitude"}),
            Step(
                "recover.distill",
                {"steps": planned, "time_budget_s": 1.0, "lr_schedule": schedule},
            ),
        ),
        seed=1,
    )
    stopped = apply_recipe(model, asked, calibration, training=training)
    step = stopped.recipe.steps[-1]
    assert 0 < step.resolved["steps"] < planned
    assert step.resolved["stopped"] == "at its time budget (time_budget_s)"
    assert step.config["steps"] == step.resolved["steps"]  # what `slimformer apply` replays
    if schedule == "cosine":  # the rate decayed over what the time afforded, as replayed
        assert step.resolved["steps"] // 2 < step.config["decay_steps"] < planned

    replayed = apply_recipe(model, stopped.recipe, calibration, training=training)
    assert replayed.recipe.steps[-1].resolved["steps"] == step.resolved["steps"]
    batch = calibration[0]
    assert torch.equal(tiny.output(replayed, batch), tiny.output(stopped, batch))


def test_a_listening_study_gets_the_held_out_loss_at_intervals_and_the_same_student():
    from slimformer.passes.base import intermediate_values

    model = tiny.build("bert")
    recipe = Recipe(
        steps=(
            Step("prune.heads", {"keep": 0.5, "criterion": "magnitude"}),
            Step("recover.distill", {"steps": 50, "lr": 1e-4}),
        ),
        seed=1,
    )
    calibration = tiny.calibration(model)
    reported: list[tuple[int, float]] = []
    with intermediate_values(lambda step, value: reported.append((step, value))):
        watched = apply_recipe(model, recipe, calibration, training=training_batches(model))
    plain = apply_recipe(model, recipe, calibration, training=training_batches(model))
    assert [step for step, _ in reported] == [0, 25, 50]
    assert reported[-1][1] < reported[0][1]  # the student nears its teacher
    batch = calibration[0]
    assert torch.equal(tiny.output(watched, batch), tiny.output(plain, batch))


def test_kept_blocks_remember_which_original_block_they_were():
    model = tiny.build("bert")
    assert model.adapter.block_origins() == list(range(tiny.NUM_LAYERS))
    model.adapter.keep_blocks([0, 2, 3])
    model.adapter.keep_blocks([0, 2])  # a second removal composes with the first
    assert model.adapter.block_origins() == [0, 3]


def _relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(student, teacher) / teacher.pow(2).mean()


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_layer_matching_pairs_each_block_with_the_original_it_came_from(family):
    import copy

    from slimformer.passes.recover_distill import layer_matching_loss

    teacher = tiny.build(family)
    batch = tiny.calibration(teacher)[0]
    with torch.no_grad():
        target = teacher(**batch, output_hidden_states=True)
        assert layer_matching_loss(teacher, target, target) == 0

        student = copy.deepcopy(teacher)
        student.adapter.keep_blocks([0, 2])  # blocks 1 and 3 of four removed
        output = student(**batch, output_hidden_states=True)
        # Block 0 stays block 0's output exactly; the last block answers for the last.
        expected = _relative_mse(output.hidden_states[2], target.hidden_states[-1]) / 2
        assert torch.allclose(layer_matching_loss(student, output, target), expected)


def test_distillation_with_layer_matching_recovers_a_model_with_a_block_removed():
    model = tiny.build("bert")
    recipe = Recipe(
        steps=(
            Step("prune.layers", {"count": 1}),
            Step("recover.distill", {"steps": 100, "lr": 1e-4, "layer_weight": 1.0}),
        ),
        seed=3,
    )
    calibration = tiny.calibration(model)
    distilled = apply_recipe(model, recipe, calibration, training=training_batches(model))
    resolved = distilled.recipe.steps[-1].resolved
    assert resolved["held_out_loss_after"] < resolved["held_out_loss_before"]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_distillation_in_bfloat16_lowers_held_out_loss_and_repeats_itself(family):
    # Explicit bfloat16 runs on any CPU (emulated where it has no bf16 instructions); the
    # losses stay float32, so a decoder's bf16 logits are compared in float32.
    model = tiny.build(family)
    recipe = Recipe(
        steps=(
            Step("prune.ffn", {"keep": 0.5, "criterion": "magnitude"}),
            Step(
                "recover.distill",
                {"steps": 60, "lr": 1e-4, "hidden_weight": 1.0, "precision": "bfloat16"},
            ),
        ),
        seed=3,
    )
    calibration = tiny.calibration(model)
    a = apply_recipe(model, recipe, calibration, training=training_batches(model))
    b = apply_recipe(model, recipe, calibration, training=training_batches(model))
    resolved = a.recipe.steps[-1].resolved
    assert resolved["precision"] == "bfloat16"
    assert resolved["held_out_loss_after"] < resolved["held_out_loss_before"]
    assert torch.equal(tiny.output(a, calibration[0]), tiny.output(b, calibration[0]))
    assert all(p.dtype == torch.float32 for p in a.module.parameters())


def test_auto_precision_is_bfloat16_only_on_a_cpu_with_bf16_instructions(monkeypatch):
    from slimformer import cpu
    from slimformer.passes.recover_distill import DistillConfig, training_precision

    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(cpu, "has_native_bf16", lambda native=native: native)
        assert training_precision(DistillConfig()) == expected
        assert training_precision(DistillConfig(int8_aware=True)) == "float32"
        assert training_precision(DistillConfig(precision="float32")) == "float32"


def test_int8_aware_distillation_in_bfloat16_is_refused():
    from slimformer.errors import SlimformerError

    model = tiny.build("bert")
    recipe = Recipe(
        steps=(Step("recover.distill", {"steps": 5, "int8_aware": True, "precision": "bfloat16"}),)
    )
    with pytest.raises(SlimformerError, match="int8_aware trains in float32"):
        apply_recipe(model, recipe, tiny.calibration(model), training=training_batches(model))


def test_cosine_schedule_decays_the_rate_to_zero_over_the_steps_and_constant_keeps_it():
    from slimformer.passes.recover_distill import DistillConfig, RateSchedule

    flat = RateSchedule.FLAT_STEPS
    cosine = RateSchedule(DistillConfig(steps=110, lr_schedule="cosine"))
    factors = [cosine.factor(step) for step in range(111)]
    assert factors[:flat] == [1.0] * flat
    assert factors[flat + 50] == pytest.approx(0.5)
    assert factors[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))
    constant = RateSchedule(DistillConfig(steps=110))
    assert {constant.factor(step) for step in range(111)} == {1.0}


def test_cosine_schedule_fits_its_span_to_the_time_left_unless_the_recipe_fixed_it():
    from slimformer.passes.recover_distill import DistillConfig, RateSchedule

    flat = RateSchedule.FLAT_STEPS
    timed = RateSchedule(DistillConfig(steps=10_000, lr_schedule="cosine"))
    timed.fit_to_time(flat, seconds=1.0, seconds_left=10.0)  # 0.1 s a step: ~90 more
    assert timed.span == flat + int(RateSchedule.SAFETY * 100)
    roomy = RateSchedule(DistillConfig(steps=200, lr_schedule="cosine"))
    roomy.fit_to_time(flat, seconds=1.0, seconds_left=1e6)
    assert roomy.span == 200
    replayed = RateSchedule(DistillConfig(steps=50, lr_schedule="cosine", decay_steps=100))
    replayed.fit_to_time(flat, seconds=1.0, seconds_left=0.5)
    assert replayed.span == 100  # a saved recipe's span is kept, so its rates are the same
