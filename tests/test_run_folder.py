"""Run folders shared between processes and machines: the lock, the CPU fingerprint on resume,
and the confirmed ratios a finished study saves. Real `slimformer` processes on a tiny BERT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny

from slimformer.checkpoint import save_model
from slimformer.evaluate import EvaluationResult
from slimformer.search.confirm import confirm_ratios, unsteady
from slimformer.search.lock import PID_FILE, RunLock

CLI = [sys.executable, "-m", "slimformer.cli"]
# One torch thread: a tiny model on two spins in OpenMP start-up (conftest.single_thread).
FAST = ["--threads", "1", "--batch-size", "8"]
# An instruction-set cap that differs from every x86 CPU's own sets, AVX2-only ones included.
# AVX, not SSE41: OpenVINO's CPU plugin needs SSE4.2 and fails below it ("MVN node ... bad
# combination"), and the study may well choose an OpenVINO candidate.
# OpenVINO's plugin is capped with oneDNN (engines/openvino.py sets the one from the other).
ANOTHER_CPU = {"ONEDNN_MAX_CPU_ISA": "AVX", "OV_CPU_MAX_ISA": "AVX"}


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tiny.tiny_bert(), tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a whole study runs, it scores this instead of the built-in task (a third faster)."""
    return tiny.corpus_file(tmp_path_factory.mktemp("data") / "corpus.txt")


def slimformer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ANOTHER_CPU}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=environ | (env or {}),
    )


def trials(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]


