"""The search: Optuna, multi-objective (quality and one cost), resumable, every trial measured.

Trial 0 is always the untouched baseline. Every other trial samples a recipe from the
registered passes' config spaces, applies it, saves the candidate, and evaluates it in a child
process. The chosen model is the cheapest trial (by the objective) whose quality drop is within
`max_drop`; if no optimized candidate meets it we say so and save the best-quality one.

Everything lives in the run folder: `study.db` (Optuna's SQLite storage, the source of truth),
`run.json` (settings and the CPU), `trials.jsonl` and `pareto.json` (rewritten after every
trial), `candidates/` (the current Pareto front's models) and `best/`. One process at a time
holds the folder (`runlock.py`).

Timings are facts about one machine: every trial records the CPU fingerprint it was measured
on, and only trials measured on this machine take part in the front, the choice and the
reuse of repeated recipes. The search also follows the CPU: settings that only pay off with
a capability this CPU lacks (bf16 math, VNNI int8) are not offered unless the user names
them. When the study ends, the baseline and the chosen model are timed again in alternating
fresh processes (`confirm.py`), and those ratios are the ones printed and saved.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimformer.assets import resolve_path
from slimformer.checkpoint import load_model, replace_dir, save_model
from slimformer.confirm import confirm_ratios
from slimformer.cpu import CpuFingerprint, fingerprint
from slimformer.errors import SlimformerError
from slimformer.evaluate import CandidateFailed, evaluate_isolated
from slimformer.files import write_atomic
from slimformer.measure import MeasureSettings
from slimformer.model import SlimModel
from slimformer.passes import Choice, FloatRange, IntRange, Pass, get_pass, registered_passes
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step
from slimformer.runlock import RunLock, clear_folder
from slimformer.tasks import TaskSpec, make_task, quality_drop, reference_state

# objective name -> (measurement field, direction)
OBJECTIVES = {
    "latency": ("latency_ms_median", "minimize"),
    "throughput": ("throughput_per_s", "maximize"),
    "memory": ("peak_memory_mb", "minimize"),
}
STUDY_NAME = "slimformer"
MAX_REPEATS = 25  # proposals in a row that repeat measured recipes before we stop

# (setting, value) pairs of a pass the study does not offer on this CPU, by pass name.
Withheld = Mapping[str, Collection[tuple[str, str]]]


def split_pass_names(entries: Sequence[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """`--passes` entries are pass names, or `pass:setting=value` to search that pass and
    offer that setting even where this CPU would not profit from it (bf16 without bf16
    instructions, say). Returns the pass names and the requested `pass:setting=value`s."""
    names: list[str] = []
    requested = set()
    for entry in entries:
        name, colon, setting = entry.partition(":")
        if colon:
            if "=" not in setting:
                raise SlimformerError(
                    f"--passes: '{entry}' must look like pass:setting=value, e.g. "
                    "runtime.openvino:precision=bf16"
                )
            key, _, value = setting.partition("=")
            get_pass(name).make_config({key: _typed(get_pass(name), key, value)})
            requested.add(f"{name}:{key}={value}")
        if name not in names:
            names.append(name)
    return tuple(names), frozenset(requested)


def _typed(cls: type[Pass], key: str, text: str) -> Any:
    """A `--passes pass:setting=value` value as the setting's own type, for validation."""
    space = cls.search_space().get(key)
    for option in space.options if isinstance(space, Choice) else ():
        if str(option) == text:
            return option
    return text


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
    # Alternating fresh-process timings of baseline and chosen model when the study ends.
    confirm_rounds: int = 3

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise SlimformerError(
                f"unknown objective '{self.objective}'; choose one of: {', '.join(OBJECTIVES)}"
            )
        if self.trials is not None and self.trials < 1:
            raise SlimformerError("--trials must be at least 1")
        if self.trials is None and self.time_budget_s is None:
            raise SlimformerError("give --trials N or --time-budget (e.g. 10m)")
        if self.confirm_rounds < 0:
            raise SlimformerError("--confirm-rounds must be 0 (off) or more")
        names, _ = split_pass_names(self.passes)
        for name in names:
            missing = [r for r in get_pass(name).requires if r not in names]
            if missing:
                raise SlimformerError(
                    f"--passes: {name} needs {', '.join(missing)}; add it to the list"
                )

    def pass_classes(self) -> list[type[Pass]]:
        names, _ = split_pass_names(self.passes)
        if not names:
            return [p for p in registered_passes() if p.searched_by_default]
        return sorted((get_pass(n) for n in names), key=lambda c: (c.stage, c.name))

    def requested_settings(self) -> frozenset[str]:
        """`pass:setting=value`s the user asked for by name: in --passes, or set explicitly
        by a --start recipe (its settings are the user's own choice)."""
        _, requested = split_pass_names(self.passes)
        from_starts = {
            f"{step['pass']}:{key}={value}"
            for start in self.starts
            for step in start.get("steps") or ()
            for key, value in (step.get("config") or {}).items()
        }
        return requested | from_starts

    def withheld(self, cpu: CpuFingerprint) -> tuple[dict[str, set[tuple[str, str]]], list[str]]:
        """What the study does not offer on `cpu` (by pass: (setting, value) pairs; a pass
        withheld whole is left out of `pass_classes` by the caller through the "" key), and
        one note per setting kept only because the user named it."""
        named, _ = split_pass_names(self.passes)
        requested = self.requested_settings()
        withheld: dict[str, set[tuple[str, str]]] = {}
        notes = []
        for cls in self.pass_classes():
            for setting, capability in cls.without_payoff(cpu).items():
                asked = (
                    (cls.name in named) if setting == "" else (f"{cls.name}:{setting}" in requested)
                )
                label = cls.name if setting == "" else f"{cls.name}:{setting}"
                if asked:
                    notes.append(
                        f"{label} is searched as asked, though this CPU lacks {capability} "
                        "and it is unlikely to pay off here"
                    )
                else:
                    key, _, value = setting.partition("=")
                    withheld.setdefault(cls.name, set()).add((key, value))
        return withheld, notes

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["task"] = self.task.to_dict()
        data["passes"] = list(self.passes)
        data["starts"] = list(self.starts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySettings:
        """From `run.json`, which also holds facts about the run (its CPU) beside them."""
        own = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in own}
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
    cpu: dict[str, Any] | None = None  # the fingerprint of the machine that measured it
    # Measured on another machine than the study's current one: kept as history, but its
    # timings take no part in the front or the choice (a resumed study measures it again).
    stale: bool = False

    @property
    def is_baseline(self) -> bool:
        return self.description == "baseline"

    @property
    def counts(self) -> bool:
        """Whether it used a slot of the trial budget (repeats and interrupted runs don't)."""
        return (self.state == "complete" and self.duplicate_of is None) or self.state == "failed"

    @property
    def comparable(self) -> bool:
        """A finished, first-of-its-recipe measurement from this machine."""
        return (
            self.state == "complete"
            and self.duplicate_of is None
            and self.quality is not None
            and not self.stale
        )

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
    # Baseline vs chosen timed again in alternating fresh processes (confirm.py); None when
    # switched off or when the baseline itself was chosen.
    confirmed: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()

    @property
    def baseline(self) -> TrialRecord | None:
        return next((t for t in self.trials if t.is_baseline and t.comparable), None)


