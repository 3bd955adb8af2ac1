"""What a person sees: live progress, the trials and Pareto tables, the model card."""

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

from slimformer.confirm import CONFIRMED_FIGURES, improvement, unsteady
from slimformer.cpu import CpuFingerprint
from slimformer.study import OBJECTIVES, StudyResult, StudySettings, TrialRecord
from slimformer.tasks import make_task

TRIAL_STAGES = {"applying passes": 1, "saving": 2, "loading": 3, "timing": 4, "scoring": 5}


def format_quality(value: float | None, bounded: bool) -> str:
    if value is None:
        return "—"
    return f"{value * 100:.2f}%" if bounded else f"{value:.4g}"


def format_drop(drop: float | None, bounded: bool) -> str:
    if drop is None:
        return "—"
    return f"{drop * 100:+.2f} pt" if bounded else f"{drop * 100:+.2f}%"


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
        self.bounded = True
        self.objective = "latency"

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def study_started(self, settings: StudySettings, total: int | None, done: int) -> None:
        if self.setup is not None:
            self.progress.remove_task(self.setup)
            self.setup = None
        self.bounded = _bounded(settings)
        self.objective = settings.objective
        self.overall = self.progress.add_task("trials", total=total, completed=done)

    def trial_started(self, number: int, description: str) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        self.current = self.progress.add_task(
            f"trial {number}: {escape(_clip(description, 60))}", total=len(TRIAL_STAGES)
        )

    def stage(self, name: str) -> None:
        if self.current is not None and name in TRIAL_STAGES:
            self.progress.update(self.current, completed=TRIAL_STAGES[name] - 1)

    def trial_finished(self, record: TrialRecord) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None
        if self.overall is not None:
            self.progress.advance(self.overall)
        self.progress.console.print(trial_line(record, self.objective, self.bounded))

    def note(self, text: str) -> None:
        """Something the user should read later too: a line that stays."""
        self.progress.console.print(f"[yellow]note:[/yellow] {escape(text)}")

    def message(self, text: str) -> None:
        """Set-up steps show as a transient line of the progress display."""
        if self.setup is None:
            self.setup = self.progress.add_task(escape(text), total=None)
        else:
            self.progress.update(self.setup, description=escape(text))


def trial_line(record: TrialRecord, objective: str, bounded: bool) -> str:
    head = f"trial {record.number:>3}  {_clip(record.description, 70):<70}"
    if record.state != "complete":
        return f"{escape(head)}  [red]{record.state}[/red] {escape(record.error or '')}"
    mark = "[green]within budget[/green]" if record.feasible else "[yellow]over budget[/yellow]"
    cost = record.cost(objective)
    return (
        f"{head}  {format_quality(record.quality, bounded)} "
        f"({format_drop(record.drop, bounded)})  {objective} {cost:g}  {mark}"
    )


