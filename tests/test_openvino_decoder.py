"""Decoders served by OpenVINO with the KV cache as model state (runtime.openvino on a causal
LM): greedy generation and logits equal eager PyTorch's, NNCF weight compression settings,
saving and loading, and the refusals."""

from __future__ import annotations

import functools

import optuna
import pytest
import tiny
import torch

import slimformer
from slimformer.checkpoint import save_model
from slimformer.engines.openvino import OpenVinoModule
from slimformer.engines.openvino_stateful import cache_shapes
from slimformer.errors import SlimformerError
from slimformer.generation import greedy
from slimformer.measure import MeasureSettings, time_decode
from slimformer.passes import get_pass
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step
from slimformer.search.space import sample_recipe
from slimformer.tasks import TaskSpec

NEW_TOKENS = 24


def serve(model, **config):
    recipe = Recipe(steps=(Step("runtime.openvino", config),))
    return apply_recipe(model, recipe, tiny.calibration(model))


@functools.lru_cache(maxsize=1)
def served_f32():
    return serve(tiny.varied(tiny.tiny_llama()))


def prompt(model, text="The quick brown fox jumps over the lazy"):
    return torch.tensor([model.tokenizer(text)["input_ids"]])


def test_stateful_openvino_greedy_tokens_equal_eager_generate():
    model, served = tiny.varied(tiny.tiny_llama()), served_f32()
    ids = prompt(model)
    with torch.inference_mode():
        expected = model.module.generate(
            ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )[:, ids.shape[1] :]
    assert len(set(expected[0].tolist())) > NEW_TOKENS // 2  # a test that can fail
    assert isinstance(served.module, OpenVinoModule) and served.module.supports_kv_cache
    assert sum(p.numel() for p in served.module.parameters()) == 0  # no torch weights run
    got = greedy(served, ids, NEW_TOKENS)
    assert got.tokens.tolist() == expected.tolist()
    assert got.first_token_s > 0 and got.decode_tokens_per_s() > 0


def test_cached_steps_and_full_passes_give_eager_logits():
    model, served = tiny.varied(tiny.tiny_llama()), served_f32()
    ids = prompt(model)
    with torch.inference_mode():
        eager = model(input_ids=ids[:, :5], use_cache=True)
        ours = served(input_ids=ids[:, :5], use_cache=True)
        torch.testing.assert_close(ours.logits, eager.logits, atol=1e-4, rtol=1e-4)
        # Two tokens at once, then one: the cache grows by what each call adds.
        for chunk in (ids[:, 5:7], ids[:, 7:8]):
            eager = model(input_ids=chunk, past_key_values=eager.past_key_values, use_cache=True)
            ours = served(input_ids=chunk, past_key_values=ours.past_key_values, use_cache=True)
            torch.testing.assert_close(ours.logits, eager.logits, atol=1e-4, rtol=1e-4)
        assert ours.past_key_values.get_seq_length() == 8
        # A padded batch without the cache (perplexity, prefill), between cached calls.
        batch = tiny.calibration(model)[0]
        mask = batch["attention_mask"].bool()
        full, reference = served(**batch).logits, model(**batch).logits
        torch.testing.assert_close(full[mask], reference[mask], atol=1e-4, rtol=1e-4)


def test_a_stale_or_foreign_cache_is_refused():
    model, served = tiny.varied(tiny.tiny_llama()), served_f32()
    ids = prompt(model)
    with torch.inference_mode():
        first = served(input_ids=ids, use_cache=True)
        second = served(input_ids=ids[:, -1:], past_key_values=first.past_key_values)
        with pytest.raises(SlimformerError, match="stale"):
            served(input_ids=ids[:, -1:], past_key_values=first.past_key_values)
        served(input_ids=ids[:, -1:], past_key_values=second.past_key_values)
        eager_cache = model(input_ids=ids, use_cache=True).past_key_values
        with pytest.raises(SlimformerError, match="must be the one it returned"):
            served(input_ids=ids[:, -1:], past_key_values=eager_cache)


def test_decode_speed_is_measured_through_the_engine():
    model, served = tiny.varied(tiny.tiny_llama()), served_f32()
    examples = [prompt(model)[0].tolist()]
    assert time_decode(served, examples, MeasureSettings(min_seconds=0.05)) > 0


