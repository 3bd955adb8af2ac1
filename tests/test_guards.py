"""Guards beside --max-drop: their syntax, the task's defaults, and what they do to a study.

The studies run on the fake models of test_search_runner (a whole study in seconds), with an
evaluator whose transfer-domain figure depends on the recipe, so a guard on it must change
which trials are feasible and which one is chosen.
"""

from __future__ import annotations

import html
import json
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
from rich.console import Console
from test_search_runner import FakeEvaluator, int8, settings, study, trials_file

from slimformer.cpu import fingerprint
from slimformer.errors import SlimformerError
from slimformer.recipe import Recipe
from slimformer.report import print_study, trial_line, trials_table
from slimformer.report_html import write_report
from slimformer.search import guards, optuna_study
from slimformer.search.settings import StudySettings
from slimformer.tasks import TaskSpec
from slimformer.tasks.base import DROP_SE

TRANSFER_GUARD = "drop(transfer_probe_accuracy)<=0.01"
# int8 scope -> how much the transfer domain loses: the fastest scope within the budget on the
# scored domain is the one that does not transfer.
TRANSFER_LOSS = {"all": 0.02, "all_but_ffn_out": 0.03, "attention": 0.002, "ffn": 0.004}


class TransferEvaluator(FakeEvaluator):
    def __call__(self, model_dir: Path, workdir: Path, *, score: bool = True, **kwargs):
        result = super().__call__(model_dir, workdir, score=score, **kwargs)
        if not score:
            return result
        transfer = 0.80
        steps = Recipe.load(model_dir).steps
        for step in steps:
            transfer -= TRANSFER_LOSS.get(step.config.get("scope"), 0.0)
        details = {"cosine_fidelity": 1.0, "transfer_probe_accuracy": transfer}
        return replace(result, details=details | {DROP_SE: 0.0065 if steps else 0.0})


# --- syntax ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("cosine_fidelity>=0.95", guards.Guard("cosine_fidelity", ">=", 0.95), None),
        (" recall@10 >= 90% ", guards.Guard("recall@10", ">=", 0.9), "recall@10>=0.9"),
        ("pairwise_spearman<=0.5", guards.Guard("pairwise_spearman", "<=", 0.5), None),
        (
            "drop( transfer_probe_accuracy )<=1%",
            guards.Guard("transfer_probe_accuracy", "<=", 0.01, of_drop=True),
            TRANSFER_GUARD,
        ),
    ],
)
def test_a_guard_parses_to_a_figure_a_comparison_and_a_threshold(text, expected, canonical):
    guard = guards.parse_guard(text)
    assert guard == expected
    assert str(guard) == (canonical or text)
    assert guards.parse_guard(str(guard)) == guard


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fidelity", "must look like"),
        ("fidelity=0.9", "must look like"),
        ("fidelity>=high", "'high' is not a number"),
        ("fidelity>=nan", "is not a number"),
        ("drop(fidelity)>=0.1", "limited from above"),
    ],
)
def test_a_malformed_guard_is_refused(text, message):
    with pytest.raises(SlimformerError, match=message):
        guards.parse_guard(text)


def test_a_guard_of_the_user_replaces_the_default_on_the_same_figure():
    defaults = ("recall@10>=0.8", TRANSFER_GUARD)
    assert guards.resolve_guards(["drop(transfer_probe_accuracy)<=2%"], defaults) == (
        "drop(transfer_probe_accuracy)<=0.02",
        "recall@10>=0.8",
    )
    assert guards.resolve_guards(["transfer_probe_accuracy>=0.7"], defaults) == (
        "transfer_probe_accuracy>=0.7",
        *defaults,
    )
    assert guards.resolve_guards([], ()) == ()


def test_a_guard_naming_a_figure_the_task_does_not_report_is_refused(tmp_path):
    with pytest.raises(SlimformerError, match="reports no figure 'fidelity'; it reports: probe"):
        settings(tmp_path, guards=("fidelity>=0.95",))
    with pytest.raises(SlimformerError, match="reports no figure 'transfer_probe_accuracy'"):
        StudySettings(
            model="m",
            task=TaskSpec("embedding", data="corpus.txt"),
            guards=("transfer_probe_accuracy>=0.7",),
        )
    chosen = settings(tmp_path, guards=(TRANSFER_GUARD,))
    assert StudySettings.from_dict(json.loads(json.dumps(chosen.to_dict()))) == chosen


# --- constraints ---------------------------------------------------------------------------------
def test_constraints_hold_the_budget_and_each_guard_with_met_at_or_below_zero():
    figures = {"probe_accuracy": 0.77, "recall@10": 0.85, "transfer_probe_accuracy": 0.78}
    drops = guards.figure_drops(
        "probe_accuracy", 0.005, figures, {"recall@10": 1.0, "transfer_probe_accuracy": 0.80}
    )
    values = guards.constraints(
        0.01, ("recall@10>=0.8", TRANSFER_GUARD), figures, drops, "probe_accuracy"
    )
    assert values == pytest.approx(
        {"max_drop": -0.005, "guard recall@10>=0.8": -0.05, f"guard {TRANSFER_GUARD}": 0.01}
    )


