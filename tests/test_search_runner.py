"""The study loop on fake models: a whole study of several trials in seconds.

The runner is handed a fake `Builder` (writes a folder with the recipe, applies nothing) and a
fake `Evaluator` (quality and latency computed from the recipe), so these tests check the loop
itself: trials.jsonl, pareto.json, the choice and best/, the confirmation, resume after an
interruption, repeats reusing earlier results, trials measured on another machine.
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from fakes import PASSES, FakeBuilder, FakeEvaluator, fake_scores
from rich.console import Console

from slimformer.card import write_card
from slimformer.child import CandidateFailed
from slimformer.cpu import fingerprint
from slimformer.errors import SlimformerError
from slimformer.figures import BY_NAME
from slimformer.measure import MeasureSettings
from slimformer.recipe import Recipe, Step
from slimformer.report import RichReporter, print_study, trials_table
from slimformer.search import runner
from slimformer.search.budget import AFTER_PASSES_S, FINISH_S
from slimformer.search.lock import PID_FILE, RunLock
from slimformer.search.records import TrialRecord
from slimformer.search.run_folder import read_run
from slimformer.search.selection import choose, pareto_front, runoff_contenders
from slimformer.search.settings import StudySettings
from slimformer.tasks import TaskSpec


class RecordingReporter:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def study_started(self, settings, total, done) -> None:
        self.events.append(("study_started", (total, done)))

    def trial_started(self, number: int, description: str) -> None:
        self.events.append(("trial_started", description))

    def stage(self, name: str) -> None:
        self.events.append(("stage", name))

    def trial_finished(self, record: TrialRecord) -> None:
        self.events.append(("trial_finished", record.number))

    def message(self, text: str) -> None:
        self.events.append(("message", text))

    def note(self, text: str) -> None:
        self.events.append(("note", text))

    def of(self, kind: str) -> list[Any]:
        return [value for event, value in self.events if event == kind]


def start(*steps: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return Recipe(steps=tuple(Step(name, config) for name, config in steps)).to_dict()


def int8(scope: str) -> dict[str, Any]:
    """A start recipe of dynamic int8, every searched setting given (as the sampler has it)."""
    return start(
        ("quantize.dynamic_int8", {"scope": scope, "per_channel": False, "keep_sensitive": 0})
    )


# Within the 1-point budget and faster than the baseline: the choice is never the baseline.
FEASIBLE = int8("all_but_ffn_out")


def settings(root: Path, trials: int = 6, **kwargs: Any) -> StudySettings:
    kwargs.setdefault("starts", (FEASIBLE,))
    return StudySettings(
        model=str(root / "original"),
        task=kwargs.pop("task", TaskSpec("embedding")),
        max_drop=kwargs.pop("max_drop", 0.01),
        trials=trials,
        passes=kwargs.pop("passes", PASSES),
        measure=MeasureSettings(threads=1, batch_size=8),
        confirm_rounds=kwargs.pop("confirm_rounds", 2),
        **kwargs,
    )


def study(root: Path, chosen: StudySettings, builder=None, evaluator=None, reporter=None, **kwargs):
    return runner.run_study(
        chosen,
        root / "run",
        reporter=reporter,
        builder=builder or FakeBuilder(root),
        evaluator=evaluator or FakeEvaluator(),
        write_card=write_card,
        **kwargs,
    )


def trials_file(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]


# --- a whole study ------------------------------------------------------------------------
def test_a_whole_study_writes_its_trials_front_and_best_and_confirms_the_choice(tmp_path):
    builder, evaluator, reporter = FakeBuilder(tmp_path), FakeEvaluator(), RecordingReporter()
    result = study(tmp_path, settings(tmp_path, 6), builder, evaluator, reporter)
    run = tmp_path / "run"

    lines = trials_file(run)
    assert len(lines) == 6 and lines[0]["description"] == "baseline"
    assert all(line["state"] == "complete" and line["duplicate_of"] is None for line in lines)
    for line in lines:  # every figure is the fake evaluation of the recipe the trial ran
        quality, latency = fake_scores(Recipe.from_dict(line["recipe"]))
        assert line["quality"] == quality
        assert line["measurement"]["latency_ms_median"] == latency
        assert line["drop"] == pytest.approx(0.90 - quality)
        assert line["feasible"] == (line["drop"] <= 0.01 + 1e-12)
    records = [TrialRecord(**line) for line in lines]
    front = pareto_front(records, "maximize", "latency")
    pareto = json.loads((run / "pareto.json").read_text())
    assert [t["number"] for t in pareto["front"]] == front == result.pareto
    assert pareto["objective"] == "latency" and pareto["metric"] == "probe_accuracy"

    # The choice: the lowest latency within the budget.
    feasible = [line for line in lines if line["feasible"]]
    fastest = min(feasible, key=lambda t: t["measurement"]["latency_ms_median"])
    assert result.chosen.number == fastest["number"] and result.met_budget
    assert choose(records, front, "maximize", "latency")[0].number == fastest["number"]
    best = run / "best"
    assert Recipe.load(best).describe() == fastest["description"]
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["trial"] == fastest["number"] and metrics["met_max_drop"] is True
    assert metrics["cpu"] == json.loads((run / "run.json").read_text())["cpu"]
    # Only the front's trials keep a saved candidate (the baseline's too, when on it), and the
    # within-budget trials whose reading came close enough to the choice's for the run-off.
    kept = {int(p.name.split("-")[1]) for p in (run / "candidates").iterdir()}
    contenders = {r.number for r in runoff_contenders(records, result.chosen, "latency")}
    assert kept == set(front) | contenders and 0 in front

    # The run-off (the fake's readings are exact: it keeps the choice), then the
    # confirmation: timing only, alternating, and its ratios are the fake's exact ratio.
    runoff = len(contenders) * 2 if len(contenders) > 1 else 0
    assert not any(score for _, score in evaluator.calls[6 : 6 + runoff])
    confirm_calls = evaluator.calls[6 + runoff :]
    assert [score for _, score in confirm_calls] == [False] * 4
    assert [d for d, _ in confirm_calls][::3] == ["baseline", "baseline"]
    ratio = round(10.0 / fastest["measurement"]["latency_ms_median"], 3)
    assert result.confirmed["ratios"]["latency"]["per_round"] == [ratio, ratio]
    assert metrics["confirmed"] == result.confirmed

    # The model card: the table's labels, the machine, the confirmed ratios.
    card = (best / "README.md").read_text()
    assert BY_NAME["latency"].label in card and "Confirmed ratios" in card
    assert f"{ratio:.2f}× ({ratio:.2f}–{ratio:.2f}) ✓" in card
    assert fingerprint(1).model in card

    # The reporter heard every trial, and the pass's own progress (not only known stages).
    assert reporter.of("study_started") == [(6, 0)]
    assert reporter.of("trial_finished") == [line["number"] for line in lines]
    assert "distilling: step 1/2, loss 0.5" in reporter.of("stage")
    assert not (run / PID_FILE).exists()

    console = Console(record=True, width=250)
    print_study(result, console)
    printed = console.export_text()
    assert f"{ratio:.2f}× better latency" in printed and "latency ms" in printed
    settings_read, records_read = read_run(run)
    assert settings_read == result.settings and records_read == records


class FailingConfirmation(FakeEvaluator):
    """Scores candidates, but every timing-only run (the confirmation) crashes."""

    def __call__(self, model_dir, workdir, *, score=True, **kwargs):
        if not score:
            raise CandidateFailed("the timing child crashed")
        return super().__call__(model_dir, workdir, score=score, **kwargs)


def test_a_confirmation_that_fails_keeps_best_and_says_why(tmp_path):
    reporter = RecordingReporter()
    result = study(
        tmp_path, settings(tmp_path, 3), evaluator=FailingConfirmation(), reporter=reporter
    )
    best = tmp_path / "run" / "best"
    assert result.confirmed is None and result.chosen is not None
    assert Recipe.load(best).describe() == result.chosen.description
    assert json.loads((best / "metrics.json").read_text())["confirmed"] is None
    assert any("could not be confirmed (the timing child crashed)" in n for n in result.notes)


def test_start_recipes_run_first_and_a_failing_candidate_fails_alone(tmp_path):
    broken = start(("prune.layers", {"count": 2, "criterion": "removal_change"}))
    crashing = int8("ffn")
    builder = FakeBuilder(tmp_path, fail=Recipe.from_dict(broken).describe())
    evaluator = FakeEvaluator(fail=Recipe.from_dict(crashing).describe())
    chosen = settings(tmp_path, 4, starts=(broken, crashing), confirm_rounds=0)
    result = study(tmp_path, chosen, builder, evaluator)
    lines = trials_file(tmp_path / "run")
    assert len(lines) == 4  # failed trials use the budget too
    assert [line["state"] for line in lines[:3]] == ["complete", "failed", "failed"]
    # Any exception fails the trial alone: its type and message are the reason, and (raised in
    # the study's own process) its traceback is in the trial's log folder.
    assert lines[1]["error"] == "AssertionError: the pass broke"
    traceback = (tmp_path / "run" / "logs" / "trial-001" / "study.log").read_text()
    assert "Traceback" in traceback and "the pass broke" in traceback
    assert lines[2]["error"] == "the candidate crashed"
    assert lines[1]["description"] == Recipe.from_dict(broken).describe()
    assert not (tmp_path / "run" / "candidates" / "trial-002").exists()
    assert result.chosen is not None and result.confirmed is None


def test_a_baseline_that_cannot_be_evaluated_stops_the_study(tmp_path):
    with pytest.raises(SlimformerError, match="baseline could not be evaluated"):
        study(tmp_path, settings(tmp_path, 3), evaluator=FakeEvaluator(fail="baseline"))


def test_a_model_that_fails_to_prepare_leaves_no_run_folder(tmp_path):
    class Broken(FakeBuilder):
        def prepare(self, pass_classes, state_path, say):
            raise SlimformerError("wrong model")

    with pytest.raises(SlimformerError, match="wrong model"):
        study(tmp_path, settings(tmp_path, 3), builder=Broken(tmp_path))
    assert not (tmp_path / "run").exists()


# --- the time budget -----------------------------------------------------------------------
def test_a_trial_that_would_overrun_the_time_budget_is_not_started_and_runs_first_on_resume(
    tmp_path,
):
    one, two = (
        start(("prune.layers", {"count": n, "criterion": "block_influence"})) for n in (1, 2)
    )
    # prune.layers reports 1000 s a run: once seen, no trial with it fits in a minute.
    builder = FakeBuilder(tmp_path, pass_seconds={"prune.layers": 1000.0})
    evaluator, reporter = FakeEvaluator(), RecordingReporter()
    chosen = settings(tmp_path, None, time_budget_s=60, starts=(one, two), confirm_rounds=0)
    began = time.time()
    study(tmp_path, chosen, builder, evaluator, reporter)

    lines = trials_file(tmp_path / "run")
    assert [line["description"] for line in lines] == ["baseline", Recipe.from_dict(one).describe()]
    assert lines[1]["timings"]["passes"] == {"prune.layers": 1000.0}
    [note] = [n for n in reporter.of("note") if "time budget" in n]
    assert re.search(
        rf"trial 2 \({re.escape(Recipe.from_dict(two).describe())}\) needs about 100\d s", note
    )
    assert "not started" in note and Recipe.from_dict(two).describe() not in builder.built
    # Every build and evaluation had the deadline; the passes' own comes before it, leaving
    # time to save and evaluate.
    for passes_deadline, kill_at in builder.deadlines[1:]:
        assert began + 60 - FINISH_S <= kill_at <= time.time() + 60 - FINISH_S
        assert kill_at - AFTER_PASSES_S - 1 < passes_deadline <= kill_at - AFTER_PASSES_S
    assert evaluator.kill_ats == [kill_at for _, kill_at in builder.deadlines[1:]]

    more_time = settings(tmp_path, 3, time_budget_s=5000, starts=(one, two), confirm_rounds=0)
    study(tmp_path, more_time, FakeBuilder(tmp_path), resume=True)
    lines = trials_file(tmp_path / "run")
    assert lines[2]["description"] == Recipe.from_dict(two).describe()


def test_a_study_out_of_time_before_a_trial_stops_saying_so(tmp_path):
    reporter = RecordingReporter()
    chosen = settings(tmp_path, None, time_budget_s=1e-3, confirm_rounds=0)
    result = study(tmp_path, chosen, reporter=reporter)
    assert reporter.of("note") == ["the time budget is spent"]
    assert not any(t.state == "complete" for t in result.trials)
    assert result.chosen is None and result.best_dir is None


# --- resume ---------------------------------------------------------------------------------
def test_an_interrupted_study_resumes_keeping_its_trials_and_rerunning_the_cut_one(tmp_path):
    reporter = RecordingReporter()
    with pytest.raises(KeyboardInterrupt):
        study(
            tmp_path,
            settings(tmp_path, 5),
            evaluator=FakeEvaluator(interrupt_at=3),
            reporter=reporter,
        )
    run = tmp_path / "run"
    before = trials_file(run)
    assert [line["number"] for line in before] == [0, 1]
    assert not (run / "best").exists() and not (run / PID_FILE).exists()
    lock = RunLock(run)  # released with the exception
    lock.acquire()
    lock.release()
    cut = reporter.of("trial_started")[2]

    with pytest.raises(SlimformerError, match="already holds a run"):
        study(tmp_path, settings(tmp_path, 5))
    evaluator = FakeEvaluator()
    result = study(tmp_path, settings(tmp_path, 5), evaluator=evaluator, resume=True)
    after = trials_file(run)
    assert after[:2] == before  # kept exactly, not redone
    assert len(after) == 5 and after[2]["description"] == cut  # the cut trial first
    assert evaluator.calls[0] == (cut, True)
    assert sum(scored for _, scored in evaluator.calls) == 3  # then the re-timings only
    assert result.best_dir is not None and (result.best_dir / "README.md").is_file()


def test_a_study_cut_off_in_its_baseline_resumes_baseline_first(tmp_path):
    # The start recipe is queued ahead of the baseline's rerun; it waits for the baseline.
    with pytest.raises(KeyboardInterrupt):
        study(tmp_path, settings(tmp_path, 3), evaluator=FakeEvaluator(interrupt_at=1))
    assert not (tmp_path / "run" / "trials.jsonl").exists()
    evaluator = FakeEvaluator()
    study(tmp_path, settings(tmp_path, 3, confirm_rounds=0), evaluator=evaluator, resume=True)
    described = [d for d, _ in evaluator.calls]
    assert described[:2] == ["baseline", Recipe.from_dict(FEASIBLE).describe()]
    lines = trials_file(tmp_path / "run")
    assert [line["description"] for line in lines] == described
    assert all(line["state"] == "complete" for line in lines)


def test_resume_needs_a_run_and_the_same_model(tmp_path):
    with pytest.raises(SlimformerError, match="nothing to resume"):
        study(tmp_path, settings(tmp_path, 2), resume=True)
    study(tmp_path, settings(tmp_path, 2, confirm_rounds=0))
    other = StudySettings(model=str(tmp_path / "elsewhere"), task=TaskSpec("embedding"))
    with pytest.raises(SlimformerError, match="resume it with the same model"):
        study(tmp_path, other, resume=True)


def test_trials_measured_on_another_machine_are_measured_again_here(tmp_path):
    other_cpu = fingerprint(1).to_dict() | {"model": "Another CPU"}
    study(tmp_path, settings(tmp_path, 1), evaluator=FakeEvaluator(cpu=other_cpu))
    run = tmp_path / "run"
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(run_json | {"cpu": other_cpu}))
    with pytest.raises(SlimformerError, match="measured on another machine"):
        study(tmp_path, settings(tmp_path, 3), resume=True)

    result = study(tmp_path, settings(tmp_path, 3), resume=True, allow_other_cpu=True)
    lines = {line["number"]: line for line in trials_file(run)}
    assert lines[0]["stale"] and lines[0]["cpu"]["model"] == "Another CPU"
    here = [line for line in lines.values() if not line["stale"]]
    assert here[0]["description"] == "baseline" and len(here) == 3  # measured again, first
    assert 0 not in result.pareto and result.chosen.number != 0


# --- repeats --------------------------------------------------------------------------------
def test_repeated_recipes_reuse_the_earlier_result_and_an_exhausted_space_ends_the_study(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(runner, "MAX_REPEATS", 4)
    # Two layers: prune.layers can only drop one, so the space holds three recipes.
    starts = tuple(
        start(("prune.layers", {"count": 1, "criterion": c}))
        for c in ("block_influence", "removal_change")
    )
    builder, evaluator, reporter = (
        FakeBuilder(tmp_path, num_layers=2),
        FakeEvaluator(),
        RecordingReporter(),
    )
    chosen = settings(tmp_path, 10, passes=("prune.layers",), starts=starts, confirm_rounds=0)
    study(tmp_path, chosen, builder, evaluator, reporter)
    lines = trials_file(tmp_path / "run")
    assert len(lines) == 3 and len({line["description"] for line in lines}) == 3
    assert len(evaluator.calls) == 3 and len(builder.built) == 1 + 3  # + the original
    assert "every recipe in the search space was measured" in reporter.of("message")
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    trials = optuna.load_study(study_name="slimformer", storage=storage).trials
    repeats = [t for t in trials if "duplicate_of" in t.user_attrs]
    assert len(repeats) == 4
    for repeat in repeats:
        earlier = trials[repeat.user_attrs["duplicate_of"]]
        assert repeat.values == earlier.values
        assert repeat.user_attrs["description"] == earlier.user_attrs["description"]


# --- what a person sees ---------------------------------------------------------------------
def test_the_progress_shows_a_passes_own_progress_beside_the_trial():
    console = Console(file=io.StringIO(), width=200)
    with RichReporter(console) as reporter:
        reporter.trial_started(3, "recover.distill(steps=300)")
        task = reporter.progress.tasks[-1]
        reporter.stage("applying passes")
        assert task.completed == 0
        reporter.stage("distilling: step 40/300, loss 0.1234")
        assert task.description.endswith("distilling: step 40/300, loss 0.1234")
        assert task.description.startswith("trial 3: recover.distill(steps=300)")
        reporter.stage("timing")
        assert task.completed == 3 and task.description.endswith("timing")


def test_the_trials_table_has_a_column_per_table_figure(tmp_path):
    result = study(tmp_path, settings(tmp_path, 3, confirm_rounds=0))
    console = Console(record=True, width=250)
    console.print(trials_table(result.trials, result.settings, result.pareto, "trials"))
    text = console.export_text()
    for column in ("latency ms", "p90 ms", "inputs/s", "memory MB", "size MB", "speed-up"):
        assert column in text
    assert "1.00×" in text and "★" in text


def test_the_trials_tables_gain_is_on_the_studys_objective_not_always_latency(tmp_path):
    # The fake's candidates differ in latency but all use 100 MB: a memory study gains nothing.
    result = study(tmp_path, settings(tmp_path, 4, confirm_rounds=0, objective="memory"))
    latencies = {r.measurement["latency_ms_median"] for r in result.trials if r.measurement}
    assert len(latencies) > 1
    console = Console(record=True, width=250)
    console.print(trials_table(result.trials, result.settings, result.pareto, "trials"))
    text = console.export_text()
    assert "memory gain" in text and "speed-up" not in text
    gains = re.findall(r"(\d+\.\d\d)×", text)
    assert gains and set(gains) == {"1.00"}


class DecoderEvaluator(FakeEvaluator):
    """A decoder's figures: decoding speed follows the fake latency, and int8 at the `ffn`
    scope stands for an engine that serves no KV cache (no decoding speed measured)."""

    def __call__(self, model_dir: Path, workdir: Path, **kwargs: Any):
        result = super().__call__(model_dir, workdir, **kwargs)
        no_cache = "scope=ffn" in Recipe.load(model_dir).describe()
        latency = result.measurement["latency_ms_median"]
        decoding = {
            "prefill_tokens_per_s": 20_000 / latency,
            "decode_tokens_per_s": None if no_cache else 100 / latency,
            "first_token_ms_median": latency,
        }
        result.measurement.update(decoding)
        return result


def test_a_decode_study_fails_a_candidate_that_cannot_decode_and_chooses_by_tokens_per_s(
    tmp_path,
):
    chosen = settings(
        tmp_path,
        4,
        starts=(int8("ffn"), FEASIBLE),
        objective="decode",
        task=TaskSpec("perplexity"),
        confirm_rounds=0,
    )
    result = study(tmp_path, chosen, evaluator=DecoderEvaluator())
    lines = trials_file(tmp_path / "run")
    no_cache = next(line for line in lines if "scope=ffn" in line["description"])
    assert no_cache["state"] == "failed" and "no KV cache" in no_cache["error"]
    assert result.chosen is not None and "all_but_ffn_out" in result.chosen.description


def test_a_within_budget_trial_off_the_front_whose_reading_came_low_enters_the_run_off(
    tmp_path,
):
    """A trial whose single reading came out low is dominated by the chosen one when it also
    scores a little lower; within the budget it competes on cost alone, so it is kept on disk
    and timed again, and wins when it is truly faster."""
    lucky = start(
        (
            "quantize.dynamic_int8",
            {"scope": "all_but_ffn_out", "per_channel": True, "keep_sensitive": 0},
        )
    )  # truly 1.2x slower, read 0.7x once, and a little better quality
    unlucky = FEASIBLE  # truly faster, read 1.1x once: dominated, off the front
    described = {name: Recipe.from_dict(r).describe() for name, r in (("l", lucky), ("u", unlucky))}
    evaluator = FakeEvaluator(
        slowdown={described["l"]: 1.2},
        in_study={described["l"]: 0.7, described["u"]: 1.1},
    )
    result = study(tmp_path, settings(tmp_path, 3, starts=(lucky, unlucky)), None, evaluator)
    front = [r.description for r in result.trials if r.number in result.pareto]
    assert described["u"] not in front
    assert result.chosen.description == described["u"]
    assert any("run-off" in note for note in result.notes)


def test_the_decode_objective_is_refused_for_an_encoder_task(tmp_path):
    with pytest.raises(SlimformerError, match="--objective decode is a decoder's figure"):
        settings(tmp_path, objective="decode")


def test_close_trials_are_timed_again_before_the_choice_and_the_fastest_then_wins(tmp_path):
    noisy = int8("all_but_ffn_out")  # truly 6.6 ms, but the study read 4.6 ms once
    steady = start(
        (
            "quantize.dynamic_int8",
            {"scope": "all_but_ffn_out", "per_channel": True, "keep_sensitive": 0},
        )
    )  # 5.5 ms, and a little better quality: on the front too
    described = {name: Recipe.from_dict(r).describe() for name, r in (("n", noisy), ("s", steady))}
    evaluator = FakeEvaluator(slowdown={described["n"]: 1.2}, in_study={described["n"]: 0.7})
    chosen = settings(tmp_path, 3, starts=(noisy, steady), confirm_rounds=2)
    result = study(tmp_path, chosen, FakeBuilder(tmp_path), evaluator)
    assert result.chosen.description == described["s"]
    assert any(n.startswith("run-off (latency_ms_median, median of 2)") for n in result.notes)
    timed_again = [d for d, scored in evaluator.calls if not scored]
    assert timed_again[:4] == [described["n"], described["s"], described["s"], described["n"]]
    # Without re-timing (no confirmation rounds) the single readings decide.
    (tmp_path / "off").mkdir()
    off = settings(tmp_path / "off", 3, starts=(noisy, steady), confirm_rounds=0)
    evaluator = FakeEvaluator(slowdown={described["n"]: 1.2}, in_study={described["n"]: 0.7})
    assert (
        study(tmp_path / "off", off, FakeBuilder(tmp_path / "off"), evaluator).chosen.description
        == described["n"]
    )
