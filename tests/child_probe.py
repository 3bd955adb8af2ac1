"""A child for the tests of slimformer.child: `python -m child_probe REQUEST.json`.

The request's "do": "answer" (with "answer"), "raise", "sleep" (writing its pid to
"pid_file" first), "stage-then-exit" (a stage line, then exit 3 with a last log line), or
"values" (reports "values" as intermediate values, a tenth of a second apart, writing its pid
first, then answers).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from slimformer.child import child_main, report_stage, report_value


def handle(request: dict[str, Any]) -> dict[str, Any]:
    action = request["do"]
    if action == "raise":
        raise KeyError("no such thing")
    if action == "sleep":
        Path(request["pid_file"]).write_text(str(os.getpid()))
        time.sleep(600)
    if action == "stage-then-exit":
        report_stage("halfway")
        print("the last words", file=sys.stderr, flush=True)
        os._exit(3)
    if action == "values":
        Path(request["pid_file"]).write_text(str(os.getpid()))
        for step, value in request["values"]:
            report_value(step, value)
            time.sleep(0.1)
    return request["answer"]


if __name__ == "__main__":
    sys.exit(child_main(sys.argv, handle))
