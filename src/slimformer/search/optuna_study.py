"""The Optuna side of a study: its storage (storage.py), what reruns on resume or when a
worker dies, the settings workers read, trials as records.

A trial's facts live in its Optuna user attributes (description, recipe, quality, drop,
feasible, constraints, guards, details, measurement, cpu, error, duration_s, timings,
duplicate_of, and while it runs its worker: liveness.py); `to_record` reads them back as a
TrialRecord. Only trials measured on one machine (`measured_here`) are compared.

The study's own user attributes hold what a worker joining it from another process or
machine needs (`share`/`shared`): the settings, the search space's CPU gaps as first decided
(Optuna's spaces cannot change within a study) and when its time budget started.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimformer.cpu import CpuFingerprint
from slimformer.errors import SlimformerError
from slimformer.passes import Pass
from slimformer.recipe import Recipe
from slimformer.search import guards, liveness
from slimformer.search.portfolio import warm_start_recipes
from slimformer.search.records import TrialRecord
from slimformer.search.settings import StudySettings, Withheld
from slimformer.search.space import START_VALUES, baseline_params, recipe_params, start_values
from slimformer.search.storage import open_storage, shown

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
    facts: Any = None,
) -> optuna.Study:
    """Create or load the study; queue what must run (again) before the sampler explores:
    interrupted trials, trials measured on another machine, or for a new study the baseline,
    the warm-start portfolio (`settings.warm_start`; `withheld`: what this CPU would not
    profit from) and the start recipes."""
    withheld = withheld or {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=open_storage(storage_url),
        sampler=_sampler(settings),
        directions=directions,
        load_if_exists=True,
    )
    # The folder's holder opens it: a trial naming no worker is one its own killed process
    # left (workers name themselves as soon as they ask).
    requeue_interrupted(study, liveness.dead_trials(study, unnamed_alive=False))
    requeue_measured_elsewhere(study, cpu)
    if not study.trials:
        study.enqueue_trial(baseline_params(pass_classes))
        recipes = (
            warm_start_recipes(pass_classes, withheld, settings.task, settings.seed, facts)
            if settings.warm_start
            else []
        )
        recipes += [Recipe.from_dict(start) for start in settings.starts]
        # Optuna's skip_if_exists compares the sampler's parameters only, and starts that
        # differ only in values outside the searched options (two learning rates a small
        # model's scaled options do not hold) share them: those are told apart by the values
        # they carry.
        carried = []
        for recipe in recipes:
            given = start_values(recipe, pass_classes, facts)
            params = recipe_params(recipe, pass_classes, facts)
            if given and (params, given) in carried:
                continue
            carried.append((params, given))
            study.enqueue_trial(
                params,
                user_attrs={START_VALUES: given} if given else None,
                skip_if_exists=not given,
            )
    return study


def _sampler(settings: StudySettings) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=settings.seed, n_startup_trials=6, multivariate=True, group=True
        )


def join_study(storage_url: str) -> optuna.Study:
    """An existing study, for a worker; a storage holding none is said in one line."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except KeyError:
        raise SlimformerError(
            f"{shown(storage_url)} holds no slimformer study; start one with `slimformer "
            "optimize ... --storage URL` first"
        ) from None
    if "settings" not in study.user_attrs:
        raise SlimformerError(
            f"the study in {shown(storage_url)} was started by a slimformer without workers; "
            "resume it once with `slimformer optimize --resume` before workers join"
        )
    # The study's own sampler, seeded per worker: workers sampling one point alike would
    # only measure it twice (the second told the first's result at no cost).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        seed = shared(study)[0].seed
        study.sampler = optuna.samplers.TPESampler(
            seed=seed + 1000 + os.getpid(), n_startup_trials=6, multivariate=True, group=True
        )
    return study


