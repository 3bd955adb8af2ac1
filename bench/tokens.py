"""Fewer tokens on MiniLM's embedding task: does `reduce.tokens` pay, alone and on top of the
best structure + int8 recipe, at ~27-token sentences and at 128 tokens? One run.

    python bench/tokens.py                 # -> bench/results/tokens.json (~1 h on 2 cores)
    python bench/tokens.py --quick --out DIR   # tiny random BERT, 4 distillation steps

Two workloads, each with the rows below; every row is replayed with `slimformer.apply` and
measured by `slimformer.benchmark` in a fresh process (batch-1 latency, throughput at batch 32):
- natural: the built-in embedding task, movie-review sentences at their real lengths (~27
  tokens); quality is the sentiment probe's accuracy, and cosine fidelity to fp32.
- 128 tokens: New York Times editorial text (VADER's transfer domain, which no recipe here is
  calibrated or distilled on otherwise) cut into passages of consecutive sentences of one
  editorial, up to 128 tokens, given as a `--data` corpus with `seq_len=128`; quality is the
  label-free recall@10 of the original's neighbours, timing on inputs of exactly 128 tokens.

Rows: fp32; token merging (ToMe) and pruning alone, at settings sized to the workload's length;
the best structure + int8 recipe (issue 3's: FFN and heads halved by activation, distilled,
PyTorch dynamic int8) alone and with each token setting; and, as the bar a text model with
reduced tokens must clear, that structure served int8 by ONNX Runtime (merged or pruned text
cannot be exported: the token counts would be fixed in the traced graph; pooled text can, and
bench/embedding_pooling.py serves it by ONNX Runtime int8).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import (
    baseline_result,
    machine,
    measure_baseline,
    measure_recipe,
    ratios,
    write_result,
)
from peers import HALVED_AND_DISTILLED

from slimformer.recipe import Step
from slimformer.tasks import TaskSpec

FIGURES = ("throughput_per_s", "latency_ms_median", "size_mb")
PASSAGE_TOKENS = 128
MIN_PASSAGE_TOKENS = 96
# Per workload: token settings sized to its length (MiniLM has 6 blocks; merging r per block
# from the first block, pruning keeps 70% of the tokens in each block from the third).
TOKEN_SETTINGS = {
    "natural": {
        "merge r=1": {"mode": "merge", "r": 1},
        "merge r=2": {"mode": "merge", "r": 2},
        "prune keep=0.7 from block 2": {"mode": "prune", "keep": 0.7, "start": 2},
    },
    "128 tokens": {
        "merge r=8": {"mode": "merge", "r": 8},
        "merge r=16": {"mode": "merge", "r": 16},
        "prune keep=0.7 from block 2": {"mode": "prune", "keep": 0.7, "start": 2},
    },
}
INT8 = (("quantize.dynamic_int8", {}),)
ONNX_INT8 = (("runtime.onnxruntime", {"optimize": True, "int8": "dynamic"}),)


def editorial_passages(tokenizer, out: Path) -> Path:
    """Consecutive sentences of one editorial joined up to PASSAGE_TOKENS tokens (with
    [CLS]/[SEP]), one passage a line; passages under MIN_PASSAGE_TOKENS are left out."""
    from slimformer.assets.reviews import _domain_file

    body = PASSAGE_TOKENS - 2
    passages: list[str] = []
    current: list[str] = []
    length, editorial = 0, None
    for line in _domain_file("editorials").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        ident, _, sentence = line.split("\t", 2)
        tokens = len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
        if ident.split("_")[0] != editorial or length + tokens > body:
            if length >= MIN_PASSAGE_TOKENS:
                passages.append(" ".join(current))
            current, length, editorial = [], 0, ident.split("_")[0]
        current.append(sentence.strip())
        length += tokens
    if length >= MIN_PASSAGE_TOKENS:
        passages.append(" ".join(current))
    out.write_text("\n".join(passages) + "\n", encoding="utf-8")
    return out


def quick_model(root: Path) -> str:
    """A tiny random BERT with MiniLM's tokenizer: the script end to end in minutes."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from slimformer import assets

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=6, num_attention_heads=4, intermediate_size=64
    )
    BertModel(config).eval().save_pretrained(root / "bert")
    AutoTokenizer.from_pretrained(assets.minilm_path()).save_pretrained(root / "bert")
    return str(root / "bert")


