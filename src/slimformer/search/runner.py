"""The loop: Optuna, multi-objective (quality and one cost), resumable, every trial measured.

Trial 0 is always the untouched baseline. Every other trial samples a recipe from the
registered passes' config spaces (space.py), builds the candidate and evaluates it (by default
each in a child process: candidates.py). Whatever goes wrong with a candidate fails its trial,
with the reason in trials.jsonl and the traceback in its log folder, and the study goes on;
only the baseline failing ends it. A time budget is a deadline for the whole study (budget.py).
The chosen model is the cheapest trial (by the objective) whose quality drop is within
`max_drop`; if no optimized candidate meets it we say so and save the best-quality one
(selection.py). Everything lives in the run folder (run_folder.py), which one process at a
time holds (lock.py); a study killed at any moment resumes from it.

Timings are facts about one machine: every trial records the CPU fingerprint it was measured
on, and only trials measured on this machine take part in the front, the choice and the
reuse of repeated recipes. The search also follows the CPU: settings that only pay off with
a capability this CPU lacks (bf16 math, VNNI int8) are not offered unless the user names
them. When the study ends, the baseline and the chosen model are timed again in alternating
fresh processes (`confirm.py`), and those ratios are the ones printed and saved.

The Optuna side (the storage, requeues, trials <-> records) is in optuna_study.py. Other
processes and machines may work on the same study (`slimformer worker`, distributed.py): the
trial budget counts their trials too, a trial whose worker died is queued again before the
next one is asked (liveness.py), and each machine kind measures its own baseline.

Over 350 lines on purpose: one trial's life (sample, reuse, build, evaluate, fail alone, stop
at the deadline) and the study's end (choice, best/, confirmation) read as one sequence here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimformer.build import Built
from slimformer.child import CandidateFailed, Stopped
from slimformer.cpu import fingerprint
from slimformer.errors import SlimformerError
from slimformer.evaluate import PROBED_COSTS, EvaluationResult
from slimformer.recipe import Recipe
from slimformer.search import distributed, guards, liveness, optuna_study
from slimformer.search.budget import TimeBudget, Timings, estimate, work
from slimformer.search.candidates import Builder, Evaluator, ModelBuilder, child_evaluator
from slimformer.search.confirm import confirm_ratios, time_alternately
from slimformer.search.cores import claim_cores
from slimformer.search.distributed import (
    Follower,
    check_workers,
    run_local_workers,
    run_ray_workers,
)
from slimformer.search.early_stop import DistillWatch, distill_study
from slimformer.search.killpoints import kill_point
from slimformer.search.lock import RunLock
from slimformer.search.neighbours import neighbours, shortened
from slimformer.search.records import BestModel, StudyResult, TrialRecord, find
from slimformer.search.run_folder import (
    CardWriter,
    Gaps,
    ReportWriter,
    RunFolder,
    read_storage,
    write_best_facts,
)
from slimformer.search.selection import choose, pareto_front, runoff_contenders
from slimformer.search.settings import StudySettings
from slimformer.search.space import (
    START_VALUES,
    baseline_params,
    recipe_params,
    sample_recipe,
    start_values,
)
from slimformer.search.storage import open_storage
from slimformer.tasks import make_task, quality_drop

MAX_REPEATS = 25  # proposals in a row that repeat measured recipes before we stop


class _BaselineFirst(Exception):
    """A queued recipe came up before the baseline's rerun (a resumed study whose baseline
    was cut off, or measured on another machine): it runs again after the baseline."""


class _DoesNotFit(Exception):
    """The sampled trial would not finish in the time left: it is not started."""

    def __init__(self, message: str, recipe: Recipe):
        super().__init__(message)
        self.recipe = recipe


class _Pruned(Exception):
    """The trial stopped early, shown over budget before its evaluation ended (or a repeat of
    such a recipe): it is told to Optuna as pruned, with its constraints violated."""


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


class Study:
    def __init__(
        self,
        settings: StudySettings,
        folder: RunFolder,
        reporter: Reporter,
        withheld: Gaps | None = None,
        *,
        builder: Builder | None = None,
        evaluator: Evaluator | None = None,
        write_card: CardWriter | None = None,
        write_report: ReportWriter | None = None,
        started: float | None = None,
        storage_url: str | None = None,
    ):
        """`withheld`: the search space's CPU-dependent gaps as first decided for this run
        (a resumed study keeps them: Optuna's spaces cannot change within a study).
        `builder`, `evaluator`: the models behind the loop (default: the real ones).
        `write_card`: writes best/README.md beside the chosen model; `write_report`:
        report.html in the run folder, after each trial and at the end. `started`: when the
        study began (epoch seconds, default now), where its time budget starts.
        `storage_url`: where the study lives (default: SQLite in the run folder)."""
        self.settings = settings
        self.folder = folder
        self.reporter = reporter
        self.task = make_task(settings.task)
        self.cpu = fingerprint(settings.measure.resolved_threads())
        self.notes: list[str] = []
        if withheld is None:
            withheld, self.notes = settings.withheld(self.cpu)
        self.withheld = withheld
        self.started = time.time() if started is None else started
        self.budget = TimeBudget(settings.time_budget_s, self.started)
        self.storage_url = storage_url or folder.storage_url
        self.machine = optuna_study.machine_key(self.cpu)
        self.builder = builder or ModelBuilder(
            settings.model,
            settings.task,
            folder.batches_path,
            settings.measure.threads,
            reuse=folder.trained_dir if settings.reuse_trained else None,
        )
        self.evaluate = evaluator or child_evaluator(
            settings.task, folder.state_path, settings.measure
        )
        self.write_card = write_card
        self.write_report = write_report
        self.report_failed = False
        self.distill_study: optuna.Study | None = None  # the distillations' pruner (early_stop.py)

    # --- set-up -------------------------------------------------------------------------
    def prepare(self) -> None:
        offered = [
            c for c in self.settings.pass_classes() if ("", "") not in self.withheld.get(c.name, ())
        ]
        self.pass_classes = self.builder.prepare(
            offered, self.folder.state_path, self.reporter.message
        )

    def open_study(self) -> optuna.Study:
        study = optuna_study.open_study(
            self.storage_url,
            self.settings,
            [self.task.direction, self.settings.cost_direction],
            self.pass_classes,
            self.cpu,
            self.withheld,
            self.builder.facts,
        )
        optuna_study.share(study, self.settings, self.withheld, self.started)
        return study

    def records(self, study: optuna.Study) -> list[TrialRecord]:
        return optuna_study.records(study, self.cpu)

    # --- one trial ----------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> tuple[float, float]:
        started = time.monotonic()
        recipe = sample_recipe(
            trial,
            self.pass_classes,
            self.builder.facts,
            self.settings.task,
            self.settings.seed,
            self.withheld,
        )
        description = recipe.describe()
        trial.set_user_attr("description", description)
        trial.set_user_attr("recipe", recipe.to_dict())
        # Another worker of this machine kind measuring the same recipe now: its result is
        # this trial's too, once it is told.
        self._wait_while_measured(trial, description)
        earlier = optuna_study.completed_with(trial.study, description, self.cpu)
        if earlier is not None:  # the sampler proposed a recipe already measured: reuse it
            return optuna_study.reuse(trial, earlier, self.settings.max_drop)
        stopped = optuna_study.pruned_with(trial.study, description, self.cpu)
        if stopped is not None and self.settings.early_stop:
            optuna_study.reuse_pruned(trial, stopped)
            raise _Pruned
        baseline = optuna_study.completed_with(trial.study, "baseline", self.cpu)
        if baseline is None and recipe.steps:
            self._wait_while_measured(trial, "baseline")
            baseline = optuna_study.completed_with(trial.study, "baseline", self.cpu)
        if baseline is None and recipe.steps:
            # Queued ahead of the baseline's rerun, or a worker on a machine kind that has
            # no baseline yet: this trial goes after one measured here.
            params = baseline_params(self.pass_classes)
            if not optuna_study.is_waiting(trial.study, params):
                trial.study.enqueue_trial(params)
            raise _BaselineFirst
        history = self.timings(trial.study)
        needed = estimate(self.builder.passes_to_run(recipe), history, work(recipe.steps))
        if needed > self.budget.left():
            raise _DoesNotFit(
                f"trial {trial.number} ({description}) needs about {needed:.0f} s, "
                f"{max(0.0, self.budget.left()):.0f} s are left",
                recipe,
            )
        self.reporter.trial_started(trial.number, description)
        candidate_dir = self.folder.candidate_dir(trial.number)
        workdir = self.folder.logs(f"trial-{trial.number:03d}")
        timings: dict[str, Any] = {}
        try:
            built, result = self._build_and_evaluate(
                recipe, candidate_dir, workdir, history, timings, trial
            )
        except Stopped as stop:  # the pruner stopped its distillation
            shutil.rmtree(candidate_dir, ignore_errors=True)
            self._distillation_stopped(trial, stop, timings, started)
        except Exception as error:  # anything a candidate does wrong fails its trial alone
            shutil.rmtree(candidate_dir, ignore_errors=True)
            reason = _reason(error, workdir)
            if not recipe.steps:
                raise SlimformerError(f"the baseline could not be evaluated: {reason}") from None
            trial.set_user_attr("error", reason)
            trial.set_user_attr("timings", timings)
            trial.set_user_attr("duration_s", round(time.monotonic() - started, 1))
            raise CandidateFailed(reason) from None
        trial.set_user_attr("recipe", built.recipe.to_dict())  # with resolved decisions
        if result.screening is not None:
            by = "timing" if result.screening.get("dominated") else "subset"
            trial.set_user_attr("early_stop", {"by": by, **result.screening})
        if result.stopped:
            shutil.rmtree(candidate_dir, ignore_errors=True)  # never on the front
            self._stopped(trial, result.screening or {}, result.cpu, timings, started)
        cost = result.measurement[self.settings.cost_field]
        if cost is None:  # decoding speed, from an engine that serves no KV cache
            reason = f"its runtime does not measure {self.settings.objective} (no KV cache)"
            trial.set_user_attr("error", reason)
            trial.set_user_attr("timings", timings)
            trial.set_user_attr("duration_s", round(time.monotonic() - started, 1))
            raise CandidateFailed(reason)
        quality = float(result.quality)  # type: ignore[arg-type]
        reference = quality if baseline is None else baseline.user_attrs["quality"]
        drop = quality_drop(reference, quality, str(result.direction), bool(result.bounded))
        trial.set_user_attr("quality", quality)
        trial.set_user_attr("drop", drop)
        base = result.details if baseline is None else baseline.user_attrs["details"]
        guards.judge(trial, self.settings, self.task.metric, quality, drop, result.details, base)
        trial.set_user_attr("details", result.details)
        trial.set_user_attr("measurement", result.measurement)
        trial.set_user_attr("cpu", result.cpu or self.cpu.to_dict())
        trial.set_user_attr("timings", timings)
        trial.set_user_attr("duration_s", round(time.monotonic() - started, 1))
        return quality, cost

    def _screen(self, recipe: Recipe) -> dict[str, float] | None:
        """The drop each figure may have, for staged scoring (tasks/staging.py): the score's
        --max-drop and every guard on a figure's drop; None when early stopping is off, and
        for the baseline (the reference every drop is measured from)."""
        if not self.settings.early_stop or not recipe.steps:
            return None
        allowed = {self.task.metric: self.settings.max_drop}
        for guard in map(guards.parse_guard, self.settings.guards):
            if guard.of_drop and guard.figure not in allowed:
                allowed[guard.figure] = guard.threshold
        return allowed

    def _front(self, records: list[TrialRecord]) -> dict[str, Any] | None:
        """The finished trials within budget measured on this machine, that a candidate's
        short timing is compared with (evaluate.py's probe); None when the objective is not
        a timing a short run can estimate, or nothing is finished yet."""
        field_name = self.settings.cost_field
        if field_name not in PROBED_COSTS:
            return None
        points = [
            {"trial": r.number, "drop": r.drop, "cost": r.measurement[field_name]}
            for r in records
            if r.state == "complete"
            and r.feasible
            and not r.stale
            and r.drop is not None
            and r.measurement.get(field_name) is not None
        ]
        if not points:
            return None
        return {
            "figure": self.task.metric,
            "cost_field": field_name,
            "higher_is_better": self.settings.cost_direction == "maximize",
            "points": points,
        }

    def _stopped(
        self,
        trial: optuna.Trial,
        screening: dict[str, Any],
        cpu: dict[str, Any] | None,
        timings: dict[str, Any],
        started: float,
    ) -> None:
        """Record a trial staged scoring stopped, its constraints at the subset's estimates
        (violated when over budget: the sampler learns to avoid its region; a dominated one's
        may hold), and end it as pruned."""
        of_drops = [g for g in map(guards.parse_guard, self.settings.guards) if g.of_drop]
        names = {self.task.metric: guards.MAX_DROP} | {g.figure: f"guard {g}" for g in of_drops}
        guards.record(
            trial,
            {
                names[figure]: facts["estimate"] - facts["allowed"]
                for figure, facts in screening.get("figures", {}).items()
                if figure in names
            },
        )
        if screening.get("over"):
            trial.set_user_attr("feasible", False)
        trial.set_user_attr("cpu", cpu or self.cpu.to_dict())
        trial.set_user_attr("timings", timings)
        trial.set_user_attr("duration_s", round(time.monotonic() - started, 1))
        raise _Pruned

    def _distillation_stopped(
        self, trial: optuna.Trial, stop: Stopped, timings: dict[str, Any], started: float
    ) -> None:
        """Record a trial whose distillation the pruner stopped, with its last held-out loss,
        and end it as pruned. Its drop is unknown; its budget's constraint is set violated
        by the budget itself, so the sampler counts it among the infeasible, mildly."""
        trial.set_user_attr(
            "early_stop",
            {
                "by": "distillation",
                "step": stop.step,
                "held_out_loss": round(stop.value, 6),
                "reason": str(stop),
            },
        )
        guards.record(trial, {guards.MAX_DROP: max(self.settings.max_drop, 1e-3)})
        trial.set_user_attr("cpu", self.cpu.to_dict())
        trial.set_user_attr("timings", timings)
        trial.set_user_attr("duration_s", round(time.monotonic() - started, 1))
        raise _Pruned

    def _distill_watch(self, recipe: Recipe, number: int) -> DistillWatch | None:
        """The pruner's watch over a distilling trial's held-out loss; None when early
        stopping is off or the recipe does not distill."""
        if not self.settings.early_stop:
            return None
        if not any(step.pass_name == "recover.distill" for step in recipe.steps):
            return None
        if self.distill_study is None:
            self.distill_study = distill_study(self.storage_url)
        return DistillWatch(self.distill_study, number)

    def _wait_while_measured(self, trial: optuna.Trial, description: str) -> None:
        """Until no other live worker of this machine kind is measuring `description`."""
        while liveness.running_on(trial.study, self.machine, description, trial.number):
            time.sleep(1.0)

    def _build_and_evaluate(
        self,
        recipe: Recipe,
        candidate_dir: Path,
        workdir: Path,
        history: list[Timings],
        timings: dict[str, Any],
        trial: optuna.Trial,
    ) -> tuple[Built, EvaluationResult]:
        """Build the candidate, then evaluate it, both within the time budget; `timings`
        collects where the time went (also when one of them fails). A distillation the
        pruner stops raises `child.Stopped`."""
        self.reporter.stage("applying passes")
        began = time.monotonic()
        watch = self._distill_watch(recipe, trial.number)
        built = None
        try:
            built = self.builder.build(
                recipe,
                candidate_dir,
                workdir,
                on_stage=self.reporter.stage,
                passes_deadline=self.budget.passes_deadline(history),
                kill_at=self.budget.trials_end,
                **({"on_value": watch} if watch else {}),
            )
        finally:
            if watch is not None:  # a stopped build's time counts in the trial's
                timings["build_s"] = round(time.monotonic() - began, 3)
                watch.close(built is not None)
        timings.update(
            build_s=round(time.monotonic() - began, 3),
            load_s=built.load_s,
            save_s=built.save_s,
            passes=built.pass_seconds,
            # as applied: a distillation stopped at the deadline records the steps it trained
            work={k: v for k, v in work(built.recipe.steps).items() if k in built.pass_seconds},
            **({"reused": list(built.reused)} if built.reused else {}),
        )
        began = time.monotonic()
        screen = self._screen(recipe)
        front = self._front(self.records(trial.study)) if screen else None
        result = self.evaluate(
            candidate_dir,
            workdir,
            on_stage=self.reporter.stage,
            kill_at=self.budget.trials_end,
            **({"screen": screen} if screen else {}),
            **({"front": front} if front else {}),
        )
        timings["evaluate_s"] = round(time.monotonic() - began, 3)
        if result.stopped:
            return built, result
        if not result.scored or result.direction is None:
            raise CandidateFailed("the evaluation returned no score")
        return built, result

    def timings(self, study: optuna.Study) -> list[Timings]:
        """The timings of the trials measured on this machine, for the budget's estimates."""
        return budget_timings(self.records(study))

    def run_trials(self, study: optuna.Study, remaining: int | None) -> None:
        """Ask, evaluate, tell — until the trial budget or the time budget is spent.

        A proposal that repeats a measured recipe is told the earlier result at no cost and
        does not count against the budget; a long run of repeats means the space is exhausted.
        The trial budget counts the trials of every worker of the study, running ones
        included; before each trial, those whose worker died are queued again.
        """
        done = repeats = 0
        local_turn = True
        while remaining is None or done < remaining:
            optuna_study.reap(study)
            if self.trials_spent(study):
                break
            left, quickest = self.budget.left(), estimate([], self.timings(study))
            if left <= quickest:
                detail = f": {left:.0f} s are left, a trial needs about {quickest:.0f} s"
                self.reporter.note("the time budget is spent" + (detail if left > 0 else ""))
                break
            if self.settings.local_search and local_turn:
                self._queue_neighbour(study)
            local_turn = not local_turn
            trial = study.ask()
            try:
                with liveness.working_on(trial, self.machine):
                    values = self.objective(trial)
            except _BaselineFirst:
                optuna_study.defer(study, trial)
                continue
            except _DoesNotFit as why:
                study.tell(trial, state=TrialState.FAIL)  # ran nothing: --resume runs it first
                # A neighbour that fits in the time left (one served from a kept trained
                # model takes seconds), else the same recipe trained shorter, goes next
                # instead of ending the study here.
                fits = self._fitting(study)
                if self.settings.local_search and (
                    self._queue_neighbour(study, fits)
                    or self._queue_shortened(study, why.recipe, fits)
                ):
                    self.reporter.message(f"not started: {why}")
                    continue
                self.reporter.note(f"the time budget is spent: {why}; not started")
                break
            except CandidateFailed:
                frozen = study.tell(trial, state=TrialState.FAIL)
            except _Pruned:
                frozen = study.tell(trial, state=TrialState.PRUNED)
            except BaseException:
                study.tell(trial, state=TrialState.FAIL)  # interrupted: rerun on --resume
                raise
            else:
                frozen = study.tell(trial, values)
            # A repeat of a measured (or pruned) recipe cost nothing; enough in a row end it.
            if frozen.state != TrialState.FAIL and "duplicate_of" in frozen.user_attrs:
                repeats += 1
                if repeats >= MAX_REPEATS:
                    self.reporter.message("every recipe in the search space was measured")
                    break
                continue
            repeats = 0
            done += 1
            self.after_trial(study, frozen)

    def _fitting(self, study: optuna.Study) -> Callable[[Recipe], bool]:
        """Whether a trial of a recipe would finish in the time left, by the budget's estimate
        from the trials measured so far."""
        history = self.timings(study)

        def fits(recipe: Recipe) -> bool:
            needed = estimate(self.builder.passes_to_run(recipe), history, work(recipe.steps))
            return needed <= self.budget.left()

        return fits

    def _queue_neighbour(
        self, study: optuna.Study, fits: Callable[[Recipe], bool] | None = None
    ) -> bool:
        """Queue the first neighbour of the measured recipes (neighbours.py) no trial has
        tried (and, given `fits`, that it accepts), unless recipes are queued already (the
        warm start, resumed trials). Whether one was queued."""
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return False
        proposals = neighbours(
            self.records(study),
            self.pass_classes,
            self.builder.facts,
            (self.settings.cost_field, self.settings.cost_direction == "maximize"),
            (self.task.metric, self.settings.max_drop),
        )
        is_new = self._untried(study)
        for recipe in proposals:
            if is_new(recipe) and (fits is None or fits(recipe)):
                self._enqueue(study, recipe, "local search: next")
                return True
        return False

    def _queue_shortened(
        self, study: optuna.Study, recipe: Recipe, fits: Callable[[Recipe], bool]
    ) -> bool:
        """Queue `recipe` with its distillation shortened to the most that fits in the time
        left and no trial tried (neighbours.shortened). Whether one was queued."""
        is_new = self._untried(study)
        fitting = shortened(
            recipe, self.pass_classes, self.builder.facts, lambda r: is_new(r) and fits(r)
        )
        if fitting is None:
            return False
        self._enqueue(study, fitting, "local search: next, trained shorter to fit the time left")
        return True

    def _untried(self, study: optuna.Study) -> Callable[[Recipe], bool]:
        """Whether no trial of the study has tried or queued a recipe yet."""
        trials = study.get_trials(deepcopy=False)
        tried = {t.user_attrs.get("description") for t in trials}
        queued = [t.system_attrs.get("fixed_params") for t in trials]

        def is_new(recipe: Recipe) -> bool:
            params = recipe_params(recipe, self.pass_classes, self.builder.facts)
            return recipe.describe() not in tried and params not in queued

        return is_new

    def _enqueue(self, study: optuna.Study, recipe: Recipe, say: str) -> None:
        given = start_values(recipe, self.pass_classes, self.builder.facts)
        study.enqueue_trial(
            recipe_params(recipe, self.pass_classes, self.builder.facts),
            user_attrs={START_VALUES: given} if given else None,
        )
        self.reporter.message(f"{say}, {recipe.describe()}")

    def trials_spent(self, study: optuna.Study) -> bool:
        """Whether the trial budget is used up: by the trials of every worker of this machine
        kind that count, and those other workers are running now."""
        if self.settings.trials is None:
            return False
        counted = [r for r in self.records(study) if r.counts and not r.stale]
        return len(counted) + liveness.running_elsewhere(study) >= self.settings.trials

    # --- after each trial ---------------------------------------------------------------
    def after_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        kill_point("trial-told")
        records = self.records(study)
        front = self._write_outputs(records)
        # The front's models stay on disk (the baseline's too): the chosen one is copied to
        # best/ at the end, not rebuilt after the deadline. So do the run-off's contenders as
        # it stands (they may lie off the front) and those of running trials (other
        # workers', in a shared folder).
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        objective = self.settings.objective
        chosen, met = choose(records, front, self.task.direction, objective)
        contenders = runoff_contenders(records, chosen, objective) if chosen and met else []
        kept = set(front) | {r.number for r in contenders} | {t.number for t in running}
        self.folder.keep_candidates(kept)
        self._report(study)
        self.reporter.trial_finished(find(records, trial.number))

    def _report(self, study: optuna.Study) -> None:
        """Rewrite report.html. The page is for reading: a failure to render it is said once
        and costs the study nothing."""
        if self.write_report is None:
            return
        try:
            self.write_report(self.folder.path, study)
        except Exception as error:
            if not self.report_failed:
                self.report_failed = True
                self.reporter.note(f"report.html could not be written: {error}"[:300])

    def _write_outputs(self, records: list[TrialRecord], cpu: Any = None) -> list[int]:
        front = pareto_front(records, self.task.direction, self.settings.objective)
        self.folder.write_trials(records, front, self.settings, self.task.metric, cpu or self.cpu)
        return front

    # --- the end ------------------------------------------------------------------------
    def finish(self, study: optuna.Study) -> StudyResult:
        # Only one machine's timings are compared: this one's, or where workers measured.
        reference = optuna_study.reference_machine(study, self.cpu)
        records = optuna_study.records(study, reference)
        front = self._write_outputs(records, reference)
        chosen, met = choose(records, front, self.task.direction, self.settings.objective)
        best_dir, confirmed = None, None
        elsewhere = not reference.same_machine(self.cpu)
        if chosen is not None and met and self.settings.confirm_rounds and not elsewhere:
            chosen = self._runoff(records, chosen)
        if chosen is not None:
            best = BestModel(
                chosen=chosen,
                baseline=next(r for r in records if r.is_baseline and r.comparable),
                settings=self.settings,
                metric=self.task.metric,
                met_budget=met,
                cpu=reference.to_dict(),
            )
            best_dir = self.folder.save_best(best, self._rebuild(chosen), self.write_card)
            if elsewhere and not chosen.is_baseline and self.settings.confirm_rounds:
                # Timing here would confirm nothing about the machines that measured it.
                note = "the ratios were not confirmed: the trials were measured on another "
                note += f"kind of machine ({reference.label}) than this one"
                self.notes.append(note)
                self.reporter.note(note)
            elif not chosen.is_baseline and self.settings.confirm_rounds:
                confirmed = self._confirm(best, best_dir)
        self._report(study)
        return StudyResult(
            self.folder.path,
            self.settings,
            records,
            front,
            chosen,
            met,
            best_dir,
            confirmed,
            tuple(self.notes),
        )

    def _runoff(self, records: list[TrialRecord], chosen: TrialRecord) -> TrialRecord:
        """The within-budget trial that is fastest when timed again: the chosen one and those
        whose single reading came close (selection.runoff_contenders), each
        timed `confirm_rounds` times in fresh processes, rotating; the best median wins."""
        objective, field = self.settings.objective, self.settings.cost_field
        contenders = [
            r
            for r in runoff_contenders(records, chosen, objective)
            if self.folder.candidate_dir(r.number).is_dir()  # saved atomically: whole
        ]
        if len(contenders) < 2 or chosen not in contenders:
            return chosen
        numbers = ", ".join(str(r.number) for r in contenders)
        self.reporter.message(f"run-off: trials {numbers} are close; timing them again")
        try:
            timed, _ = time_alternately(
                {f"trial-{r.number}": self.folder.candidate_dir(r.number) for r in contenders},
                self.evaluate,
                self.folder.logs("runoff"),
                self.settings.confirm_rounds,
                "run-off",
                on_stage=self.reporter.message,
            )
        except CandidateFailed as error:
            self.notes.append(f"the run-off could not time the close trials ({error})")
            return chosen
        medians = {
            r.number: statistics.median(m[field] for m in timed[f"trial-{r.number}"])
            for r in contenders
        }
        maximize = self.settings.cost_direction == "maximize"
        winner = (max if maximize else min)(medians, key=lambda n: medians[n])
        readings = ", ".join(f"trial {n} {medians[n]:.4g}" for n in medians)
        note = f"run-off ({field}, median of {self.settings.confirm_rounds}): {readings}"
        note += f"; chose trial {winner}"
        self.notes.append(note)
        self.reporter.note(note)
        return next(r for r in contenders if r.number == winner)

    def _rebuild(self, chosen: TrialRecord) -> Callable[[Path], Built]:
        """Replays the chosen recipe into a folder, in a build child, when its saved candidate
        is gone (removed by hand, or a run from before the baseline's was kept too)."""
        recipe = Recipe.from_dict(chosen.recipe) if chosen.recipe else Recipe()
        return lambda folder: self.builder.build(recipe, folder, self.folder.logs("best"))

    def _confirm(self, best: BestModel, best_dir: Path) -> dict | None:
        """Time baseline and chosen again (alternating fresh processes); the ratios go into
        best/metrics.json and the model card, rewritten in place. A confirmation that fails
        leaves best/ as saved (with the study's own figures) and says why: the study's
        results are not lost to it."""
        rounds = self.settings.confirm_rounds
        self.reporter.message(
            f"confirming the ratios: {rounds} rounds of baseline and chosen model, alternating"
        )
        try:
            confirmed = confirm_ratios(
                self.builder.reference_dir,
                best_dir,
                self.evaluate,
                self.folder.logs("confirm"),
                rounds,
                on_stage=self.reporter.message,
            )
        except CandidateFailed as error:
            note = f"the ratios could not be confirmed ({error}); best/ keeps the study's figures"
            self.notes.append(note)
            self.reporter.message(note)
            return None
        best = replace(best, confirmed=confirmed)
        write_best_facts(best_dir, best, self.write_card)
        return confirmed


def budget_timings(records: list[TrialRecord]) -> list[Timings]:
    """The timings the time budget estimates from (budget.py): those of this machine's trials.
    A trial stopped early took less than a full one: one stopped by staged scoring counts
    with its build (done in full) but not its evaluation; one whose build was stopped (a
    distillation) not at all."""
    timings: list[Timings] = []
    for record in records:
        if not record.timings or record.stale:
            continue
        if record.state == "pruned":
            if (record.early_stop or {}).get("by") not in ("subset", "timing"):
                continue
            timings.append({k: v for k, v in record.timings.items() if k != "evaluate_s"})
        else:
            timings.append(record.timings)
    return timings


def _reason(error: Exception, workdir: Path) -> str:
    """The reason a trial failed, for trials.jsonl and the report. A failure in the study's own
    process (not a child's, whose log has it already) leaves its traceback in the trial's log
    folder."""
    if isinstance(error, (CandidateFailed, SlimformerError)):
        return str(error)[:300]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "study.log").write_text("".join(traceback.format_exception(error)))
    return f"{type(error).__name__}: {error}"[:300]


# --- entry point ----------------------------------------------------------------------------
def run_study(
    settings: StudySettings,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    reporter: Reporter | None = None,
    allow_other_cpu: bool = False,
    *,
    write_card: CardWriter | None = None,
    write_report: ReportWriter | None = None,
    builder: Builder | None = None,
    evaluator: Evaluator | None = None,
    storage: str | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> StudyResult:
    """Run (or resume) a study in `out`, which this process holds alone while it runs.

    `write_card` writes the model card into best/ (api.optimize passes card's), `write_report`
    report.html into the run folder (api.optimize passes report_html's);
    `builder` and `evaluator` replace the real models (tests). `storage`: the study's Optuna
    storage URL (default: study.db in `out`; a resumed run keeps its own). `workers`: run the
    trials in that many worker processes on this machine instead of here; `ray_address`: as
    Ray tasks on that cluster (`workers` of them, default as many as its CPUs hold)."""
    started = time.time()
    reporter = reporter or SilentReporter()
    out = Path(out)
    created = not out.exists()
    lock = RunLock(out)
    lock.acquire()  # before anything is read or removed: a live study's folder stays intact
    try:
        folder = RunFolder(out)
        try:
            settings, withheld = folder.open(settings, resume, overwrite, allow_other_cpu)
            if folder.has_run():
                storage = storage or read_storage(folder.run_file)
            storage = storage or folder.storage_url
            if workers is not None and ray_address is None:
                check_workers(workers, settings.measure.resolved_threads())
            open_storage(storage)  # an unreachable server is said before anything is written
        except BaseException:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
        new_run = not folder.has_run()
        lock.announce()
        runner = Study(
            settings,
            folder,
            reporter,
            withheld,
            builder=builder,
            evaluator=evaluator,
            write_card=write_card,
            write_report=write_report,
            started=started,
            storage_url=storage,
        )
        try:
            runner.prepare()  # bad data or a wrong model fails here, before any run exists
        except BaseException:
            if created or new_run:  # nothing of a run was in it yet (or --overwrite emptied it)
                shutil.rmtree(out, ignore_errors=True)
            raise
        folder.write_run(settings, runner.cpu, runner.withheld, storage)
        for note in runner.notes:
            reporter.note(note)
        study = runner.open_study()
        counted = [r for r in runner.records(study) if r.counts and not r.stale]
        remaining = None if settings.trials is None else max(0, settings.trials - len(counted))
        reporter.study_started(settings, settings.trials, len(counted))
        if ray_address is not None or workers is not None:
            follow = Follower(study, lambda: runner.records(study), reporter)
            # Again while the workers left a dead worker's trial queued (they counted it as
            # running when they stopped) and the budget is not spent; a few rounds at most.
            rounds = 0
            while rounds == 0 or (
                optuna_study.reap(study)
                and not runner.trials_spent(study)
                and runner.budget.left() > 0
                and rounds < 3
            ):
                rounds += 1
                if ray_address is not None:
                    threads = settings.measure.resolved_threads()
                    run_ray_workers(
                        ray_address, storage, folder, threads, workers, follow, ray_worker
                    )
                else:
                    run_local_workers(folder, workers or 1, follow)
        else:
            runner.run_trials(study, remaining)
        return runner.finish(study)
    finally:
        lock.release()


def run_worker(
    target: str | os.PathLike[str],
    out: Path | None = None,
    reporter: Reporter | None = None,
    *,
    write_report: ReportWriter | None = None,
    builder: Builder | None = None,
    evaluator: Evaluator | None = None,
) -> int:
    """Join the study at `target` (a run folder or a storage URL: distributed.py) from this
    process and run its trials until the study's budget is spent, on cores of its own;
    returns how many it ran. The study's own process makes the choice and saves best/."""
    distributed.die_with_study()
    storage_url, path = distributed.locate(target, out)
    study = optuna_study.join_study(storage_url)
    settings, withheld, started = optuna_study.shared(study)
    claim_cores(settings.measure.resolved_threads())  # before the fingerprint is taken
    path.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(path)
    reporter = reporter or SilentReporter()
    runner = Study(
        settings,
        folder,
        reporter,
        withheld,
        builder=builder,
        evaluator=evaluator,
        write_report=write_report,
        started=started,
        storage_url=storage_url,
    )
    runner.prepare()
    if not folder.has_run():  # a worker's own folder: `slimformer show` reads it
        folder.write_run(settings, runner.cpu, runner.withheld, storage_url)
    counted = [r for r in runner.records(study) if r.counts and not r.stale]
    reporter.study_started(settings, settings.trials, len(counted))
    before = distributed.trials_of_this_process(study)
    runner.run_trials(study, None)
    return distributed.trials_of_this_process(study) - before


def ray_worker(storage_url: str, run_path: str) -> dict[str, Any]:
    """A Ray task: a worker in the run folder where its node sees it (the same machine, or a
    shared filesystem), else in a folder of its own on the node."""
    path = Path(run_path)
    if not RunFolder(path).has_run():
        key = hashlib.sha1(storage_url.encode()).hexdigest()[:12]
        path = Path.home() / ".cache" / "slimformer" / "workers" / key
    trials = run_worker(storage_url, path)
    return {"host": socket.gethostname(), "pid": os.getpid(), "trials": trials}
