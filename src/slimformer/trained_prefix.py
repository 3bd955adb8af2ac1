"""Trained prefixes, kept for the later trials of a study that start with the same steps.

A study's recipes often share their expensive part: one pruned structure distilled the same way
(2-10 minutes on 2 cores), then served by different engines or int8 schemes, which take seconds
(the local search proposes exactly those: search/neighbours.py). Like Olive's cache of pass
outputs, a build keeps the model as it stood after its last training pass, in the run folder,
keyed by the steps that made it; a later build whose recipe starts with the same steps loads it
and applies only the rest. The reloaded model has the same weights bit for bit (safetensors),
so the candidate is the one an unbroken build makes (tests/test_trained_prefix.py checks it).

Only a prefix whose passes all ran to the end is kept: a distillation stopped at the study's
deadline has not made the model its recipe names. The folder keeps the `KEEP` prefixes used
last (each is a whole model: ~90 MB for MiniLM).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimformer.passes import get_pass
from slimformer.pipeline import sorted_steps
from slimformer.recipe import Recipe, Step, plain

if TYPE_CHECKING:
    from slimformer.model import SlimModel

KEEP = 6
# A folder's name: the key's first characters are plenty to tell a run's prefixes apart.
KEY_CHARS = 24


def split_at_training(steps: Sequence[Step]) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    """(the steps up to and including the last pass that trains, the steps after it), of
    steps in recipe order; ((), steps) when none of them trains."""
    trains = [i for i, step in enumerate(steps) if get_pass(step.pass_name).needs_training]
    if not trains:
        return (), tuple(steps)
    cut = trains[-1] + 1
    return tuple(steps[:cut]), tuple(steps[cut:])


def prefix_key(model: str, task: dict[str, Any] | None, prefix: Sequence[Step], seed: int) -> str:
    """What identifies a trained prefix: the original model's folder, the task whose data it
    trained on, each step's full config (defaults filled in, so {"keep": 0.7} and the same
    config spelled out are one prefix) and the seed."""
    configs = [get_pass(step.pass_name).make_config(step.config) for step in prefix]
    steps = [
        [step.pass_name, plain(dataclasses.asdict(config))]
        for step, config in zip(prefix, configs, strict=True)
    ]
    text = json.dumps([model, task, steps, seed], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS]


@dataclass(frozen=True)
class Split:
    """A recipe's steps in recipe order, cut after its last training pass (`split_at_training`),
    and the trained prefix's key ("" when nothing trains)."""

    prefix: tuple[Step, ...]
    rest: tuple[Step, ...]
    key: str


def split_recipe(model: str, task: dict[str, Any] | None, recipe: Recipe) -> Split:
    """`recipe` applied to the original in folder `model` for `task`, split for reuse: the one
    place the build child and the study's time estimate both cut and key a recipe."""
    prefix, rest = split_at_training(sorted_steps(recipe))
    return Split(prefix, rest, prefix_key(model, task, prefix, recipe.seed) if prefix else "")


def ran_to_the_end(applied: Sequence[Step]) -> bool:
    """Whether every applied step did all its config asked (a pass that stopped early
    records why in `resolved["stopped"]`)."""
    return not any("stopped" in step.resolved for step in applied)


class TrainedPrefixes:
    """The trained prefixes of one run, in `folder` (one model folder each, by key)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def find(self, key: str, touch: bool = True) -> Path | None:
        """The kept model of this prefix, or None; `touch` marks it used now."""
        path = self.folder / key
        if not path.is_dir():  # saved atomically: a folder there is a whole model
            return None
        if touch:
            os.utime(path)
        return path

    def keep(self, key: str, model: SlimModel) -> None:
        """Save `model` as this prefix's (atomically: a killed build leaves no half model),
        then drop the least recently used beyond `KEEP`."""
        from slimformer.checkpoint import save_model

        target = self.folder / key
        if target.exists():
            return
        save_model(model, target)
        kept = sorted(
            (p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in kept[KEEP:]:
            shutil.rmtree(old, ignore_errors=True)
