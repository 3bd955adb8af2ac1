"""Where the search meets models: building a candidate from a recipe, and evaluating one.

The loop (runner.py) never touches a model itself; it is handed a `Builder` and an
`Evaluator`. The real ones are here: the original model loaded once, each recipe applied to
a copy and saved, each saved candidate evaluated in a fresh child process (evaluate.py).
Tests hand the loop fakes instead, so a whole study runs in seconds.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from slimformer.assets import resolve_path
from slimformer.checkpoint import load_model, save_model
from slimformer.evaluate import EvaluationResult, evaluate_isolated
from slimformer.measure import MeasureSettings
from slimformer.passes import Pass
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe
from slimformer.tasks import TaskSpec, make_task, reference_state

Stage = Callable[[str], None]


class Evaluator(Protocol):
    def __call__(
        self, model_dir: Path, workdir: Path, *, score: bool = True, on_stage: Stage | None = None
    ) -> EvaluationResult:
        """Load, time and (unless `score` is false: timing only) score a saved model;
        raise `evaluate.CandidateFailed` with the reason when it cannot be evaluated."""
        ...


class Builder(Protocol):
    """The original model and what the search makes of it."""

    facts: Any  # the model's facts that bound the search space (layers, heads, ...)

    @property
    def reference_dir(self) -> Path:
        """The original model's folder (the confirmation times it again)."""
        ...

    def prepare(
        self, pass_classes: Sequence[type[Pass]], state_path: Path, say: Stage
    ) -> list[type[Pass]]:
        """Load and check the original model, write the task's reference arrays to
        `state_path` (if missing), and return the passes that apply to this model."""
        ...

    def build(self, recipe: Recipe, folder: Path, on_stage: Stage | None = None) -> Recipe:
        """Apply `recipe` to the original and save the result in `folder`; return the recipe
        as applied (with the decisions its passes resolved)."""
        ...


def child_evaluator(task: TaskSpec, state_path: Path, measure: MeasureSettings) -> Evaluator:
    """The default: each evaluation in a fresh child process (clean memory, crashes contained)."""

    def evaluate(
        model_dir: Path, workdir: Path, *, score: bool = True, on_stage: Stage | None = None
    ) -> EvaluationResult:
        return evaluate_isolated(
            model_dir, task, state_path, measure, workdir, on_stage=on_stage, score=score
        )

    return evaluate


class ModelBuilder:
    """The real original model, loaded once; candidates are copies with passes applied."""

    def __init__(self, model: str, task: TaskSpec):
        self.model = model
        self.task = make_task(task)
        self.facts: Any = None

    @property
    def reference_dir(self) -> Path:
        return resolve_path(self.model)

    def prepare(
        self, pass_classes: Sequence[type[Pass]], state_path: Path, say: Stage
    ) -> list[type[Pass]]:
        say(f"loading {self.model}")
        self.base = load_model(resolve_path(self.model), head=self.task.head)
        self.task.check_model(self.base)
        say(f"preparing the {self.task.name} task on the original model")
        # The reference arrays come from the shared cache; the run keeps its own copy so it
        # stays self-contained (and resumable) if the cache is cleared.
        if not state_path.is_file():
            cached = reference_state(self.reference_dir, self.task.spec, self.base)
            shutil.copyfile(cached, state_path)
        self.calibration = self.task.calibration_batches(self.base)
        applicable = [c for c in pass_classes if c.applies_to(self.base)]
        trains = any(cls.needs_training for cls in applicable)
        self.training = self.task.training_batches(self.base) if trains else []
        self.general = self.task.general_batches(self.base) if trains else []
        self.facts = self.base.adapter.facts()
        return applicable

    def build(self, recipe: Recipe, folder: Path, on_stage: Stage | None = None) -> Recipe:
        candidate = apply_recipe(
            self.base, recipe, self.calibration, on_stage, self.training, self.general
        )
        if on_stage:
            on_stage("saving")
        save_model(candidate, folder)
        return candidate.recipe
