"""`test.fault`: a pass that fails on demand, for the tests of trial isolation and crashes.

Registered when this module is imported. The study's build child imports it too, because a
recipe names its pass (slimformer/build.py imports the module of every pass outside slimformer):
the `fault_pass` fixture (conftest.py) imports it here and puts tests/ on the children's
PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, Phase, register_pass, searchable

FAULTS = ("none", "raise", "abort", "hang", "kill-study")
# For `kill-study`: a file the pass writes its pid to, and kills the study only while the file
# is absent (so the resumed study's rerun of the trial goes through).
KILL_MARKER = "SLIMFORMER_TEST_FAULT_MARKER"


@dataclass(frozen=True)
class FaultConfig:
    fault: str = searchable("none", Choice(FAULTS), "how the pass fails")


@register_pass
class Fault(Pass):
    name = "test.fault"
    summary = "fails on demand (tests only)"
    config_class = FaultConfig
    phase = Phase.STRUCTURE
    searched_by_default = False

    def apply(self, model: SlimModel, config: FaultConfig, ctx: PassContext) -> dict[str, Any]:
        if config.fault == "raise":
            raise AssertionError("the test pass broke")
        if config.fault == "abort":
            os.abort()  # a native crash: no Python exception, no answer
        if config.fault == "hang":
            time.sleep(3600)  # ignores the deadline, as a pass without checks would
        if config.fault == "kill-study":
            marker = Path(os.environ[KILL_MARKER])
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getppid(), signal.SIGKILL)
                time.sleep(60)  # the kernel ends this child with its parent
        return {}