def trials_table(
    records: list[TrialRecord],
    settings: StudySettings,
    pareto: list[int],
    title: str,
    baseline: TrialRecord | None = None,
) -> Table:
    """One row per record; speed-ups against `baseline` (default: the records' own, which a
    front without the baseline on it lacks)."""
    bounded = _bounded(settings)
    baseline = baseline or next((r for r in records if r.is_baseline and r.comparable), None)
    table = Table(title=title, title_justify="left")
    for column in (
        "#",
        "recipe",
        "quality",
        "drop",
        "latency ms",
        "p90 ms",
        "inputs/s",
        "memory MB",
        "size MB",
        "speed-up",
        "front",
    ):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    base_latency = baseline.measurement.get("latency_ms_median") if baseline else None
    for r in records:
        if r.stale:
            table.add_row(
                str(r.number),
                _clip(r.description, 60),
                "[dim]other CPU[/dim]",
                *[""] * 7,
                "measured elsewhere",
            )
            continue
        if r.state != "complete":
            table.add_row(
                str(r.number),
                _clip(r.description, 60),
                f"[red]{r.state}[/red]",
                *[""] * 7,
                (r.error or "")[:40],
            )
            continue
        m = r.measurement
        speedup = f"{base_latency / m['latency_ms_median']:.2f}×" if base_latency else "—"
        drop_text = format_drop(r.drop, bounded)
        if not r.feasible:
            drop_text = f"[yellow]{drop_text}[/yellow]"
        table.add_row(
            str(r.number),
            _clip(r.description, 60),
            format_quality(r.quality, bounded),
            drop_text,
            f"{m['latency_ms_median']:.2f}",
            f"{m['latency_ms_p90']:.2f}",
            f"{m['throughput_per_s']:.1f}",
            f"{m['peak_memory_mb']:.0f}",
            f"{m['size_mb']:.1f}",
            speedup,
            "★" if r.number in pareto else "",
        )
    return table


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
    key = OBJECTIVES[settings.objective][0]
    ratio = baseline.measurement[key] / chosen.measurement[key]
    if OBJECTIVES[settings.objective][1] == "maximize":
        ratio = 1 / ratio
    how = "in the search's single measurement"
    if result.confirmed:
        spread = result.confirmed["ratios"][settings.objective]
        ratio = spread["median"]
        how = (
            f"median of {result.confirmed['rounds']} alternating rounds, "
            f"{spread['min']:.2f}–{spread['max']:.2f}×"
        )
    budget = format_drop(settings.max_drop, bounded).lstrip("+")
    warning = unsteady(result.confirmed) if result.confirmed else None
    if warning:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if result.met_budget:
        console.print(
            f"chosen: trial {chosen.number} ({escape(chosen.description)}) — {ratio:.2f}× "
            f"better {settings.objective} than the baseline ({how}) at "
            f"{format_drop(chosen.drop, bounded)} quality (budget {budget})"
        )
    else:
        console.print(
            f"[yellow]no optimized candidate met --max-drop {budget}[/yellow]; saved the "
            f"best-quality frontier point instead: trial {chosen.number} ({chosen.description}), "
            f"drop {format_drop(chosen.drop, bounded)}"
        )
    if result.best_dir:
        console.print(f"saved to {result.best_dir}")


