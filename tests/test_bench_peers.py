"""bench/peers.py in its reduced mode: the side-by-side benchmark runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# About 3 minutes on 2 cores: run by `make bench-studies`, not in the suite.
pytestmark = pytest.mark.bench
BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_peers_benchmark_quick_mode_writes_rows_ratios_and_machine_limits(tmp_path):
    subprocess.run(
        [sys.executable, str(BENCH / "peers.py"), "--quick", "--out", str(tmp_path)],
        check=True,
        cwd=BENCH.parent,
        capture_output=True,
        timeout=900,
    )
    result = json.loads((tmp_path / "peers_quick.json").read_text())
    labels = [r["label"] for r in result["rows"]]
    assert labels[0] == "PyTorch fp32 eager" and len(labels) == 2
    onnx_row = result["rows"][1]
    assert onnx_row["runtime"] == "onnxruntime"
    assert 0.5 < onnx_row["probe_accuracy"] <= 1 and 0.9 < onnx_row["fidelity"] <= 1
    best = max(r["throughput_per_s"] for r in result["rows"])
    for r in result["rows"]:
        assert r["throughput_vs_best_peer"] == pytest.approx(r["throughput_per_s"] / best, 1e-2)
    limits = result["machine_limits"]
    assert limits["fp32_gflops_torch"] > 0 and limits["int8_gops_onnxruntime_matmulinteger"] > 0
    assert result["rows"][0]["achieved_gflops"] < 2 * limits["fp32_gflops_torch"]
