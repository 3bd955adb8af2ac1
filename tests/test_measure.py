"""Measurement on tiny models: the figures each head reports, and decode timing's plumbing."""

from __future__ import annotations

import pytest
import tiny
import torch
from tiny import tiny_bert, tiny_llama

from slimformer.layers import codec_for
from slimformer.layers.weight_only import UNPACK_ROWS
from slimformer.measure import (
    DECODE_TOKENS,
    MeasureSettings,
    count_flops,
    measure_loaded,
    time_decode,
)
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

FAST = MeasureSettings(batch_size=4, latency_requests=4, throughput_inputs=8, min_seconds=0.05)
EXAMPLES = [[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 2088, 102], [101] + [2000] * 20]


def test_causal_lm_measurement_reports_prefill_and_decode_tokens_per_second() -> None:
    m = measure_loaded(tiny_llama(), EXAMPLES, FAST, baseline_rss_mb=0.0)
    assert m.prefill_tokens_per_s is not None and m.prefill_tokens_per_s > 0
    assert m.decode_tokens_per_s is not None and m.decode_tokens_per_s > 0
    # prefill figure = prompt tokens of the timed requests over their median latency
    mean_prompt = sum(map(len, EXAMPLES)) / len(EXAMPLES)
    # Both figures are rounded (latency to 1e-3 ms, tokens/s to 0.1): compare within that.
    fastest = mean_prompt / (m.latency_ms_median - 5e-4) * 1000 + 0.05
    slowest = mean_prompt / (m.latency_ms_median + 5e-4) * 1000 - 0.05
    assert slowest <= m.prefill_tokens_per_s <= fastest


def test_encoder_measurement_has_no_generation_figures() -> None:
    m = measure_loaded(tiny_bert(), EXAMPLES, FAST, baseline_rss_mb=0.0)
    assert m.prefill_tokens_per_s is None and m.decode_tokens_per_s is None


def test_decode_timing_feeds_one_token_at_a_time_through_the_kv_cache() -> None:
    model = tiny_llama()
    lengths: list[int] = []
    cached: list[bool] = []

    def record(module, args, kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        cached.append(kwargs.get("past_key_values") is not None)

    model.module.register_forward_pre_hook(record, with_kwargs=True)
    with torch.inference_mode():
        time_decode(model, EXAMPLES[:1], FAST)
    prompts = [i for i, n in enumerate(lengths) if n == len(EXAMPLES[0])]
    assert len(prompts) >= 2 and not any(cached[i] for i in prompts)
    steps = [n for i, n in enumerate(lengths) if i not in prompts]
    assert steps == [1] * (DECODE_TOKENS * len(prompts))
    assert all(c for i, c in enumerate(cached) if i not in prompts)


# --- FLOPs: each codec layer counted once, by its codec ------------------------------------
QUANTIZERS = {
    "weight_only int8": ("quantize.weight_only", {"bits": 8, "method": "rtn"}),
    "weight_only int4": ("quantize.weight_only", {"bits": 4, "method": "rtn"}),
    "dynamic int8": ("quantize.dynamic_int8", {}),
    "static int8": ("quantize.static_int8", {}),
}


@pytest.mark.parametrize("quantizer", list(QUANTIZERS))
@pytest.mark.parametrize("tokens", [4, 3 * UNPACK_ROWS])  # weight-only: packed kernel / unpacked
def test_quantized_layers_count_the_flops_of_the_float_layers_they_replace(quantizer, tokens):
    """A quantized GEMM counts like the float one (2·m·n·k), once: weight-only layers at
    UNPACK_ROWS rows or more run a float GEMM that torch's counter sees too."""
    model = tiny_llama()
    name, config = QUANTIZERS[quantizer]
    quantized = apply_recipe(model, Recipe(steps=(Step(name, config),)), tiny.calibration(model))
    assert any(codec_for(m) for m in quantized.module.modules())
    example = EXAMPLES[2][:1] + [2000 + i for i in range(tokens - 1)]
    assert count_flops(quantized, example) == count_flops(model, example)
