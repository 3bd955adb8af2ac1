"""`slimformer` on the command line: a thin typer layer over slimformer.api.

Over 350 lines because typer declares each option in the command's signature: the lines are
option declarations and help texts, the logic is in api.py, report.py and figures.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slimformer.errors import SlimformerError

app = typer.Typer(
    help="Make trained transformers faster and lighter, with every candidate measured.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
assets_app = typer.Typer(help="The offline models and data sets.", no_args_is_help=True)
app.add_typer(assets_app, name="assets")
# Tables are wide; when output is not a terminal, don't squeeze them into 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task",
        "-t",
        help="embedding | classification | perplexity | custom | image-classification "
        "(default: the model's natural task)",
    ),
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        help="your data: CSV/JSONL (classification, embedding), a text file, one text a line "
        "(embedding, perplexity, custom), or a folder with one sub-folder of images per class "
        "(image-classification)"
    ),
]
TextColumnOpt = Annotated[
    str, typer.Option(help="classification, embedding: the text column of a CSV/JSONL file")
]
LabelColumnOpt = Annotated[
    str | None,
    typer.Option(
        help="classification: the label column (default: label); embedding: score a probe on "
        "these labels instead of the label-free neighbour recall"
    ),
]
PairColumnOpt = Annotated[
    str | None,
    typer.Option(
        help="embedding: the column of each row's second sentence (sentence pairs, with "
        "--score-column); the score is then the Spearman correlation with the gold scores"
    ),
]
ScoreColumnOpt = Annotated[
    str | None, typer.Option(help="embedding: the column of each pair's gold similarity")
]
FunctionOpt = Annotated[
    str | None,
    typer.Option(help="custom task: module:function taking the model, returning a float"),
]
DirectionOpt = Annotated[
    str | None, typer.Option(help="custom task: maximize | minimize (higher or lower is better)")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="batch size for throughput")]
SeqOpt = Annotated[
    int | None,
    typer.Option(
        "--seq-len",
        help="time fixed-length inputs of this many real tokens "
        "(default: the task's real input lengths)",
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(help="torch threads (default: every core)")]


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="checkpoint folder, or 'default' / 'smollm2'")],
    task: TaskOpt = None,
    data: DataOpt = None,
    text_column: TextColumnOpt = "text",
    label_column: LabelColumnOpt = None,
    pair_column: PairColumnOpt = None,
    score_column: ScoreColumnOpt = None,
    function: FunctionOpt = None,
    direction: DirectionOpt = None,
    batch_size: BatchOpt = 32,
    seq_len: SeqOpt = None,
    threads: ThreadsOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Measure one model: quality, latency (median, p90), throughput, memory, size, FLOPs."""
    from slimformer import api

    columns = (text_column, label_column, pair_column, score_column)
    spec = _task_spec(task, data, columns, function, direction)
    with err.status(f"measuring {escape(model)} in a fresh process…"):
        result = api.benchmark(
            model, task=spec, batch_size=batch_size, seq_len=seq_len, threads=threads
        )
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=escape(f"{result.model} — {result.task} task"), title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    today = _figure_rows(result.metric, result.quality, result.details, result.measurement)
    chosen = result.when_chosen
    if chosen is None:
        for name, value in today:
            table.add_row(name, value)
        out.print(table)
        return
    table.columns[1].header = "today"
    table.add_column("when chosen", justify="right")
    then = dict(
        _figure_rows(result.metric, chosen["quality"], chosen["details"], chosen["measurement"])
    )
    for name, value in today:
        table.add_row(name, value, then.get(name, "—"))
    out.print(table)
    out.print(escape(_machines_line(result.cpu, chosen.get("cpu"))))


def _figure_rows(
    metric: str, quality: float, details: dict[str, float], m: dict
) -> list[tuple[str, str]]:
    from slimformer.figures import all_figures

    return [
        (metric, f"{quality:.4f}"),
        *[(k, f"{v:.4f}") for k, v in details.items()],
        *[(f.title(m), escape(f.show(m))) for f in all_figures(m)],
    ]


def _machines_line(today: dict | None, then: dict | None) -> str:
    """Which machines the two columns come from, and whether they compare."""
    from slimformer.cpu import CpuFingerprint

    if not today or not then:
        return "the figures it was chosen with carry no machine fingerprint"
    now_cpu, then_cpu = CpuFingerprint.from_dict(today), CpuFingerprint.from_dict(then)
    if now_cpu.same_machine(then_cpu):
        return f"both measured on this machine: {now_cpu.label}"
    return (
        f"chosen on another machine ({'; '.join(now_cpu.differences(then_cpu))}): the ranking "
        f"of techniques can differ here. Today: {now_cpu.label}"
    )


