"""The run folder on disk: what a study writes, what `--resume` checks, what `show` reads.

study.db                Optuna's SQLite storage, the source of truth (unless --storage
                        names another: storage.py)
run.json                settings, the CPU it runs on, the search space's CPU gaps, the
                        storage URL when it is not study.db
trials.jsonl            one TrialRecord a line, rewritten after every trial
pareto.json             the current front, rewritten after every trial
report.html             the page a person reads: the front, every trial, the machines
                        (report_html.py, through the `ReportWriter` a caller passes in),
                        rewritten after every trial and at the end
task_state.safetensors  the task's reference arrays (the run stays self-contained)
batches.safetensors     the calibration and training batches the build children read
candidates/trial-NNN/   the models on the current front, and the run-off's contenders
trained/KEY/            models as they stood after their recipe's training, for the later
                        trials that start with the same steps (trained_prefix.py)
best/                   the chosen model, metrics.json and the model card
logs/trial-NNN/         the trial's build and evaluation children: request, result and log
                        (a failed trial's traceback is there)
logs/worker-N.log       what each local worker (`--workers N`) printed
study.pid               the process holding the folder (lock.py)

Every file is replaced whole (written beside, then renamed), so a study killed at any moment
leaves each one old or new; `--resume` goes on from there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from slimformer.cpu import CpuFingerprint, fingerprint
from slimformer.errors import SlimformerError
from slimformer.files import parse_json, read_json, read_text, write_atomic
from slimformer.search.killpoints import kill_point
from slimformer.search.lock import clear_folder
from slimformer.search.records import BestModel, TrialRecord, find
from slimformer.search.settings import StudySettings

# Writes best/README.md, the model card, from what the model was chosen with.
CardWriter = Callable[[Path, BestModel], None]
# Writes report.html into the run folder from its files; the live Optuna study is passed
# too (its importance is on the page).
ReportWriter = Callable[[Path, Any], Any]
Gaps = dict[str, set[tuple[str, str]]]


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    @property
    def state_path(self) -> Path:
        return self.path / "task_state.safetensors"

    @property
    def batches_path(self) -> Path:
        return self.path / "batches.safetensors"

    @property
    def storage_url(self) -> str:
        # Absolute: a worker started from another folder finds the same file.
        return f"sqlite:///{self.path.resolve() / 'study.db'}"

    @property
    def trained_dir(self) -> Path:
        return self.path / "trained"

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    def candidate_dir(self, number: int) -> Path:
        return self.path / "candidates" / f"trial-{number:03d}"

    def logs(self, name: str) -> Path:
        return self.path / "logs" / name

    def has_run(self) -> bool:
        return self.run_file.is_file()

    # --- opening ----------------------------------------------------------------------
    def open(
        self, settings: StudySettings, resume: bool, overwrite: bool, allow_other_cpu: bool
    ) -> tuple[StudySettings, Gaps | None]:
        """The settings to run with and, for a resumed run, the search space gaps it was
        created with (None: decide them for this CPU)."""
        out = self.path
        self._restore_best()
        if self.has_run():
            if resume:
                saved = read_settings(self.run_file)
                if Path(saved.model) != Path(settings.model) and saved.model != settings.model:
                    raise SlimformerError(
                        f"{out} is a run on {saved.model}, not {settings.model}; "
                        "resume it with the same model or choose another --out"
                    )
                cpu, withheld = read_facts(self.run_file)
                check_same_machine(cpu, saved, out, allow_other_cpu)
                # The budget may grow on resume; what was searched stays as it was.
                settings = replace(
                    saved,
                    trials=settings.trials,
                    time_budget_s=settings.time_budget_s,
                    confirm_rounds=settings.confirm_rounds,
                )
                return settings, withheld
            if overwrite:
                clear_folder(out)
            else:
                raise SlimformerError(
                    f"{out} already holds a run; continue it with --resume, or start over "
                    "with --overwrite, or choose another --out"
                )
        elif resume:
            raise SlimformerError(f"nothing to resume: {out} holds no run")
        elif overwrite and any(out.iterdir()):
            clear_folder(out)  # a folder left by a run that died before run.json
        return settings, None

    def write_run(
        self,
        settings: StudySettings,
        cpu: CpuFingerprint,
        withheld: Gaps,
        storage: str | None = None,
    ) -> None:
        """run.json: the settings, the CPU it runs on now (a run resumed elsewhere continues
        as that machine's), the search space's CPU-dependent gaps as first decided, and the
        storage URL when the study is not in study.db (workers and --resume find it there)."""
        facts = {
            "cpu": cpu.to_dict(),
            "withheld": {n: sorted(map(list, pairs)) for n, pairs in withheld.items()},
        }
        if storage is not None and storage != self.storage_url:
            facts["storage"] = storage
        write_atomic(self.run_file, json.dumps(settings.to_dict() | facts, indent=2))

    # --- after each trial ---------------------------------------------------------------
    def write_trials(
        self,
        records: list[TrialRecord],
        front: list[int],
        settings: StudySettings,
        metric: str,
        cpu: CpuFingerprint,
    ) -> None:
        """trials.jsonl (the trials that used the budget) and pareto.json."""
        lines = [json.dumps(asdict(r)) for r in records if r.counts]
        write_atomic(self.path / "trials.jsonl", "\n".join(lines) + "\n")
        kill_point("trials-written")
        pareto = {
            "objective": settings.objective,
            "metric": metric,
            "max_drop": settings.max_drop,
            "guards": list(settings.guards),
            "cpu": cpu.to_dict(),
            "front": [asdict(find(records, n)) for n in front],
        }
        write_atomic(self.path / "pareto.json", json.dumps(pareto, indent=2))

    def keep_candidates(self, numbers: set[int]) -> None:
        """Remove the saved candidates that are not (any longer) among `numbers`, and what
        a build killed while saving left half-written (`.trial-NNN.*`; those of trials among
        `numbers`, running in another worker, may be being saved now)."""
        for path in (self.path / "candidates").glob("trial-*"):
            if int(path.name.split("-")[1]) not in numbers:
                shutil.rmtree(path, ignore_errors=True)
        for path in (self.path / "candidates").glob(".trial-*"):
            number = path.name[len(".trial-") :].split(".")[0]
            if not (number.isdigit() and int(number) in numbers):
                shutil.rmtree(path, ignore_errors=True)

    # --- the chosen model ---------------------------------------------------------------
    def save_best(
        self, best: BestModel, rebuild: Callable[[Path], Any], write_card: CardWriter | None
    ) -> Path:
        """Copy the chosen candidate to best/ (or `rebuild` it there: the baseline, or a
        candidate folder lost to a crash) with its metrics and model card, atomically."""
        tmp = self.path / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        candidate = self.candidate_dir(best.chosen.number)
        if candidate.is_dir():
            shutil.copytree(candidate, tmp)
        else:
            rebuild(tmp)
        write_best_facts(tmp, best, write_card)
        kill_point("best-copied")
        self._swap_best(tmp)
        return self.best_dir

    def _swap_best(self, new: Path) -> None:
        """Put `new` in best/'s place: a reader sees the old model or the new one. A death
        between the two renames leaves the old one whole in .best.old, which the next study
        on the folder puts back (`_restore_best`)."""
        old = self.path / ".best.old"
        shutil.rmtree(old, ignore_errors=True)
        if self.best_dir.exists():
            os.replace(self.best_dir, old)
            kill_point("best-aside")
        os.replace(new, self.best_dir)
        shutil.rmtree(old, ignore_errors=True)

    def _restore_best(self) -> None:
        old = self.path / ".best.old"
        if old.is_dir() and not self.best_dir.exists():
            os.replace(old, self.best_dir)


def write_best_facts(folder: Path, best: BestModel, write_card: CardWriter | None) -> None:
    """metrics.json and the model card beside a saved model (rewritten after confirmation)."""
    write_atomic(folder / "metrics.json", json.dumps(best.metrics(), indent=2))
    if write_card is not None:
        write_card(folder, best)


def check_same_machine(
    then: CpuFingerprint | None, saved: StudySettings, out: Path, allow_other_cpu: bool
) -> None:
    """Timings from two machines must not meet in one front: refuse, or (when allowed) go on
    with the earlier trials marked stale and measured again here."""
    if then is None:
        return  # a run from before fingerprints: nothing to compare
    now = fingerprint(saved.measure.resolved_threads())
    if now.same_machine(then) or allow_other_cpu:
        return
    raise SlimformerError(
        f"{out} was measured on another machine ({'; '.join(now.differences(then))}); "
        "its timings do not compare with this one's. Resume with --allow-other-cpu to measure "
        "its trials again here, or choose another --out"
    )


def _damaged(file: Path, reason: str) -> SlimformerError:
    return SlimformerError(
        f"{file} is damaged ({reason}); start over with --overwrite or choose another --out"
    )


def read_settings(run_file: Path) -> StudySettings:
    try:
        data = read_json(run_file)
    except ValueError as error:
        raise _damaged(run_file, str(error)) from None
    if not isinstance(data, dict):
        raise _damaged(run_file, "not a JSON object")
    try:
        return StudySettings.from_dict(data)
    except SlimformerError as error:
        raise _damaged(run_file, str(error)) from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise _damaged(run_file, f"{type(error).__name__}: {error}") from None


def read_facts(run_file: Path) -> tuple[CpuFingerprint | None, Gaps]:
    """What run.json holds beside the settings: the CPU the run was measured on (None for a
    run from before fingerprints) and the search space's CPU gaps as first decided."""
    try:
        facts = read_json(run_file)
        cpu = facts.get("cpu")
        withheld = facts.get("withheld") or {}
        gaps = {
            str(name): {(str(setting), str(value)) for setting, value in pairs}
            for name, pairs in withheld.items()
        }
        return (None if cpu is None else CpuFingerprint.from_dict(cpu)), gaps
    except (ValueError, TypeError, AttributeError) as error:
        raise _damaged(run_file, f"its cpu or withheld entry: {error}") from None


def read_storage(run_file: Path) -> str | None:
    """The storage URL run.json names (None: the folder's study.db)."""
    try:
        storage = read_json(run_file).get("storage")
    except (ValueError, AttributeError) as error:
        raise _damaged(run_file, str(error)) from None
    return storage if isinstance(storage, str) else None


def read_run(out: Path) -> tuple[StudySettings, list[TrialRecord]]:
    """A finished or interrupted run's settings and trials, from its folder alone."""
    folder = RunFolder(out)
    if not folder.has_run():
        raise SlimformerError(f"{out} is not a slimformer run folder (no run.json)")
    settings = read_settings(folder.run_file)
    trials_file = folder.path / "trials.jsonl"
    records = []
    if trials_file.is_file():
        try:
            lines = read_text(trials_file).splitlines()
        except ValueError as error:
            raise _damaged(trials_file, str(error)) from None
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    records.append(TrialRecord.from_dict(parse_json(line)))
                except ValueError as error:
                    raise _damaged(trials_file, f"line {number}: {error}") from None
    return settings, records


def read_best(out: Path) -> tuple[int, bool] | None:
    """The trial best/ holds and whether it met the budget, from best/metrics.json (None: no
    best/ yet)."""
    metrics_file = RunFolder(out).best_dir / "metrics.json"
    if not metrics_file.is_file():
        return None
    try:
        metrics = read_json(metrics_file)
    except ValueError as error:
        raise _damaged(metrics_file, str(error)) from None
    trial = metrics.get("trial") if isinstance(metrics, dict) else None
    met = metrics.get("met_max_drop") if isinstance(metrics, dict) else None
    if isinstance(trial, bool) or not isinstance(trial, int) or not isinstance(met, bool):
        raise _damaged(metrics_file, "no trial number or met_max_drop")
    return trial, met
