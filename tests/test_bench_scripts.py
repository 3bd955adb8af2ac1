"""The benchmark scripts can import what they need wherever they run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_no_bench_script_is_named_like_an_installed_module():
    """A script's folder comes first on its import path: a bench/kernels.py hid the `kernels`
    package transformers 5.25 imports, and every benchmark failed importing transformers."""
    shadowing = []
    for script in sorted(BENCH.glob("*.py")):
        spec = importlib.util.find_spec(script.stem)
        if spec is not None and spec.origin and Path(spec.origin).parent != BENCH:
            shadowing.append(f"{script.name} hides {spec.origin}")
    assert shadowing == []
