"""A study SIGKILLed at any moment leaves a run folder that `--resume` completes: no finished
trial lost, and best/ always a whole model — the old one or the new one, never a mixture.

Kills come at named points (`SLIMFORMER_TEST_KILL_AT`, search/killpoints.py: between the
storage and trials.jsonl, between trials.jsonl and pareto.json, around the swap of best/), from
a pass inside a build child (which must die with the study), and at random moments: uniformly
over the duration of a run measured first. The suite runs a bounded loop on fake models
(tests/crash_study.py); `make bench-crash` a long one through the CLI on a tiny real model.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import crash_study
import optuna
import pytest
from optuna.trial import TrialState

import slimformer
from slimformer.recipe import Recipe

TESTS = Path(__file__).resolve().parent
DRIVER = [sys.executable, str(TESTS / "crash_study.py")]
CLI = [sys.executable, "-m", "slimformer.cli"]
NAMED_POINTS = ("trial-told:2", "trials-written:2", "best-copied:1", "best-aside:1")
BENCH_KILLS = 20  # random kills of real studies in `make bench-crash`
# The card and the figures are rewritten after the confirmation; the rest is the model.
FACTS = {"metrics.json", "README.md"}


class Launched:
    """A study's process: forked from this one (fake models: no start-up to wait for), or a
    command in its own process group (whatever survives its leader's death is found there)."""

    def __init__(self, argv: list[str] | None, env: dict[str, str], target=None, args=()):
        self.group = argv is not None
        if argv is not None:
            self.process = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            self.pid = self.process.pid
        else:
            self.forked = multiprocessing.get_context("fork").Process(
                target=_in_env, args=(env, target, args)
            )
            self.forked.start()
            self.pid = self.forked.pid

    def running(self) -> bool:
        if self.group:
            return self.process.poll() is None
        return self.forked.is_alive()

    def wait(self) -> tuple[int, str]:
        """Its exit code (minus the signal that killed it) and what it wrote on stderr."""
        if self.group:
            _, stderr = self.process.communicate(timeout=600)
            return self.process.returncode, stderr[-3000:]
        self.forked.join(timeout=600)
        return self.forked.exitcode, ""

    def kill(self) -> None:
        """SIGKILL the study alone, then check that nothing of its group lives on."""
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
        self.wait()
        if self.group:
            assert _wait_for(lambda: not _group_members(self.pid), 10), "a child outlived it"


def _in_env(env: dict[str, str], target, args) -> None:
    os.environ.clear()
    os.environ.update(env)
    target(*args)


class Run:
    """One run folder, studied again and again by processes that may be killed. `launch`
    starts a study of so many trials in it, with these environment variables."""

    def __init__(self, path: Path, launch: Callable[[int, dict[str, str]], Launched]):
        self.path = path
        self.launch = launch

    def start(self, trials: int, env: dict[str, str] | None = None) -> Launched:
        return self.launch(trials, env or {})

    def complete(self, trials: int) -> float:
        """Run a study to its end; return the seconds from the lock taken to the end."""
        study = self.start(trials)
        began = self.wait_until_studying(study)
        code, stderr = study.wait()
        assert code == 0, stderr
        return time.monotonic() - began

    def wait_until_studying(self, study: Launched) -> float:
        """When `study` holds the folder (it wrote its pid), as time.monotonic()."""
        pid_file = self.path / "study.pid"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and study.running():
            try:
                if pid_file.read_text().strip() == str(study.pid):
                    return time.monotonic()
            except OSError:
                pass
            time.sleep(0.01)
        return time.monotonic()  # it ended (or never got there): studying "now"


def environment(**extra: str) -> dict[str, str]:
    """This process's environment, tests/ on PYTHONPATH (the children import test modules)."""
    paths = [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), **extra)


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


# --- what must hold -------------------------------------------------------------------------
def finished_trials(run: Path) -> dict[int, dict]:
    """The trials the storage holds as finished (complete, or failed with a reason), but for
    repeats of a measured recipe (they take its result, and trials.jsonl leaves them out)."""
    if not (run / "study.db").exists():
        return {}
    storage = f"sqlite:///{run / 'study.db'}"
    try:
        study = optuna.load_study(study_name="slimformer", storage=storage)
    except KeyError:  # killed before the study was created in it
        return {}
    finished = {}
    for trial in study.get_trials(deepcopy=False):
        failed = trial.state == TrialState.FAIL and "error" in trial.user_attrs
        repeat = "duplicate_of" in trial.user_attrs
        if (trial.state == TrialState.COMPLETE or failed) and not repeat:
            attrs = trial.user_attrs
            finished[trial.number] = {
                "state": "complete" if trial.state == TrialState.COMPLETE else "failed",
                "description": attrs["description"],
                "quality": attrs.get("quality"),
                "error": attrs.get("error"),
                "steps": Recipe.from_dict(attrs["recipe"]).steps,  # as applied
            }
    return finished


def model_files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in FACTS
    }


def check_best_is_whole(run: Path, before: dict[str, bytes] | None, real: bool) -> None:
    """best/ holds one model, whole, with the figures of the trial it came from; absent only
    while no study has saved one yet, or with the earlier one whole in .best.old (a death in
    the swap: the next study puts it back)."""
    best = run / "best"
    if not best.exists():
        if before is not None:
            assert model_files(run / ".best.old") == before
        return
    metrics = json.loads((best / "metrics.json").read_text())
    assert finished_trials(run)[metrics["trial"]]["steps"] == Recipe.load(best).steps
    assert (best / "README.md").is_file()
    if real:
        slimformer.load(best)  # every file it needs is there and loads
    else:
        assert set(model_files(best)) == {"recipe.yaml", "slimformer.json"}


