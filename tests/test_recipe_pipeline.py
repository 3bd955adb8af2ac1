"""Validating and applying recipes (`slimformer.pipeline`): declared requirements, conflicts,
groups and flags, enforced before any pass runs; configs normalized so that one model is one
recipe."""

from __future__ import annotations

import optuna
import pytest
import tiny

from slimformer.errors import SlimformerError
from slimformer.passes import Phase, get_pass, registered_passes
from slimformer.pipeline import apply_recipe, check_recipe, recipe_from_dict, step_config
from slimformer.recipe import FORMAT, Recipe, Step
from slimformer.search.space import sample_recipe
from slimformer.tasks import TaskSpec


def recipe(*steps: tuple[str, dict]) -> Recipe:
    return Recipe(steps=tuple(Step(name, config) for name, config in steps))


# --- recipe.py is data; the pipeline checks it against the registry -----------------------
def test_a_recipe_parses_without_the_registry_and_the_pipeline_refuses_it():
    data = {"format": FORMAT, "steps": [{"pass": "prune.nonexistent"}]}
    assert Recipe.from_dict(data).steps[0].pass_name == "prune.nonexistent"
    with pytest.raises(SlimformerError, match="unknown pass 'prune.nonexistent'"):
        recipe_from_dict(data)


def test_a_missing_required_pass_is_refused():
    with pytest.raises(SlimformerError, match="quantize.smooth needs quantize.static_int8"):
        check_recipe(recipe(("quantize.smooth", {})))


# --- conflicts match the settings a step runs with, defaults included ----------------------
def test_a_conflict_on_an_explicit_setting_fires():
    with pytest.raises(SlimformerError, match="cannot follow runtime.batching:mode=unpadded"):
        check_recipe(recipe(("runtime.batching", {"mode": "unpadded"}), ("runtime.openvino", {})))


def test_a_conflict_on_a_default_value_fires(monkeypatch):
    onnxruntime = get_pass("runtime.onnxruntime")
    conflicts = dict(onnxruntime.conflicts) | {"runtime.batching:mode=bucketed": "a reason"}
    monkeypatch.setattr(onnxruntime, "conflicts", conflicts)
    # `bucketed` is the default: the step leaves it unset and still runs with it.
    with pytest.raises(SlimformerError, match="cannot follow runtime.batching:mode=bucketed"):
        check_recipe(recipe(("runtime.batching", {}), ("runtime.onnxruntime", {})))
    check_recipe(recipe(("runtime.batching", {"mode": "padded"}), ("runtime.onnxruntime", {})))


def test_two_passes_of_one_group_are_refused():
    with pytest.raises(SlimformerError, match="one runtime pass"):
        check_recipe(recipe(("runtime.compiled", {}), ("runtime.onnxruntime", {})))


# --- phases and flags ---------------------------------------------------------------------
def test_every_pass_declares_a_phase_and_runtime_passes_are_terminal_and_last():
    for cls in registered_passes():
        assert isinstance(cls.phase, Phase) and cls.stage == (cls.phase, cls.order)
        assert cls.terminal == (cls.group == "runtime")
        if cls.terminal:
            assert cls.phase == max(Phase)
    assert [c.name for c in registered_passes() if c.needs_training] == ["recover.distill"]


def test_nothing_may_follow_a_terminal_pass(monkeypatch):
    monkeypatch.setattr(get_pass("cast.half"), "terminal", True)
    with pytest.raises(SlimformerError, match="cast.half hands the model to another engine"):
        check_recipe(recipe(("runtime.batching", {}), ("cast.half", {})))


def test_the_runner_refuses_a_pass_without_the_calibration_its_config_needs():
    model = tiny.tiny_bert()
    with pytest.raises(SlimformerError, match="quantize.dynamic_int8 needs calibration data"):
        apply_recipe(model, recipe(("quantize.dynamic_int8", {"keep_sensitive": 1})))
    with pytest.raises(SlimformerError, match="prune.ffn needs calibration data"):
        apply_recipe(model, recipe(("prune.ffn", {"criterion": "fisher"})))
    # Weight magnitudes need no data.
    pruned = apply_recipe(model, recipe(("prune.ffn", {"criterion": "magnitude", "keep": 0.5})))
    assert pruned.recipe.steps[-1].resolved["kept_neurons"] == [32] * tiny.NUM_LAYERS


def test_the_runner_refuses_a_training_pass_without_inputs_before_any_pass_runs():
    model = tiny.tiny_bert()
    steps = recipe(("prune.ffn", {"criterion": "magnitude"}), ("recover.distill", {}))
    with pytest.raises(SlimformerError, match="recover.distill needs task inputs"):
        apply_recipe(model, steps)


# --- normalization: settings that cannot change the model ----------------------------------
def test_weight_only_group_size_at_8_bits_and_act_order_under_rtn_are_normalized():
    weight_only = get_pass("quantize.weight_only")
    eight = {weight_only.make_config({"bits": 8, "group_size": g}) for g in (32, 64, 128)}
    assert len(eight) == 1
    rtn = {weight_only.make_config({"method": "rtn", "act_order": a}) for a in (False, True)}
    assert len(rtn) == 1
    # Where they matter they are kept.
    assert weight_only.make_config({"bits": 4, "group_size": 32}).group_size == 32
    assert weight_only.make_config({"method": "gptq", "act_order": True}).act_order is True
    assert step_config(Step("quantize.weight_only", {"bits": 8, "group_size": 32})).group_size == (
        128
    )


def test_the_study_proposes_one_recipe_for_weight_only_configs_that_build_one_model():
    """The study reuses the measurement of a recipe it proposed before (same description);
    configs that differ only in irrelevant settings must describe the same recipe."""
    passes = [get_pass("quantize.weight_only")]
    facts = tiny.tiny_llama().adapter.facts()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    proposals = [
        {"bits": 8, "group_size": 32, "method": "rtn", "act_order": True},
        {"bits": 8, "group_size": 128, "method": "rtn", "act_order": False},
        {"bits": 8, "group_size": 64, "method": "rtn", "act_order": False},
    ]
    descriptions = set()
    for values in proposals:
        values |= {"scope": "all", "keep_sensitive": 0}
        params = {"quantizer": "quantize.weight_only"}
        params |= {f"quantize.weight_only.{k}": v for k, v in values.items()}
        study.enqueue_trial(params)
        trial = study.ask()
        proposed = sample_recipe(trial, passes, facts, TaskSpec("embedding"), 0)
        descriptions.add(proposed.describe())
        study.tell(trial, 0.0)
    assert len(descriptions) == 1, descriptions
    (description,) = descriptions
    assert "group_size=128" in description and "act_order=False" in description


def test_a_normalized_config_builds_the_same_model():
    model = tiny.tiny_llama()
    batch = tiny.calibration(model)[0]
    a = apply_recipe(model, recipe(("quantize.weight_only", {"bits": 8, "method": "rtn"})))
    irrelevant = {"group_size": 32, "act_order": True}
    b = apply_recipe(
        model, recipe(("quantize.weight_only", {"bits": 8, "method": "rtn"} | irrelevant))
    )
    assert a.recipe.steps[-1].config == b.recipe.steps[-1].config
    assert (tiny.output(a, batch) == tiny.output(b, batch)).all()
