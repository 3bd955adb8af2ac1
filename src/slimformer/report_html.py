"""report.html: one self-contained page per run folder, the study a person looks at.

It holds the Pareto front of quality drop against the study's objective (with the budget and
every trial told apart: feasible, over budget, pruned, failed), the chosen model against the
baseline with the confirmation rounds' spread, a sortable table of every trial, how much each
pass decides what reaches the front (Optuna's importance), and the machines the figures were
measured on. Plotly draws the plots; its JavaScript is inlined, so the page opens from disk
with no network.

Everything comes from the run folder (run.json, trials.jsonl, pareto.json, best/metrics.json)
and, for the importance, the study's Optuna storage. Every string that comes from the user or
the data (a recipe, a model path, a column or task name, an error) is escaped: Jinja2's
autoescaping for the page, `html.escape` for the text plotly draws (plotly reads its text as
HTML-like markup), and plotly's and Jinja2's JSON encoders escape `<` inside <script>.
"""

from __future__ import annotations

import functools
import html
import json
import math
import platform
import textwrap
import time
import warnings
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
import optuna
import plotly.graph_objects as go
import plotly.io as pio
from markupsafe import Markup
from optuna.trial import FrozenTrial, TrialState
from plotly.offline import get_plotlyjs

from slimformer.cpu import CpuFingerprint
from slimformer.errors import SlimformerError
from slimformer.figures import (
    BY_NAME,
    CONFIRMED_FIGURES,
    FIGURES,
    Figure,
    figures_of_merit,
    improvement,
)
from slimformer.files import read_json, write_atomic
from slimformer.report import drop_text, failed_guards, format_drop, format_quality
from slimformer.search.confirm import unsteady
from slimformer.search.optuna_study import STUDY_NAME, measured_here
from slimformer.search.records import TrialRecord
from slimformer.search.run_folder import RunFolder, read_best, read_facts, read_run, read_storage
from slimformer.search.selection import pareto_front
from slimformer.search.settings import StudySettings
from slimformer.search.storage import open_storage
from slimformer.tasks import make_task
from slimformer.tasks.base import DROP_SE

REPORT_FILE = "report.html"
# Below this many finished trials measured here, Optuna's importance says nothing yet.
MIN_IMPORTANCE_TRIALS = 5
# Plot categories, in legend order: (name, marker symbol, colour).
CATEGORIES = (
    ("baseline", "square", "#1f77b4"),
    ("feasible", "circle", "#2ca02c"),
    ("over budget", "x", "#ff7f0e"),
    ("pruned", "diamond-open", "#7f7f7f"),
    ("failed", "x-thin-open", "#d62728"),
)
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


# --- what the page shows ---------------------------------------------------------------------
@dataclass(frozen=True)
class Importance:
    """Optuna's parameter importances, summed by pass, for each target ('front': reaching
    the Pareto front; 'quality'; the objective). `note` says why there are none."""

    targets: tuple[str, ...] = ()
    by_pass: dict[str, dict[str, float]] = field(default_factory=dict)  # pass -> target -> value
    by_param: dict[str, dict[str, float]] = field(default_factory=dict)
    trials: int = 0
    note: str | None = None


@dataclass(frozen=True)
class RunView:
    run: Path
    settings: StudySettings
    records: list[TrialRecord]
    metric: str
    direction: str
    bounded: bool
    score_text: str
    cpu: dict[str, Any] | None  # the machine the study measures on now
    best: dict[str, Any] | None  # best/metrics.json
    importance: Importance


def category(record: TrialRecord) -> str:
    """How the plot and the table tell a trial apart."""
    if record.state == "complete":
        if record.is_baseline:
            return "baseline"
        return "feasible" if record.feasible else "over budget"
    return record.state  # failed, pruned, interrupted, running


def stopped_early(record: TrialRecord) -> list[str]:
    """Why a pruned trial stopped before its evaluation ended (search/early_stop.py,
    tasks/staging.py)."""
    if record.state != "pruned" or not record.early_stop:
        return []
    return [f"stopped early: {record.early_stop.get('reason', '')}"]


def problems(record: TrialRecord, max_drop: float) -> list[str]:
    """Why a finished trial is not feasible: over the drop budget, failed guards."""
    found = []
    if record.drop is not None and record.drop > max_drop + 1e-12:
        found.append("over the quality budget")
    found += [f"guard {guard} failed" for guard in failed_guards(record)]
    return found