def check_resumed(run: Path, finished_before: dict[int, dict], real: bool) -> None:
    """After a study that ran to its end on the folder."""
    lines = {
        line["number"]: line
        for line in map(json.loads, (run / "trials.jsonl").read_text().splitlines())
    }
    for number, trial in finished_before.items():
        kept = lines[number]
        assert (kept["state"], kept["description"], kept["quality"], kept["error"]) == (
            trial["state"],
            trial["description"],
            trial["quality"],
            trial["error"],
        ), number
    check_best_is_whole(run, None, real)
    leftovers = [".best.tmp", ".best.old", "study.pid"]
    assert not [name for name in leftovers if (run / name).exists()]
    assert not list((run / "candidates").glob(".trial-*"))


def kill_and_resume(
    run: Run, trials: int, *, at: float | None = None, env: dict | None = None, real: bool = False
) -> float:
    """Start a study of `trials` trials, kill it `at` seconds after it took the folder (or let a
    kill point in `env` do it), check the folder, resume to the end, check again. Returns the
    duration of the completed run."""
    before = model_files(run.path / "best") if (run.path / "best").exists() else None
    study = run.start(trials, env)
    studying = run.wait_until_studying(study)
    if at is None:
        code, stderr = study.wait()
        assert code == -signal.SIGKILL, stderr
    else:
        time.sleep(max(0.0, studying + at - time.monotonic()))
    study.kill()
    finished = finished_trials(run.path)
    check_best_is_whole(run.path, before, real)
    duration = run.complete(trials)
    check_resumed(run.path, finished, real)
    return duration


# --- the tests ------------------------------------------------------------------------------
@pytest.fixture()
def in_memory(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory where there is one (/dev/shm): renames work as on a disk, and the
    storage's fsyncs, most of a fake study's time, cost nothing."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="slimformer-crash-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fake_run(path: Path) -> Run:
    """Studies of fake models, forked from this process."""
    return Run(
        path,
        lambda trials, env: Launched(None, environment(**env), crash_study.study, (path, trials)),
    )


def test_killed_at_each_named_point_the_study_resumes_losing_nothing(in_memory):
    run = fake_run(in_memory / "run")
    trials = 2
    run.complete(trials)
    for point in NAMED_POINTS:
        trials += 2
        kill_and_resume(run, trials, env={"SLIMFORMER_TEST_KILL_AT": point})
    assert len(finished_trials(run.path)) >= trials


def test_killed_at_random_moments_the_study_resumes_losing_nothing(in_memory):
    rng = random.Random(16)
    run = fake_run(in_memory / "run")
    trials = 2
    duration = run.complete(trials)
    kills = 0
    stop = time.monotonic() + 40  # a bounded loop in the suite; make bench-crash runs long
    while time.monotonic() < stop or kills < 6:
        trials += 2
        duration = kill_and_resume(run, trials, at=rng.uniform(0, duration))
        kills += 1


@pytest.mark.usefixtures("fault_pass")
def test_a_study_killed_during_a_pass_leaves_no_child_behind_and_resumes(tiny_encoder, tmp_path):
    marker = tmp_path / "fault-pid"
    path = tmp_path / "run"
    command = [*DRIVER, str(path), "--model", str(tiny_encoder), "--fault", "kill-study"]
    env = environment(SLIMFORMER_TEST_FAULT_MARKER=str(marker))
    run = Run(path, lambda trials, extra: Launched([*command, "--trials", str(trials)], env))
    # The trial after the baseline is the faulty pass's: it kills the study from inside its
    # build child, which must then die too (Launched.kill looks for it in the process group).
    kill_and_resume(run, 2, real=True)
    build_child = int(marker.read_text())
    assert not Path(f"/proc/{build_child}").exists()
    lines = [json.loads(line) for line in (path / "trials.jsonl").read_text().splitlines()]
    assert [line["state"] for line in lines] == ["complete", "complete"]
    assert "test.fault" in lines[1]["description"]  # the cut trial, run again


@pytest.mark.bench
def test_real_studies_killed_at_random_moments_resume_losing_nothing(tiny_encoder, tmp_path):
    """Through the CLI, real build and evaluation children (`make bench-crash`, ~30 min)."""
    rng = random.Random(16)
    path = tmp_path / "run"
    base = [*CLI, "optimize", str(tiny_encoder), "--out", str(path), "--threads", "1"]
    base += ["--batch-size", "8", "--passes", "prune.layers,prune.ffn,quantize.dynamic_int8"]
    base += ["--max-drop", "100%", "--confirm-rounds", "1"]

    def launch(trials: int, env: dict[str, str]) -> Launched:
        resume = ["--resume"] if (path / "run.json").is_file() else []
        return Launched([*base, "--trials", str(trials), *resume], environment(**env))

    run = Run(path, launch)
    trials = 2
    duration = run.complete(trials)
    for _ in range(BENCH_KILLS):
        trials += 1
        duration = kill_and_resume(run, trials, at=rng.uniform(0, duration), real=True)
