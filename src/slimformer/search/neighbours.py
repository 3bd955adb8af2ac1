"""Local search: one-edit neighbours of the recipes measured so far, tried between the
sampler's proposals.

Why: a 20-minute study on 2 cores measures about ten trials, and Optuna's TPE samples its first
six at random (`n_startup_trials`), so after the warm start a short study's trials were random
deep stacks, and both studies of bench/results/search_efficiency.json ended on a warm-start
recipe (ONNX Runtime int8 alone). A recipe that met the budget is the best evidence of where
the next one lies:

- the best within-budget recipe (by the objective), one step cheaper in each of its settings
  declared `cheaper=` (10% more FFN neurons or heads removed, a block more, more of the weights
  factorized), one setting at a time, in the recipe's order;
- each structured recipe that missed the budget by at most twice it (measured and faster than
  that best one, or stopped early on a subset with such an estimate), closest first, with more
  recovery: one step longer distillation (a setting declared `recovers=`), or
  `recover.distill` added at its defaults where the study searches it.

And first, because they cost seconds where the others cost minutes:

- the best within-budget recipe served with each other option of its settings declared
  `faster_depends_on_cpu=` (OpenVINO's generated kernels on or off: off served
  all-MiniLM-L6-v2's int8 structures 1.10-1.19x faster on an AMX Xeon,
  bench/results/embedding_structure_speed_snippets_amx_xeon.json), one setting at a time.
  Before the re-servings below: they multiply with every trained recipe near the budget, and
  a study on that Xeon spent its last local-search turns on them (runs of 2026-12-05);
- each recipe that trains (distillation) measured within twice the budget, best first, served
  the other ways the study measured within budget (the steps after training of those recipes:
  another engine, another int8), the way that served any model within twice the budget fastest
  first. Its trained model is kept by the first build (trained_prefix.py), so such a trial only
  converts, scores and times it; which engine serves a pruned, distilled model best is not
  known before it is measured (OpenVINO's int8 wins with VNNI, ONNX Runtime's without: README,
  "How a run works"), and how the engines served the unpruned model ranks them poorly.

The runner queues the first of these that no trial has tried yet, every other trial, so the
sampler still explores in between (`settings.local_search`; `--no-local-search` turns it off).
When a sampled trial would not finish in the time left, the first of these that would goes
next, else the sampled recipe itself with shorter distillation (`shortened`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from slimformer.errors import SlimformerError
from slimformer.passes import Choice, FloatRange, IntRange, Pass, Phase, get_pass
from slimformer.passes.settings import searched_now
from slimformer.pipeline import check_recipe, conflicts_for_model, sorted_steps
from slimformer.recipe import Recipe, Step
from slimformer.search.records import TrialRecord
from slimformer.trained_prefix import split_at_training

DISTILL = "recover.distill"
# An over-budget recipe is worth more recovery when it missed by at most this many budgets (a
# model 10 points down does not come back with 100 more distillation steps).
RECOVERABLE = 2.0
# A move spans at least this share of a FloatRange (prune.ffn's 0.05 steps: 0.1 of the
# neurons), so that one neighbour costs visibly less than its parent.
MOVE_SHARE = 0.1


def neighbours(
    records: Sequence[TrialRecord],
    pass_classes: Sequence[type[Pass]],
    facts: Any,
    objective: tuple[str, bool],
    budget: tuple[str, float],
) -> list[Recipe]:
    """The recipes to try next around the measured ones, most promising first (see above).
    `objective`: the cost's measurement field and whether higher is better; `budget`: the
    score's figure and the drop it may have (--max-drop)."""
    cost_field, maximize = objective
    offered = {cls.name: cls for cls in pass_classes}
    here = [
        r
        for r in records
        if r.recipe
        and not r.stale
        and r.duplicate_of is None
        and all(step.get("pass") in offered for step in r.recipe.get("steps") or ())
    ]

    def better(record: TrialRecord) -> float:
        cost = float(record.measurement[cost_field])
        return cost if maximize else -cost

    timed = [r for r in here if r.comparable and r.measurement.get(cost_field) is not None]
    best = max((r for r in timed if r.feasible), key=better, default=None)
    best_recipe = Recipe.from_dict(best.recipe) if best is not None else None
    proposals: list[Recipe] = []
    if best_recipe is not None:
        proposals += _other_options(best_recipe, offered, facts)
    proposals += _served_otherwise(timed, better, budget, facts)
    if best_recipe is not None:
        proposals += _moved(best_recipe, offered, facts, "cheaper")
    for recipe in _recoverable(here, offered, best, better, budget):
        recovered = _moved(recipe, offered, facts, "recovers")
        if not recovered and DISTILL in offered and DISTILL not in _names(recipe):
            recovered = [_with_step(recipe, Step(DISTILL, {}))]
        proposals += recovered
    return proposals


