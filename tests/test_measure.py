"""Measurement on tiny models: the figures each head reports, and decode timing's plumbing."""

from __future__ import annotations

import torch
from tiny import tiny_bert, tiny_llama

from slimformer.measure import DECODE_TOKENS, MeasureSettings, measure_loaded, time_decode

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
