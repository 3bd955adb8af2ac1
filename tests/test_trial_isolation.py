"""A candidate that breaks, however it breaks, fails its own trial: the study goes on, records
the reason and saves best/. Real build children on a tiny BERT (the passes run there); the
evaluation is the fake one (fakes.py), so that a study takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeEvaluator

import slimformer
from slimformer.card import write_card
from slimformer.measure import MeasureSettings
from slimformer.recipe import Recipe, Step
from slimformer.search.runner import run_study
from slimformer.search.settings import StudySettings
from slimformer.tasks import TaskSpec

PRUNE = Recipe(steps=(Step("prune.layers", {"count": 1, "criterion": "block_influence"}),))


def fault(kind: str) -> Recipe:
    return Recipe(steps=(Step("test.fault", {"fault": kind}),))


def study_settings(model: Path, *starts: Recipe, **kwargs) -> StudySettings:
    return StudySettings(
        model=str(model),
        task=TaskSpec("embedding"),
        trials=kwargs.pop("trials", len(starts) + 1),
        passes=("prune.layers", "test.fault"),
        starts=tuple(r.to_dict() for r in starts),
        measure=MeasureSettings(threads=1, batch_size=8),
        confirm_rounds=0,
        **kwargs,
    )


def trials(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("fault_pass")
def test_passes_that_raise_or_crash_natively_fail_their_trials_and_the_study_goes_on(
    tiny_encoder, tmp_path
):
    run = tmp_path / "run"
    settings = study_settings(tiny_encoder, fault("raise"), fault("abort"), PRUNE)
    result = run_study(settings, run, evaluator=FakeEvaluator(), write_card=write_card)

    lines = trials(run)
    assert [line["state"] for line in lines] == ["complete", "failed", "failed", "complete"]
    # The second trial's pass raised: the exception is the reason, its traceback in the log.
    assert lines[1]["description"] == fault("raise").describe()
    assert lines[1]["error"] == "AssertionError: the test pass broke"
    log = (run / "logs" / "trial-001" / "build.log").read_text()
    assert "Traceback" in log and "the test pass broke" in log
    # The third one's pass crashed natively (os.abort): the signal is the reason, and
    # faulthandler's traceback of the crash is in the log.
    assert lines[2]["description"] == fault("abort").describe()
    assert lines[2]["error"].startswith("the build process died of SIGABRT; its log: ")
    log = (run / "logs" / "trial-002" / "build.log").read_text()
    assert "Fatal Python error: Aborted" in log and "faulty_passes.py" in log
    assert not (run / "candidates" / "trial-001").exists()
    assert not (run / "candidates" / "trial-002").exists()

    # The study went on: the next trial was built for real and chosen.
    assert result.chosen.number == 3 and result.best_dir == run / "best"
    best = slimformer.load(run / "best")
    assert best.adapter.num_layers == 3
    assert len(best.recipe.steps[0].resolved["dropped_layers"]) == 1  # decisions recorded
