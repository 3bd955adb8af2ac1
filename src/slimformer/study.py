"""The search: Optuna, multi-objective (quality and one cost), resumable, every trial measured.

Trial 0 is always the untouched baseline. Every other trial samples a recipe from the
registered passes' config spaces, applies it, saves the candidate, and evaluates it in a child
process. The chosen model is the cheapest trial (by the objective) whose quality drop is within
`max_drop`; if no optimized candidate meets it we say so and save the best-quality one.

Everything lives in the run folder: `study.db` (Optuna's SQLite storage, the source of truth),
`run.json` (settings), `trials.jsonl` and `pareto.json` (rewritten after every trial),
`candidates/` (the current Pareto front's models) and `best/`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimformer.checkpoint import load_model, replace_dir, resolve_path, save_model
from slimformer.errors import SlimformerError
from slimformer.evaluate import CandidateFailed, evaluate_isolated
from slimformer.files import write_atomic
from slimformer.measure import MeasureSettings
from slimformer.model import SlimModel
from slimformer.passes import Choice, FloatRange, IntRange, Pass, get_pass, registered_passes
from slimformer.recipe import Recipe, Step, apply_recipe
from slimformer.tasks import TaskSpec, make_task, quality_drop, reference_state

# objective name -> (measurement field, direction)
OBJECTIVES = {
    "latency": ("latency_ms_median", "minimize"),
    "throughput": ("throughput_per_s", "maximize"),
    "memory": ("peak_memory_mb", "minimize"),
}
STUDY_NAME = "slimformer"
MAX_REPEATS = 25  # proposals in a row that repeat measured recipes before we stop


def parse_max_drop(text: str | float) -> float:
    """'1%' -> 0.01. For fraction scores (accuracy) that is one percentage point; for other
    scores (perplexity, custom) it is 1% relative to the baseline."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise SlimformerError(f"--max-drop must look like 1% or 0.01, got '{text}'") from None
    if not math.isfinite(value) or value < 0:
        raise SlimformerError(f"--max-drop must be a finite, non-negative amount, got '{text}'")
    return value


def parse_duration(text: str | None) -> float | None:
    """'90s', '10m', '1.5h' or plain seconds -> seconds."""
    if text is None:
        return None
    raw = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(raw[-1:])
    try:
        seconds = float(raw[:-1]) * scale if scale else float(raw)
    except ValueError:
        raise SlimformerError(
            f"--time-budget must look like 10m, 90s or 1h, got '{text}'"
        ) from None
    if seconds <= 0:
        raise SlimformerError("--time-budget must be positive")
    return seconds


@dataclass(frozen=True)
class StudySettings:
    model: str
    task: TaskSpec
    max_drop: float = 0.01
    objective: str = "latency"
    trials: int | None = 12
    time_budget_s: float | None = None
    passes: tuple[str, ...] = ()  # empty = every registered pass
    seed: int = 0
    # Recipes (as dicts) tried first, before the sampler explores: known-good starting points.
    starts: tuple[dict[str, Any], ...] = ()
    measure: MeasureSettings = field(default_factory=MeasureSettings)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise SlimformerError(
                f"unknown objective '{self.objective}'; choose one of: {', '.join(OBJECTIVES)}"
            )
        if self.trials is not None and self.trials < 1:
            raise SlimformerError("--trials must be at least 1")
        if self.trials is None and self.time_budget_s is None:
            raise SlimformerError("give --trials N or --time-budget (e.g. 10m)")
        for name in self.passes:
            missing = [r for r in get_pass(name).requires if r not in self.passes]
            if missing:
                raise SlimformerError(
                    f"--passes: {name} needs {', '.join(missing)}; add it to the list"
                )

    def pass_classes(self) -> list[type[Pass]]:
        if not self.passes:
            return [p for p in registered_passes() if p.searched_by_default]
        return sorted((get_pass(n) for n in self.passes), key=lambda c: (c.stage, c.name))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task"] = self.task.to_dict()
        data["passes"] = list(self.passes)
        data["starts"] = list(self.starts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySettings:
        data = dict(data)
        data["task"] = TaskSpec.from_dict(data["task"])
        data["passes"] = tuple(data.get("passes") or ())
        data["starts"] = tuple(data.get("starts") or ())
        data["measure"] = MeasureSettings(**data.get("measure") or {})
        return cls(**data)


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str  # complete | failed | interrupted
    description: str
    recipe: dict[str, Any] | None = None
    quality: float | None = None
    drop: float | None = None
    feasible: bool | None = None
    details: dict[str, float] = field(default_factory=dict)
    measurement: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    duration_s: float | None = None
    duplicate_of: int | None = None

    @property
    def is_baseline(self) -> bool:
        return self.description == "baseline"

    @property
    def counts(self) -> bool:
        """Whether it used a slot of the trial budget (repeats and interrupted runs don't)."""
        return (self.state == "complete" and self.duplicate_of is None) or self.state == "failed"

    def cost(self, objective: str) -> float | None:
        return self.measurement.get(OBJECTIVES[objective][0])


@dataclass(frozen=True)
class StudyResult:
    out: Path
    settings: StudySettings
    trials: list[TrialRecord]
    pareto: list[int]
    chosen: TrialRecord | None
    met_budget: bool
    best_dir: Path | None

    @property
    def baseline(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.is_baseline and t.state == "complete"), None)