def model_card(
    chosen: TrialRecord,
    baseline: TrialRecord,
    settings: StudySettings,
    metric: str,
    met: bool,
    saved: dict[str, Any],
    cpu: CpuFingerprint,
    confirmed: dict[str, Any] | None = None,
) -> str:
    bounded = _bounded(settings)
    rows = [
        (
            "quality (" + metric + ")",
            format_quality(baseline.quality, bounded),
            format_quality(chosen.quality, bounded),
            "",
        ),
    ]
    for name, value in baseline.details.items():
        rows.append((name, f"{value:.4f}", f"{chosen.details.get(name, float('nan')):.4f}", ""))
    fields = [
        ("batch-1 latency, median (ms)", "latency_ms_median", True),
        ("batch-1 latency, p90 (ms)", "latency_ms_p90", True),
        (
            f"throughput at batch {baseline.measurement['batch_size']} (inputs/s)",
            "throughput_per_s",
            False,
        ),
        ("peak memory (MB)", "peak_memory_mb", True),
        ("size on disk (MB)", "size_mb", True),
        ("parameters", "parameters", True),
        ("GFLOPs per input", "gflops_per_input", True),
    ]
    if baseline.measurement.get("decode_tokens_per_s") is not None:
        fields[3:3] = [
            ("prefill, batch 1 (prompt tokens/s)", "prefill_tokens_per_s", False),
            ("decode, batch 1 (new tokens/s)", "decode_tokens_per_s", False),
        ]
    confirmed_by_key = {key: figure for figure, (key, _) in CONFIRMED_FIGURES.items()}
    for label, key, lower_is_better in fields:
        a, b = baseline.measurement[key], chosen.measurement.get(key)
        ratio = improvement(a, b, lower_is_better)
        ratio_text = f"{ratio:.2f}×" if math.isfinite(ratio) else "—"
        if confirmed and key in confirmed_by_key:
            # The confirmation's medians and ratio, so the row's three numbers agree.
            a, b = confirmed["medians"]["baseline"][key], confirmed["medians"]["chosen"][key]
            spread = confirmed["ratios"][confirmed_by_key[key]]
            ratio_text = f"{spread['median']:.2f}× ({spread['min']:.2f}–{spread['max']:.2f}) ✓"
        rows.append((label, _number(a), _number(b), ratio_text))
    table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows)
    loading = {
        "hf": "Plain transformers loads it too: `AutoModel.from_pretrained(this_folder)`.",
        "slimformer": "It holds layers plain transformers cannot rebuild (int8, or widths that "
        "differ from its config), so only slimformer loads it.",
        "runtime": "It is served by another engine; its files ("
        + ", ".join(f"`{f}`" for f in (saved.get("runtime") or {}).get("files", ()))
        + ") load in that engine directly too.",
    }[saved.get("weights", "slimformer")]
    runtime = (saved.get("runtime") or {}).get("name")
    if runtime:
        loading += f" `slimformer.load` returns it running in `{runtime}`."
    status = "meets" if met else "does NOT meet"
    threads = baseline.measurement["threads"]
    throughput_batches = {
        "bucketed": "batches sorted by length and padded to their longest",
        "padded": "batches in arrival order, each padded to its longest input",
        "unpadded": "batches in arrival order with no padding computed (packed tokens)",
    }.get(chosen.measurement.get("batching", "bucketed"), "batches of real inputs")
    confirmation = (
        "The ratios above are the search's single measurement of each model."
        if not confirmed
        else "Rows marked ✓ are confirmed (below): medians of the confirmation rounds and the "
        "median of their per-round ratios; the other rows are the search's single "
        "measurement.\n\n" + _confirmed_section(confirmed)
    )
    return f"""# slimformer model

Derived from `{settings.model}` by `{chosen.description}` (study trial {chosen.number}).
It {status} the quality budget (max drop {format_drop(settings.max_drop, bounded)}) on the
`{settings.task.name}` task.

Load it with `slimformer.load(this_folder)`. {loading}
Replay it with `slimformer apply recipe.yaml {settings.model} --out DIR`.

## Measured (same machine, same run, {threads} threads, fp32 baseline vs this model)

Machine: {escape_md(cpu.label)}; {escape_md(_versions(cpu))}.

| figure | baseline | this model | ratio |
|---|---|---|---|
{table}

Latency is batch-1 requests on real inputs from the task; throughput is {throughput_batches}.
Memory is the resident memory added by loading and serving the model in a fresh process.

{confirmation}

These are facts about this machine: on a CPU with other instruction sets the ranking of
engines and precisions can differ (`slimformer bench this_folder` there shows today's figures
beside these).
"""


def _confirmed_section(confirmed: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {figure} | {r['median']:.2f}× | {r['min']:.2f}–{r['max']:.2f}× | "
        + ", ".join(f"{x:.2f}" for x in r["per_round"])
        + " |"
        for figure, r in confirmed["ratios"].items()
    )
    warning = unsteady(confirmed)
    warning = f"\n\n**Warning:** {warning}." if warning else ""
    return f"""### Confirmed ratios

Baseline and this model timed again after the search, {confirmed["rounds"]} rounds, the order
alternating, each measurement in a fresh process; a round's ratio compares that round's two
measurements (higher is better for this model).

| figure | median ratio | range | per round |
|---|---|---|---|
{rows}{warning}"""


def _versions(cpu: CpuFingerprint) -> str:
    return ", ".join(f"{lib} {version}" for lib, version in sorted(cpu.versions.items()))


def escape_md(text: str) -> str:
    """Text from the machine or a user, safe inside a Markdown table or paragraph."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
