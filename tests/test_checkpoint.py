"""Saving and loading candidates: both on-disk forms, tied weights, atomic replacement, and
deterministic replay of the saved recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import torch
import transformers
from safetensors import safe_open
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

from slimformer.checkpoint import load_model, save_model
from slimformer.layers import count_parameters
from slimformer.model import SlimModel
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
PRUNE_AND_INT8 = Recipe(
    steps=(Step("prune.layers", {"count": 1}), Step("quantize.dynamic_int8", {}))
)
INT8 = Recipe(steps=(Step("quantize.dynamic_int8", {}),))


def quantized_names(model: SlimModel) -> set[str]:
    return {n for n, m in model.module.named_modules() if isinstance(m, DynamicQuantLinear)}


def assert_same_outputs(a: SlimModel, b: SlimModel, calibration: list[dict]) -> None:
    for batch in calibration:
        assert torch.equal(tiny.output(a, batch), tiny.output(b, batch))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_no_pickles(folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    assert not [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            assert list(handle.keys())


# --- the slimformer form (int8 layers) ----------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_pruned_int8_candidate_round_trips_through_save_and_load(
    family: str, tmp_path: Path
) -> None:
    model = tiny.build(family)
    calibration = tiny.calibration(model)
    candidate = apply_recipe(model, PRUNE_AND_INT8, calibration)
    assert quantized_names(candidate)

    out = save_model(candidate, tmp_path / "candidate")

    names = {p.name for p in out.iterdir()}
    assert {"slimformer.safetensors", "slimformer.json", "config.json", "recipe.yaml"} <= names
    assert "model.safetensors" not in names
    assert ("tokenizer_config.json" in names) == (family != "vit")
    assert_no_pickles(out)
    meta = json.loads((out / "slimformer.json").read_text())
    assert meta["format_version"] == 1 and meta["head"] == tiny.HEADS[family]
    assert set(meta["modules"]) == quantized_names(candidate)

    loaded = load_model(out, head=tiny.HEADS[family])

    assert loaded.head == tiny.HEADS[family]
    assert loaded.adapter.num_layers == 3 and loaded.config.num_hidden_layers == 3
    assert quantized_names(loaded) == quantized_names(candidate)
    assert not [n for n, p in loaded.module.named_parameters() if p.is_meta]
    assert loaded.recipe.steps == candidate.recipe.steps
    assert (loaded.tokenizer is None) == (family == "vit")
    assert_same_outputs(loaded, candidate, calibration)


def test_plain_transformers_refuses_an_int8_folder_instead_of_loading_random_weights(
    tmp_path: Path,
) -> None:
    model = tiny.tiny_bert()
    out = save_model(apply_recipe(model, INT8), tmp_path / "int8")
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.AutoModel.from_pretrained(out)


# --- the plain Hugging Face form ----------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_layer_pruned_model_saves_as_plain_hugging_face(family: str, tmp_path: Path) -> None:
    model = tiny.build(family)
    calibration = tiny.calibration(model)
    candidate = apply_recipe(
        model, Recipe(steps=(Step("prune.layers", {"count": 1}),)), calibration
    )

    out = save_model(candidate, tmp_path / "pruned")

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "recipe.yaml"} <= names
    assert "slimformer.safetensors" not in names
    meta = json.loads((out / "slimformer.json").read_text())
    assert meta["weights"] == "hf" and meta["head"] == candidate.head  # provenance kept
    assert_no_pickles(out)
    auto = getattr(transformers, tiny.AUTO_CLASSES[family])
    plain = SlimModel(module=auto.from_pretrained(out).eval(), head=candidate.head)
    assert plain.config.num_hidden_layers == 3
    assert plain.adapter.num_layers == 3
    assert_same_outputs(plain, candidate, calibration)
    assert_same_outputs(load_model(out), candidate, calibration)


# --- tied and untied LM heads -------------------------------------------------------------
def test_tied_llama_embeddings_survive_int8_save_and_load(tmp_path: Path) -> None:
    model = tiny.tiny_llama(tie_word_embeddings=True)
    assert model.module.lm_head.weight is model.module.model.embed_tokens.weight
    calibration = tiny.calibration(model)
    candidate = apply_recipe(model, INT8, calibration)
    out = save_model(candidate, tmp_path / "tied")

    with safe_open(str(out / "slimformer.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert ("lm_head.weight" in keys) + ("model.embed_tokens.weight" in keys) == 1

    loaded = load_model(out, head="causal-lm")
    assert loaded.module.lm_head.weight is loaded.module.model.embed_tokens.weight
    assert torch.equal(loaded.module.lm_head.weight, model.module.lm_head.weight)
    assert_same_outputs(loaded, candidate, calibration)


def test_untied_llama_head_stays_separate_through_int8_save_and_load(tmp_path: Path) -> None:
    model = tiny.tiny_llama(tie_word_embeddings=False)
    head, embeddings = model.module.lm_head.weight, model.module.model.embed_tokens.weight
    assert head is not embeddings and not torch.equal(head, embeddings)
    calibration = tiny.calibration(model)
    candidate = apply_recipe(model, INT8, calibration)

    loaded = load_model(save_model(candidate, tmp_path / "untied"), head="causal-lm")

    assert loaded.module.lm_head.weight is not loaded.module.model.embed_tokens.weight
    assert torch.equal(loaded.module.lm_head.weight, head)
    assert torch.equal(loaded.module.model.embed_tokens.weight, embeddings)
    assert_same_outputs(loaded, candidate, calibration)


# --- atomic saves -------------------------------------------------------------------------
def test_saving_over_an_existing_folder_replaces_it_fully(tmp_path: Path) -> None:
    model = tiny.tiny_bert()
    calibration = tiny.calibration(model)
    out = tmp_path / "model"
    save_model(
        apply_recipe(model, Recipe(steps=(Step("prune.layers", {"count": 1}),)), calibration), out
    )
    (out / "stale.txt").write_text("from an earlier save")
    assert (out / "model.safetensors").is_file()

    candidate = apply_recipe(model, INT8, calibration)
    save_model(candidate, out)

    names = {p.name for p in out.iterdir()}
    assert "stale.txt" not in names
    assert "model.safetensors" not in names
    assert "slimformer.safetensors" in names
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or .old folders left
    assert_same_outputs(load_model(out), candidate, calibration)


@pytest.mark.parametrize("fail_in", ["recipe.to_yaml", "tokenizer.save_pretrained"])
def test_a_save_that_fails_midway_leaves_the_old_folder_intact(
    fail_in: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny.tiny_bert()
    out = tmp_path / "model"
    save_model(model, out, extra_files={"notes.txt": "old"})
    before = snapshot(out)
    assert "notes.txt" in before and "model.safetensors" in before

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    if fail_in == "recipe.to_yaml":
        monkeypatch.setattr(Recipe, "to_yaml", boom)
    else:
        monkeypatch.setattr(model.tokenizer, "save_pretrained", boom)
    candidate = apply_recipe(model, INT8)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(candidate, out)

    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_model_without_a_source_does_not_pick_up_files_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "modules.json").write_text("[]")
    monkeypatch.chdir(cwd)
    out = save_model(tiny.tiny_vit(), tmp_path / "vit")
    assert not (out / "modules.json").exists()


# --- the saved recipe ---------------------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_saved_recipe_replays_to_the_same_model(family: str, tmp_path: Path) -> None:
    recipe = Recipe(
        steps=(
            Step("prune.layers", {"count": 2, "criterion": "removal_change"}),
            Step("quantize.dynamic_int8", {"scope": "all_but_ffn_out", "per_channel": True}),
        ),
        seed=7,
    )
    model = tiny.build(family)
    candidate = apply_recipe(model, recipe, tiny.calibration(model))
    out = save_model(candidate, tmp_path / "candidate")

    loaded_recipe = Recipe.load(out)
    assert loaded_recipe.seed == 7
    assert loaded_recipe.steps == candidate.recipe.steps
    assert [s.pass_name for s in loaded_recipe.steps] == ["prune.layers", "quantize.dynamic_int8"]
    assert len(loaded_recipe.steps[0].resolved["dropped_layers"]) == 2
    assert loaded_recipe.steps[1].config["per_channel"] is True

    fresh = tiny.build(family)
    calibration = tiny.calibration(fresh)
    replayed = apply_recipe(fresh, loaded_recipe, calibration)
    assert replayed.recipe.steps == candidate.recipe.steps
    assert_same_outputs(replayed, candidate, calibration)
    assert_same_outputs(replayed, load_model(out, head=tiny.HEADS[family]), calibration)


# --- size accounting ----------------------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_int8_keeps_the_parameter_count_and_shrinks_the_weights_file(
    family: str, tmp_path: Path
) -> None:
    model = tiny.build(family)
    quantized = apply_recipe(model, INT8)
    assert len(quantized_names(quantized)) > 0
    assert count_parameters(quantized.module) == count_parameters(model.module)

    float_file = save_model(model, tmp_path / "fp32") / "model.safetensors"
    int8_file = save_model(quantized, tmp_path / "int8") / "slimformer.safetensors"
    saved_linear_bytes = sum(
        3 * m.weight().numel()
        for m in quantized.module.modules()
        if isinstance(m, DynamicQuantLinear)
    )  # each int8 weight saves 3 of its 4 fp32 bytes
    assert float_file.stat().st_size - int8_file.stat().st_size > 0.9 * saved_linear_bytes


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_count_parameters_of_a_float_model_counts_each_parameter_once(family: str) -> None:
    model = tiny.build(family)
    assert count_parameters(model.module) == sum(p.numel() for p in model.module.parameters())


def test_count_parameters_counts_tied_embeddings_once() -> None:
    module = tiny.tiny_llama(tie_word_embeddings=True).module
    assert count_parameters(module) == sum(p.numel() for p in module.parameters())


def test_saved_layer_kinds_and_runtime_names_stay_the_released_ones() -> None:
    # slimformer.json names these: renaming one would orphan every model saved with it.
    from slimformer.engines.base import registered_served
    from slimformer.layers import registered_codecs

    assert {codec.kind for codec in registered_codecs()} == {
        "dynamic_int8_linear",
        "static_int8_linear",
        "int4_weight_linear",
        "int8_weight_linear",
        "lowrank_linear",
    }
    assert set(registered_served()) == {
        "compiled",
        "llamacpp",
        "onnxruntime",
        "openvino",
        "unpadded",
    }
