"""The child-process evaluation: a candidate that crashes fails alone, with a reason."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_bert

from slimformer.checkpoint import save_model
from slimformer.evaluate import CandidateFailed, EvaluationResult, evaluate_isolated
from slimformer.measure import MeasureSettings
from slimformer.tasks import TaskSpec, save_state

FAST = MeasureSettings(batch_size=4, latency_requests=4, throughput_inputs=8, min_seconds=0.05)
SCORES = """
import os

def good(model):
    return 0.5

def crash(model):
    os.abort()  # a native crash: no Python exception, no result file
"""


@pytest.fixture()
def scored_model(tmp_path, monkeypatch):
    (tmp_path / "scores.py").write_text(SCORES)
    monkeypatch.chdir(tmp_path)  # the child imports the score module from the working dir
    model_dir = save_model(tiny_bert(), tmp_path / "model")
    state = tmp_path / "state.safetensors"
    save_state({}, state)
    return model_dir, state


def spec(function: str) -> TaskSpec:
    return TaskSpec("custom", function=f"scores:{function}", direction="maximize")


def test_evaluation_in_a_child_returns_quality_and_measurement(scored_model, tmp_path):
    model_dir, state = scored_model
    result = evaluate_isolated(model_dir, spec("good"), state, FAST, tmp_path / "run")
    assert isinstance(result, EvaluationResult)
    assert result.quality == 0.5 and result.direction == "maximize"
    assert result.measurement["latency_ms_median"] > 0
    assert result.measurement["parameters"] > 0
    assert result.cpu and result.cpu["threads"] == FAST.resolved_threads()
    # The child's answer stays readable JSON, the same fields the parent reads back.
    written = json.loads((tmp_path / "run" / "evaluate-result.json").read_text())
    assert EvaluationResult.from_dict(written) == result
    assert written["quality"] == 0.5 and "latency_ms_median" in written["measurement"]


def test_a_timing_only_evaluation_has_no_score(scored_model, tmp_path):
    model_dir, state = scored_model
    result = evaluate_isolated(model_dir, spec("good"), state, FAST, tmp_path / "run", score=False)
    assert not result.scored and result.metric is None and result.details == {}
    assert result.measurement["latency_ms_median"] > 0


def test_a_candidate_that_crashes_natively_fails_with_a_reason(scored_model, tmp_path):
    model_dir, state = scored_model
    stages: list[str] = []
    with pytest.raises(CandidateFailed) as failure:
        evaluate_isolated(
            model_dir, spec("crash"), state, FAST, tmp_path / "run", on_stage=stages.append
        )
    assert str(failure.value)  # a reason, taken from the child's log or exit code
    assert stages == ["loading", "timing", "scoring"]  # it got as far as scoring


def test_a_candidate_that_hangs_is_stopped_at_the_timeout(scored_model, tmp_path):
    model_dir, state = scored_model
    slow = MeasureSettings(batch_size=4, latency_requests=4, min_seconds=120)
    with pytest.raises(CandidateFailed, match="longer than"):
        evaluate_isolated(model_dir, spec("good"), state, slow, tmp_path / "run", timeout_s=8)
