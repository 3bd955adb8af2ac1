"""What a person sees: live progress, the trial lines, the trials and Pareto tables.

The model card (best/README.md) is card.py; both take their figures from figures.py.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from slimformer.errors import SlimformerError
from slimformer.figures import BY_NAME, improvement, table_columns
from slimformer.search.confirm import unsteady
from slimformer.search.records import StudyResult, TrialRecord
from slimformer.search.settings import StudySettings
from slimformer.tasks import make_task
from slimformer.tasks.base import DROP_SE

TRIAL_STAGES = {"applying passes": 1, "saving": 2, "loading": 3, "timing": 4, "scoring": 5}


def format_quality(value: float | None, bounded: bool) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.2f}%" if bounded else f"{value:.4g}"


def format_drop(drop: float | None, bounded: bool, error: float | None = None) -> str:
    """A drop in points (fractions) or percent; with `error`, its standard error after ±."""
    if drop is None:
        return "—"
    spread = f" ± {error * 100:.2f}" if error else ""
    return f"{drop * 100:+.2f}{spread} pt" if bounded else f"{drop * 100:+.2f}{spread}%"


def drop_text(record: TrialRecord, bounded: bool) -> str:
    """A trial's drop, with its standard error where the task reported one."""
    return format_drop(record.drop, bounded, record.details.get(DROP_SE))


def _bounded(settings: StudySettings) -> bool:
    """Whether the task's score is a fraction (shown in %, budgets in points)."""
    return make_task(settings.task).bounded


class RichReporter:
    """A progress bar for the study and one per trial (its stages), plus a line per trial."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", justify="left"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.overall: Any = None
        self.setup: Any = None
        self.current: Any = None
        self.current_title = ""
        self.bounded = True
        self.objective = "latency"
        self.max_drop: float | None = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is not None and issubclass(kind, SlimformerError):
            # Refused input: its one error line is all that is left on screen.
            self.progress.live.transient = True
        self.progress.stop()

    def study_started(self, settings: StudySettings, total: int | None, done: int) -> None:
        if self.setup is not None:
            self.progress.remove_task(self.setup)
            self.setup = None
        self.bounded = _bounded(settings)
        self.objective = settings.objective
        self.max_drop = settings.max_drop
        self.overall = self.progress.add_task("trials", total=total, completed=done)

    def trial_started(self, number: int, description: str) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.current_title = f"trial {number}: {escape(_clip(description, 60))}"
        self.current = self.progress.add_task(self.current_title, total=len(TRIAL_STAGES))

    def stage(self, name: str) -> None:
        """A step of the current trial, shown after its description: the trial's own steps
        advance its bar; anything else (the pass being applied, a distillation's step and
        loss) is the pass's progress and shows as it comes."""
        current = self.current
        if current is None:
            return
        shown = f"{self.current_title} · {escape(_clip(name, 50))}"
        update: dict[str, Any] = {"description": shown}
        if name in TRIAL_STAGES:
            update["completed"] = TRIAL_STAGES[name] - 1
        self.progress.update(current, **update)

    def trial_finished(self, record: TrialRecord) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None
        if self.overall is not None:
            self.progress.advance(self.overall)
        self.progress.console.print(trial_line(record, self.objective, self.bounded, self.max_drop))

    def note(self, text: str) -> None:
        """Something the user should read later too: a line that stays."""
        self.progress.console.print(f"[yellow]note:[/yellow] {escape(text)}")

    def message(self, text: str) -> None:
        """Set-up steps show as a transient line of the progress display."""
        if self.setup is None:
            self.setup = self.progress.add_task(escape(text), total=None)
        else:
            self.progress.update(self.setup, description=escape(text))


def trial_line(
    record: TrialRecord, objective: str, bounded: bool, max_drop: float | None = None
) -> str:
    head = f"trial {record.number:>3}  {_clip(record.description, 70):<70}"
    if record.state != "complete":
        why = record.error or (record.early_stop or {}).get("reason") or ""
        return f"{escape(head)}  [red]{record.state}[/red] {escape(why)}"
    failed = failed_guards(record)
    over = not failed or (max_drop is not None and (record.drop or 0) > max_drop + 1e-12)
    problems = (["over budget"] if over else []) + [f"guard {g} failed" for g in failed]
    mark = (
        "[green]within budget[/green]"
        if record.feasible
        else f"[yellow]{escape('; '.join(problems))}[/yellow]"
    )
    figure = BY_NAME[objective]
    return (
        f"{escape(head)}  {format_quality(record.quality, bounded)} "
        f"({drop_text(record, bounded)})  "
        f"{objective} {figure.show(record.measurement)} {figure.unit}  {mark}"
    )


