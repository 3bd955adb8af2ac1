"""A child process with a request: its answer, or the reason it gave none — an exception, its
last words, a deadline — and no child outliving its parent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimformer.child import DEADLINE_REASON, CandidateFailed, run_child

TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(autouse=True)
def probe_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """child_probe.py (in tests/) importable in the children."""
    paths = [TESTS, *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (dead, not yet reaped by its new parent) is not alive either.
    state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0]
    return state != "Z"


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_the_answer_comes_back_with_the_stages_relayed_and_an_exception_as_the_reason(tmp_path):
    stages: list[str] = []
    answer = run_child("child_probe", {"do": "answer", "answer": {"x": 1}}, tmp_path, "probe")
    assert answer == {"x": 1}
    with pytest.raises(CandidateFailed, match="^KeyError: 'no such thing'$"):
        run_child("child_probe", {"do": "raise"}, tmp_path, "probe")
    assert "Traceback" in (tmp_path / "probe.log").read_text()
    with pytest.raises(CandidateFailed, match="^the last words$"):
        run_child(
            "child_probe", {"do": "stage-then-exit"}, tmp_path, "probe", on_stage=stages.append
        )
    assert stages == ["halfway"]


def test_a_child_still_running_at_the_deadline_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    request = {"do": "sleep", "pid_file": str(pid_file)}
    began = time.monotonic()
    # Time enough for the child to start (it imports torch) and fall asleep.
    with pytest.raises(CandidateFailed, match=f"^{DEADLINE_REASON}$"):
        run_child("child_probe", request, tmp_path, "probe", kill_at=time.time() + 15)
    assert 15 - 0.5 <= time.monotonic() - began <= 15 + 3
    assert pid_file.exists() and not alive(int(pid_file.read_text()))
    with pytest.raises(CandidateFailed, match=DEADLINE_REASON):  # past it: not even started
        run_child("child_probe", {"do": "answer", "answer": {}}, tmp_path, "x", kill_at=time.time())
    assert not (tmp_path / "x-request.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
def test_a_child_dies_with_its_parent(tmp_path):
    pid_file = tmp_path / "pid"
    parent_code = (
        "import sys; from pathlib import Path; from slimformer.child import run_child; "
        f"run_child('child_probe', {{'do': 'sleep', 'pid_file': {str(pid_file)!r}}}, "
        f"Path({str(tmp_path)!r}), 'probe')"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        assert wait_for(pid_file.exists, 60)
        child = int(pid_file.read_text())
        assert alive(child)
        parent.kill()
        parent.wait()
        assert wait_for(lambda: not alive(child), 5)
    finally:
        parent.kill()
