"""report.html: rendered from a real run folder, which a study on fake models (tests/fakes.py)
writes in seconds, then opened in headless Chromium.

The model's folder name and the task's text column are hostile on purpose (HTML and script
tags, quotes): every page of these tests must show them as text, never run them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fakes import PASSES, FakeBuilder, FakeEvaluator
from inprocess import assert_one_error_line, run_cli
from plotly.offline import get_plotlyjs
from test_search_runner import FEASIBLE, RecordingReporter, int8, start

from slimformer import report_html
from slimformer.card import write_card
from slimformer.measure import MeasureSettings
from slimformer.recipe import Recipe
from slimformer.report_html import REPORT_FILE, pareto_figure, read_view, render, write_report
from slimformer.search import runner
from slimformer.search.records import TrialRecord
from slimformer.search.settings import StudySettings
from slimformer.tasks import TaskSpec

HOSTILE_MODEL = "<script>document.title=\"pwned\"<!--'q'&amp"  # no '/': a folder name
HOSTILE_COLUMN = '</pre><script>document.title="pwned"</script>"'
HOSTILE_RECIPE = '</script><script>document.title="pwned"</script><b>"x" & \'y\''
HOSTILE_ERROR = "<img src=x onerror=\"document.title='pwned'\"> & 'quotes'"
BROKEN = start(("prune.layers", {"count": 2, "criterion": "removal_change"}))
TRIALS = 7


class PageWatcher(RecordingReporter):
    """After each trial: the trials report.html showed at that moment."""

    def __init__(self, run: Path) -> None:
        super().__init__()
        self.run = run
        self.pages: list[tuple[int, list[int]]] = []

    def trial_finished(self, record: TrialRecord) -> None:
        super().trial_finished(record)
        page = (self.run / REPORT_FILE).read_text()
        self.pages.append((record.number, rows(page)))


def rows(page: str) -> list[int]:
    """The trial numbers of the trials table's rows, in order."""
    return [int(n) for n in re.findall(r'<tr data-trial="(\d+)"', page)]


@pytest.fixture(scope="module")
def study_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PageWatcher]:
    """A finished study of TRIALS trials (one of them a failed build) on a model whose folder
    name is hostile, its report written by the study as a real one is."""
    root = tmp_path_factory.mktemp("report") / HOSTILE_MODEL
    run = root / "run"
    watcher = PageWatcher(run)
    settings = StudySettings(
        model=str(root / "original"),
        task=TaskSpec("embedding", text_column=HOSTILE_COLUMN),
        max_drop=0.01,
        trials=TRIALS,
        passes=PASSES,
        measure=MeasureSettings(threads=1, batch_size=8),
        confirm_rounds=2,
        starts=(FEASIBLE, BROKEN, int8("all")),
    )
    runner.run_study(
        settings,
        run,
        reporter=watcher,
        builder=FakeBuilder(root, fail=Recipe.from_dict(BROKEN).describe()),
        evaluator=FakeEvaluator(),
        write_card=write_card,
        write_report=write_report,
    )
    return run, watcher


def trials_of(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]


