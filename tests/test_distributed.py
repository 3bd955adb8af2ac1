"""One study, several workers: a real PostgreSQL server with a study's own worker process and a
second `slimformer worker` that is SIGKILLed mid-trial, a real local Ray cluster running the
trials as tasks, and the one-line refusals of bad input.

The models are tiny (tests/tiny.py) and the passes cheap; the candidates are built and
evaluated for real, in children, as in any study. PostgreSQL 15's `initdb`/`pg_ctl` start a
server in a temp folder (as the `postgres` user when the tests run as root: initdb refuses
root); Ray and the driver come with `pip install '.[distributed]'`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from inprocess import run_cli
from optuna.trial import TrialState

from slimformer.search import optuna_study

CLI = [sys.executable, "-m", "slimformer.cli"]
CHEAP = ["--passes", "prune.layers,quantize.dynamic_int8", "--no-warm-start"]
STUDY = [*CHEAP, "--threads", "1", "--batch-size", "4", "--confirm-rounds", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    path = os.environ.get("PYTHONPATH", "")
    return os.environ | {"PYTHONPATH": f"{src}:{path}" if path else src}


def _wait_for(condition, timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server of its own (trust auth on 127.0.0.1); yields a URL without the
    database name, which each test creates."""
    # Debian's postgresql package keeps them off PATH, in /usr/lib/postgresql/VERSION/bin.
    path = os.pathsep.join(
        [os.environ.get("PATH", ""), *map(str, Path("/usr/lib/postgresql").glob("*/bin"))]
    )
    initdb, pg_ctl = shutil.which("initdb", path=path), shutil.which("pg_ctl", path=path)
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL's initdb/pg_ctl are not installed (Debian: postgresql)")
    pytest.importorskip("psycopg", reason="pip install '.[distributed]'")
    root = Path(tempfile.mkdtemp(prefix="slimformer-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the server runs as the postgres user
        shutil.chown(root, "postgres", "postgres")
        as_user = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"]
    port = _free_port()
    data = root / "data"
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "slim", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://slim@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def _database(server: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{server}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{server}/{name}"


@pytest.mark.slow
def test_two_workers_on_postgres_one_killed_mid_trial_lose_nothing_and_finish(
    postgres, tiny_encoder, tmp_path
):
    url = _database(postgres, "two_workers")
    run = tmp_path / "run"
    trials = 4
    study_cmd = [*CLI, "optimize", str(tiny_encoder), "--out", str(run), "--storage", url]
    main = subprocess.Popen(
        [*study_cmd, "--workers", "1", "--trials", str(trials), *STUDY],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = None
    try:
        storage = optuna.storages.RDBStorage(url)

        def study() -> optuna.Study | None:
            try:
                loaded = optuna.load_study(study_name="slimformer", storage=storage)
            except KeyError:
                return None
            return loaded if "settings" in loaded.user_attrs else None

        assert _wait_for(lambda: study() is not None, 120), "the study never appeared"
        second = subprocess.Popen(
            [*CLI, "worker", url, "--out", str(tmp_path / "second")],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

        # A trial of the second worker that is in its build child (its request is written).
        # Not merely running: a trial can wait without building (for the baseline, or for
        # another worker measuring the same recipe) and then end as that one's duplicate.
        def second_mid_trial() -> optuna.trial.FrozenTrial | None:
            for trial in study().get_trials(states=(TrialState.RUNNING,)):
                worker = trial.user_attrs.get("worker") or {}
                logs = tmp_path / "second" / "logs" / f"trial-{trial.number:03d}"
                if worker.get("pid") == second.pid and any(logs.glob("*-request.json")):
                    return trial
            return None

        assert _wait_for(lambda: second_mid_trial() is not None, 300, every=0.2), (
            "the second worker never built a trial: "
            + (second.stderr.read() if second.poll() else "")
        )
        killed = second_mid_trial()
        finished_before = {
            t.number: t.values for t in study().get_trials(states=(TrialState.COMPLETE,))
        }
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
        _, stderr = main.communicate(timeout=600)
        assert main.returncode == 0, stderr[-3000:]
    finally:
        for process in (main, second):
            if process is not None and process.poll() is None:
                process.kill()
    final = study()
    by_number = {t.number: t for t in final.trials}
    # No finished trial is lost, and its result is as it was told.
    for number, values in finished_before.items():
        assert by_number[number].state == TrialState.COMPLETE
        assert by_number[number].values == values
    # The killed trial is closed as interrupted (no error) and its recipe measured after it.
    cut = by_number[killed.number]
    assert cut.state == TrialState.FAIL and "error" not in cut.user_attrs
    # Measured again to its end: finished, or stopped early on the scoring subset (a recipe that
    # loses too much on it, as pruning layers of a random tiny model can).
    ended = (TrialState.COMPLETE, TrialState.PRUNED)
    rerun = [
        t
        for t in final.trials
        if t.number > killed.number and t.params == killed.params and t.state in ended
    ]
    assert rerun, "the killed trial's recipe was not run again"
    # The study spent its budget (by the budget's rule: a trial stopped early uses its slot too)
    # and saved its choice.
    counted = [t for t in final.trials if optuna_study.to_record(t).counts]
    assert len(counted) == trials
    assert not final.get_trials(states=(TrialState.RUNNING,))
    assert (run / "best" / "metrics.json").is_file()
    workers = {t.user_attrs["worker"]["pid"] for t in final.trials if "worker" in t.user_attrs}
    assert second.pid in workers and len(workers) >= 2
    # A worker on the same machine measures with the study's fingerprint: one front.
    cpus = {str(t.user_attrs["cpu"]) for t in final.get_trials(states=(TrialState.COMPLETE,))}
    assert len(cpus) == 1


@pytest.fixture()
def ray_cluster() -> Iterator[str]:
    """A real Ray head on this machine (2 CPUs), stopped with its whole process group."""
    pytest.importorskip("ray", reason="pip install '.[distributed]'")
    ray_bin = Path(sys.executable).with_name("ray")
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths are short
    port = _free_port()
    head = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        up = _wait_for(
            lambda: (
                subprocess.run(
                    [str(ray_bin), "status", f"--address={address}"],
                    capture_output=True,
                    env=_env(),
                ).returncode
                == 0
            ),
            120,
            every=2,
        )
        assert up, "the Ray head did not start"
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_ray_cluster_runs_the_trials_as_tasks_each_on_its_own_core(
    ray_cluster, tiny_encoder, tmp_path
):
    run = tmp_path / "run"
    command = [*CLI, "optimize", str(tiny_encoder), "--out", str(run), "--trials", "3"]
    result = subprocess.run(
        [*command, "--ray-address", ray_cluster, *STUDY],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="slimformer", storage=f"sqlite:///{run}/study.db")
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.FAIL))
    workers = {(t.user_attrs["worker"]["pid"]) for t in done if "worker" in t.user_attrs}
    assert workers and os.getpid() not in workers  # measured in the cluster's worker processes
    counted = [t for t in done if "duplicate_of" not in t.user_attrs]
    assert len([t for t in counted if t.state == TrialState.COMPLETE]) >= 2
    assert (run / "best" / "metrics.json").is_file()


def test_an_unreachable_storage_is_one_error_line(tiny_encoder, tmp_path):
    port = _free_port()  # nothing listens there
    result = run_cli(
        [
            "optimize",
            str(tiny_encoder),
            "--out",
            str(tmp_path / "run"),
            "--storage",
            f"postgresql://slim@127.0.0.1:{port}/nothing",
            *STUDY,
        ]
    )
    assert result.code == 2, result.stderr
    assert result.stderr.strip().startswith("error: cannot open the storage")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_storage_urls_workers_and_worker_targets_are_one_error_line(tiny_encoder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "not a run": (["worker", str(empty)], "holds no slimformer run"),
        "no study": (
            ["worker", f"sqlite:///{tmp_path / 'none.db'}", "--out", str(tmp_path / "w")],
            "holds no slimformer study",
        ),
        "no journal file": (
            ["worker", f"journal://{tmp_path}/none.log", "--out", str(tmp_path / "w")],
            "holds no slimformer study",
        ),
        "zero workers": (
            ["optimize", str(tiny_encoder), "--out", str(tmp_path / "r0"), "--workers", "0"],
            "--workers must be 1 or more",
        ),
        "too many workers": (
            ["optimize", str(tiny_encoder), "--out", str(tmp_path / "r1"), "--workers", "99"],
            "two timings would share a core",
        ),
        "unknown scheme": (
            ["optimize", str(tiny_encoder), "--out", str(tmp_path / "r2"), "--storage", "x://y"],
            "is not a storage URL",
        ),
    }
    for name, (args, words) in cases.items():
        result = run_cli(args)
        assert result.code == 2, (name, result.stderr)
        assert result.stderr.strip().startswith("error: ") and words in result.stderr, (
            name,
            result,
        )
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
    assert not (tmp_path / "r0").exists() and not (tmp_path / "r1").exists()


@pytest.fixture()
def cores_given_back() -> Iterator[None]:
    """A worker run in this process pins it to its cores: give them back after the test."""
    from slimformer.search.cores import release_cores

    try:
        yield
    finally:
        release_cores()


def test_a_journal_study_is_joined_by_a_worker_that_stops_at_the_shared_budget(
    tmp_path, cores_given_back
):
    """Fake models (fakes.py), in this process: the journal file holds the study, a worker
    joining it reads the settings from it and respects the trial budget the study spent."""
    from fakes import PASSES, FakeBuilder, FakeEvaluator

    from slimformer.measure import MeasureSettings
    from slimformer.search import runner
    from slimformer.search.settings import StudySettings
    from slimformer.tasks import TaskSpec

    builder = FakeBuilder(tmp_path)
    journal = f"journal://{tmp_path}/shared/study.log"
    chosen = StudySettings(
        model=str(builder.reference_dir),
        task=TaskSpec("embedding"),
        trials=4,
        passes=PASSES,
        measure=MeasureSettings(threads=1, batch_size=8),
        confirm_rounds=0,
    )
    result = runner.run_study(
        chosen, tmp_path / "run", storage=journal, builder=builder, evaluator=FakeEvaluator()
    )
    assert len([t for t in result.trials if t.counts]) == 4 and result.chosen is not None
    assert (tmp_path / "shared" / "study.log").is_file()
    assert not (tmp_path / "run" / "study.db").exists()
    # A worker given the run folder finds the journal through run.json; the budget is spent.
    ran = runner.run_worker(tmp_path / "run", builder=builder, evaluator=FakeEvaluator())
    assert ran == 0
    # The budget raised (as `optimize --resume --trials 6` does), a worker given the URL
    # runs the rest in a folder of its own, with the study's settings.
    study = optuna_study.join_study(journal)
    settings, withheld, started = optuna_study.shared(study)
    optuna_study.share(study, StudySettings(**{**chosen.__dict__, "trials": 6}), withheld, started)
    ran = runner.run_worker(journal, tmp_path / "w", builder=builder, evaluator=FakeEvaluator())
    assert ran == 2
    assert (tmp_path / "w" / "run.json").is_file() and (tmp_path / "w" / "trials.jsonl").is_file()
    counted = [t for t in optuna_study.records(study, runner.fingerprint(1)) if t.counts]
    assert len(counted) == 6


# --- the pieces, in this process -------------------------------------------------------------
def _cpu(model: str) -> dict:
    from slimformer.cpu import fingerprint

    return fingerprint(1).to_dict() | {"model": model}


def _trial(description: str, cpu: dict | None, latency: float, **attrs) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        values=[0.9, latency],
        user_attrs={"description": description, "cpu": cpu, **attrs},
    )


def test_the_choice_compares_the_machine_that_measured_a_baseline_and_the_most_trials():
    from slimformer.cpu import CpuFingerprint

    here = CpuFingerprint.from_dict(_cpu("head node CPU"))
    study = optuna.create_study(directions=["maximize", "minimize"])
    for description, model, latency in [
        ("baseline", "worker CPU A", 10.0),
        ("int8", "worker CPU A", 6.0),
        ("prune", "worker CPU A", 8.0),
        ("baseline", "worker CPU B", 30.0),
        ("int8", "worker CPU B", 1.0),  # faster, but on another kind of machine
        ("prune", "head node CPU", 0.5),  # no baseline on the head: not comparable
    ]:
        study.add_trial(_trial(description, _cpu(model), latency))
    reference = optuna_study.reference_machine(study, here)
    assert reference.model == "worker CPU A"
    records = optuna_study.records(study, reference)
    assert [r.number for r in records if not r.stale] == [0, 1, 2]
    # With a baseline of its own, the study's machine is the reference.
    study.add_trial(_trial("baseline", _cpu("head node CPU"), 5.0))
    assert optuna_study.reference_machine(study, here).same_machine(here)


def test_a_running_trial_is_dead_when_its_worker_process_is_gone_or_silent():
    import socket

    from slimformer.search import liveness

    study = optuna.create_study()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    mine, ended, elsewhere = (
        liveness.identity(),
        {"host": socket.gethostname(), "pid": gone.pid, "start": "1"},
        {"host": "elsewhere", "pid": 1, "start": "1"},
    )
    for worker in (mine, ended, elsewhere):
        trial = study.ask()
        trial.set_user_attr(liveness.WORKER, worker)
        trial.set_user_attr(liveness.ALIVE, now)
    assert {t.number for t in liveness.dead_trials(study)} == {1}  # its pid is gone
    assert liveness.running_elsewhere(study) == 1  # the other host's
    # Later, with no new stamp: a worker on this host is judged by its process, one on
    # another host by its stamps.
    later = now + liveness.GRACE_S + 1
    running = study.get_trials(states=(TrialState.RUNNING,))
    assert [liveness.alive(t, later) for t in running] == [True, False, False]


def test_keeping_the_front_spares_the_folders_of_running_trials(tmp_path):
    from slimformer.search.run_folder import RunFolder

    candidates = tmp_path / "candidates"
    for name in ("trial-001", "trial-004", ".trial-002.abc", ".trial-003.xyz"):
        (candidates / name).mkdir(parents=True)
    RunFolder(tmp_path).keep_candidates({1, 2})  # 1 on the front, 2 being saved by a worker
    assert sorted(p.name for p in candidates.iterdir()) == [".trial-002.abc", "trial-001"]
