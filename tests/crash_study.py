"""A study to kill: `python tests/crash_study.py OUT --trials N [--model DIR] [--fault KIND]`,
or `study(...)` in a forked process.

Runs (or, when OUT holds a run, resumes) a study of N trials in OUT. Without a model the models
are fakes (fakes.py: a folder with a recipe, scores computed from it), so the study's own
writes — the storage, trials.jsonl, best/ — are nearly all its time. With a model the
candidates are built for real, in build children, and evaluated by the fake evaluator; with a
fault the one start recipe is the `test.fault` pass's (faulty_passes.py), so that a trial's
pass can, for example, kill this process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fakes import PASSES, FakeBuilder, FakeEvaluator

from slimformer.card import write_card
from slimformer.measure import MeasureSettings
from slimformer.recipe import Recipe, Step
from slimformer.search.runner import run_study
from slimformer.search.settings import StudySettings
from slimformer.tasks import TaskSpec

INT8 = Step(
    "quantize.dynamic_int8", {"scope": "all_but_ffn_out", "per_channel": False, "keep_sensitive": 0}
)
PRUNE = Step("prune.layers", {"count": 1, "criterion": "block_influence"})


def study(out: Path, trials: int, model: Path | None = None, fault: str | None = None) -> None:
    starts = [Recipe(steps=(INT8,)), Recipe(steps=(PRUNE,))]
    passes = PASSES
    if fault:
        import faulty_passes  # noqa: F401  (registers test.fault)

        starts = [Recipe(steps=(Step("test.fault", {"fault": fault}),))]
        passes = (*PASSES, "test.fault")
    if model:
        builder = None
    else:
        builder = FakeBuilder(out.parent / "fake-models")
        model = builder.reference_dir
    settings = StudySettings(
        model=str(model),
        task=TaskSpec("embedding"),
        trials=trials,
        passes=passes,
        starts=tuple(r.to_dict() for r in starts),
        measure=MeasureSettings(threads=1, batch_size=8),
        confirm_rounds=1,
    )
    run_study(
        settings,
        out,
        resume=(out / "run.json").is_file(),
        builder=builder,
        evaluator=FakeEvaluator(),
        write_card=write_card,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--fault")
    args = parser.parse_args(argv)
    study(args.out, args.trials, args.model, args.fault)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