def assert_one_error_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_a_second_study_on_a_live_run_folder_is_refused_naming_the_pid(tiny_encoder, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [*CLI, "optimize", str(tiny_encoder), "--trials", "40", "--out", str(run), *FAST],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "run.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "run.json").is_file() and first.poll() is None
        run_json = (run / "run.json").read_bytes()
        for extra in (["--overwrite"], ["--resume"], []):
            second = slimformer("optimize", str(tiny_encoder), "--out", str(run), *extra)
            assert_one_error_line(second, "in use by a running study", f"pid {first.pid}")
        assert first.poll() is None  # the running study is untouched
        assert (run / "run.json").read_bytes() == run_json
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # The dead study's lock is taken over: the kernel released it with the process.
    lock = RunLock(run)
    lock.acquire()
    lock.release()
    assert not (run / PID_FILE).exists()


def test_out_that_is_a_file_or_cannot_be_created_is_one_error_line(tiny_encoder, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    assert_one_error_line(
        slimformer("optimize", str(tiny_encoder), "--out", str(a_file)), "is a file"
    )
    assert a_file.read_text() == "keep me\n"
    assert_one_error_line(
        slimformer("optimize", str(tiny_encoder), "--out", "/proc/nope/run"),
        "cannot create the run folder",
    )


def test_resume_on_another_cpu_is_refused_then_remeasured_and_bench_compares_machines(
    tiny_encoder, small_corpus, tmp_path
):
    run = tmp_path / "run"
    # No confirmation rounds: the test is about the fingerprint, and they double its time.
    start = [
        "optimize",
        str(tiny_encoder),
        "--out",
        str(run),
        *FAST,
        "--task",
        "embedding",
        "--data",
        str(small_corpus),
        "--max-drop",
        "100%",
        "--confirm-rounds",
        "0",
    ]
    elsewhere = slimformer(*start, "--trials", "1", env=ANOTHER_CPU)
    assert elsewhere.returncode == 0, elsewhere.stderr[-2000:]
    [first] = trials(run)
    assert first["cpu"]["forced"] == ANOTHER_CPU

    refused = slimformer(*start, "--resume", "--trials", "2")
    assert_one_error_line(refused, "measured on another machine", "--allow-other-cpu", "isa")
    assert trials(run) == [first]

    allowed = slimformer(*start, "--resume", "--trials", "2", "--allow-other-cpu")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    records = {t["number"]: t for t in trials(run)}
    assert records[0] == first | {"stale": True}  # kept as history, out of the comparison
    here = [t for t in records.values() if not t["stale"]]
    assert [t["description"] for t in here][0] == "baseline"  # measured again, first
    assert all(t["cpu"]["forced"] == {} for t in here) and len(here) == 2
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["cpu"]["forced"] == {}  # the run continues as this machine's
    metrics = json.loads((run / "best" / "metrics.json").read_text())
    assert metrics["cpu"] == run_json["cpu"] and metrics["trial"] in {t["number"] for t in here}

    # `bench` of the chosen model shows the figures it was chosen with beside today's.
    bench = ["bench", str(run / "best"), "--threads", "1", "--batch-size", "8"]
    same = slimformer(*bench)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "when chosen" in same.stdout and "both measured on this machine" in same.stdout
    elsewhere_bench = slimformer(*bench, env=ANOTHER_CPU)
    assert "chosen on another machine (isa" in elsewhere_bench.stdout


def test_a_finished_study_saves_confirmed_ratios_with_their_spread(
    tiny_encoder, small_corpus, tmp_path, monkeypatch
):
    from rich.console import Console

    import slimformer
    from slimformer.recipe import Recipe, Step
    from slimformer.report import print_study
    from slimformer.tasks import TaskSpec

    # Which trial a noisy tiny-model timing makes the fastest is chance; the choice is
    # pinned to the pruned one so that the confirmation (real child processes) always runs.
    monkeypatch.setattr(
        "slimformer.search.runner.choose",
        lambda records, *args: (next(r for r in records if not r.is_baseline), True),
    )
    result = slimformer.optimize(
        str(tiny_encoder),
        task=TaskSpec("embedding", data=str(small_corpus)),
        out=tmp_path / "run",
        trials=2,
        passes=["prune.layers"],
        starts=[Recipe(steps=(Step("prune.layers", {"count": 2}),))],
        threads=1,
        batch_size=8,
        max_drop="100%",
        confirm_rounds=2,
    )
    confirmed = result.confirmed
    assert confirmed["rounds"] == 2 and len(confirmed["baseline"]) == 2
    for figure in ("latency", "throughput", "memory"):
        spread = confirmed["ratios"][figure]
        assert spread["min"] <= spread["median"] <= spread["max"]
        assert len(spread["per_round"]) == 2
    metrics = json.loads((result.best_dir / "metrics.json").read_text())
    assert metrics["confirmed"] == confirmed
    card = (result.best_dir / "README.md").read_text()
    assert "Confirmed ratios" in card and metrics["cpu"]["model"] in card
    console = Console(record=True, width=200)
    print_study(result, console)
    printed = console.export_text()
    median = confirmed["ratios"]["latency"]["median"]
    assert f"{median:.2f}× better latency" in printed and "2 alternating rounds" in printed
    # The run's report.html, written by the real study (api.optimize passes its writer), shows
    # the same confirmed ratio with its spread.
    page = (tmp_path / "run" / "report.html").read_text()
    spread = confirmed["ratios"]["latency"]
    assert f"{median:.2f}× ({spread['min']:.2f}–{spread['max']:.2f})" in page
    assert 'id="confirmed-plot"' in page


def test_confirmation_alternates_the_order_and_takes_the_median_of_round_ratios():
    calls = []
    latencies = {"baseline": iter([10.0, 30.0, 10.0]), "chosen": iter([5.0, 10.0, 2.0])}

    def fake_evaluate(model_dir, workdir, *, score=True, on_stage=None):
        side = Path(model_dir).name
        calls.append(side)
        assert score is False  # confirmation times, it does not score
        m = {"latency_ms_median": next(latencies[side]), "throughput_per_s": 1.0}
        return EvaluationResult(measurement=m | {"peak_memory_mb": 1.0}, cpu={})

    result = confirm_ratios(Path("baseline"), Path("chosen"), fake_evaluate, Path("w"), rounds=3)
    assert calls == ["baseline", "chosen", "chosen", "baseline", "baseline", "chosen"]
    assert result["medians"]["baseline"]["latency_ms_median"] == 10.0
    assert result["ratios"]["latency"] == {
        "median": 3.0,
        "min": 2.0,
        "max": 5.0,
        "per_round": [2.0, 3.0, 5.0],
    }


def test_rounds_that_disagree_are_flagged_and_steady_ones_are_not():
    def ratios(low: float, high: float) -> dict:
        spread = {"median": low, "min": low, "max": high, "per_round": [low, high]}
        return {"ratios": {"latency": spread, "memory": dict(spread, min=1.0, max=1.1)}}

    assert unsteady(ratios(2.0, 2.2)) is None
    warning = unsteady(ratios(8.0, 15.0))
    assert "latency 8.00–15.00×" in warning and "memory" not in warning
