"""Recipes that make sense by construction: one quantizer per recipe, and every setting checked
against its declared valid range (the search space, unless a field declares a wider one) when
the recipe is read, and against the model where the range depends on it."""

from __future__ import annotations

import dataclasses
import math

import optuna
import pytest
import tiny

from slimformer.errors import SlimformerError
from slimformer.passes import Choice, FloatRange, IntRange, get_pass, registered_passes
from slimformer.passes.base import Interval, valid_values
from slimformer.pipeline import apply_recipe, check_recipe
from slimformer.recipe import Recipe, Step
from slimformer.search.space import sample_recipe
from slimformer.tasks import TaskSpec

QUANTIZERS = ("quantize.dynamic_int8", "quantize.static_int8", "quantize.weight_only")


def recipe(*steps: tuple[str, dict]) -> Recipe:
    return Recipe(steps=tuple(Step(name, config) for name, config in steps))


# --- one quantizer per recipe ----------------------------------------------------------------
def test_the_quantizers_are_one_group_and_smoothing_needs_static_int8() -> None:
    assert {c.name for c in registered_passes() if c.group == "quantizer"} == set(QUANTIZERS)
    assert get_pass("quantize.smooth").requires == ("quantize.static_int8",)
    assert get_pass("quantize.smooth").group is None  # it prepares static int8, quantizes nothing


@pytest.mark.parametrize(
    "names",
    [
        ("quantize.static_int8", "quantize.dynamic_int8"),
        ("quantize.dynamic_int8", "quantize.weight_only"),
        (
            "quantize.smooth",
            "quantize.static_int8",
            "quantize.dynamic_int8",
            "quantize.weight_only",
        ),
    ],
)
def test_a_recipe_stacking_quantizers_is_refused_with_the_reason(names: tuple[str, ...]) -> None:
    stacked = [n for n in names if n in QUANTIZERS]
    with pytest.raises(SlimformerError, match="one quantizer pass") as refused:
        check_recipe(recipe(*((name, {}) for name in names)))
    message = str(refused.value)
    assert "a layer is quantized once" in message and ", ".join(stacked) in message


def test_one_quantizer_with_smoothing_and_pruning_is_accepted() -> None:
    check_recipe(recipe(("prune.ffn", {}), ("quantize.smooth", {}), ("quantize.static_int8", {})))


def test_the_sampler_never_proposes_two_quantizers() -> None:
    passes = registered_passes()
    facts = tiny.tiny_bert().adapter.facts()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    picked = set()
    for _ in range(300):
        trial = study.ask()
        proposed = sample_recipe(trial, passes, facts, TaskSpec("embedding"), 0)
        names = [step.pass_name for step in proposed.steps]
        quantizers = [name for name in names if name in QUANTIZERS]
        assert len(quantizers) <= 1, names
        picked.update(quantizers)
        study.tell(trial, 0.0)
    assert picked == set(QUANTIZERS)  # each is still offered