class Reporter(Protocol):
    def study_started(self, settings: StudySettings, total: int | None, done: int) -> None: ...
    def trial_started(self, number: int, description: str) -> None: ...
    def stage(self, name: str) -> None: ...
    def trial_finished(self, record: TrialRecord) -> None: ...
    def message(self, text: str) -> None: ...
    def note(self, text: str) -> None: ...


class SilentReporter:
    def study_started(self, settings: StudySettings, total: int | None, done: int) -> None: ...
    def trial_started(self, number: int, description: str) -> None: ...
    def stage(self, name: str) -> None: ...
    def trial_finished(self, record: TrialRecord) -> None: ...
    def message(self, text: str) -> None: ...
    def note(self, text: str) -> None: ...


# --- search space -------------------------------------------------------------------------
def sample_recipe(
    trial: optuna.Trial,
    pass_classes: Sequence[type[Pass]],
    facts: Any,
    spec: TaskSpec,
    seed: int,
    withheld: Withheld | None = None,
) -> Recipe:
    """One recipe from the passes' spaces; `withheld` settings (this CPU would not profit
    from them) are left out of their options."""
    withheld = withheld or {}
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
                left_out = {v for setting, v in withheld.get(cls.name, ()) if setting == name}
                options = [o for o in space.options if str(o) not in left_out] or [space.options[0]]
                values[name] = trial.suggest_categorical(key, options)
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
    def __init__(
        self,
        settings: StudySettings,
        out: Path,
        reporter: Reporter,
        withheld: dict[str, set[tuple[str, str]]] | None = None,
    ):
        """`withheld`: the search space's CPU-dependent gaps as first decided for this run
        (a resumed study keeps them: Optuna's spaces cannot change within a study)."""
        self.settings = settings
        self.out = out
        self.reporter = reporter
        self.task = make_task(settings.task)
        self.metric_key, self.cost_direction = OBJECTIVES[settings.objective]
        self.cpu = fingerprint(settings.measure.resolved_threads())
        self.notes: list[str] = []
        if withheld is None:
            withheld, self.notes = settings.withheld(self.cpu)
        self.withheld = withheld

    # --- set-up -------------------------------------------------------------------------
    def prepare(self) -> None:
        self.reporter.message(f"loading {self.settings.model}")
        self.base: SlimModel = load_model(resolve_path(self.settings.model), head=self.task.head)
        self.task.check_model(self.base)
        self.reporter.message(f"preparing the {self.task.name} task on the original model")
        # The reference arrays come from the shared cache; the run keeps its own copy so it
        # stays self-contained (and resumable) if the cache is cleared.
        self.state_path = self.out / "task_state.safetensors"
        if not self.state_path.is_file():
            cached = reference_state(resolve_path(self.settings.model), self.task.spec, self.base)
            shutil.copyfile(cached, self.state_path)
        self.calibration = self.task.calibration_batches(self.base)
        self.pass_classes = [
            c
            for c in self.settings.pass_classes()
            if c.applies_to(self.base) and ("", "") not in self.withheld.get(c.name, ())
        ]
        trains = any(cls.needs_training for cls in self.pass_classes)
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
        self._requeue_measured_elsewhere(study)
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

    def _requeue_measured_elsewhere(self, study: optuna.Study) -> None:
        """A study resumed on another machine (--allow-other-cpu) measures again, here, every
        recipe it had finished elsewhere, baseline first, before the sampler goes on."""
        key = f"remeasured on {machine_key(self.cpu)}"
        done = set(study.user_attrs.get(key, []))
        here = {
            t.user_attrs.get("description")
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if self._measured_here(t)
        }
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            description = trial.user_attrs.get("description")
            if self._measured_here(trial) or description in here or trial.number in done:
                continue
            done.add(trial.number)
            here.add(description)
            study.enqueue_trial(trial.params, skip_if_exists=False)
        if done:
            study.set_user_attr(key, sorted(done))

    def _measured_here(self, trial: FrozenTrial) -> bool:
        recorded = trial.user_attrs.get("cpu")
        # Trials of runs older than fingerprints count as this machine's.
        return recorded is None or CpuFingerprint.from_dict(recorded).same_machine(self.cpu)

    # --- one trial ----------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        started = time.monotonic()
        recipe = sample_recipe(
            trial,
            self.pass_classes,
            self.facts,
            self.settings.task,
            self.settings.seed,
            self.withheld,
        )
        description = recipe.describe()
        trial.set_user_attr("description", description)
        trial.set_user_attr("recipe", recipe.to_dict())
        earlier = self._completed_with(trial.study, description)
        if earlier is not None:  # the sampler proposed a recipe already measured: reuse it
            for key in ("quality", "drop", "feasible", "details", "measurement", "cpu"):
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
        trial.set_user_attr("cpu", result.get("cpu") or self.cpu.to_dict())
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

    def _completed_with(self, study: optuna.Study, description: str) -> FrozenTrial | None:
        """The first finished trial of this recipe measured on this machine."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if trial.user_attrs.get("description") == description and self._measured_here(trial):
                return trial
        return None

    def _baseline(self, study: optuna.Study) -> FrozenTrial | None:
        return self._completed_with(study, "baseline")

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
        return [
            replace(to_record(t), stale=not self._measured_here(t))
            for t in study.get_trials(deepcopy=False)
        ]

    def _write_outputs(self, records: list[TrialRecord], front: list[int]) -> None:
        lines = [json.dumps(asdict(r)) for r in records if r.counts]
        write_atomic(self.out / "trials.jsonl", "\n".join(lines) + "\n")
        pareto = {
            "objective": self.settings.objective,
            "metric": self.task.metric,
            "max_drop": self.settings.max_drop,
            "cpu": self.cpu.to_dict(),
            "front": [asdict(_record(records, n)) for n in front],
        }
        write_atomic(self.out / "pareto.json", json.dumps(pareto, indent=2))

    # --- the end ------------------------------------------------------------------------
    def finish(self, study: optuna.Study) -> StudyResult:
        records = self.records(study)
        front = pareto_front(records, self.task.direction, self.settings.objective)
        self._write_outputs(records, front)
        chosen, met = choose(records, front, self.task.direction, self.settings.objective)
        best_dir, confirmed = None, None
        if chosen is not None:
            best_dir = self._save_best(chosen, records, met)
            if not chosen.is_baseline and self.settings.confirm_rounds:
                confirmed = self._confirm(chosen, records, met, best_dir)
        return StudyResult(
            self.out,
            self.settings,
            records,
            front,
            chosen,
            met,
            best_dir,
            confirmed,
            tuple(self.notes),
        )

    def _confirm(
        self, chosen: TrialRecord, records: list[TrialRecord], met: bool, best_dir: Path
    ) -> dict[str, Any]:
        """Time baseline and chosen again (alternating fresh processes); the ratios go into
        best/metrics.json and the model card, rewritten in place."""
        self.reporter.message(
            f"confirming the ratios: {self.settings.confirm_rounds} rounds of baseline and "
            "chosen model, alternating"
        )
        confirmed = confirm_ratios(
            resolve_path(self.settings.model),
            best_dir,
            self.settings.task,
            self.state_path,
            self.settings.measure,
            self.out / "logs" / "confirm",
            self.settings.confirm_rounds,
            on_stage=self.reporter.message,
        )
        self._write_best_metrics(best_dir, chosen, records, met, confirmed)
        return confirmed

    def _write_best_metrics(
        self,
        folder: Path,
        chosen: TrialRecord,
        records: list[TrialRecord],
        met: bool,
        confirmed: dict[str, Any] | None,
    ) -> None:
        from slimformer.report import model_card

        baseline = next(r for r in records if r.is_baseline and r.comparable)
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
            "cpu": self.cpu.to_dict(),
            "confirmed": confirmed,
        }
        saved = json.loads((folder / "slimformer.json").read_text())
        write_atomic(folder / "metrics.json", json.dumps(metrics, indent=2))
        card = model_card(
            chosen, baseline, self.settings, self.task.metric, met, saved, self.cpu, confirmed
        )
        write_atomic(folder / "README.md", card)

    def _save_best(self, chosen: TrialRecord, records: list[TrialRecord], met: bool) -> Path:
        candidate_dir = self.out / "candidates" / f"trial-{chosen.number:03d}"
        best_dir = self.out / "best"
        tmp = self.out / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if candidate_dir.is_dir():
            shutil.copytree(candidate_dir, tmp)
        else:  # the baseline, or a candidate folder lost to a crash: rebuild by replaying
            recipe = Recipe.from_dict(chosen.recipe) if chosen.recipe else Recipe()
            model = apply_recipe(self.base, recipe, self.calibration, training=self.training)
            save_model(model, tmp)
        self._write_best_metrics(tmp, chosen, records, met, None)
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
        cpu=attrs.get("cpu"),
    )


def machine_key(cpu: CpuFingerprint) -> str:
    """A short stable name for the machine `same_machine` compares."""
    identity = [cpu.model, list(cpu.isa), cpu.cores, cpu.threads, sorted(cpu.versions.items())]
    return hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:12]


def pareto_front(records: list[TrialRecord], direction: str, objective: str) -> list[int]:
    """Trial numbers not dominated in (quality, cost); duplicates of earlier trials, and
    trials measured on another machine, left out."""
    sign_q = 1 if direction == "maximize" else -1
    sign_c = 1 if OBJECTIVES[objective][1] == "maximize" else -1
    points = [
        (r.number, sign_q * r.quality, sign_c * r.cost(objective)) for r in records if r.comparable
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
    complete = [r for r in records if r.comparable]
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
    allow_other_cpu: bool = False,
) -> StudyResult:
    """Run (or resume) a study in `out`, which this process holds alone while it runs."""
    reporter = reporter or SilentReporter()
    out = Path(out)
    created = not out.exists()
    lock = RunLock(out)
    lock.acquire()  # before anything is read or removed: a live study's folder stays intact
    try:
        return _run_locked(
            settings, out, lock, resume, overwrite, reporter, allow_other_cpu, created
        )
    finally:
        lock.release()


def _run_locked(
    settings: StudySettings,
    out: Path,
    lock: RunLock,
    resume: bool,
    overwrite: bool,
    reporter: Reporter,
    allow_other_cpu: bool,
    created: bool,
) -> StudyResult:
    try:
        settings, withheld = _open_run_folder(settings, out, resume, overwrite, allow_other_cpu)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    new_run = not (out / "run.json").is_file()
    lock.announce()
    study_runner = Study(settings, out, reporter, withheld)
    try:
        study_runner.prepare()  # bad data or a wrong model fails here, before any run exists
    except BaseException:
        if created or new_run:  # nothing of a run was in it yet (or --overwrite emptied it)
            shutil.rmtree(out, ignore_errors=True)
        raise
    # The CPU it runs on now (a run resumed elsewhere continues as that machine's), and the
    # search space's CPU-dependent gaps as first decided.
    run_facts = {
        "cpu": study_runner.cpu.to_dict(),
        "withheld": {n: sorted(map(list, pairs)) for n, pairs in study_runner.withheld.items()},
    }
    write_atomic(out / "run.json", json.dumps(settings.to_dict() | run_facts, indent=2))
    for note in study_runner.notes:
        reporter.note(note)
    study = study_runner.open_study()
    counted = [r for r in study_runner.records(study) if r.counts and not r.stale]
    remaining = None if settings.trials is None else max(0, settings.trials - len(counted))
    reporter.study_started(settings, settings.trials, len(counted))
    study_runner.run_trials(study, remaining)
    return study_runner.finish(study)


def _open_run_folder(
    settings: StudySettings, out: Path, resume: bool, overwrite: bool, allow_other_cpu: bool
) -> tuple[StudySettings, dict[str, set[tuple[str, str]]] | None]:
    """The settings to run with and, for a resumed run, the search space gaps it was created
    with (None: decide them for this CPU)."""
    run_file = out / "run.json"
    if run_file.is_file():
        if resume:
            saved = _read_settings(run_file)
            if Path(saved.model) != Path(settings.model) and saved.model != settings.model:
                raise SlimformerError(
                    f"{out} is a run on {saved.model}, not {settings.model}; "
                    "resume it with the same model or choose another --out"
                )
            facts = json.loads(run_file.read_text())
            _check_same_machine(facts, saved, out, allow_other_cpu)
            # The budget may grow on resume; what was searched stays as it was.
            settings = replace(
                saved,
                trials=settings.trials,
                time_budget_s=settings.time_budget_s,
                confirm_rounds=settings.confirm_rounds,
            )
            withheld = {
                name: {tuple(pair) for pair in pairs}
                for name, pairs in (facts.get("withheld") or {}).items()
            }
            return settings, withheld
        if overwrite:
            clear_folder(out)
        else:
            raise SlimformerError(
                f"{out} already holds a run; continue it with --resume, or start over with "
                "--overwrite, or choose another --out"
            )
    elif resume:
        raise SlimformerError(f"nothing to resume: {out} holds no run")
    elif overwrite and any(out.iterdir()):
        clear_folder(out)  # a folder left by a run that died before run.json
    return settings, None


def _check_same_machine(
    facts: dict[str, Any], saved: StudySettings, out: Path, allow_other_cpu: bool
) -> None:
    """Timings from two machines must not meet in one front: refuse, or (when allowed) go on
    with the earlier trials marked stale and measured again here."""
    if "cpu" not in facts:
        return  # a run from before fingerprints: nothing to compare
    then = CpuFingerprint.from_dict(facts["cpu"])
    now = fingerprint(saved.measure.resolved_threads())
    if now.same_machine(then) or allow_other_cpu:
        return
    raise SlimformerError(
        f"{out} was measured on another machine ({'; '.join(now.differences(then))}); "
        "its timings do not compare with this one's. Resume with --allow-other-cpu to measure "
        "its trials again here, or choose another --out"
    )


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
