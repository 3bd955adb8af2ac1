"""Multi-fidelity trials: staged scoring's confidence bound, and the study stopping a candidate
clearly over budget before it is timed (recorded as pruned), or not at all with
--no-early-stop."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from fakes import PASSES, FakeBuilder, FakeEvaluator
from tiny import tiny_llama

from slimformer.checkpoint import save_model
from slimformer.evaluate import run_request
from slimformer.measure import MeasureSettings
from slimformer.recipe import Recipe, Step
from slimformer.search import runner
from slimformer.search.records import TrialRecord
from slimformer.search.run_folder import read_run
from slimformer.search.settings import StudySettings
from slimformer.tasks import TaskSpec, make_task, save_state
from slimformer.tasks.staging import (
    Paired,
    Staged,
    dominated,
    drop_bound,
    paired_standard_error,
    subset,
    verdict,
)


# --- the bound ----------------------------------------------------------------------------------
def population(n: int, worse: int, better: int, seed: int = 0) -> np.ndarray:
    """Per-example drops of a candidate: `worse` examples the original got right and it got
    wrong (+1), `better` the other way (−1), the rest alike (0), shuffled."""
    drops = np.zeros(n)
    drops[:worse] = 1
    drops[worse : worse + better] = -1
    return np.random.default_rng(seed).permutation(drops)


def test_a_candidate_five_points_worse_is_stopped_on_500_of_2000_examples() -> None:
    full = population(2000, worse=130, better=30)  # 5 points worse
    picked = subset(2000, seed=0, minimum=300)
    assert picked is not None and len(picked) == 500
    judged = verdict(Staged({"accuracy": Paired(full[picked], 2000)}), {"accuracy": 0.01})
    assert judged is not None and judged["over"]
    figure = judged["figures"]["accuracy"]
    assert 0.03 < figure["estimate"] < 0.07 and 0.01 < figure["bound"] < figure["estimate"]
    assert "accuracy drop" in judged["reason"]


def test_a_candidate_exactly_at_the_budget_is_stopped_at_most_at_the_nominal_rate() -> None:
    # The worst case for a wrong stop: the full split's drop is exactly the budget.
    full = population(2000, worse=60, better=40)  # 1 point worse: at a 1-point budget
    rng = np.random.default_rng(1)
    draws = 2000
    stopped = 0
    for _ in range(draws):
        picked = rng.choice(2000, 500, replace=False)
        judged = verdict(Staged({"accuracy": Paired(full[picked], 2000)}), {"accuracy": 0.01})
        stopped += bool(judged and judged["over"])
    rate = stopped / draws
    nominal = 0.025
    assert rate <= nominal + 3 * np.sqrt(nominal * (1 - nominal) / draws)


def test_a_candidate_within_budget_is_stopped_less_often_than_the_nominal_rate() -> None:
    full = population(2000, worse=50, better=40)  # half a point worse, at a 1-point budget
    rng = np.random.default_rng(2)
    stops = [
        verdict(
            Staged({"accuracy": Paired(full[rng.choice(2000, 500, replace=False)], 2000)}),
            {"accuracy": 0.01},
        )["over"]
        for _ in range(500)
    ]
    assert sum(stops) / len(stops) < 0.025


def test_checking_two_figures_splits_the_confidence_between_them() -> None:
    sample = Paired(population(2000, worse=60, better=20)[:500], 2000)
    alone = verdict(Staged({"a": sample}), {"a": 0.01})
    both = verdict(Staged({"a": sample, "b": sample}), {"a": 0.01, "b": 0.01})
    assert both["figures"]["a"]["bound"] < alone["figures"]["a"]["bound"]
    assert verdict(Staged({"a": sample}), {"other": 0.01}) is None  # nothing it can check


def test_a_relative_drop_is_the_exponential_of_the_mean_log_loss_difference() -> None:
    drops = np.full(8, np.log(1.2))  # every window's log-loss 0.18 higher: perplexity ×1.2
    estimate, bound = drop_bound(Paired(drops, 24, relative=True))
    assert estimate == pytest.approx(0.2) and bound == pytest.approx(0.2)


def test_the_standard_error_of_a_paired_drop_counts_the_examples_that_differ() -> None:
    # Differences 0, 1, 0, -1: variance 2/3 over 4 examples.
    original, candidate = np.array([1, 1, 0, 0]), np.array([1, 0, 0, 1])
    assert paired_standard_error(original, candidate) == pytest.approx(np.sqrt(2 / 3) / 2)
    assert paired_standard_error(original, original) == 0.0
    assert paired_standard_error(original[:1], candidate[:1]) == 0.0


def test_a_split_too_small_to_save_anything_is_not_staged() -> None:
    assert subset(500, seed=0, minimum=300) is None
    assert len(subset(24, seed=0, minimum=8)) == 8


# --- a task and its child -----------------------------------------------------------------------
def test_a_candidate_slower_than_a_trial_at_least_as_good_is_dominated_beyond_the_margin():
    staged = Staged({"probe_accuracy": Paired(drops=np.zeros(500), population=2000)})
    screening = {"figures": {"probe_accuracy": {"bound": 0.004}}}  # drop at least 0.4 pt
    front = [{"trial": 0, "drop": 0.0, "cost": 100.0}, {"trial": 3, "drop": 0.008, "cost": 400.0}]

    beaten = dominated(staged, screening, "probe_accuracy", 60.0, front, higher_is_better=True)
    assert beaten is not None and beaten["trial"] == 0 and "trial 0" in beaten["reason"]
    # Within the 50 % margin of trial 0; trial 3 is faster but may be worse in quality.
    assert dominated(staged, screening, "probe_accuracy", 70.0, front, True) is None
    # Latency: lower is better.
    slow = [{"trial": 0, "drop": 0.0, "cost": 10.0}]
    assert dominated(staged, screening, "probe_accuracy", 16.0, slow, False)["trial"] == 0
    assert dominated(staged, screening, "probe_accuracy", 14.0, slow, False) is None
    # A candidate that may be better than every measured trial is never dominated.
    hopeful = {"figures": {"probe_accuracy": {"bound": -0.001}}}
    assert dominated(staged, hopeful, "probe_accuracy", 1.0, front, True) is None
    assert dominated(staged, screening, "perplexity", 1.0, front, True) is None


@pytest.fixture()
def perplexity_run(tmp_path: Path) -> dict[str, Any]:
    """A tiny decoder, its task's reference state and a much worse copy of it."""
    text = tmp_path / "text.txt"
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "and",
        "runs",
        "far",
        "away",
    ]
    rng = np.random.default_rng(0)
    text.write_text(
        "\n\n".join(" ".join(rng.choice(words, 80)) for _ in range(60)), encoding="utf-8"
    )
    spec = TaskSpec("perplexity", data=str(text), seq_len=32)
    original = tiny_llama()
    task = make_task(spec)
    state_path = tmp_path / "state.safetensors"
    save_state(task.prepare(original), state_path)
    worse = tiny_llama()
    # Logits 30× sharper: a random model's guesses made confident, its log-loss far higher.
    worse.module.model.norm.weight.data.mul_(30)
    return {
        "spec": spec,
        "task": task,
        "state_path": state_path,
        "original": save_model(original, tmp_path / "original"),
        "worse": save_model(worse, tmp_path / "worse"),
        "models": (original, worse),
    }