# --- reading the run folder ------------------------------------------------------------------
def read_view(run: Path, study: optuna.Study | None = None) -> RunView:
    """Everything the page shows, from the run folder; `study`: the live Optuna study (else
    it is opened from the run's storage, for the importance only)."""
    run = Path(run)
    settings, records = read_run(run)
    cpu, _ = read_facts(RunFolder(run).run_file)
    best = None
    if read_best(run) is not None:  # checks best/metrics.json
        best = read_json(RunFolder(run).best_dir / "metrics.json")
    task = make_task(settings.task)
    if study is None:
        study = _stored_study(RunFolder(run))
    return RunView(
        run=run,
        settings=settings,
        records=records,
        metric=task.metric,
        direction=task.direction,
        bounded=task.bounded,
        score_text=task.describe_score(),
        cpu=None if cpu is None else cpu.to_dict(),
        best=best,
        importance=importance(study, settings, cpu, task.direction),
    )


def _stored_study(folder: RunFolder) -> optuna.Study | str:
    """The run's Optuna study as stored, or why it cannot be read (never creates one)."""
    url = read_storage(folder.run_file) or folder.storage_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        return "the run folder has no study.db"
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name=STUDY_NAME, storage=open_storage(url))
    except Exception as error:  # a damaged or foreign storage: the rest of the page stands
        return f"its study could not be read ({type(error).__name__}: {error})"


def importance(
    study: optuna.Study | str | None,
    settings: StudySettings,
    cpu: CpuFingerprint | None,
    direction: str,
) -> Importance:
    """Optuna's parameter importances (its default evaluator, PED-ANOVA, which also weighs
    conditional parameters) over the first measurements made on this machine, summed by
    pass. A multi-objective study's default target is reaching the Pareto front."""
    if not isinstance(study, optuna.Study):
        return Importance(note=f"Optuna's importance is not shown: {study or 'no study'}.")
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "duplicate_of" not in t.user_attrs
        and (cpu is None or measured_here(t, cpu))
        and t.values is not None
        and len(t.values) == 2
        and all(math.isfinite(v) for v in t.values)
    ]
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        return Importance(
            trials=len(trials),
            note=(
                f"Too few finished trials for Optuna to rank the passes: {len(trials)} so far, "
                f"at least {MIN_IMPORTANCE_TRIALS} needed."
            ),
        )
    copy = _study_of(trials, study.directions)
    cost_sign = -1.0 if settings.cost_direction == "maximize" else 1.0
    quality_sign = -1.0 if direction == "maximize" else 1.0
    # PED-ANOVA ranks what leads to low target values: maximized figures are negated.
    targets: dict[str, Any] = {
        "front": None,
        "quality": lambda t: quality_sign * t.values[0],
        settings.objective: lambda t: cost_sign * t.values[1],
    }
    by_param: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for name, target in targets.items():
                found = optuna.importance.get_param_importances(copy, target=target)
                for param, value in found.items():
                    by_param.setdefault(param, {})[name] = float(value)
        except Exception as error:  # Optuna's own refusal (e.g. too few distinct trials)
            return Importance(
                trials=len(trials),
                note=f"Optuna could not compute the importance: {type(error).__name__}: {error}",
            )
    equal = [str(w.message) for w in caught if "will be equal" in str(w.message)]
    if equal or not by_param:
        return Importance(
            trials=len(trials),
            note="Optuna could not tell the passes apart yet: "
            + (equal[0] if equal else "no parameter varied among the finished trials."),
        )
    by_pass: dict[str, dict[str, float]] = {}
    for param, values in by_param.items():
        owner = by_pass.setdefault(pass_of(param), {})
        for name, value in values.items():
            owner[name] = owner.get(name, 0.0) + value
    ordered = dict(sorted(by_pass.items(), key=lambda item: -item[1].get("front", 0.0)))
    return Importance(tuple(targets), ordered, by_param, len(trials))


def _study_of(trials: list[FrozenTrial], directions: list) -> optuna.Study:
    """An in-memory study holding only `trials` (Optuna's importance reads a whole study)."""
    copy = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler())
    copy.add_trials(trials)
    return copy