def share(study: optuna.Study, settings: StudySettings, withheld: Withheld, started: float) -> None:
    """What a worker joining the study needs, in the study itself."""
    study.set_user_attr("settings", settings.to_dict())
    study.set_user_attr("withheld", {n: sorted(map(list, p)) for n, p in withheld.items()})
    study.set_user_attr("started", started)


def shared(study: optuna.Study) -> tuple[StudySettings, dict[str, set[tuple[str, str]]], float]:
    """The settings, the search space's gaps and when the time budget started (`share`)."""
    attrs = study.user_attrs
    withheld = {
        str(name): {(str(setting), str(value)) for setting, value in pairs}
        for name, pairs in (attrs.get("withheld") or {}).items()
    }
    return StudySettings.from_dict(attrs["settings"]), withheld, float(attrs["started"])


def requeue_interrupted(
    study: optuna.Study, dead: Sequence[FrozenTrial] = (), scan_failed: bool = True
) -> None:
    """Trials cut off by a crash, Ctrl-C or a killed worker (`dead`: running trials whose
    worker is gone) run again; finished ones are kept as they are. `scan_failed`: also queue
    trials closed as interrupted and not queued yet (by the folder's holder when it opens
    the study; a worker only reaps the dead, as others may be closing and queueing now)."""
    requeued = set(study.user_attrs.get("requeued", []))
    for trial in dead:
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):
            continue  # another worker closed it first, and queues it again
        requeued.add(trial.number)
        enqueue_again(study, trial)
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if scan_failed else ()
    for trial in failed:
        interrupted = "error" not in trial.user_attrs
        if interrupted and trial.number not in requeued:
            requeued.add(trial.number)
            enqueue_again(study, trial)
    if scan_failed or dead:
        study.set_user_attr("requeued", sorted(requeued))


def reap(study: optuna.Study) -> int:
    """A worker's look before it asks: trials whose worker died are queued again; returns
    how many."""
    dead = liveness.dead_trials(study)
    if dead:
        requeue_interrupted(study, dead, scan_failed=False)
    return len(dead)


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


def pruned_with(study: optuna.Study, description: str, cpu: CpuFingerprint) -> FrozenTrial | None:
    """The first trial of this recipe stopped early on this machine."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
        if trial.user_attrs.get("description") == description and measured_here(trial, cpu):
            return trial
    return None


def reuse_pruned(trial: optuna.Trial, earlier: FrozenTrial) -> None:
    """A repeated recipe that was stopped early is stopped again, at no cost."""
    for key in ("early_stop", "cpu"):
        if key in earlier.user_attrs:
            trial.set_user_attr(key, earlier.user_attrs[key])
    guards.record(trial, earlier.user_attrs.get("constraints") or {})
    trial.set_user_attr("feasible", False)
    trial.set_user_attr("duplicate_of", earlier.number)


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


def reference_machine(study: optuna.Study, here: CpuFingerprint) -> CpuFingerprint:
    """The machine whose trials the front and the choice compare: this one when it measured
    the baseline; else (trials measured by workers on other kinds of machine: a Ray cluster
    seen from its head) the machine with a baseline that measured the most trials."""
    groups: list[list] = []  # [fingerprint, trials, has a baseline]
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("cpu") is None or "duplicate_of" in trial.user_attrs:
            continue
        cpu = CpuFingerprint.from_dict(trial.user_attrs["cpu"])
        group = next((g for g in groups if g[0].same_machine(cpu)), None)
        if group is None:
            group = [cpu, 0, False]
            groups.append(group)
        group[1] += 1
        group[2] = group[2] or trial.user_attrs.get("description") == "baseline"
    with_baseline = [g for g in groups if g[2]]
    if not with_baseline or any(g[0].same_machine(here) for g in with_baseline):
        return here
    return max(with_baseline, key=lambda g: g[1])[0]


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
    elif trial.state == TrialState.PRUNED:
        state = "pruned"
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
        early_stop=attrs.get("early_stop"),
    )