@app.command()
def optimize(
    model: Annotated[str, typer.Argument(help="checkpoint folder, or 'default' / 'smollm2'")],
    task: TaskOpt = None,
    data: DataOpt = None,
    text_column: TextColumnOpt = "text",
    label_column: LabelColumnOpt = None,
    pair_column: PairColumnOpt = None,
    score_column: ScoreColumnOpt = None,
    function: FunctionOpt = None,
    direction: DirectionOpt = None,
    max_drop: Annotated[
        str,
        typer.Option(
            help="quality budget: for accuracy, percentage points (1% = one point); for "
            "perplexity and custom scores, relative to the baseline"
        ),
    ] = "1%",
    guard: Annotated[
        list[str] | None,
        typer.Option(
            help="a condition on a figure the task reports, met beside --max-drop, e.g. "
            "'cosine_fidelity>=0.95' or 'drop(transfer_probe_accuracy)<=1%' (repeatable; "
            "replaces the task's default guard on the same figure)"
        ),
    ] = None,
    default_guards: Annotated[
        bool,
        typer.Option(
            "--default-guards/--no-default-guards",
            help="add the task's own guards (embedding: neighbour recall, and on the built-in "
            "data the transfer domain within --max-drop)",
        ),
    ] = True,
    warm_start: Annotated[
        bool,
        typer.Option(
            "--warm-start/--no-warm-start",
            help="measure each engine's int8 alone right after the baseline, before --start "
            "recipes and the sampler",
        ),
    ] = True,
    early_stop: Annotated[
        bool,
        typer.Option(
            "--early-stop/--no-early-stop",
            help="stop a candidate early when a subset of the scored data shows it over "
            "--max-drop with 97.5% confidence (not timed, recorded as pruned), and a "
            "distillation whose held-out loss falls behind the other trials'",
        ),
    ] = True,
    reuse_trained: Annotated[
        bool,
        typer.Option(
            "--reuse-trained/--no-reuse-trained",
            help="keep each recipe's model as it stood after distillation, and build later "
            "trials that start with the same steps from it instead of training again",
        ),
    ] = True,
    local_search: Annotated[
        bool,
        typer.Option(
            "--local-search/--no-local-search",
            help="every other trial, try the best recipe within budget one step cheaper, or a "
            "faster one over budget with longer distillation, instead of the sampler's proposal",
        ),
    ] = True,
    trials: Annotated[
        int | None,
        typer.Option(
            help="number of trials, the baseline included (default 12 unless --time-budget)"
        ),
    ] = None,
    time_budget: Annotated[
        str | None, typer.Option(help="stop starting trials after this long, e.g. 10m")
    ] = None,
    objective: Annotated[
        str, typer.Option(help="latency | throughput | memory | decode (decoders: new tokens/s)")
    ] = "latency",
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="run folder (default runs/MODEL)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run folder")] = False,
    passes: Annotated[
        str | None,
        typer.Option(
            help="comma-separated passes to search (default: all but those marked in "
            "`slimformer passes` as searched only when named); pass:setting=value also offers "
            "a setting this CPU would not profit from"
        ),
    ] = None,
    batch_size: BatchOpt = 32,
    seq_len: SeqOpt = None,
    threads: ThreadsOpt = None,
    seed: Annotated[int, typer.Option(help="seed for data splits and the sampler")] = 0,
    start: Annotated[
        list[Path] | None,
        typer.Option(help="a recipe.yaml to try first (repeat for several starting points)"),
    ] = None,
    confirm_rounds: Annotated[
        int,
        typer.Option(
            help="at the end, time the close candidates for the choice (the run-off), then "
            "baseline and chosen model, again this many rounds each, in fresh processes; the "
            "printed ratios are their medians (0 = off)"
        ),
    ] = 3,
    allow_other_cpu: Annotated[
        bool,
        typer.Option(
            help="--resume a run measured on another machine: its trials are measured again here"
        ),
    ] = False,
    storage: Annotated[
        str | None,
        typer.Option(
            help="where the study lives, an Optuna storage URL that workers on other machines "
            "join: postgresql://USER@HOST/DB, journal:///SHARED/PATH.log (a file on a shared "
            "filesystem) or sqlite:///PATH (default: study.db in the run folder)"
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="run the trials in N worker processes on this machine, each on its own cores "
            "(--threads each; default: the cores shared out); with --ray-address, N Ray tasks"
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="run the trials as Ray tasks on this cluster (e.g. ray://HEAD:10001 or auto), "
            "each reserving --threads CPUs"
        ),
    ] = None,
) -> None:
    """Search techniques jointly; save the Pareto front and the fastest model within budget."""
    from slimformer import api
    from slimformer.report import RichReporter, print_study

    if trials is None and time_budget is None:
        trials = 12
    if passes is not None and not passes.strip():
        raise SlimformerError("--passes names no pass; leave it out to search every pass")
    run_dir = out_dir or Path("runs") / Path(model).name
    columns = (text_column, label_column, pair_column, score_column)
    spec = _task_spec(task, data, columns, function, direction, seed)
    try:
        with RichReporter(err) as reporter:
            result = api.optimize(
                model,
                task=spec,
                max_drop=max_drop,
                trials=trials,
                time_budget=time_budget,
                objective=objective,
                out=run_dir,
                resume=resume,
                overwrite=overwrite,
                passes=[name.strip() for name in passes.split(",")] if passes else None,
                batch_size=batch_size,
                seq_len=seq_len,
                threads=threads,
                seed=seed,
                starts=list(start or ()),
                reporter=reporter,
                confirm_rounds=confirm_rounds,
                allow_other_cpu=allow_other_cpu,
                guards=list(guard or ()),
                default_guards=default_guards,
                warm_start=warm_start,
                early_stop=early_stop,
                reuse_trained=reuse_trained,
                local_search=local_search,
                storage=storage,
                workers=workers,
                ray_address=ray_address,
            )
    except KeyboardInterrupt:
        err.print(
            escape(
                f"interrupted: finished trials are kept in {run_dir}; continue with "
                f"`slimformer optimize {model} --out {run_dir} --resume`"
            )
        )
        raise typer.Exit(130) from None
    print_study(result, out)