def test_perplexity_on_the_subset_estimates_the_drop_of_the_full_score(perplexity_run) -> None:
    from slimformer.tasks import load_state

    task, state = perplexity_run["task"], load_state(perplexity_run["state_path"])
    original, worse = perplexity_run["models"]
    staged = task.score_staged(worse, state)
    assert staged is not None and len(staged.figures["perplexity"].drops) == 8
    estimate = float(np.exp(staged.figures["perplexity"].drops.mean()) - 1)
    full = task.score(worse, state).value / task.score(original, state).value - 1
    assert estimate > 0 and full > 0  # both see the worse model as worse
    assert estimate == pytest.approx(full, rel=0.5)


TIMING = MeasureSettings(
    threads=1, batch_size=2, latency_requests=4, throughput_inputs=4, min_seconds=0.01, warmup=1
)


def request(run: dict[str, Any], model: str, screen: dict[str, float] | None) -> dict[str, Any]:
    return {
        "model_dir": str(run[model]),
        "task": run["spec"].to_dict(),
        "state": str(run["state_path"]),
        "settings": asdict(TIMING),
        "score": True,
        "screen": screen,
    }


def test_the_evaluation_of_a_candidate_over_budget_stops_before_timing(
    perplexity_run, capsys
) -> None:
    result = run_request(request(perplexity_run, "worse", {"perplexity": 0.01}))
    assert result.stopped and result.measurement == {} and result.quality is None
    assert result.screening["figures"]["perplexity"]["bound"] > 0.01
    assert "timing" not in capsys.readouterr().out