def _served_otherwise(
    timed: Sequence[TrialRecord], better: Any, budget: tuple[str, float], facts: Any
) -> list[Recipe]:
    """Trained recipes within RECOVERABLE budgets, best first, each with the deployment steps
    of the recipes measured within budget in place of its own (see above), the deployment
    that served any recipe within RECOVERABLE budgets best first."""
    _, max_drop = budget

    def recoverable(record: TrialRecord) -> bool:
        return record.drop is not None and record.drop <= RECOVERABLE * max(max_drop, 1e-9)

    ranked = sorted(timed, key=better, reverse=True)
    # A deployment is a way to serve once it met the budget somewhere (a lossy int8 is not);
    # it is ranked by the fastest model it served, pruned or distilled ones included, not by
    # how it served the unpruned model: on an AVX2-only EPYC OpenVINO f32 served the unpruned
    # vit-fashion slowest of the three engines (469 images/s against 510 and 560) but a
    # token-pruned, distilled one fastest (1,155 against 923 and 769;
    # bench/results/peers_vision_avx2_epyc.json).
    served = [(record, _deployment(Recipe.from_dict(record.recipe))) for record in ranked]
    met = [steps for record, steps in served if record.feasible]
    deployments: list[tuple[Step, ...]] = []
    for record, steps in served:
        if steps and steps in met and steps not in deployments and recoverable(record):
            deployments.append(steps)
    proposals = []
    for record in ranked:
        if not recoverable(record):
            continue
        recipe = Recipe.from_dict(record.recipe)
        trained, _ = split_at_training(sorted_steps(recipe))
        if not trained:
            continue
        own = _deployment(recipe)
        for steps in deployments:
            if steps == own:
                continue
            candidate = dataclasses.replace(recipe, steps=_bare(trained) + steps)
            try:
                check_recipe(candidate)
            except SlimformerError:
                continue
            # e.g. token reduction in an encoder, which no engine can export: the sampler
            # would leave a pass out of such a recipe, and train another prefix.
            if not conflicts_for_model(candidate, facts):
                proposals.append(candidate)
    return proposals


def _deployment(recipe: Recipe) -> tuple[Step, ...]:
    """The steps that serve the model: those after training (int8, precision, engine)."""
    return _bare(s for s in sorted_steps(recipe) if get_pass(s.pass_name).phase > Phase.RECOVERY)


def _bare(steps: Any) -> tuple[Step, ...]:
    """Steps as configured, without what their run resolved (so equal steps compare equal)."""
    return tuple(Step(step.pass_name, dict(step.config)) for step in steps)


def _recoverable(
    records: Sequence[TrialRecord],
    offered: dict[str, type[Pass]],
    best: TrialRecord | None,
    better: Any,
    budget: tuple[str, float],
) -> list[Recipe]:
    """Structured recipes over budget by at most RECOVERABLE times it, closest first: measured
    ones only when faster than `best`; stopped on a subset ones (not timed) by their estimate."""
    figure, max_drop = budget
    found = []
    for record in records:
        if record.state == "complete" and record.comparable and not record.feasible:
            if record.drop is None or (best is not None and better(record) <= better(best)):
                continue
            drop = record.drop
        elif record.state == "pruned" and (record.early_stop or {}).get("by") == "subset":
            drop = record.early_stop.get("figures", {}).get(figure, {}).get("estimate")
            if drop is None:
                continue
        else:
            continue
        recipe = Recipe.from_dict(record.recipe)
        structured = any(_declared(offered, step, "cheaper") for step in recipe.steps)
        if structured and drop <= RECOVERABLE * max(max_drop, 1e-9):
            found.append((drop, recipe))
    return [recipe for _, recipe in sorted(found, key=lambda pair: pair[0])]


def _names(recipe: Recipe) -> set[str]:
    return {step.pass_name for step in recipe.steps}


