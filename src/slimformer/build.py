"""Build one candidate in a child process: load the original, apply a recipe, save the result.

The study's process never applies a pass itself: a pass that raises, exhausts memory or crashes
in native code fails its own trial, and the study goes on. The parent calls `build_isolated`;
the child is `python -m slimformer.build REQUEST.json` (the plumbing: child.py) and answers
with the recipe as applied (with the decisions its passes resolved) and how long its parts took.

The calibration and training batches come from a file the study writes once (`save_batches`),
so a child does not read and tokenize the task's data again. A pass registered by a module
outside slimformer (a plugin, a test's pass) is found in the child by importing that module,
which must be importable there too (on PYTHONPATH). Given a `reuse` folder, a recipe that trains
keeps its trained prefix there for later builds that start with the same steps
(trained_prefix.py).
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimformer.child import child_main, report_stage, report_value, run_child
from slimformer.passes import get_pass
from slimformer.recipe import Recipe
from slimformer.taskspec import TaskSpec
from slimformer.trained_prefix import TrainedPrefixes, ran_to_the_end, split_recipe

if TYPE_CHECKING:
    import torch

Batch = dict[str, "torch.Tensor"]
KINDS = ("calibration", "training", "general")


@dataclass(frozen=True)
class Built:
    """A candidate saved by the build child: its recipe as applied, and where the time went."""

    recipe: Recipe
    pass_seconds: dict[str, float] = field(default_factory=dict)  # by pass name
    # The passes not run because a trained prefix an earlier build kept was loaded instead.
    reused: tuple[str, ...] = ()
    load_s: float = 0.0  # the original model and the batches
    save_s: float = 0.0


def build_isolated(
    reference_dir: Path,
    task_spec: TaskSpec,
    recipe: Recipe,
    out: Path,
    workdir: Path,
    *,
    batches: Path | None = None,
    on_stage: Callable[[str], None] | None = None,
    passes_deadline: float | None = None,
    kill_at: float | None = None,
    threads: int | None = None,
    on_value: Callable[[int, float], str | None] | None = None,
    reuse: Path | None = None,
) -> Built:
    """Apply `recipe` to the model in `reference_dir` and save it in `out`, in a child whose
    request, answer and log are kept in `workdir`. Long passes stop at `passes_deadline`; the
    child is killed at `kill_at` (both epoch seconds). `threads`: torch's threads in the child
    (None: torch's default). `on_value`: the training passes report intermediate values to it
    (step, held-out loss); a reason it returns stops the build (`child.Stopped`). `reuse`:
    where trained prefixes are kept (trained_prefix.py; None: never). Raises
    `CandidateFailed` with the reason."""
    modules = {get_pass(step.pass_name).__module__ for step in recipe.steps}
    request = {
        "model": str(reference_dir),
        "task": task_spec.to_dict(),
        "recipe": recipe.to_dict(),
        "out": str(out),
        "batches": str(batches) if batches else None,
        "passes_deadline": passes_deadline,
        "threads": threads,
        "pass_modules": sorted(m for m in modules if not m.startswith("slimformer.")),
        "intermediate": on_value is not None,
        "reuse": str(reuse) if reuse else None,
    }
    answer = run_child(
        "slimformer.build",
        request,
        workdir,
        "build",
        on_stage=on_stage,
        kill_at=kill_at,
        on_value=on_value,
    )
    return Built(
        recipe=Recipe.from_dict(answer["recipe"]),
        pass_seconds=answer["pass_seconds"],
        reused=tuple(answer.get("reused", ())),
        load_s=answer["load_s"],
        save_s=answer["save_s"],
    )


# --- the batches, shared by every child of a study ------------------------------------------
def save_batches(
    path: Path,
    calibration: Sequence[Batch],
    training: Sequence[Batch],
    general: Sequence[Batch] = (),
) -> None:
    """Write the batches atomically (a crash leaves no half file that a child would read):
    calibration, training, and the general-domain batches a distillation may mix in."""
    from safetensors.torch import save_file

    tensors = {
        f"{kind}.{index:05d}.{name}": tensor.contiguous()
        for kind, batches in zip(KINDS, (calibration, training, general), strict=True)
        for index, batch in enumerate(batches)
        for name, tensor in batch.items()
    }
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_batches(path: Path) -> tuple[list[Batch], list[Batch], list[Batch]]:
    """The calibration, training and general batches `save_batches` wrote, in their order."""
    from safetensors.torch import load_file

    grouped: dict[str, dict[int, Batch]] = {kind: {} for kind in KINDS}
    for key, tensor in load_file(str(path)).items():
        kind, index, name = key.split(".", 2)
        grouped[kind].setdefault(int(index), {})[name] = tensor
    calibration, training, general = (
        [batches[i] for i in sorted(batches)] for batches in grouped.values()
    )
    return calibration, training, general


# --- the child ------------------------------------------------------------------------------
class _PassClock:
    """Times each pass: `apply_recipe` announces every pass by name just before it runs it."""

    def __init__(self, names: Sequence[str]):
        self.pending = list(names)
        self.seconds: dict[str, float] = {}
        self.current: str | None = None
        self.since = time.monotonic()

    def progress(self, message: str) -> None:
        if self.pending and message == self.pending[0]:
            self.stop()
            self.current, self.since = self.pending.pop(0), time.monotonic()
        report_stage(message)

    def stop(self) -> None:
        if self.current is not None:
            spent = time.monotonic() - self.since
            self.seconds[self.current] = round(self.seconds.get(self.current, 0.0) + spent, 3)
            self.current = None


def run_request(request: dict[str, Any]) -> dict[str, Any]:
    import torch

    from slimformer.checkpoint import load_model, save_model
    from slimformer.passes.base import intermediate_values, passes_deadline
    from slimformer.pipeline import apply_recipe, check_recipe
    from slimformer.tasks import make_task

    for module in request["pass_modules"]:
        importlib.import_module(module)
    if request["threads"]:
        torch.set_num_threads(request["threads"])
    started = time.monotonic()
    task = make_task(TaskSpec.from_dict(request["task"]))
    recipe = Recipe.from_dict(request["recipe"])
    check_recipe(recipe)  # whole: its parts below are checked only each alone
    # A recipe that trains is built in two parts, the trained prefix kept for later trials
    # that start with the same steps (trained_prefix.py); one kept by an earlier trial is
    # loaded instead of trained again, and the original is not needed at all.
    split = split_recipe(request["model"], request["task"], recipe)
    prefix, rest = split.prefix, split.rest
    prefixes = TrainedPrefixes(Path(request["reuse"])) if request.get("reuse") else None
    kept = prefixes.find(split.key) if prefixes is not None and prefix else None
    if kept is not None:
        report_stage("loading the trained model an earlier trial kept")
        start, to_run = load_model(kept, head=task.head), rest
    else:
        report_stage("loading the original")
        start, to_run = load_model(Path(request["model"]), head=task.head), prefix + rest
    calibration, training, general = (
        load_batches(Path(request["batches"])) if request["batches"] else ([], [], [])
    )
    load_s = time.monotonic() - started
    clock = _PassClock([step.pass_name for step in to_run])
    listener = report_value if request.get("intermediate") else None
    with passes_deadline(request["passes_deadline"]), intermediate_values(listener):
        if kept is None and prefix:
            before = len(start.recipe.steps)
            start = apply_recipe(
                start,
                replace(recipe, steps=prefix),
                calibration,
                clock.progress,
                training,
                general,
            )
            if prefixes is not None and ran_to_the_end(start.recipe.steps[before:]):
                prefixes.keep(split.key, start)
        candidate = apply_recipe(
            start, replace(recipe, steps=rest), calibration, clock.progress, training, general
        )
    clock.stop()
    report_stage("saving")
    saving = time.monotonic()
    save_model(candidate, Path(request["out"]))
    return {
        "recipe": candidate.recipe.to_dict(),
        "pass_seconds": clock.seconds,
        "reused": [step.pass_name for step in prefix] if kept is not None else [],
        "load_s": round(load_s, 3),
        "save_s": round(time.monotonic() - saving, 3),
    }


def main(argv: list[str]) -> int:
    return child_main(argv, run_request)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