def hostile_copy(run: Path, target: Path) -> Path:
    """The run folder with a recipe description and an error as a user's file could hold."""
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("candidates", "logs"))
    lines = trials_of(target)
    failed = next(line for line in lines if line["state"] == "failed")
    failed.update(description=HOSTILE_RECIPE, error=HOSTILE_ERROR)
    complete = next(line for line in lines if line["state"] == "complete" and line["number"])
    complete["description"] = HOSTILE_RECIPE
    (target / "trials.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_report(target)
    return target / REPORT_FILE


# --- what the page holds -----------------------------------------------------------------------
def test_the_page_is_rewritten_after_every_trial_with_every_trial_so_far(study_run):
    run, watcher = study_run
    numbers = [line["number"] for line in trials_of(run)]
    assert len(watcher.pages) == TRIALS
    for index, (finished, shown) in enumerate(watcher.pages):
        # The trial just finished is on the page, beside every one before it.
        assert shown == numbers[: index + 1] and finished == numbers[index]
    final = (run / REPORT_FILE).read_text()
    assert rows(final) == numbers
    # Written again at the end: the choice and its confirmation are on it.
    best = json.loads((run / "best" / "metrics.json").read_text())
    assert f"trial {best['trial']}" in final and 'id="confirmed-plot"' in final
    assert not list(run.glob(f".{REPORT_FILE}.tmp-*"))  # replaced whole, nothing left beside


def test_the_page_is_self_contained_and_shows_the_front_budget_failures_and_machine(study_run):
    run, _ = study_run
    page = (run / REPORT_FILE).read_text()
    plotlyjs = get_plotlyjs()
    assert plotlyjs in page  # inlined whole, once
    ours = page.replace(plotlyjs, "")
    assert "Plotly.newPlot" in ours and not re.search(r"<(script|link|img)[^>]* (src|href)=", ours)
    assert "http" not in ours  # nothing to fetch
    lines = trials_of(run)
    failed = next(line for line in lines if line["state"] == "failed")
    assert "AssertionError: the pass broke" in page  # the failed trial, listed with its reason
    assert re.search(rf"<li>trial {failed['number']} · failed", page)
    assert "budget: max drop" in page and "(this study's machine)" in page
    cpu = lines[0]["cpu"]
    assert cpu["model"] in page and all(v in page for v in cpu["versions"].values())
    for package in ("optuna", "plotly", "slimformer"):
        assert f"{package} " in page


def test_the_plot_has_one_point_per_measured_trial_by_kind_with_the_recipe_on_hover(study_run):
    run, _ = study_run
    view = read_view(run)
    figure = pareto_figure(view, view.records, view.best["trial"])
    markers = [t for t in figure.data if t.mode == "markers"]
    plotted = {n for t in markers for n in t.customdata}
    measured = {r.number for r in view.records if r.drop is not None}
    assert plotted == measured and sum(len(t.x) for t in markers) == len(measured)
    kinds = {t.name.split(" (")[0]: list(t.customdata) for t in markers}
    for record in view.records:
        if record.number in measured:
            kind = "feasible" if record.feasible else "over budget"
            assert record.number in kinds["baseline" if record.is_baseline else kind]
    hover = {n: text for t in markers for n, text in zip(t.customdata, t.hovertext, strict=True)}
    for record in view.records:
        if record.number in measured:
            assert record.description[:40] in hover[record.number].replace("<br>", "")
    budget = [s for s in figure.layout.shapes if s.y0 == s.y1]
    assert budget and budget[0].y0 == pytest.approx(view.settings.max_drop * 100)


def test_pruned_trials_are_plotted_when_measured_and_listed_when_not(study_run):
    run, _ = study_run
    view = read_view(run)
    baseline = view.records[0]
    pruned = TrialRecord(
        number=90,
        state="pruned",
        description="prune.layers(count=3)",
        quality=0.5,
        drop=0.4,
        measurement=baseline.measurement,
        error="quality estimate 50% ± 3 pt: clearly over budget",
    )
    unmeasured = replace(pruned, number=91, measurement={}, description="prune.ffn(keep=0.1)")
    view = replace(view, records=[*view.records, pruned, unmeasured])
    traces = {t.name: t for t in pareto_figure(view, view.records, None).data}
    assert list(traces["pruned (1)"].customdata) == [90]
    page = render(view)
    assert re.search(r"<li>trial 91 · pruned · <code>prune.ffn\(keep=0.1\)</code>", page)
    assert "<li>trial 90" not in page and rows(page)[-2:] == [90, 91]


def test_every_string_from_the_user_or_the_data_is_shown_as_text(study_run, tmp_path):
    run, _ = study_run
    page = hostile_copy(run, tmp_path / "hostile").read_text()
    for hostile in (HOSTILE_MODEL, HOSTILE_COLUMN, HOSTILE_RECIPE, HOSTILE_ERROR):
        assert hostile not in page
    assert 'document.title="pwned"' not in page and "document.title='pwned'" not in page
    assert "<img src=x" not in page and "<b>&quot;x" not in page
    # Every <script> the page has is its own: none opened or closed by the data.
    plots = page.count('class="plotly-graph-div"')
    assert plots == 3  # the front, the confirmation, the importance
    assert page.count("<script") == page.count("</script>") == plots + 2  # + plotly.js, sorting
    assert "&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;" in page  # shown
    assert "&lt;img src=x onerror=" in page
    # In the plot's hover text too (plotly reads it as markup): escaped, then JSON-encoded.
    assert '&lt;\\u002fscript&gt;&lt;script&gt;document.title=\\"pwned\\"' in page
    assert "\\u003c\\u002fscript\\u003e\\u003cscript\\u003e" not in page


# --- importance --------------------------------------------------------------------------------
def test_optuna_importance_is_summed_by_pass(study_run):
    run, _ = study_run
    found = read_view(run).importance
    assert found.note is None, found.note
    assert found.trials >= report_html.MIN_IMPORTANCE_TRIALS
    assert found.targets == ("front", "quality", "latency")
    known = {*PASSES, "quantizer (which one)", "runtime (which one)"}
    assert found.by_pass and set(found.by_pass) <= known
    for target in found.targets:  # each target's importances sum to 1 over the parameters
        assert sum(v[target] for v in found.by_param.values()) == pytest.approx(1.0)
        assert sum(v[target] for v in found.by_pass.values()) == pytest.approx(1.0)
    page = (run / REPORT_FILE).read_text()
    assert 'id="importance-plot"' in page and "Too few" not in page


def test_the_page_says_why_there_is_no_importance(study_run, tmp_path, monkeypatch):
    run, _ = study_run
    monkeypatch.setattr(report_html, "MIN_IMPORTANCE_TRIALS", 100)
    note = read_view(run).importance.note
    assert note and note.startswith("Too few finished trials") and "100 needed" in note
    monkeypatch.undo()
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("candidates", "logs", "study.db"))
    write_report(copy)
    page = (copy / REPORT_FILE).read_text()
    assert "the run folder has no study.db" in page
    assert not (copy / "study.db").exists()  # reading the report creates no study