def pass_of(param: str) -> str:
    """The pass a search parameter belongs to: 'use prune.ffn' and 'prune.ffn.keep' to
    'prune.ffn'; a group's choice ('runtime', 'quantizer') stands for itself."""
    if param.startswith("use "):
        return param[4:]
    if "." not in param:
        return f"{param} (which one)"
    return param.rsplit(".", 1)[0]


# --- plots -----------------------------------------------------------------------------------
def _hover(record: TrialRecord, view: RunView, figure: Figure) -> str:
    """A point's hover text: plotly reads it as markup, so the recipe is escaped."""
    lines = [f"<b>trial {record.number}</b> · {category(record)}"]
    lines += [html.escape(line, quote=False) for line in textwrap.wrap(record.description, 70)]
    if record.quality is not None:
        lines.append(
            f"{html.escape(view.metric, quote=False)} "
            f"{format_quality(record.quality, view.bounded)} "
            f"(drop {drop_text(record, view.bounded)})"
        )
    lines.append(f"{figure.name} {figure.show(record.measurement)} {figure.unit}")
    lines += [html.escape(p, quote=False) for p in problems(record, view.settings.max_drop)]
    if record.error:
        lines.append(html.escape(_clip(record.error, 120), quote=False))
    return "<br>".join(lines)


def machine_groups(view: RunView) -> list[tuple[dict[str, Any] | None, list[TrialRecord]]]:
    """The trials with timings, by the machine that measured them (the study's current one
    first): latencies are only ever compared within one group."""
    groups: list[tuple[CpuFingerprint | None, list[TrialRecord]]] = []
    current = CpuFingerprint.from_dict(view.cpu) if view.cpu else None
    if current is not None:
        groups.append((current, []))
    for record in view.records:
        if record.cpu is None:
            continue
        cpu = CpuFingerprint.from_dict(record.cpu)
        for known, members in groups:
            if known is not None and known.same_machine(cpu):
                members.append(record)
                break
        else:
            groups.append((cpu, [record]))
    return [(None if c is None else c.to_dict(), members) for c, members in groups if members]


def pareto_figure(view: RunView, records: list[TrialRecord], chosen: int | None) -> go.Figure:
    """Quality drop against the objective, one marker trace per category (each trial in one
    of them), the front as a line through its points, the budget as a horizontal line."""
    settings = view.settings
    figure = BY_NAME[settings.objective]
    unit = "pt" if view.bounded else "%"
    # Within a machine's own group the trials compare, whether or not it is the current one.
    comparable = [replace(r, stale=False) for r in records]
    plotted = [
        r for r in comparable if r.drop is not None and r.cost(settings.objective) is not None
    ]
    fig = go.Figure()
    for name, symbol, colour in CATEGORIES:
        members = [r for r in plotted if category(r) == name]
        if not members:
            continue
        fig.add_trace(
            go.Scatter(
                x=[r.cost(settings.objective) for r in members],
                y=[r.drop * 100 for r in members],
                mode="markers",
                name=f"{name} ({len(members)})",
                marker={"symbol": symbol, "color": colour, "size": 11, "line": {"width": 1}},
                hovertext=[_hover(r, view, figure) for r in members],
                hoverinfo="text",
                customdata=[r.number for r in members],
            )
        )
    front = pareto_front(comparable, view.direction, settings.objective)
    points = sorted(
        (r for r in plotted if r.number in front), key=lambda r: r.cost(settings.objective)
    )
    if len(points) > 1:
        fig.add_trace(
            go.Scatter(
                x=[r.cost(settings.objective) for r in points],
                y=[r.drop * 100 for r in points],
                mode="lines",
                name="Pareto front",
                line={"color": "#444", "dash": "dot", "width": 1.5},
                hoverinfo="skip",
            )
        )
    fig.add_hline(
        y=settings.max_drop * 100,
        line={"color": "#d62728", "dash": "dash", "width": 1.5},
        annotation_text="budget: max drop "
        + format_drop(settings.max_drop, view.bounded).lstrip("+"),
        annotation_position="bottom right",
    )
    target = next((r for r in plotted if r.number == chosen), None)
    if target is not None:
        fig.add_annotation(
            x=target.cost(settings.objective),
            y=target.drop * 100,
            text=f"chosen: trial {target.number}",
            showarrow=True,
            arrowhead=2,
            ax=60,
            ay=-50,
        )
    better = "lower" if figure.lower_is_better else "higher"
    fig.update_layout(
        xaxis_title=f"{figure.title(plotted[0].measurement if plotted else {})} "
        f"— {better} is better",
        yaxis_title=f"quality drop vs baseline ({unit}) — lower is better",
        legend_title_text="trials",
        margin={"l": 60, "r": 20, "t": 30, "b": 50},
        height=520,
        template="plotly_white",
    )
    return fig


