"""The one table of measured figures, and the places that read it."""

from __future__ import annotations

import dataclasses

from slimformer.cli import _figure_rows
from slimformer.figures import (
    BY_FIELD,
    BY_NAME,
    CONFIRMED_FIGURES,
    OBJECTIVES,
    figures_of_merit,
    improvement,
    table_columns,
)
from slimformer.measure import Measurement

ENCODER = {
    "latency_ms_median": 9.2,
    "latency_ms_p90": 11.91,
    "throughput_per_s": 248.24,
    "peak_memory_mb": 311.4,
    "size_mb": 86.66,
    "parameters": 22713216,
    "gflops_per_input": 0.5523,
    "threads": 2,
    "batch_size": 32,
    "mean_tokens": 26.7,
    "runtime": "eager",
    "batching": "bucketed",
}
DECODER = ENCODER | {"prefill_tokens_per_s": 812.3, "decode_tokens_per_s": None}


def test_every_measurement_field_has_a_figure():
    # batch_size is named in the throughput label; batching is described in the model card.
    fields = {f.name for f in dataclasses.fields(Measurement)} - {"batch_size", "batching"}
    assert set(BY_FIELD) == fields


def test_objectives_and_confirmed_figures_come_from_the_table():
    assert OBJECTIVES == {
        "latency": ("latency_ms_median", "minimize"),
        "throughput": ("throughput_per_s", "maximize"),
        "memory": ("peak_memory_mb", "minimize"),
        "decode": ("decode_tokens_per_s", "maximize"),
    }
    assert CONFIRMED_FIGURES == {
        "latency": ("latency_ms_median", True),
        "throughput": ("throughput_per_s", False),
        "decode": ("decode_tokens_per_s", False),
        "memory": ("peak_memory_mb", True),
    }
    assert improvement(10.0, 5.0, True) == 2.0 and improvement(100.0, 150.0, False) == 1.5


def test_bench_rows_use_the_tables_labels_and_formats():
    rows = dict(_figure_rows("probe_accuracy", 0.7755, {"cosine_fidelity": 1.0}, ENCODER))
    assert rows["probe_accuracy"] == "0.7755" and rows["cosine_fidelity"] == "1.0000"
    assert rows["latency, batch 1, median (ms)"] == "9.20"
    assert rows["latency, batch 1, p90 (ms)"] == "11.91"
    assert rows["throughput, batch 32 (inputs/s)"] == "248.2"
    assert rows["peak memory (MB)"] == "311"
    assert rows["size on disk (MB)"] == "86.7"
    assert rows["parameters"] == "22,713,216"
    assert rows["GFLOPs per input"] == "0.552"
    assert rows["mean tokens per input"] == "26.7"
    assert rows["threads"] == "2" and rows["runtime"] == "eager"
    assert not any("prefill" in label for label in rows)


def test_decoder_figures_show_for_causal_lms_with_the_missing_text():
    rows = dict(_figure_rows("perplexity", 16.02, {}, DECODER))
    assert rows["prefill, batch 1 (prompt tokens/s)"] == "812"
    assert rows["decode, batch 1 (new tokens/s)"] == "— (runtime has no KV cache)"
    assert BY_NAME["decode"] in figures_of_merit(DECODER)
    assert BY_NAME["decode"] not in figures_of_merit(ENCODER)
    # An older measurement without a runtime field was eager.
    assert BY_NAME["runtime"].show({}) == "eager"


def test_figures_of_merit_have_a_direction_and_settings_do_not():
    merit = {f.name for f in figures_of_merit(DECODER)}
    assert merit == set(BY_NAME) - {"mean_tokens", "threads", "runtime"}
    assert [f.column for f in table_columns()] == [
        "latency ms",
        "p90 ms",
        "inputs/s",
        "memory MB",
        "size MB",
    ]
