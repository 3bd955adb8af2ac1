"""Named moments at which the crash tests kill the study, to check that any death leaves a run
folder `--resume` completes.

`SLIMFORMER_TEST_KILL_AT=POINT[:N]` makes the process SIGKILL itself the Nth time (default:
the first) it reaches `kill_point(POINT)`. Unset, a kill point does nothing. The points:

    trial-told     a trial's result is in the storage, trials.jsonl not yet rewritten
    trials-written trials.jsonl rewritten, pareto.json not yet
    best-copied    the new best/ is complete beside the old one, not yet swapped in
    best-aside     the old best/ moved aside, the new one not yet in its place
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "SLIMFORMER_TEST_KILL_AT"
_reached: Counter[str] = Counter()


def kill_point(name: str) -> None:
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
