"""One piece of a study's work in a child process: a request in, an answer out, crashes contained.

The parent (`run_child`) writes `NAME-request.json` into a work folder and starts
`python -m MODULE NAME-request.json`. The child (`child_main`) prints its progress as stage
lines on stdout, writes everything else it has to say (warnings, tracebacks) to `NAME.log`, and
answers in `NAME-result.json`: a JSON object, or `{"error": reason}`. Whatever becomes of the
child — an exception, a native crash, the kernel's out-of-memory killer, a deadline — the
parent gets the answer or a `CandidateFailed` whose message is the reason.

The child dies with its parent (Linux: the parent-death signal), so a study killed however it
dies leaves no child working on behind it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from slimformer.errors import SlimformerError
from slimformer.files import write_atomic

STAGE_PREFIX = "@@slimformer-stage "
VALUE_PREFIX = "@@slimformer-value "
POLL_S = 0.5  # how often the parent looks at a child's intermediate values
DEADLINE_REASON = "stopped at the study's deadline"
_PR_SET_PDEATHSIG = 1


class CandidateFailed(Exception):
    """A candidate could not be built or evaluated; the message is the reason recorded for
    its trial."""


class Stopped(CandidateFailed):
    """The parent stopped the child on one of its intermediate values (`on_value`)."""

    def __init__(self, reason: str, step: int, value: float):
        super().__init__(reason)
        self.step, self.value = step, value


def run_child(
    module: str,
    request: dict[str, Any],
    workdir: Path,
    name: str,
    *,
    on_stage: Callable[[str], None] | None = None,
    timeout_s: float | None = None,
    kill_at: float | None = None,
    on_value: Callable[[int, float], str | None] | None = None,
) -> dict[str, Any]:
    """Run `python -m module` on `request` and return its answer. The child is killed after
    `timeout_s`, or at `kill_at` (epoch seconds: the study's deadline), whichever comes first.
    `on_value`: called in this thread with each intermediate value (step, value) the child
    reports (`report_value`); a reason returned stops the child, raising `Stopped`."""
    limit, limit_reason = _limit(name, timeout_s, kill_at)
    if limit is not None and limit <= 0:
        raise CandidateFailed(limit_reason)
    workdir.mkdir(parents=True, exist_ok=True)
    result_path = workdir / f"{name}-result.json"
    request_path = workdir / f"{name}-request.json"
    log_path = workdir / f"{name}.log"
    request = request | {"result": str(result_path), "parent": os.getpid()}
    write_atomic(request_path, json.dumps(request, indent=2))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-X", "faulthandler", "-m", module, str(request_path)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        assert process.stdout is not None
        values: queue.SimpleQueue[tuple[int, float]] = queue.SimpleQueue()
        relay = threading.Thread(
            target=_relay, args=(process.stdout, on_stage, values), daemon=True
        )
        relay.start()
        try:
            returncode = _wait(process, limit, values, on_value)
        except subprocess.TimeoutExpired:
            raise CandidateFailed(limit_reason) from None
        finally:  # also on Ctrl-C in the parent: no child outlives its request
            if process.poll() is None:
                process.kill()
                process.wait()
            relay.join(timeout=5)
    answer = _read_answer(result_path)
    if "error" in answer:
        raise CandidateFailed(str(answer["error"]))
    if returncode == 0 and answer:
        return answer
    raise CandidateFailed(_reason(name, returncode, log_path))


def _limit(name: str, timeout_s: float | None, kill_at: float | None) -> tuple[float | None, str]:
    """Seconds the child may run (None: no limit), and the reason when it runs out."""
    by_timeout = math.inf if timeout_s is None else timeout_s
    by_deadline = math.inf if kill_at is None else kill_at - time.time()
    if math.isinf(by_timeout) and math.isinf(by_deadline):
        return None, ""
    if by_deadline <= by_timeout:
        return by_deadline, DEADLINE_REASON
    return by_timeout, f"the {name} process took longer than {by_timeout:.0f} s"


def _wait(
    process: subprocess.Popen,
    limit: float | None,
    values: queue.SimpleQueue[tuple[int, float]],
    on_value: Callable[[int, float], str | None] | None,
) -> int:
    """The child's exit code; its intermediate values handed to `on_value` meanwhile (here,
    not in the relay thread: the study's storage is used from one thread)."""
    if on_value is None:
        return process.wait(timeout=limit)
    end = None if limit is None else time.monotonic() + limit
    while True:
        try:
            wait = POLL_S if end is None else min(POLL_S, max(0.0, end - time.monotonic()))
            returncode = process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            returncode = None
            if end is not None and time.monotonic() >= end:
                raise
        while not values.empty():
            step, value = values.get()
            reason = on_value(step, value)
            if reason:
                raise Stopped(reason, step, value)
        if returncode is not None:
            return returncode


def _relay(
    stream: IO[str],
    on_stage: Callable[[str], None] | None,
    values: queue.SimpleQueue[tuple[int, float]] | None = None,
) -> None:
    for line in stream:
        if line.startswith(STAGE_PREFIX) and on_stage:
            on_stage(line[len(STAGE_PREFIX) :].strip())
        elif line.startswith(VALUE_PREFIX) and values is not None:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                message = json.loads(line[len(VALUE_PREFIX) :])
                values.put((int(message["step"]), float(message["value"])))


def _read_answer(path: Path) -> dict[str, Any]:
    try:
        answer = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return answer if isinstance(answer, dict) else {}


def _reason(name: str, returncode: int, log_path: Path) -> str:
    """Why a child that left no answer failed: the signal that ended it, or its last words."""
    if returncode < 0:
        try:
            signame = signal.Signals(-returncode).name
        except ValueError:
            signame = f"signal {-returncode}"
        why = " (out of memory, or killed from outside)" if returncode == -signal.SIGKILL else ""
        return f"the {name} process died of {signame}{why}; its log: {log_path}"
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1] if lines else f"the {name} process exited with code {returncode}"
    return last[:300]


# --- the child's side -----------------------------------------------------------------------
def report_stage(name: str) -> None:
    """Tell the parent which stage the child is in (relayed to the study's progress)."""
    print(STAGE_PREFIX + name, flush=True)


def report_value(step: int, value: float) -> None:
    """Tell the parent an intermediate value (a training pass's held-out loss at `step`)."""
    print(VALUE_PREFIX + json.dumps({"step": step, "value": value}), flush=True)


def child_main(argv: list[str], handle: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Answer the request file `argv[1]` with `handle`; any exception becomes the answer's
    reason, its traceback goes to the log."""
    warnings.simplefilter("ignore")
    request = json.loads(Path(argv[1]).read_text())
    die_with_parent(request.get("parent"))
    try:
        answer, code = handle(request), 0
    except SlimformerError as error:
        traceback.print_exc()
        answer, code = {"error": str(error)}, 2
    except Exception as error:  # whatever breaks a candidate is its trial's reason
        traceback.print_exc()
        answer, code = {"error": f"{type(error).__name__}: {error}"[:300]}, 1
    write_atomic(Path(request["result"]), json.dumps(answer, indent=2))
    return code


def die_with_parent(parent: int | None) -> None:
    """Ask the kernel to kill this process when its parent dies (Linux; elsewhere a no-op)."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request was even read
        os._exit(1)