class Reporter(Protocol):
    def study_started(self, settings: StudySettings, total: int | None, done: int) -> None: ...
    def trial_started(self, number: int, description: str) -> None: ...
    def stage(self, name: str) -> None: ...
    def trial_finished(self, record: TrialRecord) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    def study_started(self, settings: StudySettings, total: int | None, done: int) -> None: ...
    def trial_started(self, number: int, description: str) -> None: ...
    def stage(self, name: str) -> None: ...
    def trial_finished(self, record: TrialRecord) -> None: ...
    def message(self, text: str) -> None: ...


# --- search space -------------------------------------------------------------------------
def sample_recipe(
    trial: optuna.Trial, pass_classes: Sequence[type[Pass]], facts: Any, spec: TaskSpec, seed: int
) -> Recipe:
    steps = []
    groups: dict[str, list[str]] = {}
    for cls in pass_classes:
        if cls.group:
            groups.setdefault(cls.group, []).append(cls.name)
    picked = {trial.suggest_categorical(group, ["none", *names]) for group, names in groups.items()}
    # Passes that cannot precede the picked runtime (PyTorch int8 before an ONNX export) are
    # not offered with it.
    excluded = {
        name
        for cls in pass_classes
        if cls.name in picked
        for name in cls.conflicts
        if ":" not in name
    }
    # Passes that need another (e.g. smoothing needs static int8) are offered only after it
    # was chosen, so no trial is spent on a recipe that cannot run.
    for cls in sorted(pass_classes, key=lambda c: bool(c.requires)):
        chosen = {step.pass_name for step in steps}
        if not set(cls.requires) <= chosen or cls.name in excluded:
            continue
        if cls.group:
            if cls.name not in picked:
                continue
        elif not trial.suggest_categorical(f"use {cls.name}", [False, True]):
            continue
        values: dict[str, Any] = {}
        for name, space in cls.search_space().items():
            key = f"{cls.name}.{name}"
            if isinstance(space, Choice):
                values[name] = trial.suggest_categorical(key, list(space.options))
            elif isinstance(space, IntRange):
                low, high = space.resolve(facts)
                values[name] = trial.suggest_int(key, low, high)
            elif isinstance(space, FloatRange):
                value = trial.suggest_float(key, space.low, space.high, step=space.step)
                values[name] = round(value, 6)  # 0.9, not 0.9000000000000001, in recipes
        full = asdict(cls.make_config(values))
        steps.append(Step(cls.name, {k: v for k, v in full.items() if k in values}))
    steps.sort(key=lambda step: get_pass(step.pass_name).stage)
    return Recipe(steps=tuple(steps), task=spec, seed=seed)


def baseline_params(pass_classes: Sequence[type[Pass]]) -> dict[str, Any]:
    """Every pass off (passes that need another are not even offered then)."""
    params: dict[str, Any] = {
        f"use {cls.name}": False for cls in pass_classes if not cls.requires and not cls.group
    }
    return params | {cls.group: "none" for cls in pass_classes if cls.group}


