"""The run folder on disk: what a study writes, what `--resume` checks, what `show` reads.

study.db                Optuna's SQLite storage, the source of truth
run.json                settings, the CPU it runs on, the search space's CPU gaps
trials.jsonl            one TrialRecord a line, rewritten after every trial
pareto.json             the current front, rewritten after every trial
task_state.safetensors  the task's reference arrays (the run stays self-contained)
candidates/trial-NNN/   the models on the current front
best/                   the chosen model, metrics.json and the model card
logs/                   each evaluation child's request, result and log
study.pid               the process holding the folder (lock.py)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from slimformer.cpu import CpuFingerprint, fingerprint
from slimformer.errors import SlimformerError
from slimformer.files import replace_dir, write_atomic
from slimformer.search.lock import clear_folder
from slimformer.search.records import BestModel, TrialRecord, find
from slimformer.search.settings import StudySettings

# Writes best/README.md, the model card, from what the model was chosen with.
CardWriter = Callable[[Path, BestModel], None]
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
    def storage_url(self) -> str:
        return f"sqlite:///{self.path / 'study.db'}"

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
        if self.has_run():
            if resume:
                saved = read_settings(self.run_file)
                if Path(saved.model) != Path(settings.model) and saved.model != settings.model:
                    raise SlimformerError(
                        f"{out} is a run on {saved.model}, not {settings.model}; "
                        "resume it with the same model or choose another --out"
                    )
                facts = json.loads(self.run_file.read_text())
                check_same_machine(facts, saved, out, allow_other_cpu)
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
                return settings, withheld  # type: ignore[return-value]
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

    def write_run(self, settings: StudySettings, cpu: CpuFingerprint, withheld: Gaps) -> None:
        """run.json: the settings, the CPU it runs on now (a run resumed elsewhere continues
        as that machine's), and the search space's CPU-dependent gaps as first decided."""
        facts = {
            "cpu": cpu.to_dict(),
            "withheld": {n: sorted(map(list, pairs)) for n, pairs in withheld.items()},
        }
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
        """Remove the saved candidates that are not (any longer) among `numbers`."""
        for path in (self.path / "candidates").glob("trial-*"):
            if int(path.name.split("-")[1]) not in numbers:
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
        replace_dir(tmp, self.best_dir)
        return self.best_dir


def write_best_facts(folder: Path, best: BestModel, write_card: CardWriter | None) -> None:
    """metrics.json and the model card beside a saved model (rewritten after confirmation)."""
    write_atomic(folder / "metrics.json", json.dumps(best.metrics(), indent=2))
    if write_card is not None:
        write_card(folder, best)


def check_same_machine(
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


def read_settings(run_file: Path) -> StudySettings:
    try:
        return StudySettings.from_dict(json.loads(run_file.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise SlimformerError(
            f"{run_file} is damaged ({type(error).__name__}: {error}); start over with "
            "--overwrite or choose another --out"
        ) from None


def read_run(out: Path) -> tuple[StudySettings, list[TrialRecord]]:
    """A finished or interrupted run's settings and trials, from its folder alone."""
    folder = RunFolder(out)
    if not folder.has_run():
        raise SlimformerError(f"{out} is not a slimformer run folder (no run.json)")
    settings = read_settings(folder.run_file)
    trials_file = folder.path / "trials.jsonl"
    records = []
    if trials_file.is_file():
        for line in trials_file.read_text().splitlines():
            if line.strip():
                records.append(TrialRecord(**json.loads(line)))
    return settings, records
