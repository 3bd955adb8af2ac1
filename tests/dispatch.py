"""Test code run in a fresh interpreter at another dispatch level.

The caps must be in the environment before PyTorch, oneDNN, fbgemm or OpenVINO load, so a
test that compares two levels runs one of them in a child process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

DISPATCH_CAPS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "FBGEMM_ENABLE_INSTRUCTIONS",
    "OV_CPU_MAX_ISA",
)
# What an AVX2-only CPU (AMD Zen 3, say) runs: every library that can be capped, capped.
FORCED_AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "OV_CPU_MAX_ISA": "AVX2",
}
TESTS = str(Path(__file__).resolve().parent)


def run_at(caps: dict[str, str], script: str, *args: str, timeout: float = 300) -> str:
    """Run `script` (python -c) with exactly these caps and one thread; return its stdout."""
    env = {k: v for k, v in os.environ.items() if k not in DISPATCH_CAPS}
    # tests/ for `import tiny`, then whatever made this process import its slimformer.
    python_path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    env |= caps | {"OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def findings_at(caps: dict[str, str], script: str, *args: str) -> dict:
    """The JSON object a script printed last, run at these caps."""
    return json.loads(run_at(caps, script, *args).splitlines()[-1])
