"""Measurement: latency, throughput, peak memory, size, parameters and FLOPs.

Rules every figure follows: real inputs from the task (never random tokens), warm-up first,
repeated timed runs with median and p90, a fixed and recorded torch thread count. Peak memory
is only meaningful in a fresh process, so `evaluate.py` runs this in a child per candidate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from slimformer.checkpoint import weights_size_bytes
from slimformer.engines import ServedModule
from slimformer.errors import SlimformerError
from slimformer.layers import codec_for, count_parameters
from slimformer.model import SlimModel
from slimformer.tasks.base import batch_rows, batches_by_length, collate, input_tokens

MIN_REQUESTS = 20  # batch-1 requests timed at least
DECODE_TOKENS = 128  # new tokens per timed batch-1 generation (causal LMs)
SLOW_MODEL_SECONDS = 10.0  # a throughput run stops here even before visiting every batch


@dataclass(frozen=True)
class MeasureSettings:
    batch_size: int = 32
    threads: int | None = None  # None = every core (os.cpu_count())
    seq_len: int | None = None  # fixed-length inputs of real tokens instead of natural lengths
    latency_requests: int = 64
    throughput_inputs: int = 256
    min_seconds: float = 1.5  # each timed phase repeats until at least this long
    warmup: int = 3

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SlimformerError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise SlimformerError(f"--threads must be at least 1, got {self.threads}")
        if self.seq_len is not None and self.seq_len < 8:
            raise SlimformerError(f"--seq-len must be at least 8, got {self.seq_len}")

    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass(frozen=True)
class Measurement:
    latency_ms_median: float
    latency_ms_p90: float
    throughput_per_s: float
    peak_memory_mb: float  # resident memory added by loading and serving the model
    size_mb: float
    parameters: int
    gflops_per_input: float | None  # None: counted only for PyTorch-run models
    threads: int
    batch_size: int
    mean_tokens: float
    runtime: str = "eager"
    batching: str = "bucketed"  # how the throughput batches were formed
    # Causal LMs only: batch-1 prompt tokens/s and time to first token (both from the latency
    # runs, which are batch-1 prompt forwards: the prefill that yields the first new token),
    # and new tokens/s while decoding DECODE_TOKENS after the prompt.
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    first_token_ms_median: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        # Only settable before the first parallel op; the intra-op count is what matters.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)


def reset_peak_memory() -> float:
    """Reset the kernel's peak-RSS counter (Linux); return the current RSS in MiB."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_memory_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    try:
        match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        match = None
    if match is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return int(match.group(1)) / 1024


@torch.inference_mode()
def time_latency(
    model: SlimModel, examples: Sequence[Sequence[int]], settings: MeasureSettings
) -> tuple[float, float]:
    """Batch-1 requests, one real input each: (median ms, p90 ms)."""
    requests = [collate(model, [e]) for e in examples[: settings.latency_requests]]
    for request in requests[: settings.warmup]:
        model(**request)
    # At least min_seconds and a fair sample of the inputs; slow models (a decoder's long
    # prefill) stop at MIN_REQUESTS rather than run every input.
    enough = min(len(requests), MIN_REQUESTS)
    timings: list[float] = []
    start = time.perf_counter()
    while len(timings) < enough or time.perf_counter() - start < settings.min_seconds:
        request = requests[len(timings) % len(requests)]
        began = time.perf_counter()
        model(**request)
        timings.append((time.perf_counter() - began) * 1000)
    return statistics.median(timings), _percentile(timings, 90)


@torch.inference_mode()
def time_throughput(
    model: SlimModel, examples: Sequence[Sequence[int]], settings: MeasureSettings
) -> float:
    """Inputs per second over batches formed as the model's `batching` says: sorted by length
    (bucketed) or in arrival order (padded, unpadded), each padded to its longest input."""
    chosen = examples[: settings.throughput_inputs]
    if model.batching == "bucketed":
        grouped = [b for _, b in batches_by_length(chosen, settings.batch_size)]
    else:
        size = settings.batch_size
        grouped = [chosen[i : i + size] for i in range(0, len(chosen), size)]
    batches = [collate(model, b) for b in grouped]
    model(**min(batches, key=lambda b: next(iter(b.values())).numel()))  # warm-up on the smallest
    # Visit batches in a fixed shuffled order so a short run is not biased to short inputs;
    # stop after every batch ran and min_seconds passed, or after a cap for slow models.
    order = list(range(len(batches)))
    random.Random(0).shuffle(order)
    processed, runs = 0, 0
    start = time.perf_counter()
    while True:
        batch = batches[order[runs % len(order)]]
        model(**batch)
        processed += batch_rows(batch)
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= settings.min_seconds and (
            runs >= len(order) or elapsed >= SLOW_MODEL_SECONDS
        ):
            return processed / elapsed