@app.command()
def worker(
    study: Annotated[
        str,
        typer.Argument(
            help="the run folder of `slimformer optimize` (this machine or a shared "
            "filesystem), or the study's --storage URL"
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="this worker's folder for its candidates and logs (default: the run folder, "
            "or runs/worker-HOST for a URL)",
        ),
    ] = None,
) -> None:
    """Join a study from another process or machine; run its trials until its budget is spent."""
    from slimformer import api
    from slimformer.report import RichReporter

    with RichReporter(err) as reporter:
        ran = api.worker(study, out=out_dir, reporter=reporter)
    out.print(f"this worker ran {ran} trials; the study's process saves the chosen model")


@app.command("apply")
def apply_recipe(
    recipe: Annotated[Path, typer.Argument(help="recipe.yaml (or a folder holding one)")],
    model: Annotated[str, typer.Argument(help="checkpoint folder, or 'default' / 'smollm2'")],
    out_dir: Annotated[Path, typer.Option("--out", help="where to save the result")],
) -> None:
    """Replay a saved recipe on a model, deterministically, and save the result."""
    from slimformer import api

    with err.status("applying recipe…"):
        result = api.apply(model, recipe, out=out_dir)
    out.print(escape(f"applied {result.recipe.describe()}; saved to {out_dir}"))


@app.command()
def show(
    run: Annotated[Path, typer.Argument(help="a run folder from `slimformer optimize`")],
) -> None:
    """Print a finished or interrupted run's trials and Pareto front."""
    from slimformer.report import trials_table
    from slimformer.search.run_folder import read_best, read_run
    from slimformer.search.selection import pareto_front
    from slimformer.tasks import make_task

    settings, records = read_run(run)
    best = read_best(run)
    direction = make_task(settings.task).direction
    front = pareto_front(records, direction, settings.objective)
    out.print(
        trials_table(
            records,
            settings,
            front,
            escape(
                f"{run}: {len(records)} trials "
                f"({settings.model}, {settings.task.name}, {settings.objective})"
            ),
        )
    )
    if best is not None:
        trial, met = best
        meets = "meets" if met else "does NOT meet"
        out.print(escape(f"best: trial {trial} ({meets} the budget) in {run / 'best'}"))
    else:
        out.print("no best/ yet: the run was interrupted; continue it with --resume")


