"""Where the search meets models: building a candidate from a recipe, and evaluating one.

The loop (runner.py) never touches a model itself; it is handed a `Builder` and an
`Evaluator`. The real ones are here: the original model loaded once to prepare the study (its
facts, the task's reference arrays, the calibration and training batches, saved for the
children), then each recipe applied and saved in a fresh child process (build.py) and each
saved candidate evaluated in another (evaluate.py), so that nothing a candidate does — an
exception, a native crash, running out of memory — reaches the study's process.
Tests hand the loop fakes instead, so a whole study runs in seconds.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from slimformer.assets import resolve_path
from slimformer.build import Built, build_isolated, save_batches
from slimformer.checkpoint import load_model
from slimformer.evaluate import EvaluationResult, evaluate_isolated
from slimformer.measure import MeasureSettings
from slimformer.passes import Pass
from slimformer.recipe import Recipe
from slimformer.tasks import TaskSpec, make_task, reference_state
from slimformer.trained_prefix import TrainedPrefixes, split_recipe

Stage = Callable[[str], None]


class Evaluator(Protocol):
    def __call__(
        self,
        model_dir: Path,
        workdir: Path,
        *,
        score: bool = True,
        on_stage: Stage | None = None,
        kill_at: float | None = None,
        screen: dict[str, float] | None = None,
    ) -> EvaluationResult:
        """Load, time and (unless `score` is false: timing only) score a saved model, keeping
        what the evaluation leaves (its log) in `workdir`; raise `child.CandidateFailed` with
        the reason when it cannot be evaluated, or is still at it at `kill_at` (epoch s).
        `screen`: the drop allowed per figure; a candidate over one of them on a subset of
        the scored split, with confidence, stops there (`EvaluationResult.stopped`). Only
        passed when given (evaluators that never screen need not take it)."""
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

    def build(
        self,
        recipe: Recipe,
        folder: Path,
        workdir: Path,
        *,
        on_stage: Stage | None = None,
        passes_deadline: float | None = None,
        kill_at: float | None = None,
        on_value: Callable[[int, float], str | None] | None = None,
    ) -> Built:
        """Apply `recipe` to the original and save the result in `folder`, keeping what the
        build leaves (its log) in `workdir`; return the recipe as applied (with the decisions
        its passes resolved) and the time its parts took. Long passes stop at
        `passes_deadline`; at `kill_at` the build is abandoned (epoch seconds). Raise
        `child.CandidateFailed` with the reason when it fails. `on_value`: training passes'
        intermediate values (step, held-out loss); a reason it returns stops the build with
        `child.Stopped` (only passed when given)."""
        ...

    def passes_to_run(self, recipe: Recipe) -> list[str]:
        """The passes a build of `recipe` would run now, in order: all of them, unless an
        earlier build kept its trained prefix (trained_prefix.py). The time budget's
        estimate of a trial counts these."""
        ...


def child_evaluator(task: TaskSpec, state_path: Path, measure: MeasureSettings) -> Evaluator:
    """The default: each evaluation in a fresh child process (clean memory, crashes contained)."""

    def evaluate(
        model_dir: Path,
        workdir: Path,
        *,
        score: bool = True,
        on_stage: Stage | None = None,
        kill_at: float | None = None,
        screen: dict[str, float] | None = None,
        front: dict[str, Any] | None = None,
    ) -> EvaluationResult:
        return evaluate_isolated(
            model_dir,
            task,
            state_path,
            measure,
            workdir,
            on_stage=on_stage,
            score=score,
            kill_at=kill_at,
            screen=screen,
            front=front,
        )

    return evaluate


class ModelBuilder:
    """The real original model: loaded here once to prepare the study; each candidate is built
    from it in a child process (build.py)."""

    def __init__(
        self,
        model: str,
        task: TaskSpec,
        batches_path: Path,
        threads: int | None = None,
        reuse: Path | None = None,
    ):
        """`batches_path`: where the calibration and training batches are kept for the
        children (in the run folder); `threads`: torch's threads in them (None: its default);
        `reuse`: where trained prefixes are kept for later trials (None: never)."""
        self.model = model
        self.task = make_task(task)
        self.batches_path = batches_path
        self.threads = threads
        self.reuse = reuse
        self.facts: Any = None

    @property
    def reference_dir(self) -> Path:
        return resolve_path(self.model)

    def prepare(
        self, pass_classes: Sequence[type[Pass]], state_path: Path, say: Stage
    ) -> list[type[Pass]]:
        say(f"loading {self.model}")
        base = load_model(self.reference_dir, head=self.task.head)
        self.task.check_model(base)
        say(f"preparing the {self.task.name} task on the original model")
        # The reference arrays come from the shared cache; the run keeps its own copy so it
        # stays self-contained (and resumable) if the cache is cleared.
        if not state_path.is_file():
            cached = reference_state(self.reference_dir, self.task.spec, base)
            shutil.copyfile(cached, state_path)
        applicable = [c for c in pass_classes if c.applies_to(base)]
        trains = any(cls.needs_training for cls in applicable)
        training = self.task.training_batches(base) if trains else []
        general = self.task.general_batches(base) if trains else []
        save_batches(self.batches_path, self.task.calibration_batches(base), training, general)
        self.facts = base.adapter.facts()
        return applicable

    def build(
        self,
        recipe: Recipe,
        folder: Path,
        workdir: Path,
        *,
        on_stage: Stage | None = None,
        passes_deadline: float | None = None,
        kill_at: float | None = None,
        on_value: Callable[[int, float], str | None] | None = None,
    ) -> Built:
        return build_isolated(
            self.reference_dir,
            self.task.spec,
            recipe,
            folder,
            workdir,
            batches=self.batches_path,
            on_stage=on_stage,
            passes_deadline=passes_deadline,
            kill_at=kill_at,
            threads=self.threads,
            on_value=on_value,
            reuse=self.reuse,
        )

    def passes_to_run(self, recipe: Recipe) -> list[str]:
        split = split_recipe(str(self.reference_dir), self.task.spec.to_dict(), recipe)
        kept = (
            self.reuse is not None
            and split.prefix
            and TrainedPrefixes(self.reuse).find(split.key, touch=False) is not None
        )
        return [step.pass_name for step in (split.rest if kept else split.prefix + split.rest)]