def recipe_params(recipe: Recipe, pass_classes: Sequence[type[Pass]]) -> dict[str, Any]:
    """The sampler's parameters that make `sample_recipe` propose `recipe`. Settings outside
    the searched options (e.g. 250 distillation steps) are left for the sampler to pick."""
    offered = {cls.name: cls for cls in pass_classes}
    unknown = [s.pass_name for s in recipe.steps if s.pass_name not in offered]
    if unknown:
        raise SlimformerError(
            f"--start recipe uses {', '.join(unknown)}, which the study does not search; add "
            "them to --passes"
        )
    used = {step.pass_name: step for step in recipe.steps}
    params = baseline_params(pass_classes)
    for cls in pass_classes:
        if cls.name not in used:
            continue
        params[cls.group or f"use {cls.name}"] = cls.name if cls.group else True
        config = asdict(cls.make_config(used[cls.name].config))
        for name, space in cls.search_space().items():
            value = config[name]
            if isinstance(space, Choice) and value not in space.options:
                continue
            params[f"{cls.name}.{name}"] = value
    return params


# --- the study ----------------------------------------------------------------------------
class Study:
    def __init__(self, settings: StudySettings, out: Path, reporter: Reporter):
        self.settings = settings
        self.out = out
        self.reporter = reporter
        self.task = make_task(settings.task)
        self.metric_key, self.cost_direction = OBJECTIVES[settings.objective]

    # --- set-up -------------------------------------------------------------------------
    def prepare(self) -> None:
        self.reporter.message(f"loading {self.settings.model}")
        self.base: SlimModel = load_model(self.settings.model, head=self.task.head)
        self.task.check_model(self.base)
        self.reporter.message(f"preparing the {self.task.name} task on the original model")
        # The reference arrays come from the shared cache; the run keeps its own copy so it
        # stays self-contained (and resumable) if the cache is cleared.
        self.state_path = self.out / "task_state.safetensors"
        if not self.state_path.is_file():
            cached = reference_state(resolve_path(self.settings.model), self.task.spec, self.base)
            shutil.copyfile(cached, self.state_path)
        self.calibration = self.task.calibration_batches(self.base)
        self.pass_classes = [c for c in self.settings.pass_classes() if c.applies_to(self.base)]
        trains = any(cls.name == "recover.distill" for cls in self.pass_classes)
        self.training = self.task.training_batches(self.base) if trains else []
        self.facts = self.base.adapter.facts()

    def open_study(self) -> optuna.Study:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(f"sqlite:///{self.out / 'study.db'}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=self.settings.seed, n_startup_trials=6, multivariate=True, group=True
            )
        study = optuna.create_study(
            study_name=STUDY_NAME,
            storage=storage,
            sampler=sampler,
            directions=[self.task.direction, self.cost_direction],
            load_if_exists=True,
        )
        self._requeue_interrupted(study)
        if not study.trials:
            study.enqueue_trial(baseline_params(self.pass_classes))
            for start in self.settings.starts:
                recipe = Recipe.from_dict(start)
                study.enqueue_trial(recipe_params(recipe, self.pass_classes), skip_if_exists=True)
        return study

    def _requeue_interrupted(self, study: optuna.Study) -> None:
        """Trials cut off by a crash or Ctrl-C run again; finished ones are kept as they are."""
        requeued = set(study.user_attrs.get("requeued", []))
        for trial in study.trials:
            if trial.state == TrialState.RUNNING:  # its process died mid-trial
                study.tell(trial.number, state=TrialState.FAIL)
            interrupted = trial.state in (TrialState.RUNNING, TrialState.FAIL) and (
                "error" not in trial.user_attrs
            )
            if interrupted and trial.number not in requeued:
                requeued.add(trial.number)
                study.enqueue_trial(trial.params, skip_if_exists=False)
        study.set_user_attr("requeued", sorted(requeued))

    # --- one trial ----------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        started = time.monotonic()
        recipe = sample_recipe(
            trial, self.pass_classes, self.facts, self.settings.task, self.settings.seed
        )
        description = recipe.describe()
        trial.set_user_attr("description", description)
        trial.set_user_attr("recipe", recipe.to_dict())
        earlier = self._completed_with(trial.study, description)
        if earlier is not None:  # the sampler proposed a recipe already measured: reuse it
            for key in ("quality", "drop", "feasible", "details", "measurement"):
                trial.set_user_attr(key, earlier.user_attrs[key])
            trial.set_constraint("max_drop", earlier.user_attrs["drop"] - self.settings.max_drop)
            trial.set_user_attr("duplicate_of", earlier.number)
            return tuple(earlier.values)  # type: ignore[return-value]
        self.reporter.trial_started(trial.number, description)
        baseline = self._baseline(trial.study)
        if baseline is None and recipe.steps:
            raise SlimformerError("the baseline trial has not finished; rerun with --resume")
        candidate_dir = self.out / "candidates" / f"trial-{trial.number:03d}"
        try:
            self.reporter.stage("applying passes")
            candidate = apply_recipe(
                self.base, recipe, self.calibration, self.reporter.stage, self.training
            )
            self.reporter.stage("saving")
            save_model(candidate, candidate_dir)
            result = evaluate_isolated(
                candidate_dir,
                self.settings.task,
                self.state_path,
                self.settings.measure,
                self.out / "logs" / f"trial-{trial.number:03d}",
                on_stage=self.reporter.stage,
            )
        except (SlimformerError, CandidateFailed, RuntimeError, ValueError) as error:
            shutil.rmtree(candidate_dir, ignore_errors=True)
            if not recipe.steps:
                raise SlimformerError(f"the baseline could not be evaluated: {error}") from None
            trial.set_user_attr("error", str(error)[:300])
            trial.set_user_attr("duration_s", round(time.monotonic() - started, 1))
            raise CandidateFailed(str(error)) from None
        trial.set_user_attr("recipe", candidate.recipe.to_dict())  # with resolved decisions
        quality = result["quality"]
        reference = quality if baseline is None else baseline.user_attrs["quality"]
        drop = quality_drop(reference, quality, result["direction"], result["bounded"])
        cost = result["measurement"][self.metric_key]
        trial.set_user_attr("quality", quality)
        trial.set_user_attr("drop", drop)
        trial.set_user_attr("feasible", drop <= self.settings.max_drop + 1e-12)
        trial.set_constraint("max_drop", drop - self.settings.max_drop)
        trial.set_user_attr("details", result["details"])
        trial.set_user_attr("measurement", result["measurement"])
        trial.set_user_attr("duration_s", round(time.monotonic() - started, 1))
        return quality, cost

    def run_trials(self, study: optuna.Study, remaining: int | None) -> None:
        """Ask, evaluate, tell — until the trial budget or the time budget is spent.

        A proposal that repeats a measured recipe is told the earlier result at no cost and
        does not count against the budget; a long run of repeats means the space is exhausted.
        """
        deadline = (
            time.monotonic() + self.settings.time_budget_s if self.settings.time_budget_s else None
        )
        done = repeats = 0
        while remaining is None or done < remaining:
            if deadline is not None and time.monotonic() >= deadline:
                break
            trial = study.ask()
            try:
                values = self.objective(trial)
            except CandidateFailed:
                frozen = study.tell(trial, state=TrialState.FAIL)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)  # interrupted: rerun on --resume
                raise
            else:
                frozen = study.tell(trial, values)
                if "duplicate_of" in frozen.user_attrs:
                    repeats += 1
                    if repeats >= MAX_REPEATS:
                        self.reporter.message("every recipe in the search space was measured")
                        break
                    continue
            repeats = 0
            done += 1
            self.after_trial(study, frozen)

    @staticmethod
    def _completed_with(study: optuna.Study, description: str) -> FrozenTrial | None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if trial.user_attrs.get("description") == description:
                return trial
        return None

    @staticmethod
    def _baseline(study: optuna.Study) -> FrozenTrial | None:
        return Study._completed_with(study, "baseline")

    # --- after each trial ---------------------------------------------------------------
    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        records = self.records(study)
        record = next(r for r in records if r.number == trial.number)
        front = pareto_front(records, self.task.direction, self.settings.objective)
        self._write_outputs(records, front)
        for path in (self.out / "candidates").glob("trial-*"):
            number = int(path.name.split("-")[1])
            keep = number in front and not _record(records, number).is_baseline
            if not keep:
                shutil.rmtree(path, ignore_errors=True)
        self.reporter.trial_finished(record)

    def records(self, study: optuna.Study) -> list[TrialRecord]:
        return [to_record(t) for t in study.get_trials(deepcopy=False)]

    def _write_outputs(self, records: list[TrialRecord], front: list[int]) -> None:
        lines = [json.dumps(asdict(r)) for r in records if r.counts]
        write_atomic(self.out / "trials.jsonl", "\n".join(lines) + "\n")
        pareto = {
            "objective": self.settings.objective,
            "metric": self.task.metric,
            "max_drop": self.settings.max_drop,
            "front": [asdict(_record(records, n)) for n in front],
        }
        write_atomic(self.out / "pareto.json", json.dumps(pareto, indent=2))

    # --- the end ------------------------------------------------------------------------
    def finish(self, study: optuna.Study) -> StudyResult:
        records = self.records(study)
        front = pareto_front(records, self.task.direction, self.settings.objective)
        self._write_outputs(records, front)
        chosen, met = choose(records, front, self.task.direction, self.settings.objective)
        best_dir = None
        if chosen is not None:
            best_dir = self._save_best(chosen, records, met)
        return StudyResult(self.out, self.settings, records, front, chosen, met, best_dir)

    def _save_best(self, chosen: TrialRecord, records: list[TrialRecord], met: bool) -> Path:
        from slimformer.report import model_card

        baseline = next(r for r in records if r.is_baseline and r.state == "complete")
        candidate_dir = self.out / "candidates" / f"trial-{chosen.number:03d}"
        best_dir = self.out / "best"
        metrics = {
            "trial": chosen.number,
            "met_max_drop": met,
            "max_drop": self.settings.max_drop,
            "objective": self.settings.objective,
            "metric": self.task.metric,
            "quality": chosen.quality,
            "drop": chosen.drop,
            "details": chosen.details,
            "measurement": chosen.measurement,
            "baseline": {
                "quality": baseline.quality,
                "details": baseline.details,
                "measurement": baseline.measurement,
            },
        }
        tmp = self.out / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if candidate_dir.is_dir():
            shutil.copytree(candidate_dir, tmp)
        else:  # the baseline, or a candidate folder lost to a crash: rebuild by replaying
            recipe = Recipe.from_dict(chosen.recipe) if chosen.recipe else Recipe()
            model = apply_recipe(self.base, recipe, self.calibration, training=self.training)
            save_model(model, tmp)
        saved = json.loads((tmp / "slimformer.json").read_text())
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        card = model_card(chosen, baseline, self.settings, self.task.metric, met, saved)
        (tmp / "README.md").write_text(card)
        replace_dir(tmp, best_dir)
        return best_dir