@torch.inference_mode()
def time_decode(
    model: SlimModel, examples: Sequence[Sequence[int]], settings: MeasureSettings
) -> float:
    """Batch-1 greedy decoding with the KV cache after a real prompt: new tokens per second.

    A plain loop (prefill, then one token per forward reusing `past_key_values`), not
    `generate`, so sampling and stopping logic do not blur the model's own per-token cost.
    The prefill is not timed; it is the latency figure.
    """
    timings: list[float] = []
    start = time.perf_counter()
    prompt_index = 0
    # Two generations at least (the first step of each is not timed).
    while len(timings) < DECODE_TOKENS or time.perf_counter() - start < settings.min_seconds:
        prompt = torch.tensor([list(examples[prompt_index % len(examples)])], dtype=torch.long)
        prompt_index += 1
        output = model(input_ids=prompt, use_cache=True)
        for step in range(DECODE_TOKENS):
            token = output.logits[:, -1:].argmax(-1)
            began = time.perf_counter()
            output = model(input_ids=token, past_key_values=output.past_key_values, use_cache=True)
            if step >= 1:  # the first step warms up cache growth
                timings.append(time.perf_counter() - began)
    return 1.0 / statistics.median(timings)


@torch.inference_mode()
def count_flops(model: SlimModel, example: Sequence[int]) -> int:
    """FLOPs of one forward on one input: torch's FlopCounterMode for standard modules, and the
    codec's own count (`LayerCodec.flops`: int8 GEMMs like float ones, 2·m·n·k) for each codec
    layer, in place of whatever the counter saw inside it (its kernels are invisible to the
    counter, or visible only when a layer unpacks its weight for a float GEMM)."""
    counter = FlopCounterMode(display=False)
    seen_inside = 0  # counted by FlopCounterMode within codec layers: replaced below
    own = 0  # the codec layers' own counts
    started: list[int] = []

    def before(module: Any, args: tuple) -> None:
        started.append(counter.get_total_flops())

    def after(module: Any, args: tuple, output: torch.Tensor) -> None:
        nonlocal seen_inside, own
        seen_inside += counter.get_total_flops() - started.pop()
        rows = args[0].numel() // args[0].shape[-1]
        own += codec_for(module).flops(module, rows)

    hooks = []
    # A codec layer counts what it holds (a low-rank layer its factors, int8 or not), so only
    # the outermost ones are hooked.
    codec_layers = {n: m for n, m in model.module.named_modules() if codec_for(m) is not None}
    for name, module in codec_layers.items():
        if not any(name.startswith(outer + ".") for outer in codec_layers):
            hooks.append(module.register_forward_pre_hook(before))
            hooks.append(module.register_forward_hook(after))
    try:
        with counter:
            model(**collate(model, [example]))
    finally:
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() - seen_inside + own


def measure_loaded(
    model: SlimModel,
    examples: Sequence[Sequence[int]],
    settings: MeasureSettings,
    baseline_rss_mb: float,
    model_dir: Path | None = None,
) -> Measurement:
    """Time `model` on `examples`; memory is the peak since `reset_peak_memory()`."""
    threads = settings.resolved_threads()
    set_threads(threads)
    median, p90 = time_latency(model, examples, settings)
    throughput = time_throughput(model, examples, settings)
    peak = peak_memory_mb() - baseline_rss_mb
    lengths = [input_tokens(model, e) for e in examples]
    typical = examples[sorted(range(len(examples)), key=lengths.__getitem__)[len(examples) // 2]]
    mean_tokens = sum(lengths) / len(examples)
    timed = examples[: settings.latency_requests]
    prompt_tokens = sum(map(len, timed)) / len(timed)
    generative = model.head == "causal-lm"
    served = model.module if isinstance(model.module, ServedModule) else None
    # FLOPs are counted from PyTorch's ops; inside another engine they are invisible.
    counted = served is None or served.eager is not None
    eager_view = model if served is None else dataclasses.replace(model, module=served.eager)
    decodes = generative and (served is None or served.supports_kv_cache)
    return Measurement(
        latency_ms_median=round(median, 3),
        latency_ms_p90=round(p90, 3),
        throughput_per_s=round(throughput, 2),
        peak_memory_mb=round(peak, 1),
        size_mb=round(weights_size_bytes(model_dir) / 2**20, 2) if model_dir else 0.0,
        parameters=count_parameters(model.module),
        gflops_per_input=round(count_flops(eager_view, typical) / 1e9, 4) if counted else None,
        threads=threads,
        batch_size=settings.batch_size,
        mean_tokens=round(mean_tokens, 1),
        prefill_tokens_per_s=round(prompt_tokens / median * 1000, 1) if generative else None,
        decode_tokens_per_s=round(time_decode(model, examples, settings), 2) if decodes else None,
        first_token_ms_median=round(median, 3) if generative else None,
        runtime=served.reported_engine() if served else "eager",
        batching=model.batching,
    )


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
