"""The Optuna side of a study: its SQLite storage, what reruns on resume, trials as records.

A trial's facts live in its Optuna user attributes (description, recipe, quality, drop,
feasible, constraints, guards, details, measurement, cpu, error, duration_s, timings,
duplicate_of); `to_record` reads them back as a TrialRecord. Only trials measured on this
machine (`measured_here`) are compared.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import replace

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimformer.cpu import CpuFingerprint
from slimformer.passes import Pass
from slimformer.recipe import Recipe
from slimformer.search import guards
from slimformer.search.portfolio import warm_start_recipes
from slimformer.search.records import TrialRecord
from slimformer.search.settings import StudySettings, Withheld
from slimformer.search.space import START_VALUES, baseline_params, recipe_params, start_values

STUDY_NAME = "slimformer"
# What a repeated recipe takes over from the trial that measured it.
MEASURED_ATTRS = ("quality", "drop", "feasible", "details", "measurement", "cpu")


def open_study(
    storage_url: str,
    settings: StudySettings,
    directions: list[str],
    pass_classes: Sequence[type[Pass]],
    cpu: CpuFingerprint,
    withheld: Withheld | None = None,
) -> optuna.Study:
    """Create or load the study; queue what must run (again) before the sampler explores:
    interrupted trials, trials measured on another machine, or for a new study the baseline,
    the warm-start portfolio (`settings.warm_start`; `withheld`: what this CPU would not
    profit from) and the start recipes."""
    withheld = withheld or {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(storage_url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=settings.seed, n_startup_trials=6, multivariate=True, group=True
        )
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        sampler=sampler,
        directions=directions,
        load_if_exists=True,
    )
    requeue_interrupted(study)
    requeue_measured_elsewhere(study, cpu)
    if not study.trials:
        study.enqueue_trial(baseline_params(pass_classes))
        if settings.warm_start:
            for recipe in warm_start_recipes(pass_classes, withheld, settings.task, settings.seed):
                study.enqueue_trial(recipe_params(recipe, pass_classes), skip_if_exists=True)
        for start in settings.starts:
            recipe = Recipe.from_dict(start)
            given = start_values(recipe, pass_classes)
            study.enqueue_trial(
                recipe_params(recipe, pass_classes),
                user_attrs={START_VALUES: given} if given else None,
                skip_if_exists=True,
            )
    return study


def requeue_interrupted(study: optuna.Study) -> None:
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
            enqueue_again(study, trial)
    study.set_user_attr("requeued", sorted(requeued))


def requeue_measured_elsewhere(study: optuna.Study, cpu: CpuFingerprint) -> None:
    """A study resumed on another machine (--allow-other-cpu) measures again, here, every
    recipe it had finished elsewhere, baseline first, before the sampler goes on."""
    key = f"remeasured on {machine_key(cpu)}"
    done = set(study.user_attrs.get(key, []))
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    here = {t.user_attrs.get("description") for t in finished if measured_here(t, cpu)}
    for trial in finished:
        description = trial.user_attrs.get("description")
        if measured_here(trial, cpu) or description in here or trial.number in done:
            continue
        done.add(trial.number)
        here.add(description)
        enqueue_again(study, trial)
    if done:
        study.set_user_attr(key, sorted(done))


def enqueue_again(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> None:
    """Queue `trial`'s recipe once more, with the start values it carried."""
    given = trial.user_attrs.get(START_VALUES)
    study.enqueue_trial(
        trial.params, user_attrs={START_VALUES: given} if given else None, skip_if_exists=False
    )


def is_waiting(study: optuna.Study, params: dict) -> bool:
    """Whether a trial with exactly these parameters is queued."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return any(t.system_attrs.get("fixed_params") == params for t in waiting)


def defer(study: optuna.Study, trial: optuna.Trial) -> None:
    """Put an asked trial back at the end of the queue (it ran nothing): it is closed as
    failed, without an error, and queued again, once (not again on the next resume)."""
    study.tell(trial, state=TrialState.FAIL)
    enqueue_again(study, trial)
    requeued = set(study.user_attrs.get("requeued", []))
    study.set_user_attr("requeued", sorted(requeued | {trial.number}))


def machine_key(cpu: CpuFingerprint) -> str:
    """A short stable name for the machine `same_machine` compares."""
    identity = [cpu.model, list(cpu.isa), cpu.cores, cpu.threads, sorted(cpu.versions.items())]
    return hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:12]


def measured_here(trial: FrozenTrial, cpu: CpuFingerprint) -> bool:
    recorded = trial.user_attrs.get("cpu")
    # Trials of runs older than fingerprints count as this machine's.
    return recorded is None or CpuFingerprint.from_dict(recorded).same_machine(cpu)


def completed_with(
    study: optuna.Study, description: str, cpu: CpuFingerprint
) -> FrozenTrial | None:
    """The first finished trial of this recipe measured on this machine."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("description") == description and measured_here(trial, cpu):
            return trial
    return None


def reuse(trial: optuna.Trial, earlier: FrozenTrial, max_drop: float) -> tuple[float, float]:
    """Tell a repeated recipe the earlier trial's result, at no cost."""
    for key in MEASURED_ATTRS:
        trial.set_user_attr(key, earlier.user_attrs[key])
    # Trials of runs older than guards recorded only the budget's constraint.
    constraints = earlier.user_attrs.get("constraints") or {
        guards.MAX_DROP: earlier.user_attrs["drop"] - max_drop
    }
    guards.record(trial, constraints)
    trial.set_user_attr("duplicate_of", earlier.number)
    return tuple(earlier.values)  # type: ignore[return-value]


def records(study: optuna.Study, cpu: CpuFingerprint) -> list[TrialRecord]:
    """Every trial as a record; those measured on another machine marked stale."""
    return [
        replace(to_record(t), stale=not measured_here(t, cpu))
        for t in study.get_trials(deepcopy=False)
    ]


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
        guards=attrs.get("guards", {}),
        measurement=attrs.get("measurement", {}),
        error=attrs.get("error"),
        duration_s=attrs.get("duration_s"),
        timings=attrs.get("timings", {}),
        duplicate_of=attrs.get("duplicate_of"),
        cpu=attrs.get("cpu"),
    )
