"""The public verbs: optimize, worker, apply, benchmark, load, report. The CLI is a thin layer
over these."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimformer import assets
from slimformer.assets import resolve_path
from slimformer.checkpoint import (
    check_out_folder,
    load_gguf,
    load_model,
    natural_head,
    save_model,
    source_of,
)
from slimformer.errors import SlimformerError
from slimformer.evaluate import CandidateFailed, evaluate_isolated
from slimformer.measure import MeasureSettings
from slimformer.model import SlimModel
from slimformer.pipeline import apply_recipe, check_recipe, load_recipe, needs_training
from slimformer.recipe import Recipe
from slimformer.search.guards import resolve_guards
from slimformer.search.records import StudyResult
from slimformer.search.runner import Reporter, run_study
from slimformer.search.settings import StudySettings, parse_duration, parse_max_drop
from slimformer.tasks import Task, TaskSpec, default_task_for, make_task, reference_state

ModelRef = str | os.PathLike[str] | SlimModel


def load(path: str | os.PathLike[str], *, trust_remote_code: bool = False) -> SlimModel:
    """Load a model slimformer saved (or any supported Hugging Face checkpoint folder), or a
    `.gguf` file, served as it is by llama.cpp (its config and tokenizer read from the file)."""
    if Path(path).suffix.lower() == ".gguf":
        return load_gguf(path)
    return load_model(resolve_path(path), trust_remote_code=trust_remote_code)


def task_spec(
    task: str | TaskSpec | None,
    model: SlimModel | None = None,
    head: str | None = None,
    **options: Any,
) -> TaskSpec:
    """A TaskSpec from a task name and options; no name = the model's natural task."""
    if isinstance(task, TaskSpec):
        return task
    name = task or default_task_for(model.head if model else head or "embedding")
    return TaskSpec(name=name, **{k: v for k, v in options.items() if v is not None})


def _as_model(model: ModelRef, head: str | None = None) -> SlimModel:
    return model if isinstance(model, SlimModel) else load_model(resolve_path(model), head=head)