# --- the command -------------------------------------------------------------------------------
def test_slimformer_report_writes_the_page_and_prints_its_path(study_run, tmp_path):
    run, _ = study_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("candidates", "logs"))
    (copy / REPORT_FILE).unlink()
    result = run_cli(["report", str(copy)])
    assert result.code == 0, result.stderr
    assert result.stdout.strip() == str(copy / REPORT_FILE)
    assert rows((copy / REPORT_FILE).read_text()) == [t["number"] for t in trials_of(run)]
    assert_one_error_line(run_cli(["report", str(tmp_path)]), "not a slimformer run folder")


# --- in a real browser -------------------------------------------------------------------------
def chromium() -> str:
    """Headless Chromium (Debian's `chromium`; `make browser` installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("no chromium and no apt-get to install it: the browser test needs Chromium")
    pytest.fail("chromium is not installed: run `make browser` (apt-get install -y chromium)")


def open_page(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium opens the page from disk, runs its scripts, and does what `args` say."""
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=15000",
            *args,
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )


def console_lines(stderr: str) -> list[str]:
    """What the page wrote to the console, and uncaught errors (Chromium logs both so)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


SORT_PROBE = """<script>
window.addEventListener("load", function () {
  function order() {
    return Array.prototype.map.call(
      document.querySelectorAll("#trials-table tbody tr"), function (r) { return r.dataset.trial; }
    ).join(",");
  }
  var th = document.querySelector('#trials-table th[data-key="drop"]');
  th.click();
  document.body.setAttribute("data-ascending", order());
  th.click();
  document.body.setAttribute("data-descending", order());
});
</script>
</body>"""


def test_the_page_renders_in_chromium_with_every_point_every_row_and_no_console_error(
    study_run, tmp_path
):
    run, _ = study_run
    page = hostile_copy(run, tmp_path / "hostile")
    lines = trials_of(page.parent)
    measured = [line for line in lines if line["drop"] is not None]

    opened = open_page(page, tmp_path / "profile", "--dump-dom")
    assert opened.returncode == 0, opened.stderr[-2000:]
    dom = opened.stdout
    assert console_lines(opened.stderr) == []
    # Plotly drew the front: its SVG holds one marker per measured trial in the scatter traces.
    start_, end = dom.index('id="pareto-plot-0"'), dom.index('id="chosen"')
    svg = dom[start_:end]
    assert "main-svg" in svg and 'class="scatterlayer' in svg
    assert len(re.findall(r'<path class="point[ "]', svg)) == len(measured)
    assert "budget: max drop" in svg  # the budget line's label, drawn
    # The table has every trial; the hostile strings are text, no script of theirs ran.
    assert rows(dom) == [line["number"] for line in lines]
    title = re.search(r"<title>(.*?)</title>", dom, re.S)
    assert title and title.group(1).startswith("slimformer study · ")  # no script renamed it
    assert '<img src="x"' not in dom and "&lt;img src=x onerror=" in dom
    # The confirmation and the importance plots rendered too.
    for plot in ("confirmed-plot", "importance-plot"):
        assert re.search(rf'id="{plot}"[^>]*class="[^"]*js-plotly-plot', dom), plot

    shot = tmp_path / "report.png"
    taken = open_page(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    artifacts = os.environ.get("SLIMFORMER_TEST_ARTIFACTS")  # CI keeps what lands there
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "report.png")
    print(f"screenshot: {shot}")


def test_the_trials_table_sorts_on_a_header_click_in_chromium(study_run, tmp_path):
    run, _ = study_run
    probe = tmp_path / "probe.html"
    head, _, tail = (run / REPORT_FILE).read_text().rpartition("</body>")
    probe.write_text(head + SORT_PROBE + tail)
    opened = open_page(probe, tmp_path / "profile", "--dump-dom")
    assert opened.returncode == 0 and console_lines(opened.stderr) == []
    found = {
        name: [int(n) for n in value.split(",")]
        for name, value in re.findall(r'data-(ascending|descending)="([\d,]+)"', opened.stdout)
    }
    lines = trials_of(run)
    measured = [line for line in lines if line["drop"] is not None]
    blank = [line["number"] for line in lines if line["drop"] is None]  # failed: last both ways
    # Stable sorts from the table's order (by number): ties stay in that order.
    ascending = sorted(measured, key=lambda line: (line["drop"], line["number"]))
    descending = sorted(measured, key=lambda line: (-line["drop"], line["number"]))
    assert blank and found["ascending"] == [line["number"] for line in ascending] + blank
    assert found["descending"] == [line["number"] for line in descending] + blank