def _record(records: list[TrialRecord], number: int) -> TrialRecord:
    return next(r for r in records if r.number == number)


def to_record(trial: FrozenTrial) -> TrialRecord:
    attrs = trial.user_attrs
    if trial.state == TrialState.COMPLETE:
        state = "complete"
    elif trial.state == TrialState.RUNNING:
        state = "running"
    elif "error" in attrs:
        state = "failed"
    else:
        state = "interrupted"
    return TrialRecord(
        number=trial.number,
        state=state,
        description=attrs.get("description", "?"),
        recipe=attrs.get("recipe"),
        quality=attrs.get("quality"),
        drop=attrs.get("drop"),
        feasible=attrs.get("feasible"),
        details=attrs.get("details", {}),
        measurement=attrs.get("measurement", {}),
        error=attrs.get("error"),
        duration_s=attrs.get("duration_s"),
        duplicate_of=attrs.get("duplicate_of"),
    )


def pareto_front(records: list[TrialRecord], direction: str, objective: str) -> list[int]:
    """Trial numbers not dominated in (quality, cost); duplicates of earlier trials left out."""
    sign_q = 1 if direction == "maximize" else -1
    sign_c = 1 if OBJECTIVES[objective][1] == "maximize" else -1
    points = [
        (r.number, sign_q * r.quality, sign_c * r.cost(objective))
        for r in records
        if r.state == "complete" and r.duplicate_of is None and r.quality is not None
    ]
    front = []
    for number, q, c in points:
        dominated = any(
            (q2 >= q and c2 >= c) and (q2 > q or c2 > c) for n2, q2, c2 in points if n2 != number
        )
        if not dominated:
            front.append(number)
    return sorted(front)


