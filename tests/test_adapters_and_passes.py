"""Adapters (where each family keeps its blocks and projections) and the built-in passes,
on tiny random-weight models of every supported family."""

from __future__ import annotations

import re

import pytest
import tiny
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear

from slimformer.errors import SlimformerError
from slimformer.passes import get_pass, registered_passes
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")

# Written out independently of the adapters: full module names, per family and linear role.
BLOCK_PREFIX = {
    "bert": r"encoder\.layer\.\d+\.",
    "llama": r"model\.layers\.\d+\.",
    "vit": r"vit\.layers\.\d+\.",
}
ROLE_PATTERNS = {
    "bert": {
        "attention": r"attention\.(self\.(query|key|value)|output\.dense)",
        "ffn_in": r"intermediate\.dense",
        "ffn_out": r"output\.dense",
    },
    "llama": {
        "attention": r"self_attn\.[qkvo]_proj",
        "ffn_in": r"mlp\.(gate|up)_proj",
        "ffn_out": r"mlp\.down_proj",
    },
    "vit": {
        "attention": r"attention\.[qkvo]_proj",
        "ffn_in": r"mlp\.fc1",
        "ffn_out": r"mlp\.fc2",
    },
}
PER_BLOCK = {  # Linear layers per block, by role
    "bert": {"attention": 4, "ffn_in": 1, "ffn_out": 1},
    "llama": {"attention": 4, "ffn_in": 2, "ffn_out": 1},
    "vit": {"attention": 4, "ffn_in": 1, "ffn_out": 1},
}
SCOPE_ROLES = {
    "all": ("attention", "ffn_in", "ffn_out"),
    "all_but_ffn_out": ("attention", "ffn_in"),
    "attention": ("attention",),
    "ffn": ("ffn_in", "ffn_out"),
}


def linear_names(module: nn.Module, family: str, roles: tuple[str, ...]) -> set[str]:
    """Names of the float nn.Linear modules that play `roles` inside the blocks."""
    patterns = [BLOCK_PREFIX[family] + ROLE_PATTERNS[family][role] for role in roles]
    return {
        name
        for name, sub in module.named_modules()
        if type(sub) is nn.Linear and any(re.fullmatch(p, name) for p in patterns)
    }


def all_linears(module: nn.Module) -> set[str]:
    return {name for name, sub in module.named_modules() if type(sub) is nn.Linear}


def quantized_names(module: nn.Module) -> set[str]:
    return {name for name, sub in module.named_modules() if isinstance(sub, DynamicQuantLinear)}


def one_step(pass_name: str, **config) -> Recipe:
    return Recipe(steps=(Step(pass_name, config),))


# --- adapters -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_adapter_finds_every_block(family: str) -> None:
    model = tiny.build(family)
    adapter = model.adapter
    assert adapter.family == family
    assert adapter.num_layers == 4
    assert len(adapter.blocks()) == 4
    assert adapter.facts().num_layers == 4


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("role", ["attention", "ffn_in", "ffn_out"])
def test_block_linear_names_name_the_linears_of_each_role(family: str, role: str) -> None:
    model = tiny.build(family)
    names = model.adapter.block_linear_names((role,))
    assert len(names) == PER_BLOCK[family][role] * 4
    assert len(set(names)) == len(names)
    for name in names:
        assert type(model.module.get_submodule(name)) is nn.Linear
    assert set(names) == linear_names(model.module, family, (role,))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_block_linear_names_of_all_roles_cover_every_linear_in_the_blocks(family: str) -> None:
    model = tiny.build(family)
    names = model.adapter.block_linear_names()
    in_blocks = {n for n in all_linears(model.module) if re.match(BLOCK_PREFIX[family], n)}
    assert set(names) == in_blocks
    assert len(names) == sum(PER_BLOCK[family].values()) * 4
    with pytest.raises(ValueError, match="unknown linear roles"):
        model.adapter.block_linear_names(("mlp",))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_keep_blocks_keeps_those_blocks_and_updates_the_config(family: str) -> None:
    model = tiny.build(family)
    batch = tiny.calibration(model)[0]
    before = tiny.output(model, batch)
    adapter = model.adapter
    original = list(adapter.blocks())
    adapter.keep_blocks([0, 2, 3])
    assert model.adapter.num_layers == 3
    assert list(model.adapter.blocks()) == [original[0], original[2], original[3]]
    assert model.config.num_hidden_layers == 3
    after = tiny.output(model, batch)
    assert after.shape == before.shape
    assert torch.isfinite(after).all()
    assert not torch.equal(after, before)  # block 1 really is gone from the forward pass