def trials_table(
    records: list[TrialRecord],
    settings: StudySettings,
    pareto: list[int],
    title: str,
    baseline: TrialRecord | None = None,
) -> Table:
    """One row per record; the last figure is how many times better than `baseline` (default:
    the records' own, which a front without the baseline on it lacks) each is on the study's
    objective: a speed-up for latency, throughput and decoding, a gain for memory."""
    bounded = _bounded(settings)
    baseline = baseline or next((r for r in records if r.is_baseline and r.comparable), None)
    table = Table(title=title, title_justify="left")
    figures = table_columns()
    guarded = bool(settings.guards)
    objective = BY_NAME[settings.objective]
    gain_column = "memory gain" if settings.objective == "memory" else "speed-up"
    columns = ["#", "recipe", "quality", "drop", *(f.column for f in figures), gain_column]
    columns += ["guards", "front"] if guarded else ["front"]
    for column in columns:
        table.add_column(column, justify="left" if column == "recipe" else "right")
    blank = [""] * (len(columns) - 4)  # from the drop to the gain
    base_value = baseline.measurement.get(objective.field) if baseline else None
    for r in records:
        if r.stale:
            table.add_row(
                str(r.number),
                escape(_clip(r.description, 60)),
                "[dim]other CPU[/dim]",
                *blank,
                "measured elsewhere",
            )
            continue
        if r.state != "complete":
            # Why, under the recipe: in the last column it would squeeze the recipes.
            why = r.error or (r.early_stop or {}).get("reason") or ""
            table.add_row(
                str(r.number),
                escape(_clip(r.description, 60))
                + (f"\n[dim]{escape(_clip(why, 60))}[/dim]" if why else ""),
                f"[red]{r.state}[/red]",
                *blank,
                "",
            )
            continue
        m = r.measurement
        gain = improvement(base_value, m.get(objective.field), objective.lower_is_better)
        drop_shown = drop_text(r, bounded)
        if not r.feasible:
            drop_shown = f"[yellow]{drop_shown}[/yellow]"
        failed = failed_guards(r)
        guard_cell = f"[yellow]✗ {escape(_clip(', '.join(failed), 40))}[/yellow]" if failed else "✓"
        table.add_row(
            str(r.number),
            escape(_clip(r.description, 60)),
            format_quality(r.quality, bounded),
            drop_shown,
            *(f.show(m) for f in figures),
            f"{gain:.2f}×" if math.isfinite(gain) else "—",
            *([guard_cell] if guarded else []),
            "★" if r.number in pareto else "",
        )
    return table


def failed_guards(record: TrialRecord) -> list[str]:
    return [guard for guard, met in record.guards.items() if not met]


def print_study(result: StudyResult, console: Console) -> None:
    settings = result.settings
    bounded = _bounded(settings)
    front = [r for r in result.trials if r.number in result.pareto]
    console.print(
        trials_table(front, settings, result.pareto, "Pareto front", baseline=result.baseline)
    )
    chosen, baseline = result.chosen, result.baseline
    if chosen is None or baseline is None:
        console.print("[red]no trial finished; nothing was saved[/red]")
        return
    figure = BY_NAME[settings.objective]
    ratio = improvement(
        baseline.measurement[figure.field], chosen.measurement[figure.field], figure.lower_is_better
    )
    how = "in the search's single measurement"
    if result.confirmed:
        spread = result.confirmed["ratios"][settings.objective]
        ratio = spread["median"]
        how = (
            f"median of {result.confirmed['rounds']} alternating rounds, "
            f"{spread['min']:.2f}–{spread['max']:.2f}×"
        )
    budget = format_drop(settings.max_drop, bounded).lstrip("+")
    limits = f"--max-drop {budget}" + (" and the guards" if settings.guards else "")
    warning = unsteady(result.confirmed) if result.confirmed else None
    if warning:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if result.met_budget:
        console.print(
            f"chosen: trial {chosen.number} ({escape(chosen.description)}) — {ratio:.2f}× "
            f"better {settings.objective} than the baseline ({how}) at "
            f"{drop_text(chosen, bounded)} quality (budget {budget})"
        )
    else:
        console.print(
            f"[yellow]no optimized candidate met {limits}[/yellow]; saved the "
            f"best-quality frontier point instead: trial {chosen.number} "
            f"({escape(chosen.description)}), "
            f"drop {drop_text(chosen, bounded)}"
        )
    if settings.guards:
        marks = [f"{g} {'✓' if chosen.guards.get(g) else '✗'}" for g in settings.guards]
        console.print(escape("guards: " + ", ".join(marks)))
    if result.best_dir:
        console.print(f"saved to {result.best_dir}")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