def confirmation_figure(confirmed: dict[str, Any]) -> go.Figure:
    """Each confirmed figure's ratio (median of the rounds) with its min–max spread."""
    names = list(confirmed["ratios"])
    ratios = [confirmed["ratios"][n] for n in names]
    fig = go.Figure(
        go.Bar(
            x=names,
            y=[r["median"] for r in ratios],
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [r["max"] - r["median"] for r in ratios],
                "arrayminus": [r["median"] - r["min"] for r in ratios],
            },
            text=[f"{r['median']:.2f}×" for r in ratios],
            textposition="outside",
            marker_color="#2ca02c",
            hovertext=[
                f"{n}: {r['median']:.2f}× "
                f"(rounds {', '.join(f'{v:.2f}' for v in r.get('per_round', []))})"
                for n, r in zip(names, ratios, strict=True)
            ],
            hoverinfo="text",
        )
    )
    fig.add_hline(y=1.0, line={"color": "#444", "dash": "dash"}, annotation_text="baseline")
    fig.update_layout(
        yaxis_title="chosen vs baseline (× better)",
        height=340,
        margin={"l": 60, "r": 20, "t": 20, "b": 40},
        template="plotly_white",
        showlegend=False,
    )
    return fig


def importance_figure(found: Importance, objective: str) -> go.Figure:
    passes = list(found.by_pass)[::-1]  # the most important on top
    labels = {"front": "reaching the front", "quality": "quality", objective: objective}
    fig = go.Figure(
        [
            go.Bar(
                y=passes,
                x=[found.by_pass[p].get(target, 0.0) for p in passes],
                orientation="h",
                name=labels[target],
            )
            for target in found.targets
        ]
    )
    fig.update_layout(
        barmode="group",
        xaxis_title="importance (each target's importances sum to 1)",
        height=120 + 60 * len(passes),
        margin={"l": 200, "r": 20, "t": 20, "b": 40},
        template="plotly_white",
    )
    return fig


def _plot(fig: go.Figure, div_id: str) -> str:
    """A figure's div and script; plotly.js itself is inlined once in the page's head."""
    return pio.to_html(
        fig, include_plotlyjs=False, full_html=False, div_id=div_id, config=PLOTLY_CONFIG
    )


# --- the page --------------------------------------------------------------------------------
def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table_figures(records: list[TrialRecord], objective: str) -> list[Figure]:
    """The figures of merit any trial has a value for, the objective first."""
    present = [
        f
        for f in FIGURES
        if f.better is not None and any(r.measurement.get(f.field) is not None for r in records)
    ]
    return sorted(present, key=lambda f: f.name != objective)


