"""Whether a running trial is still being worked on, when several processes or machines share
one study.

Each trial names its worker (host, pid and the process's start time, so a reused pid is not
taken for it) and, while it runs, a thread stamps it every `BEAT_S` seconds. A trial is dead
when its worker is on this host and its process is gone (seen at once), or, for a worker on
another host, when its stamp is older than `GRACE_S`. A dead trial is closed as failed
without an error and queued again (`reap`), so no recipe a killed worker held is lost.

Optuna's own heartbeat covers only its RDB storages, not the journal file, hence this one on
trial user attributes, which every storage keeps.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

WORKER = "worker"  # user attribute: {"host", "pid", "start", "machine"}
ALIVE = "alive"  # user attribute: epoch seconds of the last stamp
BEAT_S = 10.0
GRACE_S = 60.0  # three missed stamps and then some: a busy server is not a dead worker


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), None
    when there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) is in parentheses and may hold spaces.
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def identity() -> dict[str, Any]:
    """This process as a trial's worker."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_ticks(pid)}


def alive(trial: FrozenTrial, now: float | None = None, unnamed_alive: bool = True) -> bool:
    """Whether a running trial's worker is still at it. `unnamed_alive`: how to take a trial
    that names no worker (a run from before workers, or one killed right after it was asked):
    alive within the grace period of its start, or (False) dead — what the process holding
    the run folder concludes when it opens it."""
    now = time.time() if now is None else now
    worker = trial.user_attrs.get(WORKER)
    if isinstance(worker, dict) and worker.get("host") == socket.gethostname():
        return worker.get("start") is not None and _start_ticks(worker["pid"]) == worker["start"]
    if not isinstance(worker, dict) and not unnamed_alive:
        return False
    stamps = [trial.user_attrs.get(ALIVE)]
    if trial.datetime_start is not None:
        stamps.append(trial.datetime_start.timestamp())
    last = max((s for s in stamps if isinstance(s, (int, float))), default=0.0)
    return now - last < GRACE_S


def running_elsewhere(study: optuna.Study) -> int:
    """How many trials other processes are working on now."""
    me = identity()
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if alive(t) and not _is(t.user_attrs.get(WORKER), me)
    )


def _is(worker: Any, me: dict[str, Any]) -> bool:
    return isinstance(worker, dict) and all(worker.get(k) == me[k] for k in ("host", "pid"))


def running_on(study: optuna.Study, machine: str, description: str, before: int) -> bool:
    """Whether a live worker on a machine of this kind (`optuna_study.machine_key`) is
    measuring this recipe now, in a trial asked before trial `before` (only earlier ones:
    two trials of one recipe never wait for each other)."""
    return any(
        t.number < before
        and t.user_attrs.get("description") == description
        and (t.user_attrs.get(WORKER) or {}).get("machine") == machine
        and alive(t)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    )


@contextlib.contextmanager
def working_on(trial: optuna.Trial, machine: str) -> Iterator[None]:
    """Name this process (on a machine of kind `machine`) as `trial`'s worker and stamp it
    until the block ends (before the trial is told: a finished trial takes no more
    attributes)."""
    trial.set_user_attr(WORKER, identity() | {"machine": machine})
    trial.set_user_attr(ALIVE, time.time())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            # A lost connection must not end the trial; the next stamp tries again.
            with contextlib.suppress(Exception):
                trial.set_user_attr(ALIVE, time.time())

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def dead_trials(study: optuna.Study, unnamed_alive: bool = True) -> list[FrozenTrial]:
    now = time.time()
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not alive(t, now, unnamed_alive)
    ]