def choose(
    records: list[TrialRecord], front: list[int], direction: str, objective: str
) -> tuple[TrialRecord | None, bool]:
    """The cheapest trial within the budget; else the best-quality optimized frontier point."""
    sign_c = -1 if OBJECTIVES[objective][1] == "maximize" else 1
    complete = [r for r in records if r.state == "complete" and r.duplicate_of is None]
    baseline = next((r for r in complete if r.is_baseline), None)
    if baseline is None:
        return None, False
    feasible = [r for r in complete if r.feasible]
    best = min(feasible, key=lambda r: (sign_c * r.cost(objective), r.drop, r.number))
    if not best.is_baseline:
        return best, True
    optimized = [_record(records, n) for n in front if not _record(records, n).is_baseline]
    if not optimized:
        return baseline, False
    sign_q = -1 if direction == "maximize" else 1
    return min(optimized, key=lambda r: (sign_q * r.quality, r.number)), False


# --- entry point ----------------------------------------------------------------------------
def run_study(
    settings: StudySettings,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
) -> StudyResult:
    reporter = reporter or SilentReporter()
    out = Path(out)
    settings = _open_run_folder(settings, out, resume, overwrite)
    new_folder = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    study_runner = Study(settings, out, reporter)
    try:
        study_runner.prepare()  # bad data or a wrong model fails here, before any run exists
    except BaseException:
        if new_folder:
            shutil.rmtree(out, ignore_errors=True)
        raise
    write_atomic(out / "run.json", json.dumps(settings.to_dict(), indent=2))
    study = study_runner.open_study()
    counted = [t for t in map(to_record, study.trials) if t.counts]
    remaining = None if settings.trials is None else max(0, settings.trials - len(counted))
    reporter.study_started(settings, settings.trials, len(counted))
    study_runner.run_trials(study, remaining)
    return study_runner.finish(study)