@app.command("report")
def report(
    run: Annotated[Path, typer.Argument(help="a run folder from `slimformer optimize`")],
) -> None:
    """Write the run's report.html (the front, every trial, the machines) and print its path."""
    from slimformer import api

    path = api.report(run)
    out.print(escape(str(path)), highlight=False, soft_wrap=True)


@app.command("passes")
def list_passes() -> None:
    """List the registered techniques and their searchable parameters."""
    import dataclasses

    from slimformer.cpu import fingerprint
    from slimformer.passes import registered_passes

    cpu = fingerprint()
    out.print(f"[dim]this CPU: {escape(cpu.label)}[/dim]\n")
    for cls in registered_passes():
        unpaid = cls.without_payoff(cpu)
        note = (
            "" if cls.searched_by_default else " [dim](searched only when named in --passes)[/dim]"
        )
        if "" in unpaid:
            note += f" [yellow](this CPU lacks {unpaid.pop('')}: not offered unless named)[/yellow]"
        out.print(f"[bold]{cls.name}[/bold] — {cls.summary}{note}")
        for setting, capability in unpaid.items():
            out.print(
                f"  [yellow]{setting}: not offered on this CPU (lacks {capability}); name it as "
                f"{cls.name}:{setting} in --passes to search it anyway[/yellow]"
            )
        table = Table(box=None, padding=(0, 2), show_edge=False)
        for column in ("setting", "search space", "default", "meaning"):
            table.add_column(
                column, no_wrap=column != "meaning", style="dim" if column == "default" else None
            )
        for f in dataclasses.fields(cls.config_class):
            space = f.metadata.get("space")
            table.add_row(
                f.name,
                space.describe() if space else "(not searched)",
                repr(f.default),
                f.metadata.get("help", ""),
            )
        out.print(table)
        out.print()


@assets_app.command("install")
def assets_install(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="assets to install (default: all but vit-fashion, built on first use)"),
    ] = None,
    train_for: Annotated[
        str | None,
        typer.Option(
            "--for",
            help="train vit-fashion at most this long this time (e.g. 30m); the same command "
            "goes on from where it stopped",
        ),
    ] = None,
) -> None:
    """Install and cache the offline models and data sets (idempotent)."""
    from slimformer import assets
    from slimformer.search.settings import parse_duration

    train_for_s = parse_duration(train_for, "--for")
    assets.install(names or None, log=lambda line: err.print(escape(line)), train_for_s=train_for_s)


@assets_app.command("status")
def assets_status() -> None:
    """Show which offline assets are installed and where."""
    from slimformer import assets

    table = Table()
    for column in ("asset", "installed", "where", "how to install"):
        table.add_column(column)
    for item in assets.status():
        table.add_row(
            item.name, "yes" if item.installed else "no", item.location, item.how_to_install
        )
    out.print(table)


def _task_spec(
    task: str | None,
    data: str | None,
    columns: tuple[str, str | None, str | None, str | None],
    function: str | None,
    direction: str | None,
    seed: int = 0,
) -> object:
    """The task options as a TaskSpec; None when no option was given (the model decides).
    `columns`: the text, label, pair and score columns."""
    from slimformer.tasks import TaskSpec

    text_column, label_column, pair_column, score_column = columns
    if task is None and not (data or function or direction):
        return None
    if task is None:
        task = "custom" if function else None
    if task is None and data and Path(data).is_dir():
        task = "image-classification"  # a folder of class sub-folders: the one task it fits
    if task is None:
        raise SlimformerError(
            "--data needs --task (classification, embedding, perplexity, custom or "
            "image-classification)"
        )
    return TaskSpec(
        name=task,
        data=data,
        text_column=text_column,
        label_column=label_column,
        pair_column=pair_column,
        score_column=score_column,
        function=function,
        direction=direction,
        seed=seed,
    )


def _fail(message: str, code: int) -> None:
    # One line, even where the message quotes user text that holds line breaks or other
    # control characters: those are shown escaped (\n, \x1e).
    message = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode() for c in message
    )
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Console entry point: user errors print one line and exit 2, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except SlimformerError as error:
        _fail(str(error), 2)
    except typer.Abort:
        sys.exit(130)
    except Exception as error:
        # typer vendors click, so its usage errors have no public class to catch; they are
        # the exceptions that carry a formatted message and an exit code.
        if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
            raise
        if not error.format_message():  # a command given without arguments: its help was shown
            sys.exit(0)
        _fail(f"{error.format_message()} (see --help)", error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
