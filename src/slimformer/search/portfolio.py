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

KnownGood = tuple[tuple[str, dict[str, Any]], ...]

# Each engine's int8 alone, the engines that usually pay off most on CPUs first.
KNOWN_GOOD: KnownGood = (
    ("runtime.openvino", {"int8": "nncf"}),
    ("runtime.onnxruntime", {"int8": "dynamic"}),
    ("quantize.dynamic_int8", {}),
)
# Decoders are judged by batch-1 decoding, which reads every weight per token: int8 *weights*
# (activations kept f32) quarter the bytes at +0.1% perplexity on SmolLM2, where PyTorch's
# dynamic int8 (activations too) costs +200% (bench/results/openvino_decoder.json and
# quantization_smollm2.json).
KNOWN_GOOD_BY_TASK: dict[str, KnownGood] = {
    "perplexity": (("runtime.openvino", {"weights": "int8_asym"}),),
}


def warm_start_recipes(
    pass_classes: Sequence[type[Pass]], withheld: Withheld, task: TaskSpec, seed: int
) -> list[Recipe]:
    """The portfolio for this study: the known-good recipes for its task whose pass the study
    offers."""
    offered = {cls.name for cls in pass_classes}
    recipes = []
    for name, config in KNOWN_GOOD_BY_TASK.get(task.name, KNOWN_GOOD):
        gaps = withheld.get(name, ())
        if name not in offered or ("", "") in gaps:
            continue
        kept = {key: value for key, value in config.items() if (key, str(value)) not in gaps}
        recipes.append(Recipe(steps=(Step(name, kept),), task=task, seed=seed))
    return recipes