def test_the_evaluation_of_a_candidate_within_budget_goes_on_to_the_full_score(
    perplexity_run, capsys
) -> None:
    screened = run_request(request(perplexity_run, "original", {"perplexity": 0.01}))
    plain = run_request(request(perplexity_run, "original", None))
    assert not screened.stopped and screened.screening["figures"]["perplexity"]["estimate"] == 0
    assert screened.quality == pytest.approx(plain.quality, rel=1e-9)
    assert screened.measurement["latency_ms_median"] > 0 and plain.screening is None
    assert "timing" in capsys.readouterr().out


def test_a_candidate_a_short_timing_shows_dominated_stops_before_the_full_timing(
    perplexity_run, capsys
) -> None:
    screen = {"perplexity": 0.01}
    front = {"figure": "perplexity", "cost_field": "throughput_per_s", "higher_is_better": True}
    unbeatable = front | {"points": [{"trial": 4, "drop": 0.0, "cost": 1e12}]}
    stopped = run_request(request(perplexity_run, "original", screen) | {"front": unbeatable})
    assert stopped.stopped and stopped.measurement == {} and stopped.quality is None
    assert stopped.screening["dominated"]["trial"] == 4 and stopped.screening["over"] is False
    assert 0 < stopped.screening["dominated"]["probe"] < 1e12
    out = capsys.readouterr().out
    assert "timing briefly" in out and "scoring\n" not in out.replace("scoring a subset", "")

    beatable = front | {"points": [{"trial": 4, "drop": 0.0, "cost": 1e-9}]}
    kept = run_request(request(perplexity_run, "original", screen) | {"front": beatable})
    assert not kept.stopped and kept.quality is not None
    assert kept.measurement["throughput_per_s"] > 0