def as_row(workload: str, label: str, kind: str, measured: dict) -> dict:
    m = measured["measurement"]
    return {
        "workload": workload,
        "label": label,
        "kind": kind,  # fp32 | tokens | structure | structure+tokens | exported
        "recipe": measured.get("recipe", "baseline"),
        "quality": measured["quality"],
        "cosine_fidelity": measured["details"].get("cosine_fidelity"),
        "latency_ms_median": m["latency_ms_median"],
        "throughput_per_s": m["throughput_per_s"],
        "size_mb": m["size_mb"],
        "mean_tokens": m.get("mean_tokens"),
        "runtime": m.get("runtime"),
        "steps": measured.get("steps"),
    }


def run_workload(
    model: str, workload: str, spec: TaskSpec, structure: tuple, tmp: Path
) -> list[dict]:
    fp32 = as_row(workload, "fp32", "fp32", baseline_result(measure_baseline(model, spec)))
    rows = [fp32]
    runs: dict[str, tuple[str, tuple]] = {}
    for label, setting in TOKEN_SETTINGS[workload].items():
        runs[f"tokens: {label}"] = ("tokens", (("reduce.tokens", setting),))
    runs["structure + int8"] = ("structure", (*structure, *INT8))
    for label, setting in TOKEN_SETTINGS[workload].items():
        steps = (*structure, ("reduce.tokens", setting), *INT8)
        runs[f"structure + int8 + tokens: {label}"] = ("structure+tokens", steps)
    runs["structure + ONNX Runtime int8 (no tokens: not exportable with them)"] = (
        "exported",
        (*structure, *ONNX_INT8),
    )
    for index, (label, (kind, steps)) in enumerate(runs.items()):
        workdir = tmp / f"{workload.replace(' ', '_')}_{index}"
        measured = measure_recipe(model, tuple(Step(n, c) for n, c in steps), spec, workdir)
        rows.append(as_row(workload, label, kind, measured))
        print(workload, label, rows[-1]["throughput_per_s"], rows[-1]["quality"], flush=True)
    structured = next(r for r in rows if r["kind"] == "structure")
    for row in rows:
        row["drop_points"] = round((fp32["quality"] - row["quality"]) * 100, 2)
        row["vs_fp32"] = ratios(fp32, row, FIGURES)
        if row["kind"] == "structure+tokens":
            row["vs_structure_int8"] = ratios(structured, row, FIGURES)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, 4 steps")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from slimformer import assets

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="slimformer-tokens-") as tmp_name:
        tmp = Path(tmp_name)
        model = quick_model(tmp) if args.quick else "default"
        structure = tuple(
            (name, config | {"steps": 4})
            if args.quick and name == "recover.distill"
            else (name, config)
            for name, config in HALVED_AND_DISTILLED
        )
        corpus = editorial_passages(
            AutoTokenizer.from_pretrained(assets.minilm_path()), tmp / "editorials.txt"
        )
        workloads = {
            "natural": TaskSpec(name="embedding"),
            "128 tokens": TaskSpec(name="embedding", data=str(corpus), seq_len=PASSAGE_TOKENS),
        }
        passages = corpus.read_text(encoding="utf-8").splitlines()
        rows = []
        for workload, spec in workloads.items():
            rows += run_workload(model, workload, spec, structure, tmp)

    path = write_result(
        "tokens" + ("_quick" if args.quick else ""),
        {
            "command": "python bench/tokens.py" + (" --quick" if args.quick else ""),
            "machine": machine(),
            "model": "tiny random BERT (6 blocks)" if args.quick else "all-MiniLM-L6-v2",
            "workloads": {
                "natural": "movie-review sentences at real lengths; quality = sentiment probe "
                "accuracy",
                "128 tokens": f"{len(passages)} NYT editorial passages of {MIN_PASSAGE_TOKENS}-"
                f"{PASSAGE_TOKENS} tokens; quality = recall@10 of the original's neighbours; "
                f"timed at exactly {PASSAGE_TOKENS} tokens",
            },
            "structure": [list(step) for step in structure],
            "rows": rows,
            "wall_seconds": round(time.time() - started, 1),
        },
        args.out,
    )
    for row in rows:
        fidelity = row["cosine_fidelity"]
        fidelity = "-" if fidelity is None else f"{fidelity:.3f}"
        print(
            f"{row['workload']:<11} {row['label']:<62} q={row['quality']:.4f} "
            f"({row['drop_points']:+.2f} pt) fid={fidelity} "
            f"b1={row['latency_ms_median']:.2f}ms thr={row['throughput_per_s']:.1f}/s "
            f"x fp32 {row['vs_fp32'].get('throughput_per_s')}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