def _declared(offered: dict[str, type[Pass]], step: Step, way: str) -> list[dataclasses.Field]:
    cls = offered.get(step.pass_name)
    if cls is None:
        return []
    return [f for f in dataclasses.fields(cls.config_class) if f.metadata.get(way)]


def shortened(
    recipe: Recipe,
    pass_classes: Sequence[type[Pass]],
    facts: Any,
    fits: Callable[[Recipe], bool],
) -> Recipe | None:
    """`recipe` with less recovery (fewer distillation steps: the settings declared
    `recovers=`, moved the other way one option at a time), the most of it that `fits`; None
    when even the least does not fit, or the recipe trains nothing.

    Why: a study whose sampled trial no longer fits in the time left used to end there, with
    up to a third of its budget unspent (bench/results/search_efficiency.json: ~7 of 20
    minutes, a 200-step distillation estimated at 440 s); the same recipe trained shorter is
    the nearest trial that fits, and distillation's time is estimated per step."""
    offered = {cls.name: cls for cls in pass_classes}
    current = recipe
    while moved := _moved(current, offered, facts, "recovers", backwards=True):
        current = moved[0]
        if fits(current):
            return current
    return None


def _moved(
    recipe: Recipe,
    offered: dict[str, type[Pass]],
    facts: Any,
    way: str,
    backwards: bool = False,
) -> list[Recipe]:
    """`recipe` with one setting declared `way` moved one step that way (`backwards`: the
    other way), for each such setting."""
    moved = []
    for index, step in enumerate(recipe.steps):
        cls = offered.get(step.pass_name)
        for setting in _declared(offered, step, way):
            current = dataclasses.asdict(cls.make_config(step.config))[setting.name]
            direction = setting.metadata[way]
            if backwards:
                direction = "lower" if direction == "higher" else "higher"
            value = _step_from(current, setting.metadata["space"], direction, facts)
            if value is None:
                continue
            moved.append(_with_setting(recipe, index, setting.name, value))
    return moved


def _other_options(recipe: Recipe, offered: dict[str, type[Pass]], facts: Any) -> list[Recipe]:
    """`recipe` with each other option of each setting declared `faster_depends_on_cpu`, one
    setting at a time (only where the setting matters given the step's others)."""
    changed = []
    for index, step in enumerate(recipe.steps):
        cls = offered.get(step.pass_name)
        for setting in _declared(offered, step, "faster_depends_on_cpu"):
            values = dataclasses.asdict(cls.make_config(step.config))
            if not searched_now(cls.config_class, setting.name, values):
                continue
            for option in setting.metadata["space"].resolve(facts):
                if option != values[setting.name]:
                    changed.append(_with_setting(recipe, index, setting.name, option))
    return changed


def _with_setting(recipe: Recipe, index: int, name: str, value: Any) -> Recipe:
    """`recipe` with setting `name` of its step `index` set to `value`."""
    step = recipe.steps[index]
    changed = Step(step.pass_name, {**step.config, name: value})
    return dataclasses.replace(
        recipe, steps=(*recipe.steps[:index], changed, *recipe.steps[index + 1 :])
    )


def _step_from(current: Any, space: Any, direction: str, facts: Any) -> Any:
    """The next value of a setting in its space, that way; None at the space's end."""
    sign = 1 if direction == "higher" else -1
    if isinstance(space, Choice):  # numbers; a value outside the options moves onto them
        options = space.resolve(facts)
        beyond = [option for option in options if (option - current) * sign > 0]
        return min(beyond, key=lambda option: abs(option - current), default=None)
    if isinstance(space, IntRange):
        low, high = space.resolve(facts)
        value = current + sign
        return value if low <= value <= high else None
    if isinstance(space, FloatRange):
        unit = space.step or (space.high - space.low) / 10
        steps = max(1, math.ceil(round(MOVE_SHARE * (space.high - space.low) / unit, 6)))
        value = round(current + sign * steps * unit, 6)
        return value if space.low - 1e-9 <= value <= space.high + 1e-9 else None
    return None


def _with_step(recipe: Recipe, added: Step) -> Recipe:
    steps = sorted((*recipe.steps, added), key=lambda step: get_pass(step.pass_name).stage)
    return dataclasses.replace(recipe, steps=tuple(steps))
