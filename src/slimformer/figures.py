"""The measured figures, once: label, unit, format and which way is better, per figure.

Every place that shows or compares a measurement reads this table: `slimformer bench`, the
trials and front tables and the trial lines, the model card, the study's objectives and the
confirmed ratios. A figure's `field` is the `Measurement` field (measure.py) it shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Figure:
    name: str
    field: str  # the Measurement field
    label: str  # may name {batch_size}
    unit: str  # "" for counts and settings
    spec: str  # format spec of the value
    # "lower" | "higher" is better; None: a setting of the measurement, not a figure of merit
    better: str | None
    column: str | None = None  # header in the trials table; None: not a column there
    missing: str = "—"  # shown where the measurement has no value
    causal_only: bool = False  # measured for causal LMs only

    @property
    def lower_is_better(self) -> bool:
        return self.better == "lower"

    @property
    def direction(self) -> str:
        """Optuna's name for the way this figure improves."""
        return "minimize" if self.lower_is_better else "maximize"

    def title(self, measurement: Mapping[str, Any]) -> str:
        return self.label.format(batch_size=measurement.get("batch_size", "?"))

    def text(self, value: Any) -> str:
        return self.missing if value is None else format(value, self.spec)

    def accepts(self, value: Any) -> bool:
        """Whether `value` is one this figure can show (a damaged file may hold anything)."""
        if value is None:
            return True
        if self.spec == "s":
            return isinstance(value, str)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.spec != "d" or isinstance(value, int)

    def show(self, measurement: Mapping[str, Any]) -> str:
        return self.text(measurement.get(self.field))

    def applies(self, measurement: Mapping[str, Any]) -> bool:
        """Whether the figure belongs to this measurement (decoder figures: causal LMs)."""
        return not self.causal_only or measurement.get("prefill_tokens_per_s") is not None


FIGURES: tuple[Figure, ...] = (
    Figure(
        "latency",
        "latency_ms_median",
        "latency, batch 1, median (ms)",
        "ms",
        ".2f",
        "lower",
        column="latency ms",
    ),
    Figure(
        "latency_p90",
        "latency_ms_p90",
        "latency, batch 1, p90 (ms)",
        "ms",
        ".2f",
        "lower",
        column="p90 ms",
    ),
    Figure(
        "throughput",
        "throughput_per_s",
        "throughput, batch {batch_size} (inputs/s)",
        "inputs/s",
        ".1f",
        "higher",
        column="inputs/s",
    ),
    Figure(
        "prefill",
        "prefill_tokens_per_s",
        "prefill, batch 1 (prompt tokens/s)",
        "tokens/s",
        ".0f",
        "higher",
        causal_only=True,
    ),
    Figure(
        "ttft",
        "first_token_ms_median",
        "time to first token, batch 1 (ms)",
        "ms",
        ".1f",
        "lower",
        causal_only=True,
    ),
    Figure(
        "decode",
        "decode_tokens_per_s",
        "decode, batch 1 (new tokens/s)",
        "tokens/s",
        ".1f",
        "higher",
        missing="— (runtime has no KV cache)",
        causal_only=True,
    ),
    Figure(
        "memory", "peak_memory_mb", "peak memory (MB)", "MB", ".0f", "lower", column="memory MB"
    ),
    Figure("size", "size_mb", "size on disk (MB)", "MB", ".1f", "lower", column="size MB"),
    Figure("parameters", "parameters", "parameters", "", ",", "lower"),
    Figure("gflops", "gflops_per_input", "GFLOPs per input", "GFLOPs", ".3f", "lower"),
    Figure("mean_tokens", "mean_tokens", "mean tokens per input", "tokens", ".1f", None),
    Figure("threads", "threads", "threads", "", "d", None),
    Figure("runtime", "runtime", "runtime", "", "s", None, missing="eager"),
)
BY_NAME = {figure.name: figure for figure in FIGURES}
BY_FIELD = {figure.field: figure for figure in FIGURES}

# What a study can optimize, and what the confirmation rounds time again.
# "latency" is a batch-1 forward (for a causal LM: its prompt's prefill, the time to first
# token); "decode" the new tokens/s after it, what serving a decoder is mostly judged by.
OBJECTIVE_NAMES = ("latency", "throughput", "memory", "decode")
# objective name -> (measurement field, Optuna direction)
OBJECTIVES = {name: (BY_NAME[name].field, BY_NAME[name].direction) for name in OBJECTIVE_NAMES}
# figure -> (measurement field, whether lower is better)
CONFIRMED_FIGURES = {
    name: (BY_NAME[name].field, BY_NAME[name].lower_is_better) for name in OBJECTIVE_NAMES
}


def figures_of_merit(measurement: Mapping[str, Any]) -> list[Figure]:
    """The figures a model is compared on (better one way), those that apply to it."""
    return [f for f in FIGURES if f.better is not None and f.applies(measurement)]


def all_figures(measurement: Mapping[str, Any]) -> list[Figure]:
    """Every figure that applies to the measurement, settings included (for `bench`)."""
    return [f for f in FIGURES if f.applies(measurement)]


def table_columns() -> list[Figure]:
    """The figures the trials table has a column for, in order."""
    return [f for f in FIGURES if f.column is not None]


def improvement(baseline: float | None, chosen: float | None, lower_is_better: bool) -> float:
    """How many times better `chosen` is than `baseline` (>1 = better); NaN if unknown."""
    if not baseline or not chosen:
        return float("nan")
    return baseline / chosen if lower_is_better else chosen / baseline
