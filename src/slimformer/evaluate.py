"""Score and measure one saved model in a child process.

A fresh process per candidate gives a clean peak-memory figure, and a candidate that crashes
(even in native code) fails its own trial, not the study. The parent calls
`evaluate_isolated`; the child is `python -m slimformer.evaluate REQUEST.json` (the plumbing:
child.py). The child answers with an `EvaluationResult` as JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from slimformer.child import CandidateFailed as CandidateFailed
from slimformer.child import child_main, report_stage, run_child


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
    # Staged scoring's verdict on a subset of the scored split (tasks/staging.py), when the
    # request asked for it; with "over" true the evaluation stopped there: not timed, not
    # scored in full (measurement empty, quality None).
    screening: dict[str, Any] | None = None

    @property
    def scored(self) -> bool:
        return self.quality is not None

    @property
    def stopped(self) -> bool:
        """Stopped early: the subset showed it over budget with confidence, or a short
        timing showed a measured trial better on both objectives ("dominated")."""
        screening = self.screening or {}
        return bool(screening.get("over") or screening.get("dominated"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluationResult:
        own = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in own})


def evaluate_isolated(
    model_dir: Path,
    task_spec: Any,
    state_path: Path,
    settings: Any,
    workdir: Path,
    on_stage: Callable[[str], None] | None = None,
    timeout_s: float = 1800,
    score: bool = True,
    kill_at: float | None = None,
    screen: dict[str, float] | None = None,
    front: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Load, time and (unless `score` is false: timing only) score `model_dir` in a child;
    the result holds quality, details, measurement and the measuring process's CPU. The child
    is stopped after `timeout_s`, or at `kill_at` (epoch seconds), with `CandidateFailed`.
    `screen`: the drop allowed per figure (the score's --max-drop, guards' drop limits): the
    child first scores a subset and stops there when the candidate is over one of them with
    confidence (`EvaluationResult.stopped`; tasks/staging.py). `front` (with `screen`): the
    finished trials within budget the candidate is compared with after a short timing
    ({"figure", "cost_field", "higher_is_better", "points"}); dominated, it stops there too."""
    request = {
        "model_dir": str(model_dir),
        "task": task_spec.to_dict(),
        "state": str(state_path),
        "settings": asdict(settings),
        "score": score,
        "screen": screen if score else None,
        "front": front if score and screen else None,
    }
    answer = run_child(
        "slimformer.evaluate",
        request,
        workdir,
        "evaluate",
        on_stage=on_stage,
        timeout_s=timeout_s,
        kill_at=kill_at,
    )
    if "measurement" not in answer:
        raise CandidateFailed("the evaluation returned no measurement")
    return EvaluationResult.from_dict(answer)


def run_request(request: dict[str, Any]) -> EvaluationResult:
    from slimformer.checkpoint import load_model
    from slimformer.cpu import fingerprint
    from slimformer.measure import (
        MeasureSettings,
        measure_loaded,
        peak_memory_mb,
        reset_peak_memory,
        set_threads,
    )
    from slimformer.tasks import TaskSpec, load_state, make_task
    from slimformer.tasks.base import fixed_length_examples
    from slimformer.tasks.staging import dominated, verdict

    settings = MeasureSettings(**request["settings"])
    set_threads(settings.resolved_threads())
    task = make_task(TaskSpec.from_dict(request["task"]))
    report_stage("loading")
    baseline_rss = reset_peak_memory()
    model_dir = Path(request["model_dir"])
    model = load_model(model_dir, head=task.head)
    scoring = request.get("score", True)
    state, staged, screening, loaded_peak = None, None, None, None
    if request.get("screen") and scoring:
        loaded_peak = peak_memory_mb()  # loading's, before the subset is scored
        report_stage("scoring a subset")
        state = load_state(Path(request["state"]))
        staged = task.score_staged(model, state)
        screening = verdict(staged, request["screen"]) if staged is not None else None
        if screening is not None and screening["over"]:
            cpu = fingerprint(settings.resolved_threads()).to_dict()
            return EvaluationResult(measurement={}, cpu=cpu, screening=screening)
        # The memory figure is loading and serving the model: loading's peak is kept, the
        # subset's scoring (and the reference arrays, read again after the timing) handed
        # back and left out of the timing's peak.
        state = None
        gc.collect()
        release_free_memory()
        reset_peak_memory()
    if settings.seq_len:
        examples = fixed_length_examples(
            model, task.texts("timing"), settings.seq_len, settings.throughput_inputs
        )
    else:
        examples = task.examples(model, "timing")
    front = request.get("front")
    if screening is not None and staged is not None and front and front["points"]:
        report_stage("timing briefly")
        probe = probe_cost(model, examples, settings, front["cost_field"])
        beaten_by = dominated(
            staged, screening, front["figure"], probe, front["points"], front["higher_is_better"]
        )
        if beaten_by is not None:
            cpu = fingerprint(settings.resolved_threads()).to_dict()
            stopped = screening | {"dominated": beaten_by, "reason": beaten_by["reason"]}
            return EvaluationResult(measurement={}, cpu=cpu, screening=stopped)
    report_stage("timing")
    measurement = measure_loaded(model, examples, settings, baseline_rss, model_dir).to_dict()
    if loaded_peak is not None:
        peak = max(loaded_peak - baseline_rss, measurement["peak_memory_mb"])
        measurement["peak_memory_mb"] = round(peak, 1)
    timed = EvaluationResult(
        measurement=measurement,
        cpu=fingerprint(settings.resolved_threads()).to_dict(),
        screening=screening,
    )
    if not scoring:
        return timed
    report_stage("scoring")
    state = state if state is not None else load_state(Path(request["state"]))
    score = task.score(model, state)  # the whole split again, also after a subset (Staged)
    return replace(
        timed,
        quality=score.value,
        metric=score.metric,
        direction=score.direction,
        bounded=score.bounded,
        details=score.details,
    )


# The measurement fields a short timing can estimate (tasks/staging.py's `dominated`).
PROBED_COSTS = ("throughput_per_s", "latency_ms_median")


def probe_cost(model: Any, examples: list, settings: Any, cost_field: str) -> float:
    """A quick reading of the cost the full timing measures: the same batches or batch-1
    requests and warm-up, for a third of the time."""
    from slimformer.measure import time_latency, time_throughput

    brief = replace(settings, min_seconds=settings.min_seconds / 3)
    if cost_field == "throughput_per_s":
        return time_throughput(model, examples, brief)
    return time_latency(model, examples, brief)[0]


def release_free_memory() -> None:
    """Hand the allocator's free memory back to the kernel (glibc), so that what an earlier
    step freed is not counted in a later step's resident memory; elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def main(argv: list[str]) -> int:
    return child_main(argv, lambda request: run_request(request).to_dict())


if __name__ == "__main__":
    sys.exit(main(sys.argv))
