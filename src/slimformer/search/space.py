"""The search space: recipes <-> Optuna parameters.

Each pass's config dataclass declares its searchable settings (passes/base.py); here they
become Optuna distributions. The space is conditional: passes of one group (the runtimes; the
quantizers) are one categorical choice each, a pass that needs another is offered only once
that one was chosen, a runtime's conflicting passes are not offered with it, a setting that
matters only with some value of another (`searchable(when=...)`) is varied only then, and
settings this CPU would not profit from (`Withheld`) are left out of their options.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import optuna

from slimformer.errors import SlimformerError
from slimformer.passes import Choice, FloatRange, IntRange, Pass, get_pass
from slimformer.passes.settings import searched_now
from slimformer.pipeline import steps_conflict
from slimformer.recipe import Recipe, Step
from slimformer.search.settings import Withheld
from slimformer.tasks import TaskSpec


def sample_recipe(
    trial: optuna.Trial,
    pass_classes: Sequence[type[Pass]],
    facts: Any,
    spec: TaskSpec,
    seed: int,
    withheld: Withheld | None = None,
) -> Recipe:
    """One recipe from the passes' spaces; `withheld` settings (this CPU would not profit
    from them) are left out of their options."""
    withheld = withheld or {}
    # A start recipe's values outside the searched options (say 1000 distillation steps) are
    # kept as given: the trial carries them beside its parameters (`start_values`).
    given = trial.user_attrs.get(START_VALUES, {})
    steps = []
    groups: dict[str, list[str]] = {}
    for cls in pass_classes:
        if cls.group:
            groups.setdefault(cls.group, []).append(cls.name)
    picked = {trial.suggest_categorical(group, ["none", *names]) for group, names in groups.items()}
    # Passes that cannot precede the picked runtime (PyTorch int8 before an ONNX export) are
    # not offered with it.
    excluded = {
        name
        for cls in pass_classes
        if cls.name in picked
        for name in cls.conflicts_for(facts)
        if ":" not in name
    }
    # Passes that need another (e.g. smoothing needs static int8) are offered only after it
    # was chosen, so no trial is spent on a recipe that cannot run.
    for cls in sorted(pass_classes, key=lambda c: bool(c.requires)):
        chosen = {step.pass_name for step in steps}
        if not set(cls.requires) <= chosen or cls.name in excluded:
            continue
        if cls.group:
            if cls.name not in picked:
                continue
        elif not trial.suggest_categorical(f"use {cls.name}", [False, True]):
            continue
        values: dict[str, Any] = {}
        for name, space in cls.search_space().items():
            key = f"{cls.name}.{name}"
            if name in given.get(cls.name, {}):
                values[name] = given[cls.name][name]
            elif not searched_now(cls.config_class, name, values):
                continue  # irrelevant given the settings before it: left at its default
            elif isinstance(space, Choice):
                left_out = {v for setting, v in withheld.get(cls.name, ()) if setting == name}
                offered = space.resolve(facts)
                options = [o for o in offered if str(o) not in left_out] or [offered[0]]
                values[name] = _suggest_choice(trial, key, options)
            elif isinstance(space, IntRange):
                low, high = space.resolve(facts)
                values[name] = trial.suggest_int(key, low, high)
            elif isinstance(space, FloatRange):
                value = trial.suggest_float(key, space.low, space.high, step=space.step)
                values[name] = round(value, 6)  # 0.9, not 0.9000000000000001, in recipes
        config = cls.make_config(values)
        if facts is not None and cls.changes_nothing(config, facts):
            continue  # the recipe without it: the same model, measured once
        full = asdict(config)
        step = Step(cls.name, {k: v for k, v in full.items() if k in values})
        # A setting that conflicts with a pass already chosen (padding-free batching after
        # token reduction; merging text tokens before an export) leaves this pass out rather
        # than spend a trial on a refusal.
        if any(steps_conflict(step, earlier, facts) for earlier in steps):
            continue
        steps.append(step)
    steps.sort(key=lambda step: get_pass(step.pass_name).stage)
    return Recipe(steps=tuple(steps), task=spec, seed=seed)


def _suggest_choice(trial: optuna.Trial, key: str, options: list[Any]) -> Any:
    """Optuna refuses a categorical parameter whose options changed since a trial of the study
    used it: a study begun by another version of slimformer whose options for this model
    differ (distillation's steps and rates scale with the model since 0555b3e) cannot go on."""
    try:
        return trial.suggest_categorical(key, options)
    except ValueError as error:
        if "dynamic value space" not in str(error):
            raise
        earlier = next(
            (
                list(t.distributions[key].choices)
                for t in trial.study.get_trials(deepcopy=False)
                if key in t.distributions
            ),
            "other options",
        )
        raise SlimformerError(
            f"this study searched {key} over {earlier}, this version of slimformer offers "
            f"{options} for this model: it cannot be resumed; start a new study (another "
            "--out, or --overwrite)"
        ) from None


def baseline_params(pass_classes: Sequence[type[Pass]]) -> dict[str, Any]:
    """Every pass off (passes that need another are not even offered then)."""
    params: dict[str, Any] = {
        f"use {cls.name}": False for cls in pass_classes if not cls.requires and not cls.group
    }
    return params | {cls.group: "none" for cls in pass_classes if cls.group}


START_VALUES = "start values"  # the trial attribute that carries them


def recipe_params(
    recipe: Recipe, pass_classes: Sequence[type[Pass]], facts: Any = None
) -> dict[str, Any]:
    """The sampler's parameters that make `sample_recipe` propose `recipe`. Settings outside
    the searched options for the model of `facts` (e.g. 250 distillation steps) are not
    parameters: `start_values` carries them."""
    offered = {cls.name: cls for cls in pass_classes}
    unknown = [s.pass_name for s in recipe.steps if s.pass_name not in offered]
    if unknown:
        raise SlimformerError(
            f"--start recipe uses {', '.join(unknown)}, which the study does not search; add "
            "them to --passes"
        )
    params = baseline_params(pass_classes)
    used = {step.pass_name for step in recipe.steps}
    for cls in pass_classes:
        if cls.name in used:
            params[cls.group or f"use {cls.name}"] = cls.name if cls.group else True
    for cls, name, value, searched in _settings_of(recipe, pass_classes, facts):
        if searched:
            params[f"{cls.name}.{name}"] = value
    return params


def start_values(
    recipe: Recipe, pass_classes: Sequence[type[Pass]], facts: Any = None
) -> dict[str, dict]:
    """The settings of `recipe` that lie outside their searched options (for the model of
    `facts`), by pass: a trial enqueued with them (attribute `START_VALUES`) runs them as
    given."""
    found: dict[str, dict] = {}
    for cls, name, value, searched in _settings_of(recipe, pass_classes, facts):
        if not searched:
            found.setdefault(cls.name, {})[name] = value
    return found


def _settings_of(
    recipe: Recipe, pass_classes: Sequence[type[Pass]], facts: Any
) -> Iterator[tuple[type[Pass], str, Any, bool]]:
    """Each searched setting of each offered pass `recipe` uses: (pass, setting, value,
    whether the value is among the options searched for the model of `facts`)."""
    used = {step.pass_name: step for step in recipe.steps}
    for cls in pass_classes:
        if cls.name in used:
            config = asdict(cls.make_config(used[cls.name].config))
            for name, space in cls.search_space().items():
                if not searched_now(cls.config_class, name, config):
                    continue
                value = config[name]
                yield (
                    cls,
                    name,
                    value,
                    not (isinstance(space, Choice) and value not in space.resolve(facts)),
                )