# --- the study ----------------------------------------------------------------------------------
def start(*steps: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return Recipe(steps=tuple(Step(name, config) for name, config in steps)).to_dict()


INT8 = {"per_channel": False, "keep_sensitive": 0}
FEASIBLE = start(("quantize.dynamic_int8", {"scope": "all_but_ffn_out", **INT8}))
# 2 points worse (fakes.fake_scores) and the fastest recipe of the starts.
OVER = start(
    ("prune.layers", {"count": 2, "criterion": "block_influence"}),
    ("quantize.dynamic_int8", {"scope": "all", **INT8}),
)
OVER_TEXT = Recipe.from_dict(OVER).describe()


def settings(root: Path, trials: int = 3, **kwargs: Any) -> StudySettings:
    return StudySettings(
        model=str(root / "original"),
        task=TaskSpec("embedding"),
        max_drop=0.01,
        trials=trials,
        passes=PASSES,
        starts=(FEASIBLE, OVER),
        warm_start=False,
        measure=MeasureSettings(threads=1, batch_size=8),
        confirm_rounds=0,
        **kwargs,
    )


def run(root: Path, chosen: StudySettings, evaluator: FakeEvaluator, **kwargs: Any):
    return runner.run_study(
        chosen, root / "run", builder=FakeBuilder(root), evaluator=evaluator, **kwargs
    )


def lines(root: Path) -> list[dict[str, Any]]:
    text = (root / "run" / "trials.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_a_candidate_clearly_over_budget_is_pruned_with_its_estimate_and_never_timed(tmp_path):
    from slimformer.report_html import write_report

    evaluator = FakeEvaluator(staged=True)
    result = run(tmp_path, settings(tmp_path), evaluator, write_report=write_report)

    over = next(t for t in result.trials if t.description == OVER_TEXT)
    assert over.state == "pruned" and over.measurement == {} and over.quality is None
    assert over.early_stop["by"] == "subset"
    assert over.early_stop["figures"]["probe_accuracy"]["estimate"] == pytest.approx(0.020)
    assert over.feasible is False
    assert OVER_TEXT not in evaluator.timed
    assert over.number not in result.pareto and result.chosen.description != OVER_TEXT
    # The baseline is never screened: every drop is measured from it.
    assert evaluator.screens[0] is None and evaluator.screens[1] == {"probe_accuracy": 0.01}
    line = next(x for x in lines(tmp_path) if x["description"] == OVER_TEXT)
    assert line["state"] == "pruned" and TrialRecord.from_dict(line).early_stop == over.early_stop
    pareto = json.loads((tmp_path / "run" / "pareto.json").read_text())
    assert OVER_TEXT not in [point["description"] for point in pareto["front"]]
    url = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    told = optuna.load_study(study_name="slimformer", storage=url).trials[over.number]
    assert told.state == optuna.trial.TrialState.PRUNED
    assert told.constraints["max_drop"] > 0  # the sampler sees it infeasible
    page = (tmp_path / "run" / "report.html").read_text()
    assert "stopped early: probe_accuracy drop" in page


SLOW = start(("quantize.dynamic_int8", {"scope": "ffn", **INT8}))
SLOW_TEXT = Recipe.from_dict(SLOW).describe()


def test_a_candidate_slower_than_the_baseline_and_no_better_is_pruned_by_its_short_timing(
    tmp_path,
):
    evaluator = FakeEvaluator(staged=True, slowdown={SLOW_TEXT: 3.0})  # 18 ms against 10
    chosen = replace(settings(tmp_path), starts=(FEASIBLE, SLOW))
    result = run(tmp_path, chosen, evaluator)

    slow = next(t for t in result.trials if t.description == SLOW_TEXT)
    assert slow.state == "pruned" and slow.measurement == {} and slow.quality is None
    assert slow.early_stop["by"] == "timing" and slow.early_stop["dominated"]["trial"] == 0
    assert "dominated by trial 0" in slow.early_stop["reason"]
    assert SLOW_TEXT not in evaluator.timed and slow.number not in result.pareto
    # The probe compares with what was finished before it: the baseline and FEASIBLE.
    points = evaluator.fronts[-1]["points"]
    assert sorted(p["trial"] for p in points) == [0, 1]
    assert evaluator.fronts[0] is None  # the baseline: nothing to compare with


def test_without_early_stop_every_candidate_is_timed_and_scored_in_full(tmp_path):
    evaluator = FakeEvaluator(staged=True)
    result = run(tmp_path, settings(tmp_path, early_stop=False), evaluator)

    assert all(t.state == "complete" for t in result.trials)
    assert all(screen is None for screen in evaluator.screens)
    assert evaluator.timed == [t.description for t in result.trials]
    over = next(t for t in result.trials if t.description == OVER_TEXT)
    assert over.number in result.pareto and not over.feasible  # fastest, over budget
    assert result.chosen.description != OVER_TEXT
    assert read_run(tmp_path / "run")[0].early_stop is False


def test_a_resumed_study_keeps_its_pruned_trial_and_its_early_stop_setting(tmp_path):
    first = run(tmp_path, settings(tmp_path, 3), FakeEvaluator(staged=True))
    pruned = [t.number for t in first.trials if t.state == "pruned"]
    assert len(pruned) == 1

    evaluator = FakeEvaluator(staged=True)
    # On resume the run's own settings hold: early stopping stays on though asked off.
    again = run(tmp_path, settings(tmp_path, 5, early_stop=False), evaluator, resume=True)
    assert [t.number for t in again.trials if t.state == "pruned"][:1] == pruned
    assert OVER_TEXT not in [description for description, _ in evaluator.calls]  # not rerun
    assert sum(t.counts for t in again.trials) == 5
    assert all(screen is not None for screen in evaluator.screens)


# --- distillation stopped by the pruner ---------------------------------------------------------
def distill(count: int, lr: float) -> dict[str, Any]:
    return start(
        ("prune.layers", {"count": count, "criterion": "block_influence"}),
        ("recover.distill", {"steps": 100, "lr": lr}),
    )


GOOD_LOSSES = {0: 1.0, 25: 0.5, 50: 0.3, 75: 0.2, 100: 0.1}
BAD_LOSSES = {0: 2.0, 25: 1.5, 50: 1.2, 75: 1.1, 100: 1.0}  # far from its teacher throughout


def distill_settings(root: Path, **kwargs: Any) -> StudySettings:
    starts = (distill(1, 2e-5), distill(1, 5e-5), distill(1, 1e-4), distill(2, 5e-5))
    return StudySettings(
        model=str(root / "original"),
        task=TaskSpec("embedding"),
        max_drop=0.01,
        trials=5,
        passes=("prune.layers", "recover.distill"),
        starts=starts,
        warm_start=False,
        measure=MeasureSettings(threads=1, batch_size=8),
        confirm_rounds=0,
        **kwargs,
    )


def test_a_distillation_whose_held_out_loss_falls_behind_is_pruned_by_the_pruner(tmp_path):
    builder = FakeBuilder(tmp_path, losses={"count=2": BAD_LOSSES}, losses_default=GOOD_LOSSES)
    evaluator = FakeEvaluator()
    result = runner.run_study(
        distill_settings(tmp_path), tmp_path / "run", builder=builder, evaluator=evaluator
    )

    bad = next(t for t in result.trials if "count=2" in t.description)
    assert bad.state == "pruned" and bad.measurement == {}
    assert bad.early_stop["by"] == "distillation"
    # Stopped at the first step past the warm-up, with the last value it reported.
    assert bad.early_stop["step"] == 50 and bad.early_stop["held_out_loss"] == 1.2
    assert bad.description not in [description for description, _ in evaluator.calls]
    assert bad.number not in result.pareto and result.chosen.number != bad.number
    good = [t for t in result.trials if "count=1" in t.description]
    assert len(good) == 3 and all(t.state == "complete" for t in good)
    # The pruner's companion study holds each distillation, the stopped one pruned.
    url = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    companion = optuna.load_study(study_name="slimformer-distill", storage=url)
    states = [t.state for t in companion.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3
    assert states.count(optuna.trial.TrialState.PRUNED) == 1


def test_without_early_stop_no_distillation_is_watched_or_stopped(tmp_path):
    builder = FakeBuilder(tmp_path, losses={"count=2": BAD_LOSSES}, losses_default=GOOD_LOSSES)
    result = runner.run_study(
        distill_settings(tmp_path, early_stop=False),
        tmp_path / "run",
        builder=builder,
        evaluator=FakeEvaluator(),
    )
    assert all(t.state == "complete" for t in result.trials) and builder.stopped == []


def test_a_child_reporting_values_is_stopped_when_the_listener_says_so(tmp_path, monkeypatch):
    import os
    import time

    from slimformer.child import Stopped, run_child

    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    seen: list[tuple[int, float]] = []

    def listen(step: int, value: float) -> str | None:
        seen.append((step, value))
        return "too slow" if value > 1 else None

    values = [[0, 0.5], [25, 0.7], [50, 2.0]] + [[75 + i, 0.1] for i in range(100)]
    request = {"do": "values", "values": values, "pid_file": str(tmp_path / "pid"), "answer": {}}
    began = time.monotonic()
    with pytest.raises(Stopped, match="too slow") as stop:
        run_child("child_probe", request, tmp_path, "probe", on_value=listen)
    assert (stop.value.step, stop.value.value) == (50, 2.0) and seen[-1] == (50, 2.0)
    assert time.monotonic() - began < 8  # not the 10 s its values would take
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--no-early-stop"], False)])
def test_the_command_line_passes_early_stopping_on_unless_switched_off(
    monkeypatch, tmp_path, flag, expected
) -> None:
    from typer.testing import CliRunner

    from slimformer import api
    from slimformer.cli import app

    asked: dict[str, Any] = {}

    def optimize(model: str, **kwargs: Any) -> None:
        asked.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(api, "optimize", optimize)
    out = str(tmp_path / "run")
    CliRunner().invoke(app, ["optimize", "default", "--trials", "2", "--out", out, *flag])
    assert asked["early_stop"] is expected


def test_a_real_distillation_child_reports_its_held_out_loss_and_is_stopped(
    tiny_encoder, tmp_path
) -> None:
    import tiny

    from slimformer.build import build_isolated, save_batches
    from slimformer.checkpoint import load_model
    from slimformer.child import Stopped

    model = load_model(tiny_encoder)
    calibration, training = (tiny.calibration(model, batches=6) for _ in range(2))
    save_batches(tmp_path / "batches.safetensors", calibration, training)
    recipe = Recipe(
        steps=(
            Step("prune.heads", {"keep": 0.5, "criterion": "magnitude"}),
            Step("recover.distill", {"steps": 10_000}),
        )
    )
    seen: list[tuple[int, float]] = []

    def listen(step: int, value: float) -> str | None:
        seen.append((step, value))
        return "falls behind" if step >= 25 else None

    with pytest.raises(Stopped, match="falls behind"):
        build_isolated(
            tiny_encoder,
            TaskSpec("embedding"),
            recipe,
            tmp_path / "out",
            tmp_path / "work",
            batches=tmp_path / "batches.safetensors",
            threads=1,
            on_value=listen,
        )
    assert [step for step, _ in seen] == [0, 25] and all(value > 0 for _, value in seen)
    assert not (tmp_path / "out").exists()


def test_the_time_budget_does_not_learn_a_full_trial_s_length_from_trials_stopped_early():
    full = {"build_s": 20.0, "evaluate_s": 30.0, "save_s": 1.0, "passes": {"prune.layers": 5.0}}
    screened = {"build_s": 20.0, "evaluate_s": 4.0, "save_s": 1.0, "passes": {"prune.layers": 5}}
    records = [
        TrialRecord(0, "complete", "baseline", timings=full),
        TrialRecord(1, "pruned", "a", timings=screened, early_stop={"by": "subset"}),
        TrialRecord(
            2, "pruned", "b", timings={"build_s": 300.0}, early_stop={"by": "distillation"}
        ),
    ]
    timings = runner.budget_timings(records)
    assert timings == [full, {k: v for k, v in screened.items() if k != "evaluate_s"}]


def test_a_candidate_that_passes_the_subset_records_what_a_full_scoring_records(
    tiny_encoder, tmp_path
) -> None:
    """Scored again in full, not subset + rest: dynamic int8 scales activations per batch, so
    the same sentences batched differently give other embeddings."""
    import tiny

    from slimformer.checkpoint import load_model
    from slimformer.pipeline import apply_recipe
    from slimformer.tasks import load_state, reference_state

    spec = TaskSpec("embedding")
    task, model = make_task(spec), load_model(tiny_encoder)
    state_path = reference_state(tiny_encoder, spec)
    state = load_state(state_path)
    staged = task.score_staged(model, state)
    assert set(staged.figures) == {"probe_accuracy", "transfer_probe_accuracy"}
    assert all(len(f.drops) == 500 and f.population == 2000 for f in staged.figures.values())
    # The original against itself: the same answer on every sentence.
    assert all(not f.drops.any() for f in staged.figures.values())

    int8 = apply_recipe(
        model, Recipe(steps=(Step("quantize.dynamic_int8", {}),)), tiny.calibration(model)
    )
    run = {"spec": spec, "state_path": state_path, "int8": save_model(int8, tmp_path / "int8")}
    screened = run_request(request(run, "int8", {"probe_accuracy": 1.0}))
    plain = run_request(request(run, "int8", None))
    assert screened.screening is not None and plain.screening is None
    assert screened.quality == plain.quality and screened.details == plain.details