def _open_run_folder(
    settings: StudySettings, out: Path, resume: bool, overwrite: bool
) -> StudySettings:
    run_file = out / "run.json"
    if run_file.is_file():
        if resume:
            saved = _read_settings(run_file)
            if Path(saved.model) != Path(settings.model) and saved.model != settings.model:
                raise SlimformerError(
                    f"{out} is a run on {saved.model}, not {settings.model}; "
                    "resume it with the same model or choose another --out"
                )
            # The budget may grow on resume; what was searched stays as it was.
            settings = replace(saved, trials=settings.trials, time_budget_s=settings.time_budget_s)
        elif overwrite:
            shutil.rmtree(out)
        else:
            raise SlimformerError(
                f"{out} already holds a run; continue it with --resume, or start over with "
                "--overwrite, or choose another --out"
            )
    elif resume:
        raise SlimformerError(f"nothing to resume: {out} holds no run")
    return settings


def _read_settings(run_file: Path) -> StudySettings:
    try:
        return StudySettings.from_dict(json.loads(run_file.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise SlimformerError(
            f"{run_file} is damaged ({type(error).__name__}: {error}); start over with "
            "--overwrite or choose another --out"
        ) from None


def read_run(out: Path) -> tuple[StudySettings, list[TrialRecord]]:
    """A finished or interrupted run's settings and trials, from its folder alone."""
    run_file = out / "run.json"
    if not run_file.is_file():
        raise SlimformerError(f"{out} is not a slimformer run folder (no run.json)")
    settings = _read_settings(run_file)
    trials_file = out / "trials.jsonl"
    records = []
    if trials_file.is_file():
        for line in trials_file.read_text().splitlines():
            if line.strip():
                records.append(TrialRecord(**json.loads(line)))
    return settings, records
