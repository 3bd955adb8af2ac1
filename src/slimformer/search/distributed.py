"""One study, many workers: processes on this machine, other machines, or Ray tasks.

A study lives in its storage (storage.py), with what a worker needs to join it (the settings,
the search space's gaps, when its time budget started: optuna_study.share). A worker
(`slimformer worker RUN_OR_STORAGE`, `run_worker`) loads it, claims its own cores (cores.py),
prepares the task on its copy of the model, and runs trials until the study's trial or time
budget is spent; a trial whose worker dies is queued again by the next worker that asks
(liveness.py). The study's own process (`optimize --workers N` or `--ray-address`) prepares
and opens the study, starts the workers, reports their trials as they finish, and when they
are done makes the choice, saves best/ and confirms its ratios as a study alone would.

The worker itself is runner.py's `run_worker` (it runs the study's loop); here is what starts
workers and follows them. A worker given a run folder works in it (same machine, or a shared
filesystem); one given a storage URL keeps its candidates, logs and the task's arrays in its
own folder (`--out`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from slimformer.child import die_with_parent
from slimformer.errors import SlimformerError
from slimformer.search import optuna_study
from slimformer.search.cores import available_cores
from slimformer.search.liveness import WORKER, identity
from slimformer.search.records import TrialRecord
from slimformer.search.run_folder import RunFolder, read_storage
from slimformer.search.storage import check_url, is_url, shown

POLL_S = 1.0
PARENT = "SLIMFORMER_STUDY_PID"  # set in a local worker: the study's process, to die with


def check_workers(workers: int, threads: int) -> None:
    """`--workers N` timing with `threads` threads each must fit this machine's cores, one
    set each."""
    if workers < 1:
        raise SlimformerError("--workers must be 1 or more (leave it out to run trials here)")
    cores = len(available_cores())
    if workers * threads > cores:
        raise SlimformerError(
            f"--workers {workers} timing with {threads} threads each need {workers * threads} "
            f"cores, this machine gives {cores}: two timings would share a core; lower "
            "--workers or --threads"
        )


def locate(target: str | os.PathLike[str], out: Path | None) -> tuple[str, Path]:
    """The storage URL and the work folder of a worker given a run folder or a URL."""
    text = str(target)
    if is_url(text):
        check_url(text)
        return text, out or Path("runs") / f"worker-{socket.gethostname()}"
    folder = RunFolder(Path(text))
    if not folder.has_run():
        raise SlimformerError(
            f"{text} holds no slimformer run (no run.json) and is not a storage URL; give the "
            "run folder of `slimformer optimize` or its --storage URL"
        )
    return read_storage(folder.run_file) or folder.storage_url, out or folder.path


def trials_of_this_process(study: optuna.Study) -> int:
    """The trials of the budget this process measured (by the budget's own rule,
    TrialRecord.counts: repeats told at no cost and interrupted trials left out)."""
    me = identity()
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if all((t.user_attrs.get(WORKER) or {}).get(k) == me[k] for k in ("host", "pid"))
        and optuna_study.to_record(t).counts
    )


# --- the study's own process ----------------------------------------------------------------
class Follower:
    """Reports the trials workers finish, as the study's process learns of them."""

    def __init__(self, study: optuna.Study, records: Callable[[], list[TrialRecord]], reporter):
        self.study = study
        self.records = records
        self.reporter = reporter
        self.seen = {r.number for r in records() if r.state in ("complete", "failed", "pruned")}

    def poll(self) -> None:
        for record in self.records():
            if record.state in ("complete", "failed", "pruned") and record.number not in self.seen:
                self.seen.add(record.number)
                if record.counts:
                    self.reporter.trial_finished(record)


def die_with_study() -> None:
    """In a local worker: die when the study's process that started it dies (however it
    dies), so no worker outlives its study."""
    parent = os.environ.pop(PARENT, "")
    if parent.isdigit():
        die_with_parent(int(parent))


def run_local_workers(folder: RunFolder, count: int, follow: Follower) -> None:
    """`count` worker processes on this machine, each in the run folder, until all are done;
    their output goes to logs/worker-N.log. One that ended badly is said with its last line."""
    logs = folder.logs("")
    logs.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "slimformer.cli", "worker", str(folder.path.resolve())]
    processes = []
    try:
        for index in range(count):
            log = open(logs / f"worker-{index}.log", "w")  # noqa: SIM115 (closed below)
            processes.append(
                (
                    subprocess.Popen(
                        command,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=os.environ | {PARENT: str(os.getpid())},
                    ),
                    log,
                    logs / f"worker-{index}.log",
                )
            )
        while any(p.poll() is None for p, _, _ in processes):
            time.sleep(POLL_S)
            follow.poll()
        follow.poll()
    finally:
        for process, log, _ in processes:
            if process.poll() is None:
                process.terminate()
                process.wait()
            log.close()
    failed = [(p.returncode, path) for p, _, path in processes if p.returncode != 0]
    if failed and len(failed) == len(processes):
        code, path = failed[0]
        raise SlimformerError(f"every worker failed (exit {code}): {_last_line(path)}; see {path}")
    for code, path in failed:
        follow.reporter.note(f"a worker ended with exit {code}: {_last_line(path)}; see {path}")


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()[:300]
    return "no output"


def run_ray_workers(
    address: str,
    storage_url: str,
    folder: RunFolder,
    threads: int,
    count: int | None,
    follow: Follower,
    work: Callable[[str, str], Any],
) -> None:
    """Workers as Ray tasks on the cluster at `address`, each reserving the cores it times
    on (`num_cpus` = its threads; on its node it pins itself to them: cores.py); `count`
    tasks (default: as many as the cluster's CPUs hold). `work(storage_url, run_path)` is
    the task (runner.ray_worker)."""
    try:
        import ray
    except ImportError:
        raise SlimformerError(
            "--ray-address needs Ray: pip install 'slimformer[distributed]'"
        ) from None
    if storage_url.startswith("sqlite") and address not in ("local", "auto"):
        follow.reporter.note(
            f"the study is in {shown(storage_url)}: Ray nodes reach it only through a shared "
            "filesystem; use --storage postgresql://… or journal:///shared/… across machines"
        )
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except Exception as error:  # ray raises ConnectionError, RuntimeError, ValueError...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SlimformerError(
            f"cannot reach the Ray cluster at {address}: {reason[:200]}; start one with "
            "`ray start --head` or check the address"
        ) from None
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < threads:
            raise SlimformerError(
                f"the Ray cluster at {address} has {cpus} CPUs, a trial times with {threads} "
                "threads; lower --threads"
            )
        count = count or cpus // threads
        # max_calls=1: the worker process exits after its task, dropping its cores (cores.py).
        task = ray.remote(num_cpus=threads, max_retries=0, max_calls=1)(work)
        pending = [task.remote(storage_url, str(folder.path.resolve())) for _ in range(count)]
        errors = []
        while pending:
            done, pending = ray.wait(pending, timeout=POLL_S)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as error:  # the task's exception, wrapped by Ray
                    cause = getattr(error, "cause", None) or error
                    errors.append(str(cause).strip().splitlines()[-1][:300])
            follow.poll()
        follow.poll()
        if errors and len(errors) == count:
            raise SlimformerError(f"every Ray worker failed: {errors[0]}")
        for reason in errors:
            follow.reporter.note(f"a Ray worker failed: {reason}")
    finally:
        ray.shutdown()