def _number(value: Any) -> str:
    """A table cell's sort key: the number, or '' (sorted last) where there is none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return ""
    return repr(float(value))


# Headers of the figures the terminal's trials table has no column for.
SHORT_HEADERS = {
    "prefill": "prefill tok/s",
    "ttft": "TTFT ms",
    "decode": "decode tok/s",
    "parameters": "params",
    "gflops": "GFLOPs",
}


def headers(view: RunView) -> list[tuple[str, str, str]]:
    """(sort key, header, full label) of each figure column of the trials table."""
    sample = next((r.measurement for r in view.records if r.measurement), {})
    return [
        (f.name, f.column or SHORT_HEADERS.get(f.name, f.name), f.title(sample))
        for f in table_figures(view.records, view.settings.objective)
    ]


def trial_rows(view: RunView, front: set[int], machines: list[dict | None]) -> list[dict]:
    objective = BY_NAME[view.settings.objective]
    figures = table_figures(view.records, view.settings.objective)
    baseline = next((r for r in view.records if r.is_baseline and r.comparable), None)
    rows = []
    for r in view.records:
        kind = category(r)
        machine = ""
        if r.cpu is not None:
            cpu = CpuFingerprint.from_dict(r.cpu)
            machine = next(
                (
                    f"M{i + 1}"
                    for i, m in enumerate(machines)
                    if m and CpuFingerprint.from_dict(m).same_machine(cpu)
                ),
                "",
            )
        ratio = (
            improvement(
                baseline.measurement.get(objective.field),
                r.measurement.get(objective.field),
                objective.lower_is_better,
            )
            if baseline is not None and r.quality is not None
            else float("nan")
        )
        notes = problems(r, view.settings.max_drop) if r.state == "complete" else []
        if r.stale:
            notes.append("measured on another machine: not compared with this one's trials")
        rows.append(
            {
                "number": r.number,
                "kind": kind,
                "css": kind.replace(" ", "-"),
                "recipe": r.description,
                "quality": format_quality(r.quality, view.bounded),
                "quality_v": _number(r.quality),
                "drop": drop_text(r, view.bounded),
                "drop_v": _number(r.drop),
                "figures": [
                    (
                        f.show(r.measurement) if r.measurement else "",
                        _number(r.measurement.get(f.field)),
                    )
                    for f in figures
                ],
                "ratio": f"{ratio:.2f}×" if math.isfinite(ratio) else "",
                "ratio_v": _number(ratio),
                "front": "★" if r.number in front else "",
                "guards": ", ".join(f"{g} {'✓' if ok else '✗'}" for g, ok in r.guards.items()),
                "notes": "; ".join([*notes, *([r.error] if r.error else []), *stopped_early(r)]),
                "duration": "" if r.duration_s is None else f"{r.duration_s:.0f} s",
                "duration_v": _number(r.duration_s),
                "machine": machine,
            }
        )
    return rows


def chosen_rows(view: RunView) -> list[dict]:
    """Baseline vs chosen on each figure of merit: the search's measurement and, where the
    confirmation timed it again, its median ratio with the rounds' min–max."""
    best = view.best
    if not best:
        return []
    confirmed = best.get("confirmed") or {}
    by_field = {spec[0]: name for name, spec in CONFIRMED_FIGURES.items()}
    # A metrics.json from an older run may lack a part: its rows are then left out.
    base = (best.get("baseline") or {}).get("measurement") or {}
    chosen = best.get("measurement") or {}
    rows = []
    for f in figures_of_merit(base):
        ratio = improvement(base.get(f.field), chosen.get(f.field), f.lower_is_better)
        spread = (confirmed.get("ratios") or {}).get(by_field.get(f.field, ""))
        rows.append(
            {
                "figure": f.title(base),
                "baseline": f.show(base),
                "chosen": f.show(chosen),
                "ratio": f"{ratio:.2f}×" if math.isfinite(ratio) else "—",
                "confirmed": (
                    f"{spread['median']:.2f}× ({spread['min']:.2f}–{spread['max']:.2f}), "
                    f"rounds: {', '.join(f'{v:.2f}' for v in spread.get('per_round', []))}"
                    if spread
                    else ""
                ),
            }
        )
    return rows


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("slimformer", "optuna", "plotly", "jinja2"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _machine(cpu: dict[str, Any] | None, count: int, current: bool) -> dict[str, Any]:
    fp = CpuFingerprint.from_dict(cpu or {})
    return {
        "label": fp.label,
        "current": current,
        "trials": count,
        "facts": [
            ("CPU", fp.model),
            ("instruction sets used", " ".join(fp.isa) or "no AVX2"),
            ("instruction sets of the CPU", " ".join(fp.native_isa) or "no AVX2"),
            ("cores", str(fp.cores)),
            ("threads timed with", str(fp.threads)),
            ("forced caps", ", ".join(f"{k}={v}" for k, v in fp.forced.items()) or "none"),
            *((f"{lib}", version) for lib, version in sorted(fp.versions.items())),
        ],
    }


def render(view: RunView) -> str:
    """The page, as one string."""
    settings = view.settings
    chosen = view.best["trial"] if view.best else None
    groups = machine_groups(view)
    machines = [cpu for cpu, _ in groups]
    plots = []
    for index, (cpu, members) in enumerate(groups):
        fig = pareto_figure(view, members, chosen if index == 0 and not members[0].stale else None)
        label = CpuFingerprint.from_dict(cpu).label if cpu else "unknown machine"
        div = _plot(fig, f"pareto-plot-{index}")
        plots.append({"title": f"M{index + 1}: {label}", "html": div})
    current = [r for r in view.records if not r.stale]
    front = set(pareto_front(current, view.direction, settings.objective))
    confirmed = (view.best or {}).get("confirmed")
    counts: dict[str, int] = {}
    for r in view.records:
        counts[category(r)] = counts.get(category(r), 0) + 1
    unplotted = [
        r
        for r in view.records
        if r.state != "complete" and (r.drop is None or r.cost(settings.objective) is None)
    ]
    context = {
        "plotlyjs": Markup(get_plotlyjs()),
        "view": view,
        "settings": settings,
        "model": settings.model,
        "run": str(view.run),
        "objective": BY_NAME[settings.objective],
        "budget": format_drop(settings.max_drop, view.bounded).lstrip("+"),
        "counts": counts,
        "plots": [{"title": p["title"], "html": Markup(p["html"])} for p in plots],
        "several_machines": len(groups) > 1,
        "best": view.best,
        "chosen_record": next((r for r in view.records if r.number == chosen), None),
        "chosen_rows": chosen_rows(view),
        "chosen_quality": format_quality((view.best or {}).get("quality"), view.bounded),
        "chosen_drop": format_drop(
            (view.best or {}).get("drop"),
            view.bounded,
            ((view.best or {}).get("details") or {}).get(DROP_SE),
        ),
        "confirmed": confirmed,
        "unsteady": unsteady(confirmed) if confirmed else None,
        "confirmation_plot": (
            Markup(_plot(confirmation_figure(confirmed), "confirmed-plot"))
            if confirmed and confirmed.get("ratios")
            else None
        ),
        "headers": headers(view),
        "rows": trial_rows(view, front, machines),
        "unplotted": unplotted,
        "importance": view.importance,
        "importance_plot": (
            Markup(_plot(importance_figure(view.importance, settings.objective), "importance-plot"))
            if view.importance.by_pass
            else None
        ),
        "machines": [
            _machine(cpu, len(members), i == 0 and not members[0].stale)
            for i, (cpu, members) in enumerate(groups)
        ],
        "versions": _versions(),
        "settings_json": json.dumps(settings.to_dict(), indent=2, default=str),
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return _template().render(**context)


@functools.lru_cache(maxsize=1)
def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE)


def write_report(run: Path, study: optuna.Study | None = None) -> Path:
    """Write (or rewrite) report.html in a run folder, atomically; returns its path.
    `study`: the live Optuna study, when a running study calls this after a trial."""
    run = Path(run)
    if not RunFolder(run).has_run():
        raise SlimformerError(f"{run} is not a slimformer run folder (no run.json)")
    path = run / REPORT_FILE
    write_atomic(path, render(read_view(run, study)))
    return path


# Sorting the trials table is a dozen lines of plain JavaScript: no library for it.
TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>slimformer study · {{ model }}</title>
<script>{{ plotlyjs }}</script>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 0 24px 48px; color: #222; }
h1 { font-size: 22px; margin: 24px 0 4px; } h2 { font-size: 18px; margin-top: 32px; }
.sub { color: #555; margin: 0 0 12px; } code { background: #f3f3f3; padding: 0 3px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e3e3e3; text-align: right;
         white-space: nowrap; vertical-align: top; }
th { background: #f6f6f6; position: sticky; top: 0; }
td.text, th.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[data-dir=asc]::after { content: " ▲"; }
table.sortable th[data-dir=desc]::after { content: " ▼"; }
tr.feasible td.kind { color: #2ca02c; } tr.over-budget td.kind { color: #d46b08; }
tr.failed td.kind { color: #d62728; } tr.pruned td.kind { color: #777; }
tr.baseline td.kind { color: #1f77b4; }
td.recipe { min-width: 280px; max-width: 460px; word-break: break-word; white-space: normal;
            text-align: left;
            font-family: ui-monospace, monospace; font-size: 12px; }
.scroll { overflow-x: auto; }
td.notes { min-width: 200px; max-width: 360px; text-align: left; color: #8a4b00;
           word-break: break-word; white-space: normal; }
.warn { background: #fff4e5; border-left: 4px solid #ff9800; padding: 6px 10px; }
.ok { color: #2ca02c; } .bad { color: #d62728; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 150px; }
.card b { display: block; font-size: 18px; }
pre { background: #f6f6f6; padding: 8px; overflow: auto; max-height: 360px; }
</style>
</head>
<body>
<h1>slimformer study: <code>{{ model }}</code></h1>
<p class="sub">{{ settings.task.name }} task · quality: {{ view.metric }} ·
objective: {{ objective.name }} ({{ "lower" if objective.lower_is_better else "higher" }}
is better) · budget: max drop {{ budget }}
{%- if settings.guards %} and guards {{ settings.guards | join(", ") }}{% endif %} ·
run folder <code>{{ run }}</code> · written {{ written }}</p>

<section id="summary">
<div class="cards">
  <div class="card">trials<b>{{ rows | length }}</b></div>
  {% for name, count in counts.items() %}
  <div class="card">{{ name }}<b>{{ count }}</b></div>
  {% endfor %}
  {% if best %}
  <div class="card">chosen<b>trial {{ best.trial }}</b>
    {% if best.met_max_drop %}<span class="ok">meets the budget</span>
    {% else %}<span class="bad">does NOT meet the budget</span>{% endif %}</div>
  {% endif %}
</div>
{% if not best %}
<p>No model chosen yet: the study is running, or was interrupted (continue it with
<code>--resume</code>).</p>
{% endif %}
</section>

<section id="pareto">
<h2>Pareto front: quality drop vs {{ objective.name }}</h2>
<p class="sub">Every trial measured, one point each; hover for its recipe. Points under the
dashed red line are within the quality budget; the dotted line joins the Pareto front.
{% if several_machines %}Trials measured on different machines are in separate plots: their
timings do not compare.{% endif %}</p>
{% for plot in plots %}
{% if several_machines %}<h3>{{ plot.title }}</h3>{% endif %}
<div class="plot">{{ plot.html }}</div>
{% endfor %}
{% if unplotted %}
<p>Not on the plot (no measurement):</p>
<ul class="unplotted">
{% for r in unplotted %}
<li>trial {{ r.number }} · {{ r.state }} · <code>{{ r.description }}</code>
{%- if r.error %}: {{ r.error }}
{%- elif r.state == "pruned" and r.early_stop %}: stopped early, {{ r.early_stop.reason }}
{%- endif %}</li>
{% endfor %}
</ul>
{% endif %}
</section>

<section id="chosen">
<h2>Chosen model vs baseline</h2>
{% if best %}
<p>Trial {{ best.trial }}: <code>{{ chosen_record.description if chosen_record else "?" }}</code>
— {{ view.metric }} {{ chosen_quality }} (drop {{ chosen_drop }});
saved in <code>{{ run }}/best</code>.</p>
{% if unsteady %}<p class="warn">{{ unsteady }}</p>{% endif %}
{% if confirmation_plot %}
<p class="sub">Confirmed: baseline and chosen model timed again {{ confirmed.rounds }} rounds,
{{ confirmed.order }}; bars are the median of the per-round ratios, whiskers their min–max.</p>
{{ confirmation_plot }}
{% else %}
<p class="sub">Not confirmed (no confirmation rounds ran): the ratios are the search's single
measurement.</p>
{% endif %}
<table>
<thead><tr><th class="text">figure</th><th>baseline</th><th>chosen</th>
<th>ratio (search)</th><th class="text">confirmed ratio (min–max)</th></tr></thead>
<tbody>
{% for row in chosen_rows %}
<tr><td class="text">{{ row.figure }}</td><td>{{ row.baseline }}</td><td>{{ row.chosen }}</td>
<td>{{ row.ratio }}</td><td class="text">{{ row.confirmed }}</td></tr>
{% endfor %}
</tbody>
</table>
{% else %}
<p>None yet.</p>
{% endif %}
</section>

<section id="trials">
<h2>Every trial</h2>
<p class="sub">Click a column to sort. Quality is {{ view.score_text }}</p>
<div class="scroll">
<table class="sortable" id="trials-table">
<thead><tr>
<th data-key="number">#</th><th data-key="kind" class="text">state</th>
<th data-key="recipe" class="text">recipe</th>
<th data-key="quality">quality</th><th data-key="drop">drop</th>
{% for key, text, title in headers %}<th data-key="{{ key }}" title="{{ title }}">{{ text }}</th>
{% endfor %}
<th data-key="ratio" title="{{ objective.name }} vs the baseline, × better">× baseline</th>
<th data-key="front">front</th><th data-key="guards" class="text">guards</th>
<th data-key="duration">time</th>
{% if several_machines %}<th data-key="machine">machine</th>{% endif %}
<th data-key="notes" class="text">why not / error</th>
</tr></thead>
<tbody>
{% for row in rows %}
<tr data-trial="{{ row.number }}" class="{{ row.css }}">
<td data-v="{{ row.number }}">{{ row.number }}</td>
<td class="kind text">{{ row.kind }}</td>
<td class="recipe text">{{ row.recipe }}</td>
<td data-v="{{ row.quality_v }}">{{ row.quality }}</td>
<td data-v="{{ row.drop_v }}">{{ row.drop }}</td>
{% for text, value in row.figures %}<td data-v="{{ value }}">{{ text }}</td>{% endfor %}
<td data-v="{{ row.ratio_v }}">{{ row.ratio }}</td>
<td>{{ row.front }}</td>
<td class="text">{{ row.guards }}</td>
<td data-v="{{ row.duration_v }}">{{ row.duration }}</td>
{% if several_machines %}<td>{{ row.machine }}</td>{% endif %}
<td class="notes">{{ row.notes }}</td>
</tr>
{% endfor %}
</tbody>
</table>
</div>
</section>

<section id="importance">
<h2>What mattered: importance by pass</h2>
{% if importance.note %}
<p class="warn">{{ importance.note }}</p>
{% else %}
<p class="sub">Optuna's parameter importance (PED-ANOVA) over the {{ importance.trials }}
finished trials measured on this machine, summed by pass: how much each pass's settings
decide whether a trial reaches the Pareto front, its quality, and its {{ objective.name }}.</p>
{{ importance_plot }}
<details><summary>by parameter</summary>
<table>
<thead><tr><th class="text">parameter</th>
{% for t in importance.targets %}<th>{{ t }}</th>{% endfor %}</tr></thead>
<tbody>
{% for param, values in importance.by_param.items() %}
<tr><td class="text"><code>{{ param }}</code></td>
{% for t in importance.targets %}<td>{{ "%.3f" | format(values.get(t, 0.0)) }}</td>{% endfor %}
</tr>
{% endfor %}
</tbody>
</table>
</details>
{% endif %}
</section>

<section id="machines">
<h2>Measured on</h2>
{% for m in machines %}
<h3>M{{ loop.index }}{% if m.current %} (this study's machine){% endif %}: {{ m.label }}</h3>
<p class="sub">{{ m.trials }} trials measured here.</p>
<table class="facts">
{% for name, value in m.facts %}
<tr><td class="text">{{ name }}</td><td class="text"><code>{{ value }}</code></td></tr>
{% endfor %}
</table>
{% else %}
<p>No trial was measured yet.</p>
{% endfor %}
<p class="sub">This page: {% for name, version in versions.items() -%}
{{ name }} {{ version }}{% if not loop.last %} · {% endif %}{%- endfor %}.</p>
</section>

<section id="settings">
<h2>Settings</h2>
<details><summary>run.json settings</summary><pre>{{ settings_json }}</pre></details>
</section>

<script>
(function () {
  function key(row, col) {
    var cell = row.cells[col];
    return cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent.trim();
  }
  function compare(a, b) {
    if (a === "" || b === "") { return (a === "") - (b === ""); }
    var x = Number(a), y = Number(b);
    if (isFinite(x) && isFinite(y)) { return x - y; }
    return a.localeCompare(b);
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var headers = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(headers, function (th, col) {
      th.addEventListener("click", function () {
        var asc = th.getAttribute("data-dir") !== "asc";
        Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("data-dir"); });
        th.setAttribute("data-dir", asc ? "asc" : "desc");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var ka = key(a, col), kb = key(b, col);
          if (ka === "" || kb === "") { return compare(ka, kb); }  // blanks last either way
          return asc ? compare(ka, kb) : compare(kb, ka);
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
})();
</script>
</body>
</html>
"""
