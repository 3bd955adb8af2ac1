"""SmolLM2-135M served by OpenVINO with its KV cache as state, against PyTorch fp32 eager.

    python bench/openvino_decoder.py          # -> bench/results/openvino_decoder.json (~8 min)

Rows: PyTorch fp32 eager; OpenVINO f32 (stateful); OpenVINO with NNCF int8 weights
(int8_asym); OpenVINO with NNCF int4 weights (int4_asym, groups of 128, every block matrix).
Each OpenVINO row is built with `slimformer.apply` and saved, then loaded with
`slimformer.load` and measured in a fresh process, 2 threads, everything through the engine:
time to first token for a 128-token prompt (prefill and the first token's choice), batch-1
greedy decode tokens/s over 128 new tokens (the project's loop, `slimformer.generation`),
held-out Wikipedia perplexity computed from the engine's own logits (the perplexity task), and
the size of the saved model. Prompts are the first 128 tokens of held-out windows; the eager
row's tokens are kept so each row reports how many of its 128 greedy tokens match them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_result

THREADS = 2
PROMPT_TOKENS = 128
NEW_TOKENS = 128
PROMPTS = 3  # prompts timed per row (median over them)
ROWS: dict[str, dict | None] = {
    "PyTorch fp32 eager": None,
    "OpenVINO f32 stateful": {},
    "OpenVINO int8 weights (int8_asym)": {"weights": "int8_asym"},
    "OpenVINO int4 weights (int4_asym g128)": {"weights": "int4_asym", "group_size": 128},
}


def measure(model_ref: str, prompts: int = PROMPTS) -> dict:
    """Run in a fresh process: load, then time and score through whatever serves the model
    (the median over the first `prompts` held-out prompts)."""
    import torch

    import slimformer
    from slimformer.assets import resolve_path
    from slimformer.checkpoint import weights_size_bytes
    from slimformer.generation import greedy
    from slimformer.measure import peak_memory_mb, reset_peak_memory, set_threads
    from slimformer.tasks import TaskSpec, make_task

    set_threads(THREADS)
    before = reset_peak_memory()
    started = time.perf_counter()
    model = slimformer.load(model_ref)
    load_seconds = time.perf_counter() - started
    task = make_task(TaskSpec(name="perplexity"))
    windows = task.examples(model, "test")
    inputs = [torch.tensor([w[:PROMPT_TOKENS]]) for w in windows[:prompts]]
    greedy(model, inputs[0], 4)  # warm-up (compilation, first allocations)
    runs = [greedy(model, prompt, NEW_TOKENS + 1) for prompt in inputs]
    score = task.score(model, task.prepare(model))
    return {
        "time_to_first_token_ms": round(statistics.median(r.first_token_s for r in runs) * 1e3, 1),
        "decode_tokens_per_s": round(statistics.median(r.decode_tokens_per_s() for r in runs), 2),
        "perplexity": round(score.value, 4),
        "peak_memory_mb": round(peak_memory_mb() - before, 1),
        "size_mb": round(weights_size_bytes(Path(resolve_path(model_ref))) / 2**20, 2),
        "load_seconds": round(load_seconds, 2),
        "tokens": [r.tokens[0].tolist() for r in runs],
        "engine": type(model.module).__name__,
    }


def build(config: dict, out: Path) -> dict:
    """Run in a fresh process: `slimformer.apply` the OpenVINO recipe and save it."""
    import slimformer
    from slimformer.recipe import Recipe, Step
    from slimformer.tasks import TaskSpec

    recipe = Recipe(steps=(Step("runtime.openvino", config),), task=TaskSpec(name="perplexity"))
    started = time.perf_counter()
    applied = slimformer.apply("smollm2", recipe, out=out)
    return {
        "build_seconds": round(time.perf_counter() - started, 1),
        "resolved": applied.recipe.steps[-1].resolved,
    }


def child(*args: str, script: str = __file__) -> dict:
    """A bench script (this one unless named) in a fresh process; its last stdout line is the
    JSON answer."""
    done = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matching_prefix(tokens: list[list[int]], reference: list[list[int]]) -> int:
    """The fewest leading tokens that agree with the reference, over the prompts."""
    counts = []
    for got, expected in zip(tokens, reference, strict=True):
        same = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), len(got)
        )
        counts.append(same)
    return min(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    if args.build:
        print(json.dumps(build(json.loads(args.build[0]), Path(args.build[1]))))
        return

    started = time.time()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimformer-ov-decoder-") as tmp:
        for index, (label, config) in enumerate(ROWS.items()):
            row: dict = {"row": label, "config": config}
            if config is None:
                row |= child("--measure", "smollm2")
            else:
                out = Path(tmp) / f"r{index}"
                row |= child("--build", json.dumps(config), str(out))
                row |= child("--measure", str(out))
            rows.append(row)
            print(
                f"{label:<40} ttft={row['time_to_first_token_ms']} ms "
                f"decode={row['decode_tokens_per_s']} tok/s ppl={row['perplexity']} "
                f"size={row['size_mb']} MB"
            )
    eager = rows[0]
    for row in rows:
        row["decode_speedup"] = round(row["decode_tokens_per_s"] / eager["decode_tokens_per_s"], 2)
        row["ttft_speedup"] = round(
            eager["time_to_first_token_ms"] / row["time_to_first_token_ms"], 2
        )
        row["perplexity_change"] = round(row["perplexity"] / eager["perplexity"] - 1, 4)
        row["greedy_tokens_matching_eager"] = matching_prefix(row["tokens"], eager["tokens"])
    for row in rows:
        del row["tokens"]
    path = write_result(
        "openvino_decoder",
        {
            "model": "smollm2",
            "command": "python bench/openvino_decoder.py",
            "threads": THREADS,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "machine": machine() | {"threads": THREADS},
            # Other work on the same cores skews timings: the 1-minute load average before
            # and after the run says how busy they were.
            "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "rows": rows,
            "wall_seconds": round(time.time() - started, 1),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