def apply(
    model: ModelRef,
    recipe: Recipe | str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
) -> SlimModel:
    """Replay a recipe on a model (deterministic: same calibration data, same seed)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if out is not None:
        check_out_folder(Path(out))  # before the work, which `save_model` would waste
    # Loaded with the head of the recipe's task, as the study that wrote the recipe loaded it
    # (a task the model does not fit is refused there).
    loaded = _as_model(model, head=make_task(recipe.task).head if recipe.task else None)
    spec = recipe.task or task_spec(None, loaded)
    task = make_task(spec)
    calibration, training, general = (), (), ()
    if any(_needs_calibration(s.pass_name) for s in recipe.steps):
        calibration = task.calibration_batches(loaded)
    if needs_training(recipe):
        training = task.training_batches(loaded)
        general = task.general_batches(loaded)
    result = apply_recipe(loaded, recipe, calibration, training=training, general=general)
    if out is not None:
        save_model(result, out)
    return result


def _needs_calibration(pass_name: str) -> bool:
    from slimformer.passes import get_pass

    return get_pass(pass_name).needs_calibration


@dataclass(frozen=True)
class BenchResult:
    model: str
    task: str
    metric: str
    quality: float
    details: dict[str, float]
    measurement: dict[str, Any]
    cpu: dict[str, Any] | None = None  # the machine measured on now
    # For a model a study chose: the figures it was chosen with (its metrics.json), to show
    # beside today's — on another CPU they can differ a lot.
    when_chosen: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "metric": self.metric,
            "quality": self.quality,
            "details": self.details,
            "measurement": self.measurement,
            "cpu": self.cpu,
            "when_chosen": self.when_chosen,
        }


def _when_chosen(model_dir: Path) -> dict[str, Any] | None:
    """quality, details, measurement and cpu from a study's `metrics.json`, if it has one."""
    import json

    try:
        metrics = json.loads((model_dir / "metrics.json").read_text())
        return {k: metrics[k] for k in ("quality", "details", "measurement", "cpu")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def benchmark(
    model: ModelRef,
    *,
    task: str | TaskSpec | None = None,
    batch_size: int = 32,
    seq_len: int | None = None,
    threads: int | None = None,
    data: str | None = None,
) -> BenchResult:
    """Quality, latency, throughput, memory, size, parameters and FLOPs of one model.

    Runs in a fresh child process so memory is clean. Quality is measured against the model
    this one was derived from (its `source`), or against itself for an original model.
    """
    settings = MeasureSettings(batch_size=batch_size, seq_len=seq_len, threads=threads)
    with tempfile.TemporaryDirectory(prefix="slimformer-bench-") as tmp:
        workdir = Path(tmp)
        if isinstance(model, SlimModel):
            model_dir = save_model(model, workdir / "model")
            spec = task_spec(task, model, data=data)
        else:
            model_dir = resolve_path(model)
            spec = task_spec(task, None, head=natural_head(model_dir), data=data)
        _check_seq_len(spec, seq_len)
        # The reference is loaded only when its task state is not cached yet.
        state_path = reference_state(source_of(model_dir), spec)
        try:
            result = evaluate_isolated(model_dir, spec, state_path, settings, workdir / "run")
        except CandidateFailed as error:
            raise SlimformerError(f"benchmark failed: {error}") from None
        when_chosen = None if isinstance(model, SlimModel) else _when_chosen(model_dir)
    return BenchResult(
        model=str(model if not isinstance(model, SlimModel) else model.source),
        task=spec.name,
        metric=str(result.metric),
        quality=float(result.quality),  # type: ignore[arg-type]
        details=result.details,
        measurement=result.measurement,
        cpu=result.cpu,
        when_chosen=when_chosen,
    )


def _data_checked(spec: TaskSpec) -> Task:
    """The task of `spec` with its data read, so a bad file fails before a study starts."""
    task = make_task(spec)
    task.check_data()
    return task


def _check_seq_len(spec: TaskSpec, seq_len: int | None) -> None:
    if seq_len is not None and not make_task(spec).takes_seq_len:
        raise SlimformerError(
            f"--seq-len cuts text inputs; the {spec.name} task's inputs keep the model's size"
        )


def optimize(
    model: str | os.PathLike[str],
    *,
    task: str | TaskSpec | None = None,
    max_drop: str | float = "1%",
    trials: int | None = 12,
    time_budget: str | float | None = None,
    objective: str = "latency",
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    passes: list[str] | tuple[str, ...] | None = None,
    batch_size: int = 32,
    seq_len: int | None = None,
    threads: int | None = None,
    data: str | None = None,
    seed: int = 0,
    starts: list[str | os.PathLike[str] | Recipe] | None = None,
    reporter: Reporter | None = None,
    confirm_rounds: int = 3,
    allow_other_cpu: bool = False,
    guards: list[str] | tuple[str, ...] = (),
    default_guards: bool = True,
    warm_start: bool = True,
    early_stop: bool = True,
    reuse_trained: bool = True,
    local_search: bool = True,
    storage: str | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> StudyResult:
    """Search passes jointly, measure every candidate, return the Pareto front and the choice.

    `starts`: recipes (or recipe files) the study tries first, before its sampler explores.
    `passes`: pass names, or `pass:setting=value` to offer a setting this CPU would not
    profit from. `confirm_rounds`: fresh-process timings at the end, rotating: of the
    close candidates for the choice (the run-off), then of baseline and chosen (0 = off).
    `allow_other_cpu`: resume a run measured on another machine, measuring its trials again
    here. `guards`: conditions on the task's figures a chosen model
    must meet beside `max_drop` (e.g. "cosine_fidelity>=0.95"); the task's own default guards
    are added unless `default_guards` is false (a guard of yours on the same figure replaces
    the default one). `warm_start`: measure each engine's int8 alone first (search/portfolio.py),
    so that a short study never ends behind a one-line recipe. `early_stop`: multi-fidelity
    trials — a candidate a subset of the scored split shows over budget with confidence stops
    there (pruned, not timed), and so does a distillation the pruner finds falling behind;
    false: every candidate is timed and scored in full (kept by --resume). `reuse_trained`:
    keep each recipe's model as it stood after its training passes, and build later trials
    that start with the same steps from it (trained_prefix.py). `local_search`:
    every other trial tries a one-edit neighbour of the best recipes so far (one step more
    pruning of the best within budget, longer distillation of a faster one over it:
    search/neighbours.py) instead of the sampler's proposal.

    `storage`: the study's Optuna storage URL — default SQLite in the run folder;
    `postgresql://USER@HOST/DB`, or `journal:///PATH` (a file on a filesystem every worker
    shares) — that `worker()` on other machines joins. `workers`: run the trials in that many
    worker processes on this machine, each on its own cores (`threads` each; default: the
    cores shared out). `ray_address`: run workers as Ray tasks on that cluster, each reserving
    `threads` CPUs (`workers` of them; default as many as the cluster holds).
    """
    if workers is not None and ray_address is None:
        from slimformer.search.distributed import check_workers

        threads = threads or max(1, len(os.sched_getaffinity(0)) // max(1, workers))
        check_workers(workers, threads)
    if isinstance(model, SlimModel):
        raise SlimformerError("optimize takes a checkpoint folder or alias, not a loaded model")
    path = resolve_path(model)
    spec = task_spec(task, None, head=natural_head(path), data=data, seed=seed)
    name = str(model)
    budget = parse_max_drop(max_drop)
    _check_seq_len(spec, seq_len)
    checked = _data_checked(spec)
    defaults = checked.default_guards(budget) if default_guards else ()
    settings = StudySettings(
        model=name if assets.resolve_model_name(name) else str(path.resolve()),
        task=spec,
        max_drop=budget,
        guards=resolve_guards(guards, defaults),
        objective=objective,
        trials=trials if time_budget is None or trials is not None else None,
        time_budget_s=parse_duration(time_budget) if isinstance(time_budget, str) else time_budget,
        passes=tuple(passes or ()),
        seed=seed,
        measure=MeasureSettings(batch_size=batch_size, seq_len=seq_len, threads=threads),
        confirm_rounds=confirm_rounds,
        starts=tuple(_checked_start(start).to_dict() for start in starts or ()),
        warm_start=warm_start,
        early_stop=early_stop,
        reuse_trained=reuse_trained,
        local_search=local_search,
    )
    out_dir = Path(out) if out else Path("runs") / Path(name).name
    # Here: rendering loads rich, plotly and jinja2, which only a study needs.
    from slimformer.card import write_card
    from slimformer.report_html import write_report

    return run_study(
        settings,
        out_dir,
        resume=resume,
        overwrite=overwrite,
        reporter=reporter,
        allow_other_cpu=allow_other_cpu,
        write_card=write_card,
        write_report=write_report,
        storage=storage,
        workers=workers,
        ray_address=ray_address,
    )


def worker(
    study: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    reporter: Reporter | None = None,
) -> int:
    """Join a running study from this process (on this machine or another) and run its
    trials until the study's trial or time budget is spent; returns how many it ran.

    `study`: a run folder of `optimize` (this machine, or a shared filesystem) or the study's
    storage URL. `out`: this worker's folder for its candidates and logs (default: the run
    folder, or runs/worker-HOST for a URL)."""
    from slimformer.report_html import write_report
    from slimformer.search.runner import run_worker

    return run_worker(study, Path(out) if out else None, reporter, write_report=write_report)


def report(run: str | os.PathLike[str]) -> Path:
    """Write (or refresh) a run folder's report.html, a self-contained page with its Pareto
    front, every trial and the machines it was measured on; returns the page's path."""
    from slimformer.report_html import write_report

    return write_report(Path(run))


def _checked_start(start: str | os.PathLike[str] | Recipe) -> Recipe:
    """A start recipe, refused before the study begins if it cannot run (a file is checked
    as it is read)."""
    if isinstance(start, Recipe):
        check_recipe(start)
        return start
    return load_recipe(start)