def test_a_repeated_recipe_takes_over_the_earlier_trials_constraints():
    study_ = optuna.create_study(directions=["maximize", "minimize"])
    earlier = study_.ask()
    for key, value in {"drop": 0.0, "details": {}, "quality": 0.9}.items():
        earlier.set_user_attr(key, value)
    for key in ("measurement", "cpu"):
        earlier.set_user_attr(key, {})
    guards.record(earlier, {"max_drop": -0.01, f"guard {TRANSFER_GUARD}": 0.02})
    frozen = study_.tell(earlier, (0.9, 5.0))
    repeat = study_.ask()
    optuna_study.reuse(repeat, frozen, 0.01)
    again = study_.tell(repeat, (0.9, 5.0))
    assert again.constraints == frozen.constraints
    assert again.user_attrs["feasible"] is False
    assert again.user_attrs["guards"] == {TRANSFER_GUARD: False}


# --- a study ------------------------------------------------------------------------------------
def run(root: Path, *guard_texts: str):
    starts = (int8("all_but_ffn_out"), int8("attention"))
    chosen = settings(root, 3, starts=starts, guards=guard_texts, confirm_rounds=0)
    return study(root, chosen, evaluator=TransferEvaluator(fingerprint(1).to_dict()))


def test_a_trial_breaking_a_guard_is_infeasible_and_never_chosen(tmp_path):
    unguarded = run(tmp_path / "unguarded")
    guarded = run(tmp_path / "guarded", TRANSFER_GUARD)
    fast = Recipe.from_dict(int8("all_but_ffn_out")).describe()
    assert unguarded.chosen.description == fast  # within --max-drop, and the fastest

    lines = trials_file(tmp_path / "guarded" / "run")
    baseline = lines[0]["details"]["transfer_probe_accuracy"]
    for line in lines:
        transfer_drop = baseline - line["details"]["transfer_probe_accuracy"]
        kept = transfer_drop <= 0.01 + 1e-12
        assert line["guards"] == {TRANSFER_GUARD: kept}
        assert line["feasible"] == (kept and line["drop"] <= 0.01 + 1e-12)
    assert guarded.chosen.description != fast and guarded.met_budget
    assert guarded.chosen.guards == {TRANSFER_GUARD: True}

    storage = f"sqlite:///{tmp_path / 'guarded' / 'run' / 'study.db'}"
    trials = optuna.load_study(study_name="slimformer", storage=storage).trials
    breaking = next(t for t in trials if t.user_attrs["description"] == fast)
    assert set(breaking.constraints) == {"max_drop", f"guard {TRANSFER_GUARD}"}
    assert breaking.constraints[f"guard {TRANSFER_GUARD}"] == pytest.approx(0.02)
    metrics = json.loads((tmp_path / "guarded" / "run" / "best" / "metrics.json").read_text())
    assert metrics["guards"] == {TRANSFER_GUARD: True}
    pareto = json.loads((tmp_path / "guarded" / "run" / "pareto.json").read_text())
    assert pareto["guards"] == [TRANSFER_GUARD]


def test_the_front_table_the_summary_and_the_card_show_each_guard(tmp_path):
    result = run(tmp_path, TRANSFER_GUARD)
    console = Console(record=True, width=250)
    console.print(trials_table(result.trials, result.settings, result.pareto, "trials"))
    print_study(result, console)
    text = console.export_text()
    assert "guards" in text and f"✗ {TRANSFER_GUARD}" in text
    assert f"guards: {TRANSFER_GUARD} ✓" in text
    card = (result.best_dir / "README.md").read_text()
    assert "meets the quality budget and its guards" in card
    assert "| drop(transfer_probe_accuracy) ≤ 0.01 | 0.0000 | 0.0020 | yes |" in card
    assert "Quality (`probe_accuracy`) is the accuracy of a logistic-regression" in card


def test_a_drop_reads_with_its_standard_error_in_the_lines_the_tables_and_the_card(tmp_path):
    result = run(tmp_path)
    chosen = result.chosen
    console = Console(record=True, width=250)
    console.print(trials_table(result.trials, result.settings, result.pareto, "trials"))
    print_study(result, console)
    console.print(trial_line(chosen, "throughput", bounded=True))
    shown = f"{chosen.drop * 100:+.2f} ± 0.65 pt"
    text = console.export_text()
    assert text.count(shown) >= 3  # its row, the summary's chosen line, its trial line
    card = (result.best_dir / "README.md").read_text()
    assert f"This model's drop: {shown} (± one standard error" in card
    page = html.unescape(write_report(result.out).read_text())
    assert shown in page


def test_without_guards_the_tables_and_the_card_have_no_guard_column(tmp_path):
    result = run(tmp_path)
    console = Console(record=True, width=250)
    console.print(trials_table(result.trials, result.settings, result.pareto, "trials"))
    assert "guards" not in console.export_text()
    assert "Guards:" not in (result.best_dir / "README.md").read_text()
