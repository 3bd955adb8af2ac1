"""Warm start: the known-good recipes a new study measures first, right after the baseline.

A sampler with a handful of trials spends them on random deep stacks; a short study then ends
behind what one engine's int8 alone gives in a minute (issue 15: 1.4x after 20 minutes, where
ONNX Runtime int8 alone gives about 3x). So a new study first measures each engine's int8
alone, then the user's `--start` recipes, then lets the sampler explore. Only passes the study
searches and the model takes are used; a setting this CPU would not profit from (`Withheld`:
OpenVINO's NNCF int8 without VNNI) is left at the pass's default instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from slimformer.passes import Pass
from slimformer.recipe import Recipe, Step
from slimformer.search.settings import Withheld
from slimformer.tasks import TaskSpec

# Each engine's int8 alone, the engines that usually pay off most on CPUs first.
KNOWN_GOOD: tuple[tuple[str, dict[str, Any]], ...] = (
    ("runtime.openvino", {"int8": "nncf"}),
    ("runtime.onnxruntime", {"int8": "dynamic"}),
    ("quantize.dynamic_int8", {}),
)


def warm_start_recipes(
    pass_classes: Sequence[type[Pass]], withheld: Withheld, task: TaskSpec, seed: int
) -> list[Recipe]:
    """The portfolio for this study: `KNOWN_GOOD` recipes whose pass the study offers."""
    offered = {cls.name for cls in pass_classes}
    recipes = []
    for name, config in KNOWN_GOOD:
        gaps = withheld.get(name, ())
        if name not in offered or ("", "") in gaps:
            continue
        kept = {key: value for key, value in config.items() if (key, str(value)) not in gaps}
        recipes.append(Recipe(steps=(Step(name, kept),), task=task, seed=seed))
    return recipes
