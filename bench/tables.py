"""Print a bench/results JSON file as a markdown table (for notes, READMEs, reviews).

python bench/tables.py bench/results/pruning_minilm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def speed_by_structure(rows: list[dict], key: str) -> dict[str, float]:
    """Median of a speed figure over every row with the same structure: distillation changes
    weights, not shapes, so those rows time the same architecture and the median damps the
    machine's run-to-run noise."""
    values: dict[str, list[float]] = {}
    for row in rows:
        values.setdefault(row.get("structure", row.get("mode")), []).append(row["measurement"][key])
    return {k: statistics.median(v) for k, v in values.items()}


def pruning_table(result: dict) -> str:
    base = result["baseline"]
    bounded = result["task"] != "perplexity"
    speed_key = "throughput_per_s" if bounded else "decode_tokens_per_s"
    speeds = speed_by_structure(result["rows"], speed_key)
    quality = "probe acc" if bounded else "perplexity"
    lines = [
        f"| structure | criterion | distilled | {quality} | drop | "
        + ("fidelity | " if bounded else "")
        + "latency ms | "
        + ("throughput/s" if bounded else "prefill tok/s | decode tok/s")
        + f" | {speed_key} ×, structure median | distill s |",
        "|" + "---|" * (10 if bounded else 10),
    ]
    for row in result["rows"]:
        m = row["measurement"]
        drop = f"{row['drop'] * 100:+.2f} pt" if bounded else f"{row['drop'] * 100:+.1f}%"
        cells = [
            row["structure"],
            row["criterion"],
            "yes" if row["distilled"] else "no",
            f"{row['quality'] * 100:.2f}%" if bounded else f"{row['quality']:.2f}",
            drop,
        ]
        if bounded:
            cells.append(f"{row['details'].get('cosine_fidelity', float('nan')):.3f}")
        cells.append(f"{m['latency_ms_median']:.2f}")
        if bounded:
            cells.append(f"{m['throughput_per_s']:.0f}")
        else:
            cells += [f"{m['prefill_tokens_per_s']:.0f}", f"{m['decode_tokens_per_s']:.1f}"]
        cells.append(f"{speeds[row['structure']] / base[speed_key]:.2f}×")
        cells.append(str(row.get("distill", {}).get("seconds", "")))
        lines.append("| " + " | ".join(cells) + " |")
    header = (
        f"baseline: quality {base['quality']:.4f}, latency {base['latency_ms_median']:.2f} ms, "
        f"{speed_key} {base[speed_key]:.1f} (median of {len(base['spread'][speed_key])} "
        f"measurements: {base['spread'][speed_key]})"
    )
    return header + "\n\n" + "\n".join(lines)


def quantization_table(result: dict) -> str:
    base = result["baseline"]
    bounded = result["task"] != "perplexity"
    keys = [k for k in base if k not in ("spread", "quality")]
    lines = [
        "| mode | quality | drop | " + " | ".join(keys) + " |",
        "|" + "---|" * (3 + len(keys)),
        "| fp32 | "
        + (f"{base['quality'] * 100:.2f}%" if bounded else f"{base['quality']:.2f}")
        + " | | "
        + " | ".join(f"{base[k]:.4g}" for k in keys)
        + " |",
    ]
    for row in result["rows"]:
        m, r = row["measurement"], row["ratio_to_baseline"]
        drop = f"{row['drop'] * 100:+.2f} pt" if bounded else f"{row['drop'] * 100:+.1f}%"
        quality = f"{row['quality'] * 100:.2f}%" if bounded else f"{row['quality']:.2f}"
        cells = [f"{m[k]:.4g} ({r.get(k, float('nan')):.2f}×)" for k in keys]
        lines.append(f"| {row['mode']} | {quality} | {drop} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lowrank_table(part: dict) -> str:
    """One part (minilm or smollm2) of a bench/lowrank.py result."""
    base = part["baseline"]
    bounded = part["task"] != "perplexity"
    speeds = ("latency_ms_median", "throughput_per_s" if bounded else "decode_tokens_per_s")
    quality = "probe acc" if bounded else "perplexity"
    lines = [
        f"| row | removed | {quality} | drop | "
        + ("fidelity | " if bounded else "")
        + " | ".join(f"{k} ×" for k in speeds)
        + " |",
        "|" + "---|" * (4 + bounded + len(speeds)),
    ]
    for row in part["rows"]:
        ratio = row["ratio_to_baseline"]
        if bounded:
            cells = [f"{row['quality'] * 100:.2f}", f"{row['drop'] * 100:+.2f} pt"]
            cells.append(f"{row.get('details', {}).get('cosine_fidelity', float('nan')):.3f}")
        else:
            cells = [f"{row['quality']:.4g}", f"{row['drop'] * 100:+.1f}%"]
        cells += [f"{ratio.get(k, float('nan')):.2f}×" for k in speeds]
        removed = f"{row['removed_fraction']:.1%}"
        lines.append(f"| {row['row']} | {removed} | " + " | ".join(cells) + " |")
    baseline_quality = f"{base['quality'] * 100:.2f}" if bounded else f"{base['quality']:.4g}"
    header = f"baseline: {quality} {baseline_quality}, " + ", ".join(
        f"{k} {base[k]:.4g} (spread {base['spread'][k]})" for k in speeds if k in base
    )
    return header + "\n\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("result", type=Path)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    rows = result.get("rows", [])
    if "minilm" in result or "smollm2" in result:
        for name in ("minilm", "smollm2"):
            if name in result:
                print(f"{name} ({result['machine']})\n\n{lowrank_table(result[name])}\n")
    elif rows and "structure" in rows[0]:
        print(pruning_table(result))
    elif rows and "mode" in rows[0]:
        print(quantization_table(result))
    else:
        raise SystemExit(f"{args.result}: not a pruning, quantization or low-rank result")


if __name__ == "__main__":
    main()
