"""Integration checks on the real all-MiniLM-L6-v2 and the real movie-review sentences."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import slimformer
from slimformer.checkpoint import load_model, save_model
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step
from slimformer.tasks import TaskSpec, make_task
from slimformer.tasks.base import DROP_SE
from slimformer.tasks.embedding import _probe, embed
from slimformer.tasks.geometry import normalize, probe_correct

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "slimformer.cli"]


FIDELITY_STATIC = 0.90
FIDELITY_SMOOTHED = 0.90


@pytest.fixture(scope="module")
def minilm():
    return slimformer.load("default")


@pytest.fixture(scope="module")
def task():
    return make_task(TaskSpec("embedding"))


@pytest.fixture(scope="module")
def calibration(minilm, task):
    return task.calibration_batches(minilm, 64)


@pytest.fixture(scope="module")
def sentences(task):
    return task.texts("test")[:300]


def fidelity(model, reference, sentences) -> float:
    a = normalize(embed(model, sentences, 128))
    b = normalize(embed(reference, sentences, 128))
    return float(np.mean(np.sum(a * b, axis=1)))


def hidden(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize(
    ("steps", "least_fidelity"),
    [
        ([("quantize.dynamic_int8", {"scope": "attention"})], 0.99),
        # Bounds hold at 7-bit activations (AVX2 CPUs): 0.9856 and 0.933 there, 0.9956 and
        # 0.958 at full range (VNNI).
        ([("quantize.dynamic_int8", {"scope": "all_but_ffn_out", "per_channel": True})], 0.98),
        ([("quantize.dynamic_int8", {"scope": "all"})], 0.92),
        ([("quantize.static_int8", {"observer": "mse"})], FIDELITY_STATIC),
        (
            [("quantize.smooth", {"alpha": 0.5}), ("quantize.static_int8", {"observer": "mse"})],
            FIDELITY_SMOOTHED,
        ),
        ([("quantize.weight_only", {"bits": 8, "method": "gptq"})], 0.995),
        ([("quantize.weight_only", {"bits": 4, "group_size": 32, "method": "gptq"})], 0.95),
        ([("prune.layers", {"count": 1, "criterion": "removal_change"})], 0.85),
    ],
    ids=[
        "int8-attention",
        "int8-no-ffn-out",
        "int8-all",
        "static-int8",
        "smoothed-static-int8",
        "weight-only-int8-gptq",
        "int4-gptq",
        "drop-1-layer",
    ],
)
def test_pass_keeps_embeddings_close_on_minilm(
    minilm, calibration, sentences, steps, least_fidelity
):
    recipe = Recipe(steps=tuple(Step(name, config) for name, config in steps))
    candidate = apply_recipe(minilm, recipe, calibration)
    score = fidelity(candidate, minilm, sentences)
    assert least_fidelity < score < 0.99999  # close, and really changed


def test_a_probe_drop_on_minilm_comes_with_the_standard_error_of_its_paired_answers(
    minilm, tmp_path
):
    # A probe that tells the classes apart (a tiny random model's predicts one class), and a
    # copy whose weights moved enough to flip some of its answers.
    rows = [
        (text, "pos" if score > 0 else "neg")
        for text, score in slimformer.assets.rated_sentences("amazon")
        if score
    ][:800]
    data = tmp_path / "labelled.csv"
    with data.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("text", "mood"), *rows])
    task = make_task(TaskSpec("embedding", data=str(data), label_column="mood"))
    state = task.prepare(minilm)
    moved = minilm.copy()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in moved.module.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(0.1 * parameter.std() * noise)
    score = task.score(moved, state)

    probe, labels = _probe(state, "probe_"), task.labels("test")
    before = probe_correct(probe, state["reference_test"], labels)
    after = probe_correct(probe, embed(moved, task.texts("test"), task.seq_len), labels)
    assert after.mean() == pytest.approx(score.value) and np.any(before != after)
    expected = np.std(before - after, ddof=1) / np.sqrt(len(labels))
    assert score.details[DROP_SE] == pytest.approx(expected)
    assert task.score(minilm, state).details[DROP_SE] == 0.0


def test_layer_importance_keeps_first_and_last_minilm_blocks(minilm, calibration):
    candidate = apply_recipe(
        minilm, Recipe(steps=(Step("prune.layers", {"count": 2}),)), calibration
    )
    dropped = candidate.recipe.steps[-1].resolved["dropped_layers"]
    assert len(dropped) == 2 and 0 not in dropped and 5 not in dropped
    assert candidate.config.num_hidden_layers == 4


def test_saved_int8_minilm_reloads_to_identical_outputs(minilm, calibration, tmp_path):
    recipe = Recipe(
        steps=(Step("prune.layers", {"count": 1}), Step("quantize.dynamic_int8", {})),
        task=TaskSpec("embedding"),
    )
    candidate = apply_recipe(minilm, recipe, calibration)
    save_model(candidate, tmp_path / "model")
    reloaded = slimformer.load(tmp_path / "model")
    for batch in calibration[:2]:
        assert torch.equal(hidden(candidate, batch), hidden(reloaded, batch))
    size = (tmp_path / "model" / "slimformer.safetensors").stat().st_size
    assert size < 0.8 * (slimformer.assets.minilm_path() / "model.safetensors").stat().st_size


def test_recipe_replays_to_identical_outputs_through_the_cli(minilm, calibration, tmp_path):
    recipe = Recipe(
        steps=(
            Step("prune.layers", {"count": 1, "criterion": "block_influence"}),
            Step("quantize.dynamic_int8", {"scope": "all_but_ffn_out"}),
        ),
        task=TaskSpec("embedding"),
    )
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    for name in ("a", "b"):
        subprocess.run(
            [
                *CLI,
                "apply",
                str(tmp_path / "recipe.yaml"),
                "default",
                "--out",
                str(tmp_path / name),
            ],
            check=True,
            capture_output=True,
        )
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    in_process = apply_recipe(
        minilm, recipe, make_task(TaskSpec("embedding")).calibration_batches(minilm)
    )
    for batch in calibration[:2]:
        assert torch.equal(hidden(a, batch), hidden(b, batch))
        assert torch.equal(hidden(a, batch), hidden(in_process, batch))
    assert Recipe.load(tmp_path / "a").steps[0].resolved["dropped_layers"]


def test_bench_reports_sane_figures_for_minilm():
    result = slimformer.benchmark("default", batch_size=16)
    m = result.measurement
    assert result.metric == "probe_accuracy" and 0.70 < result.quality < 0.85
    assert result.details["cosine_fidelity"] == pytest.approx(1.0, abs=1e-5)
    # Sanity bounds, not speed claims (those are make bench's): wide enough for a 2-core CI
    # machine that other jobs share (19 inputs/s and a 968 ms p90 were seen there), narrow
    # enough to catch a unit slip (seconds for milliseconds, a batch counted as one input).
    assert 0.5 < m["latency_ms_median"] <= m["latency_ms_p90"] < 2500
    assert 4 < m["throughput_per_s"] < 5000
    assert 80 < m["size_mb"] < 100  # 22.7M fp32 parameters
    assert m["parameters"] == sum(p.numel() for p in slimformer.load("default").module.parameters())
    assert 50 < m["peak_memory_mb"] < 2000
    assert 0.1 < m["gflops_per_input"] < 5
    assert m["threads"] == (os.cpu_count() or 1)
    assert 10 < m["mean_tokens"] < 60  # real sentences, not padded to 128


def _finished_trials(run: Path) -> list[dict]:
    file = run / "trials.jsonl"
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


# The real default study through the CLI, killed and resumed (about 3 minutes on 2 cores): run
# by `make bench-studies`. The suite kills and resumes studies of a tiny model
# (tests/test_crash_points.py), which exercise the same run folder and resume code.
@pytest.mark.bench
def test_killed_study_resumes_without_losing_trials(tmp_path):
    run = tmp_path / "run"
    args = [
        *CLI,
        "optimize",
        "default",
        "--trials",
        "3",
        "--out",
        str(run),
        "--passes",
        "quantize.dynamic_int8",
        "--confirm-rounds",
        "0",  # resuming is the subject; the confirmation of the choice has its own tests
    ]
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(_finished_trials(run)) < 2:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)  # the study and its evaluation child, mid-trial
    process.wait()
    before = {t["number"]: t for t in _finished_trials(run) if t["state"] == "complete"}
    assert len(before) >= 2 and not (run / "best").exists()

    done = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {t["number"]: t for t in _finished_trials(run) if t["state"] == "complete"}
    for number, trial in before.items():
        assert after[number] == trial  # kept exactly, not redone
    assert len(after) == 3
    assert after[0]["description"] == "baseline"
    best = run / "best"
    for name in ("recipe.yaml", "metrics.json", "README.md", "slimformer.json"):
        assert (best / name).is_file(), name
    # best/ is the chosen trial's model: its recipe as the trial recorded it, loadable.
    chosen = after[json.loads((best / "metrics.json").read_text())["trial"]]
    assert yaml.safe_load((best / "recipe.yaml").read_text()) == chosen["recipe"]
    assert json.loads((best / "slimformer.json").read_text())["head"] == "embedding"
    assert json.loads((run / "pareto.json").read_text())["front"]

    shown = subprocess.run([*CLI, "show", str(run)], capture_output=True, text=True)
    assert shown.returncode == 0 and "baseline" in shown.stdout


@pytest.mark.parametrize(
    ("steps", "least_fidelity"),
    [
        ([("runtime.onnxruntime", {})], 0.99999),
        ([("runtime.onnxruntime", {"int8": "dynamic"})], 0.98),  # per-channel: 0.9915
        ([("runtime.openvino", {})], 0.99999),
        ([("runtime.openvino", {"int8": "nncf"})], 0.93),
        ([("runtime.batching", {"mode": "unpadded"})], 0.99999),
    ],
    ids=["onnxruntime", "onnxruntime-int8", "openvino", "openvino-nncf", "unpadded"],
)
def test_runtime_serves_minilm_with_eager_embeddings(
    minilm, calibration, sentences, steps, least_fidelity
):
    recipe = Recipe(steps=tuple(Step(name, config) for name, config in steps))
    served = apply_recipe(minilm, recipe, calibration)
    assert fidelity(served, minilm, sentences) > least_fidelity


def test_onnxruntime_fuses_every_minilm_attention_and_layernorm(minilm, calibration):
    served = apply_recipe(minilm, Recipe(steps=(Step("runtime.onnxruntime", {}),)), calibration)
    fusions = served.recipe.steps[-1].resolved["fusions"]
    assert fusions["Attention"] == 6 and fusions["SkipLayerNormalization"] == 12
    assert fusions["EmbedLayerNormalization"] == 1


def test_unpadded_minilm_equals_padded_on_real_sentences(minilm, calibration, task):
    unpadded = apply_recipe(
        minilm, Recipe(steps=(Step("runtime.batching", {"mode": "unpadded"}),)), calibration
    )
    batch = calibration[0]
    mask = batch["attention_mask"].bool()
    assert (~mask).sum() > mask.numel() // 4  # the batch really is mostly padding
    torch.testing.assert_close(
        hidden(unpadded, batch)[mask], hidden(minilm, batch)[mask], rtol=1e-4, atol=1e-4
    )
