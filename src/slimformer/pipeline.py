"""Recipes against the pass registry: validate them and apply them.

`check_recipe` refuses, before any pass runs, a recipe that names an unknown pass or setting,
sets a value outside its setting's valid range, lacks a pass another requires, holds two passes
of one group (two runtimes, two quantizers) or a pass after a terminal one, or holds a declared
conflict (matched on the settings each step *runs* with, defaults included). `apply_recipe` then
runs the passes in phase order on a copy of the model, after checking that it was given the
calibration and training data the passes declare they need and that settings whose range
depends on the model fit this one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes import PassContext, get_pass
from slimformer.passes.base import GROUPS, Pass
from slimformer.recipe import Recipe, Step, plain

Batches = Sequence[dict[str, torch.Tensor]]


def step_config(step: Step) -> Any:
    """The step's config as its pass runs it: validated, defaults filled in, normalized."""
    return get_pass(step.pass_name).make_config(step.config)


def sorted_steps(recipe: Recipe) -> tuple[Step, ...]:
    """The steps in the order they run: by phase, then order within it (ties keep the
    recipe's order)."""
    return tuple(sorted(recipe.steps, key=lambda s: get_pass(s.pass_name).stage))


def _matches(step: Step, config: Any, pattern: str) -> bool:
    """Whether `step` is `pass`, or `pass:setting=value` with that value in the config it runs
    with (set explicitly or by default)."""
    name, _, setting = pattern.partition(":")
    if step.pass_name != name:
        return False
    key, _, value = setting.partition("=")
    return not setting or str(getattr(config, key, None)) == value


def _conflict(step: Step, other: Step, other_config: Any, facts: Any = None) -> str | None:
    """The conflict `step`'s pass declares with `other` as configured (its pattern), if any;
    with `facts`, those it declares for that model too."""
    cls = get_pass(step.pass_name)
    patterns = cls.conflicts if facts is None else cls.conflicts_for(facts)
    return next((p for p in patterns if _matches(other, other_config, p)), None)


def steps_conflict(first: Step, second: Step, facts: Any = None) -> bool:
    """Whether either step's pass declares a conflict with the other as configured (the
    check `check_recipe` makes, for one pair, and with `facts` for that model: the search
    space uses it while it samples)."""
    return bool(
        _conflict(first, second, step_config(second), facts)
        or _conflict(second, first, step_config(first), facts)
    )


def conflicts_for_model(recipe: Recipe, facts: Any) -> bool:
    """Whether a step's pass declares, for this model (`Pass.conflicts_for(facts)`), a conflict
    with another step of `recipe` (e.g. token reduction in an encoder no engine can export):
    the search space never samples such a recipe."""
    return any(
        _matches(other, step_config(other), pattern)
        for step in recipe.steps
        for pattern in get_pass(step.pass_name).conflicts_for(facts)
        for other in recipe.steps
        if other is not step
    )


def check_recipe(recipe: Recipe) -> None:
    """Refuse a recipe that cannot run (see the module docstring); cheap, runs no pass."""
    configs = [step_config(step) for step in recipe.steps]  # names and settings first
    names = {step.pass_name for step in recipe.steps}
    for step in recipe.steps:
        missing = [r for r in get_pass(step.pass_name).requires if r not in names]
        if missing:
            raise SlimformerError(
                f"{step.pass_name} needs {', '.join(missing)} in the same recipe; add it"
            )
    for step in recipe.steps:
        for other, config in zip(recipe.steps, configs, strict=True):
            pattern = _conflict(step, other, config)
            if pattern is not None:
                reason = get_pass(step.pass_name).conflicts[pattern]
                raise SlimformerError(f"{step.pass_name} cannot follow {pattern}: {reason}")
    by_group: dict[str, list[str]] = {}
    for step in recipe.steps:
        group = get_pass(step.pass_name).group
        if group:
            by_group.setdefault(group, []).append(step.pass_name)
    for group, members in by_group.items():
        if len(members) > 1:
            raise SlimformerError(
                f"a recipe takes one {group} pass ({GROUPS[group]}), this one has "
                f"{', '.join(members)}; keep one"
            )
    ordered = sorted_steps(recipe)
    for step, after in zip(ordered, ordered[1:], strict=False):
        if get_pass(step.pass_name).terminal:
            raise SlimformerError(
                f"{step.pass_name} hands the model to another engine, so nothing can follow it; "
                f"{after.pass_name} does"
            )


def recipe_from_dict(data: Any, origin: str = "recipe") -> Recipe:
    """`Recipe.from_dict`, then `check_recipe`."""
    recipe = Recipe.from_dict(data, origin)
    check_recipe(recipe)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """`Recipe.load` (a recipe.yaml, or a folder holding one), then `check_recipe`."""
    recipe = Recipe.load(path)
    check_recipe(recipe)
    return recipe


def needs_calibration(recipe: Recipe) -> bool:
    """Whether any pass of `recipe` uses calibration batches (the runner prepares them)."""
    return any(get_pass(step.pass_name).needs_calibration for step in recipe.steps)


def needs_training(recipe: Recipe) -> bool:
    """Whether any pass of `recipe` trains (the runner prepares training batches)."""
    return any(get_pass(step.pass_name).needs_training for step in recipe.steps)


def _check_data(plan: list[tuple[type[Pass], Any]], calibration: Batches, training: Batches):
    for pass_class, config in plan:
        if not calibration and pass_class.calibration_required(config):
            raise SlimformerError(f"{pass_class.name} needs calibration data; none was given")
        if pass_class.needs_training and not (training or calibration):
            raise SlimformerError(f"{pass_class.name} needs task inputs to train on; none given")


def _check_for_model(plan: list[tuple[type[Pass], Any]], model: SlimModel) -> None:
    """Settings whose valid range depends on the model (e.g. how many blocks it has)."""
    dependent = [(cls, config) for cls, config in plan if cls.depends_on_model()]
    if dependent:
        facts = model.adapter.facts()
        for pass_class, config in dependent:
            pass_class.check_for_model(config, facts)


def apply_recipe(
    model: SlimModel,
    recipe: Recipe,
    calibration: Batches = (),
    progress: Callable[[str], None] | None = None,
    training: Batches = (),
    general: Batches = (),
) -> SlimModel:
    """Replay `recipe` on a copy of `model`; the input model is left untouched."""
    check_recipe(recipe)
    steps = sorted_steps(recipe)
    plan = [(get_pass(step.pass_name), step_config(step)) for step in steps]
    _check_data(plan, calibration, training)
    _check_for_model(plan, model)
    result = model.copy()
    applied = []
    for step, (pass_class, config) in zip(steps, plan, strict=True):
        torch.manual_seed(recipe.seed)
        ctx = PassContext(
            calibration=calibration,
            training=training,
            general=general,
            teacher=model,
            seed=recipe.seed,
            progress=progress or (lambda message: None),
        )
        if progress:
            progress(step.pass_name)
        resolved = pass_class().apply(result, config, ctx)
        applied.append(
            Step(step.pass_name, plain(pass_class.as_applied(config, resolved)), resolved)
        )
    result.recipe = Recipe(
        steps=model.recipe.steps + tuple(applied),
        task=recipe.task or model.recipe.task,
        seed=recipe.seed,
    )
    return result
