"""The cores a worker times on, its own: two timings on one machine never share a core.

A worker claims as many cores as it measures with threads by taking an exclusive lock on one
file per core (in the temp folder, so workers of every study on the machine see each other's
claims), and pins itself to them; its build and evaluation children inherit the pinning. The
kernel drops the locks when the worker dies, however it dies. Ray's `num_cpus` only counts
cores, it does not pin, hence this beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from pathlib import Path

from slimformer.cpu import MACHINE_CORES
from slimformer.errors import SlimformerError

_HELD: list[int] = []  # the lock files' descriptors, open for the life of the process
_CLAIMED: list[int] = []  # the cores they lock
_BEFORE: list[set[int]] = []  # the affinity before the claim


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def claim_cores(count: int, wait_s: float = 600.0) -> list[int]:
    """Pin this process to `count` cores no other worker holds, waiting up to `wait_s` for
    them; the fingerprint keeps the machine's core count (cpu.MACHINE_CORES)."""
    if len(_CLAIMED) >= count:  # a second worker in one process (tests): the same cores
        os.sched_setaffinity(0, _CLAIMED[:count])
        return _CLAIMED[:count]
    cores = available_cores()
    if count > len(cores):
        raise SlimformerError(
            f"a worker times with {count} threads but this machine gives it {len(cores)} "
            "cores; lower --threads"
        )
    folder = Path(tempfile.gettempdir()) / "slimformer-cores"
    folder.mkdir(exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        held: list[tuple[int, int]] = []
        for core in cores:
            fd = os.open(folder / f"core-{core}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((core, fd))
            if len(held) == count:
                break
        if len(held) == count:
            os.environ.setdefault(MACHINE_CORES, str(len(cores)))
            _BEFORE[:] = [set(cores)]
            os.sched_setaffinity(0, [core for core, _ in held])
            _HELD.extend(fd for _, fd in held)
            _CLAIMED[:] = [core for core, _ in held]
            return list(_CLAIMED)
        for _, fd in held:
            with contextlib.suppress(OSError):
                os.close(fd)
        if time.monotonic() > deadline:
            raise SlimformerError(
                f"no {count} free cores on this machine within {wait_s:.0f} s: other workers "
                "hold them; start fewer workers or lower --threads"
            )
        time.sleep(1.0)


def release_cores() -> None:
    """Give the claimed cores back and run on all cores again (a process that goes on after
    its worker, such as a test's)."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    _CLAIMED.clear()
    if _BEFORE:
        os.sched_setaffinity(0, _BEFORE.pop())
        os.environ.pop(MACHINE_CORES, None)
