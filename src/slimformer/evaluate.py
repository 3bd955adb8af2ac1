"""Score and measure one saved model in a child process.

A fresh process per candidate gives a clean peak-memory figure, and a candidate that crashes
(even in native code) fails its own trial, not the study. The parent calls
`evaluate_isolated`; the child is `python -m slimformer.evaluate REQUEST.json`. The child
answers in `result.json`: an `EvaluationResult` as JSON, or `{"error": reason}`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any

from slimformer.errors import SlimformerError
from slimformer.files import write_atomic

STAGE_PREFIX = "@@slimformer-stage "


@dataclass(frozen=True)
class EvaluationResult:
    """One model loaded, timed and (unless timing only) scored in a fresh process.

    Crosses the process boundary as JSON (`to_dict`/`from_dict`, the keys as named here)."""

    measurement: dict[str, Any]  # a Measurement as a dict (measure.py)
    cpu: dict[str, Any] | None = None  # the fingerprint of the process that measured it
    quality: float | None = None  # None: timed only, not scored
    metric: str | None = None
    direction: str | None = None  # maximize | minimize
    bounded: bool | None = None  # the score is a fraction (budgets in points)
    details: dict[str, float] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return self.quality is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        own = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in own})


class CandidateFailed(Exception):
    """A candidate could not be evaluated; the message is the reason recorded for its trial."""


def evaluate_isolated(
    model_dir: Path,
    task_spec: Any,
    state_path: Path,
    settings: Any,
    workdir: Path,
    on_stage: Callable[[str], None] | None = None,
    timeout_s: float = 1800,
    score: bool = True,
) -> EvaluationResult:
    """Load, time and (unless `score` is false: timing only) score `model_dir` in a child;
    the result holds quality, details, measurement and the measuring process's CPU."""
    workdir.mkdir(parents=True, exist_ok=True)
    request = {
        "model_dir": str(model_dir),
        "task": task_spec.to_dict(),
        "state": str(state_path),
        "settings": asdict(settings),
        "result": str(workdir / "result.json"),
        "score": score,
    }
    request_path = workdir / "request.json"
    request_path.write_text(json.dumps(request, indent=2))
    Path(request["result"]).unlink(missing_ok=True)
    log_path = workdir / "evaluate.log"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "slimformer.evaluate", str(request_path)],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        assert process.stdout is not None
        stages = threading.Thread(
            target=_relay_stages, args=(process.stdout, on_stage), daemon=True
        )
        stages.start()
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise CandidateFailed(f"evaluation took longer than {timeout_s:.0f} s") from None
        stages.join(timeout=5)
    result_file = Path(request["result"])
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if returncode == 0 and "measurement" in result:
        return EvaluationResult.from_dict(result)
    if "error" in result:
        raise CandidateFailed(result["error"])
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    reason = lines[-1].strip() if lines else f"evaluation process exited with code {returncode}"
    raise CandidateFailed(reason[:300])


def _relay_stages(stream: IO[str], on_stage: Callable[[str], None] | None) -> None:
    for line in stream:
        if line.startswith(STAGE_PREFIX) and on_stage:
            on_stage(line[len(STAGE_PREFIX) :].strip())


def _stage(name: str) -> None:
    print(STAGE_PREFIX + name, flush=True)


def run_request(request: dict[str, Any]) -> EvaluationResult:
    from slimformer.checkpoint import load_model
    from slimformer.cpu import fingerprint
    from slimformer.measure import (
        MeasureSettings,
        measure_loaded,
        reset_peak_memory,
        set_threads,
    )
    from slimformer.tasks import TaskSpec, load_state, make_task
    from slimformer.tasks.base import fixed_length_examples

    settings = MeasureSettings(**request["settings"])
    set_threads(settings.resolved_threads())
    task = make_task(TaskSpec.from_dict(request["task"]))
    _stage("loading")
    baseline_rss = reset_peak_memory()
    model_dir = Path(request["model_dir"])
    model = load_model(model_dir, head=task.head)
    if settings.seq_len:
        examples = fixed_length_examples(
            model, task.texts("timing"), settings.seq_len, settings.throughput_inputs
        )
    else:
        examples = task.examples(model, "timing")
    _stage("timing")
    measurement = measure_loaded(model, examples, settings, baseline_rss, model_dir)
    timed = EvaluationResult(
        measurement=measurement.to_dict(),
        cpu=fingerprint(settings.resolved_threads()).to_dict(),
    )
    if not request.get("score", True):
        return timed
    _stage("scoring")
    state = load_state(Path(request["state"]))
    score = task.score(model, state)
    return replace(
        timed,
        quality=score.value,
        metric=score.metric,
        direction=score.direction,
        bounded=score.bounded,
        details=score.details,
    )


def main(argv: list[str]) -> int:
    import warnings

    warnings.simplefilter("ignore")
    request = json.loads(Path(argv[1]).read_text())
    result_path = Path(request["result"])
    try:
        result = run_request(request).to_dict()
        code = 0
    except SlimformerError as error:
        result, code = {"error": str(error)}, 2
    write_atomic(result_path, json.dumps(result, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