# --- values outside the valid range, NaN, infinities, wrong types ----------------------------
@pytest.mark.parametrize(
    ("pass_name", "setting", "value", "expected"),
    [
        ("prune.ffn", "keep", 5, "keep must be a number in (0, 1], got 5"),
        ("prune.ffn", "keep", math.nan, "keep must be a number in (0, 1], got nan"),
        ("prune.ffn", "keep", 0, "keep must be a number in (0, 1], got 0"),
        ("prune.ffn", "keep", -math.inf, "keep must be a number in (0, 1], got -inf"),
        ("prune.ffn", "keep", "0.5", "keep must be a number in (0, 1], got '0.5'"),
        ("prune.ffn", "keep", True, "keep must be a number in (0, 1], got True"),
        ("prune.ffn", "multiple", 0, "multiple must be a positive integer, got 0"),
        ("prune.heads", "keep", 1.5, "keep must be a number in (0, 1], got 1.5"),
        ("prune.layers", "count", 0, "count must be an integer in [1, layers-1], got 0"),
        ("prune.layers", "count", 2.0, "count must be an integer in [1, layers-1], got 2.0"),
        ("recover.distill", "steps", -3, "steps must be an integer in [0, inf), got -3"),
        ("recover.distill", "lr", math.inf, "lr must be a positive number, got inf"),
        ("recover.distill", "lr", 10**400, "lr must be a positive number, got 1000"),
        ("recover.distill", "temperature", 0, "temperature must be a positive number"),
        ("recover.distill", "time_budget_s", math.nan, "time_budget_s must be a positive number"),
        ("quantize.weight_only", "damp", -0.1, "damp must be a positive number, got -0.1"),
        ("quantize.weight_only", "bits", 8.0, "bits must be one of 4 | 8, got 8.0"),
        ("quantize.weight_only", "bits", 3, "bits=3 is not one of 4 | 8"),
        ("quantize.dynamic_int8", "keep_sensitive", True, "keep_sensitive must be an integer"),
        ("quantize.dynamic_int8", "keep_sensitive", -1, "keep_sensitive must be an integer in [0"),
        ("quantize.dynamic_int8", "per_channel", 1, "per_channel must be true or false, got 1"),
        ("quantize.dynamic_int8", "skip", [1, 2], "skip must be a list of names, got [1, 2]"),
        ("quantize.smooth", "alpha", 1.5, "alpha must be a number in [0, 1], got 1.5"),
        ("cast.half", "dtype", 16, "dtype must be one of bfloat16 | float16, got 16"),
    ],
)
def test_a_setting_outside_its_valid_range_is_refused_naming_pass_setting_value_and_range(
    pass_name: str, setting: str, value: object, expected: str
) -> None:
    with pytest.raises(SlimformerError) as refused:
        check_recipe(recipe((pass_name, {setting: value})))
    message = str(refused.value)
    assert message.startswith(f"{pass_name}: ") and expected in message
    assert "\n" not in message and len(message) < 200


@pytest.mark.parametrize(
    ("pass_name", "values"),
    [
        ("prune.ffn", {"keep": 0.1}),  # searched 0.3..0.95; any fraction is valid
        ("prune.ffn", {"keep": 1}),
        ("prune.heads", {"keep": 0.125}),
        ("recover.distill", {"steps": 250, "lr": 3e-5}),
        ("quantize.dynamic_int8", {"keep_sensitive": 3}),
        ("quantize.smooth", {"alpha": 0.7}),
    ],
)
def test_a_value_in_a_wider_declared_range_than_the_searched_one_is_accepted(
    pass_name: str, values: dict
) -> None:
    config = get_pass(pass_name).make_config(values)
    assert {k: getattr(config, k) for k in values} == values


def test_an_integer_for_a_float_setting_reads_as_that_float() -> None:
    config = get_pass("prune.ffn").make_config({"keep": 1})
    assert config.keep == 1.0 and isinstance(config.keep, float)


def test_every_searched_value_lies_in_its_settings_valid_range() -> None:
    facts = tiny.tiny_llama().adapter.facts()
    for cls in registered_passes():
        for setting in dataclasses.fields(cls.config_class):
            space, valid = setting.metadata.get("space"), valid_values(setting)
            if isinstance(space, Choice):
                searched = list(space.options)
            elif isinstance(space, IntRange):
                searched = list(space.resolve(facts))
            elif isinstance(space, FloatRange):
                searched = [space.low, space.high]
            else:
                searched = []
            searched.append(setting.default)
            # A setting that matters only with another's value is set with that value.
            context, when = {}, setting.metadata.get("when")
            while when:
                other, allowed = when
                context[other] = allowed[0]
                when = next(f for f in dataclasses.fields(cls.config_class) if f.name == other)
                when = when.metadata.get("when")
            for value in searched:
                assert cls.make_config(context | {setting.name: value}) is not None
                if isinstance(valid, Interval):
                    assert valid.contains(value, facts), (cls.name, setting.name, value)


# --- ranges that depend on the model -----------------------------------------------------------
def test_a_model_dependent_bound_is_checked_against_the_model_before_any_pass_runs() -> None:
    model = tiny.tiny_bert()  # 4 blocks: 1..3 may go
    get_pass("prune.layers").make_config({"count": 100})  # unknown bound: the model decides
    with pytest.raises(
        SlimformerError, match=r"count must be an integer in \[1, 3\] for this model"
    ):
        apply_recipe(model, recipe(("prune.layers", {"count": 4})), tiny.calibration(model))
    pruned = apply_recipe(model, recipe(("prune.layers", {"count": 3})), tiny.calibration(model))
    assert pruned.adapter.num_layers == 1 and model.adapter.num_layers == 4