def test_keep_blocks_renumbers_layer_idx_of_a_decoder() -> None:
    model = tiny.tiny_llama()
    model.adapter.keep_blocks([0, 2, 3])
    for position, block in enumerate(model.adapter.blocks()):
        indices = [m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")]
        assert indices, "the attention module of a Llama block carries layer_idx"
        assert set(indices) == {position}


def test_kv_cache_still_works_after_dropping_decoder_blocks() -> None:
    model = tiny.tiny_llama()
    model.adapter.keep_blocks([0, 2, 3])
    ids = tiny.calibration(model)[0]["input_ids"][:1, :8]
    module = model.module
    with torch.inference_mode():
        full = module(input_ids=ids, use_cache=False).logits
        prefix = module(input_ids=ids[:, :5], use_cache=True)
        assert prefix.past_key_values.get_seq_length() == 5
        rest = module(input_ids=ids[:, 5:], past_key_values=prefix.past_key_values, use_cache=True)
        cached = module.generate(ids[:, :4], max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = module.generate(ids[:, :4], max_new_tokens=6, do_sample=False, use_cache=False)
    torch.testing.assert_close(rest.logits, full[:, 5:], rtol=1e-4, atol=1e-5)
    assert cached.shape == (1, 10)
    assert torch.equal(cached, uncached)


def test_keep_blocks_follows_per_layer_layer_types() -> None:
    model = tiny.tiny_qwen2()
    assert model.adapter.family == "llama"
    types = list(model.config.layer_types)
    assert types[0] != types[3]  # mixed full / sliding attention, so the test can tell
    model.adapter.keep_blocks([0, 3])
    assert model.config.layer_types == [types[0], types[3]]
    assert model.config.num_hidden_layers == 2
    batch = tiny.calibration(model)[0]
    assert torch.isfinite(tiny.output(model, batch)).all()


# --- prune.layers -------------------------------------------------------------------------
@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("criterion", ["block_influence", "removal_change"])
def test_prune_layers_drops_a_planted_useless_block_first(family: str, criterion: str) -> None:
    model = tiny.build(family)
    tiny.plant_identity_block(model, 2)
    calibration = tiny.calibration(model)
    before = tiny.output(model, calibration[0])
    recipe = one_step("prune.layers", count=1, criterion=criterion)

    result = apply_recipe(model, recipe, calibration)

    resolved = result.recipe.steps[-1].resolved
    assert resolved["dropped_layers"] == [2]
    assert len(resolved["importance"]) == 4
    assert min(resolved["importance"]) == resolved["importance"][2]
    assert result.adapter.num_layers == 3
    assert result.config.num_hidden_layers == 3
    # Dropping an identity block changes (almost) nothing.
    torch.testing.assert_close(tiny.output(result, calibration[0]), before, rtol=1e-3, atol=1e-4)
    # The input model is untouched.
    assert model.adapter.num_layers == 4
    assert model.config.num_hidden_layers == 4
    assert model.recipe.steps == ()
    assert torch.equal(tiny.output(model, calibration[0]), before)


def test_prune_layers_drops_count_blocks() -> None:
    model = tiny.tiny_llama()
    result = apply_recipe(model, one_step("prune.layers", count=2), tiny.calibration(model))
    dropped = result.recipe.steps[-1].resolved["dropped_layers"]
    assert len(dropped) == 2 and dropped == sorted(dropped)
    assert result.adapter.num_layers == 2


@pytest.mark.parametrize("count", [0, 4, 5])
def test_prune_layers_rejects_a_count_outside_1_to_layers_minus_1(count: int) -> None:
    model = tiny.tiny_bert()
    # 0 is refused when the recipe is read; 4 and 5 against this 4-block model.
    with pytest.raises(SlimformerError, match=r"count must be an integer in \[1, (3|layers-1)\]"):
        apply_recipe(model, one_step("prune.layers", count=count), tiny.calibration(model))
    assert model.adapter.num_layers == 4


def test_prune_layers_needs_calibration_data() -> None:
    model = tiny.tiny_bert()
    with pytest.raises(SlimformerError, match="calibration"):
        apply_recipe(model, one_step("prune.layers", count=1), calibration=())


def test_recipe_steps_run_in_stage_order() -> None:
    model = tiny.tiny_vit()
    recipe = Recipe(steps=(Step("quantize.dynamic_int8", {}), Step("prune.layers", {"count": 1})))
    result = apply_recipe(model, recipe, tiny.calibration(model))
    assert [s.pass_name for s in result.recipe.steps] == ["prune.layers", "quantize.dynamic_int8"]
    assert result.adapter.num_layers == 3
    assert len(quantized_names(result.module)) == 6 * 3


# --- quantize.dynamic_int8 ----------------------------------------------------------------
def assert_close_but_changed(quantized: torch.Tensor, reference: torch.Tensor) -> None:
    assert not torch.equal(quantized, reference), "int8 output is bit-identical to fp32"
    width = reference.shape[-1]
    cosine = F.cosine_similarity(quantized.reshape(-1, width), reference.reshape(-1, width), dim=-1)
    assert float(cosine.min()) > 0.99
    assert float((quantized - reference).norm() / reference.norm()) < 0.1


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("scope", list(SCOPE_ROLES))
def test_dynamic_int8_scope_swaps_exactly_the_expected_linears(family: str, scope: str) -> None:
    model = tiny.build(family)
    batch = tiny.calibration(model)[0]
    reference = tiny.output(model, batch)
    expected = linear_names(model.module, family, SCOPE_ROLES[scope])
    assert len(expected) == 4 * sum(PER_BLOCK[family][r] for r in SCOPE_ROLES[scope])

    result = apply_recipe(model, one_step("quantize.dynamic_int8", scope=scope))

    assert quantized_names(result.module) == expected
    assert all_linears(result.module) == all_linears(model.module) - expected
    assert result.recipe.steps[-1].resolved["quantized_layers"] == len(expected)
    assert_close_but_changed(tiny.output(result, batch), reference)
    assert quantized_names(model.module) == set()  # the input model is untouched


def test_dynamic_int8_skip_keeps_named_layers_and_prefixes_in_float() -> None:
    model = tiny.tiny_llama()
    exact = "model.layers.1.self_attn.q_proj"
    prefix = "model.layers.3"
    result = apply_recipe(model, one_step("quantize.dynamic_int8", skip=(exact, prefix)))
    quantized = quantized_names(result.module)
    assert exact not in quantized
    assert type(result.module.get_submodule(exact)) is nn.Linear
    assert not any(n.startswith(prefix + ".") for n in quantized)
    everything = linear_names(model.module, "llama", SCOPE_ROLES["all"])
    kept = {exact} | {n for n in everything if n.startswith(prefix + ".")}
    assert len(kept) == 1 + 7
    assert quantized == everything - kept
    assert result.recipe.steps[-1].resolved["quantized_layers"] == len(everything) - 8


def test_dynamic_int8_skip_matches_whole_name_parts_only() -> None:
    model = tiny.tiny_bert()
    # A string prefix that stops inside a name part ("que" of "query") skips nothing.
    partial = "encoder.layer.1.attention.self.que"
    result = apply_recipe(model, one_step("quantize.dynamic_int8", skip=(partial,)))
    assert "encoder.layer.1.attention.self.query" in quantized_names(result.module)
    assert len(quantized_names(result.module)) == 6 * 4


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize(
    ("per_channel", "qscheme"),
    [(False, torch.per_tensor_affine), (True, torch.per_channel_affine)],
)
def test_dynamic_int8_per_channel_sets_the_weight_qscheme(
    family: str, per_channel: bool, qscheme: torch.qscheme
) -> None:
    model = tiny.build(family)
    batch = tiny.calibration(model)[0]
    result = apply_recipe(model, one_step("quantize.dynamic_int8", per_channel=per_channel))
    modules = [m for m in result.module.modules() if isinstance(m, DynamicQuantLinear)]
    assert len(modules) == 4 * sum(PER_BLOCK[family].values())
    assert {m.weight().qscheme() for m in modules} == {qscheme}
    if per_channel:
        assert all(m.weight().q_per_channel_scales().numel() == m.out_features for m in modules)
    assert_close_but_changed(tiny.output(result, batch), tiny.output(model, batch))


# --- configs and the registry -------------------------------------------------------------
def test_make_config_fills_defaults_and_turns_lists_into_tuples() -> None:
    config = get_pass("quantize.dynamic_int8").make_config({"skip": ["a", "b"]})
    assert config.skip == ("a", "b")
    assert config.scope == "all" and config.per_channel is False
    layer_config = get_pass("prune.layers").make_config({"count": 2})
    assert (layer_config.count, layer_config.criterion) == (2, "block_influence")


@pytest.mark.parametrize(
    ("pass_name", "values", "message"),
    [
        ("prune.layers", {"layers": 2}, "unknown setting"),
        ("quantize.dynamic_int8", {"scope": "all", "bits": 4}, "unknown setting"),
        ("prune.layers", {"criterion": "random"}, "not one of"),
        ("quantize.dynamic_int8", {"scope": "everything"}, "not one of"),
        ("quantize.dynamic_int8", {"per_channel": "yes"}, "must be true or false"),
        ("recover.distill", {"steps": -5}, r"must be an integer in \[0, inf\)"),
        ("recover.distill", {"lr": "fast"}, "positive number"),
    ],
)
def test_make_config_rejects_unknown_settings_and_values_outside_the_choices(
    pass_name: str, values: dict, message: str
) -> None:
    with pytest.raises(SlimformerError, match=message):
        get_pass(pass_name).make_config(values)


def test_numeric_choices_take_values_between_the_searched_options() -> None:
    config = get_pass("recover.distill").make_config({"steps": 300, "lr": 3e-5})
    assert (config.steps, config.lr) == (300, 3e-5)


def test_make_config_rejects_a_non_integer_count() -> None:
    with pytest.raises(SlimformerError):
        get_pass("prune.layers").make_config({"count": "two"})


def test_get_pass_rejects_an_unknown_name() -> None:
    with pytest.raises(SlimformerError, match="unknown pass 'prune.nonexistent'"):
        get_pass("prune.nonexistent")


def test_registered_passes_come_in_stage_order() -> None:
    passes = registered_passes()
    names = [p.name for p in passes]
    assert "prune.layers" in names and "quantize.dynamic_int8" in names
    assert names.index("prune.layers") < names.index("quantize.dynamic_int8")
    stages = [p.stage for p in passes]
    assert stages == sorted(stages)
    assert get_pass("prune.layers").needs_calibration is True
