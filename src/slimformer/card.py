"""The model card: best/README.md, what a person reads beside the chosen model.

Rendered from the records a study saved (`BestModel`) and the model's own slimformer.json;
the figures and their labels come from figures.py, like every other table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from slimformer.cpu import CpuFingerprint
from slimformer.figures import CONFIRMED_FIGURES, figures_of_merit, improvement
from slimformer.files import write_atomic
from slimformer.report import format_drop, format_quality
from slimformer.search.confirm import unsteady
from slimformer.search.guards import figure_drops, parse_guard
from slimformer.search.records import BestModel
from slimformer.tasks import make_task
from slimformer.tasks.base import DROP_SE


def write_card(folder: Path, best: BestModel) -> None:
    """Write the model card into a saved model's folder (a `CardWriter` for the study)."""
    saved = json.loads((folder / "slimformer.json").read_text())
    write_atomic(folder / "README.md", model_card(best, saved))


def model_card(best: BestModel, saved: dict[str, Any]) -> str:
    chosen, baseline, settings = best.chosen, best.baseline, best.settings
    cpu = CpuFingerprint.from_dict(best.cpu)
    confirmed = best.confirmed
    task = make_task(settings.task)
    bounded = task.bounded
    rows = [
        (
            "quality (" + best.metric + ")",
            format_quality(baseline.quality, bounded),
            format_quality(chosen.quality, bounded),
            "",
        ),
    ]
    for name, value in baseline.details.items():
        rows.append((name, f"{value:.4f}", f"{chosen.details.get(name, float('nan')):.4f}", ""))
    confirmed_by_field = {field: figure for figure, (field, _) in CONFIRMED_FIGURES.items()}
    for figure in figures_of_merit(baseline.measurement):
        a, b = baseline.measurement.get(figure.field), chosen.measurement.get(figure.field)
        ratio = improvement(a, b, figure.lower_is_better)
        ratio_text = f"{ratio:.2f}×" if math.isfinite(ratio) else "—"
        confirmed_figure = confirmed_by_field.get(figure.field)
        if confirmed and confirmed_figure in confirmed["ratios"]:
            # The confirmation's medians and ratio, so the row's three numbers agree.
            medians = confirmed["medians"]
            a, b = medians["baseline"][figure.field], medians["chosen"][figure.field]
            spread = confirmed["ratios"][confirmed_figure]
            ratio_text = f"{spread['median']:.2f}× ({spread['min']:.2f}–{spread['max']:.2f}) ✓"
        rows.append(
            (figure.title(baseline.measurement), figure.text(a), figure.text(b), ratio_text)
        )
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
    status = "meets" if best.met_budget else "does NOT meet"
    limits = "the quality budget" + (" and its guards" if settings.guards else "")
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
It {status} {limits} (max drop {format_drop(settings.max_drop, bounded)}) on the
`{settings.task.name}` task.

Quality (`{best.metric}`) is {escape_md(task.describe_score())}
{_drop_sentence(chosen.drop, chosen.details.get(DROP_SE), bounded)}
{_guards_section(best)}
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


def _drop_sentence(drop: float | None, error: float | None, bounded: bool) -> str:
    """The chosen model's drop, and where the task reported it its standard error with what
    that means for reading it."""
    if drop is None:
        return ""
    if not error:
        return f"This model's drop: {format_drop(drop, bounded)}."
    return (
        f"This model's drop: {format_drop(drop, bounded, error)} (± one standard error of the "
        "per-example paired difference: the drop on more data of this kind would lie within "
        "about twice that of the figure, and models whose drops differ by less are not told "
        "apart by this data)."
    )


def _guards_section(best: BestModel) -> str:
    """Each guard with the baseline's and this model's figure and whether it was met."""
    if not best.settings.guards:
        return ""
    chosen, baseline, metric = best.chosen, best.baseline, best.metric
    figures = {metric: chosen.quality, **chosen.details}
    drops = figure_drops(metric, chosen.drop or 0.0, chosen.details, baseline.details)
    base_figures = {metric: baseline.quality, **baseline.details}
    base_drops = figure_drops(metric, 0.0, baseline.details, baseline.details)
    rows = []
    for text in best.settings.guards:
        guard = parse_guard(text)
        met = chosen.guards.get(text)
        rows.append(
            f"| {escape_md(guard.display())} | {guard.value(base_figures, base_drops):.4f} | "
            f"{guard.value(figures, drops):.4f} | {'yes' if met else 'NO'} |"
        )
    table = "\n".join(rows)
    return f"""
Guards: conditions beside the budget that every candidate had to meet to be chosen (a
`drop(...)` is how much lower than the baseline's the figure is).

| guard | baseline | this model | met |
|---|---|---|---|
{table}
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