def test_int8_weights_round_trip_through_save_and_load(tmp_path):
    model = tiny.varied(tiny.tiny_llama())
    served = serve(model, weights="int8_asym")
    resolved = served.recipe.steps[-1].resolved
    # Every Linear of the 4 blocks (7 each) and the tied embedding/head: int8 codes.
    assert resolved["compressed_weights"] == {"int8": 7 * tiny.NUM_LAYERS + 1}
    ids = prompt(model)
    before = greedy(served, ids, NEW_TOKENS).tokens
    save_model(served, tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.safetensors"))
    loaded = slimformer.load(tmp_path / "m")
    assert isinstance(loaded.module, OpenVinoModule) and loaded.module.supports_kv_cache
    assert greedy(loaded, ids, NEW_TOKENS).tokens.tolist() == before.tolist()
    # int8 weights stay near the float model on real positions.
    batch = tiny.calibration(model)[0]
    mask = batch["attention_mask"].bool()
    got, reference = tiny.output(loaded, batch)[mask], tiny.output(model, batch)[mask]
    assert torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0) > 0.99


def test_int4_with_awq_scale_estimation_and_an_int8_share():
    model = tiny.varied(tiny.tiny_llama())
    served = serve(
        model, weights="int4_asym", group_size=32, ratio=0.6, awq=True, scale_estimation=True
    )
    counts = served.recipe.steps[-1].resolved["compressed_weights"]
    # About 60% of the block weights (NNCF counts elements) in int4; the rest of the 28 block
    # matrices and the embedding/head in int8.
    assert 0.4 * 7 * tiny.NUM_LAYERS < counts["int4"] < 0.8 * 7 * tiny.NUM_LAYERS
    assert counts["int8"] == 7 * tiny.NUM_LAYERS + 1 - counts["int4"]
    batch = tiny.calibration(model)[0]
    mask = batch["attention_mask"].bool()
    got, reference = tiny.output(served, batch)[mask], tiny.output(model, batch)[mask]
    assert torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0) > 0.9
    assert greedy(served, prompt(model), 4).tokens.shape == (1, 4)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"weights": "int8_asym", "awq": True}, "awq=True applies to int4 weights only"),
        ({"group_size": 64}, r"group_size=64 applies to int4 weights only \(weights=none\)"),
        ({"weights": "int8_sym", "ratio": 0.8}, "ratio=0.8 applies to int4 weights only"),
        ({"int8": "nncf", "weights": "int4_sym"}, "int8=nncf already makes weights"),
        ({"weights": "int3"}, "weights='int3' is not one of"),
        ({"weights": "int4_sym", "ratio": 0}, "ratio must be a number in"),
    ],
)
def test_settings_that_make_no_sense_together_are_refused(config, message):
    with pytest.raises(SlimformerError, match=message):
        get_pass("runtime.openvino").make_config(config)


def test_the_study_varies_int4_settings_only_with_int4_weights():
    openvino = get_pass("runtime.openvino")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    modes = set()
    for _ in range(60):
        trial = study.ask()
        recipe = sample_recipe(trial, [openvino], None, TaskSpec(name="perplexity"), 0)
        study.tell(trial, 0.0)
        for step in recipe.steps:
            config = openvino.make_config(step.config)  # never refused
            modes.add(config.weights)
            int4_only = {"runtime.openvino.awq", "runtime.openvino.group_size"}
            assert (config.weights.startswith("int4")) == (int4_only <= set(trial.params))
            assert config.int8 == "none" or "runtime.openvino.weights" not in trial.params
    assert {"none", "int8_asym", "int4_sym"} <= modes


def test_a_decoder_pruned_to_uneven_heads_generates_like_eager():
    model = tiny.varied(tiny.tiny_llama())
    recipe = Recipe(
        steps=(
            Step("prune.heads", {"keep": 0.75, "criterion": "magnitude", "allocation": "global"}),
            Step("runtime.openvino", {}),
        )
    )
    pruned = apply_recipe(model.copy(), Recipe(steps=recipe.steps[:1]), tiny.calibration(model))
    groups = {h for h, _ in cache_shapes(pruned)}
    assert len(groups) > 1  # layers kept different numbers of key-value heads
    served = apply_recipe(model, recipe, tiny.calibration(model))
    ids = prompt(model)
    assert greedy(served, ids, 12).tokens.tolist() == greedy(pruned, ids, 12).tokens.tolist()


def test_sliding_window_attention_is_refused_with_the_reason():
    model = tiny.tiny_qwen2()
    with pytest.raises(SlimformerError, match="sliding-window"):
        serve(model)


def test_nncf_int8_activations_calibrate_the_stateful_decoder():
    # At initialization scale: the scaled-up weights' activations saturate oneDNN's u8 x s8
    # GEMM on CPUs without VNNI (cosine 0.90 under a forced AVX2 cap).
    model = tiny.tiny_llama()
    served = serve(model, int8="nncf")
    assert served.recipe.steps[-1].resolved["int8_ops"] >= 4 * tiny.NUM_LAYERS
    batch = tiny.calibration(model)[0]
    mask = batch["attention_mask"].bool()
    got, reference = tiny.output(served, batch)[mask], tiny.output(model, batch)[mask]
    assert torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0) > 0.95
    assert greedy(served, prompt(model), 4).tokens.shape == (1, 4)
