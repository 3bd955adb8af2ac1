"""prune.ffn and prune.heads on tiny BERT, Llama (grouped-query attention) and ViT models."""

from __future__ import annotations

import pytest
import tiny
import torch
import transformers

from slimformer.checkpoint import load_model, save_model
from slimformer.errors import SlimformerError
from slimformer.passes.importance import CRITERIA, choose_kept
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")


def prune(model, *steps):
    return apply_recipe(
        model, Recipe(steps=tuple(Step(n, c) for n, c in steps)), tiny.calibration(model)
    )


def output_with_masked_inputs(model, batch, masks):
    """The model's output with each (module, mask) multiplying that module's input."""
    handles = [
        module.register_forward_pre_hook(lambda m, args, mask=mask: (args[0] * mask,))
        for module, mask in masks
    ]
    try:
        return tiny.output(model, batch)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_ffn_slicing_equals_masking_the_removed_neurons(family):
    model = tiny.build(family)
    pruned = prune(model, ("prune.ffn", {"keep": 0.5, "criterion": "magnitude", "multiple": 1}))
    batch = tiny.calibration(model)[0]
    # Mask every layer's removed neurons at once on the original model.
    masks = []
    for index in range(model.adapter.num_layers):
        kept_out = pruned.adapter.ffn_linears(index)["out"]
        full_out = model.adapter.ffn_linears(index)["out"]
        keep = [
            c
            for c in range(full_out.in_features)
            if any(
                torch.equal(full_out.weight[:, c], kept_out.weight[:, k])
                for k in range(kept_out.in_features)
            )
        ]
        assert len(keep) == kept_out.in_features == full_out.in_features // 2
        mask = torch.zeros(full_out.in_features)
        mask[keep] = 1
        masks.append((full_out, mask))
    reference = output_with_masked_inputs(model, batch, masks)
    torch.testing.assert_close(tiny.output(pruned, batch), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_head_slicing_equals_masking_the_removed_heads(family):
    model = tiny.build(family)
    pruned = prune(model, ("prune.heads", {"keep": 0.5, "criterion": "magnitude"}))
    head_dim = model.adapter.head_dim()
    batch = tiny.calibration(model)[0]
    masks = []
    for index in range(model.adapter.num_layers):
        full_out = model.adapter.attention_linears(index)["out"]
        kept_out = pruned.adapter.attention_linears(index)["out"]
        heads = full_out.in_features // head_dim
        keep = [
            h
            for h in range(heads)
            if any(
                torch.equal(
                    full_out.weight[:, h * head_dim : (h + 1) * head_dim],
                    kept_out.weight[:, k * head_dim : (k + 1) * head_dim],
                )
                for k in range(kept_out.in_features // head_dim)
            )
        ]
        assert len(keep) * head_dim == kept_out.in_features
        mask = torch.zeros(full_out.in_features)
        for h in keep:
            mask[h * head_dim : (h + 1) * head_dim] = 1
        masks.append((full_out, mask))
    reference = output_with_masked_inputs(model, batch, masks)
    torch.testing.assert_close(tiny.output(pruned, batch), reference, rtol=1e-5, atol=1e-5)


def test_grouped_query_heads_go_with_their_kv_group():
    model = tiny.build("llama")  # 4 query heads sharing 2 KV heads
    pruned = prune(model, ("prune.heads", {"keep": 0.5, "criterion": "activation"}))
    head_dim = model.adapter.head_dim()
    for index in range(pruned.adapter.num_layers):
        attention = pruned.adapter.attention_linears(index)
        assert attention["key"].out_features == attention["value"].out_features == head_dim
        assert attention["query"].out_features == 2 * head_dim
        assert attention["out"].in_features == 2 * head_dim
    ids = tiny.calibration(model)[0]["input_ids"][:1, :6]
    generated = pruned.module.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 10)  # the KV cache works with fewer heads


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_every_criterion_ranks_a_planted_useless_neuron_and_head_last(family, criterion):
    model = tiny.build(family)
    adapter = model.adapter
    head_dim = adapter.head_dim()
    with torch.no_grad():
        adapter.ffn_linears(1)["out"].weight[:, 5] = 0  # neuron 5 of block 1 feeds nothing
        adapter.attention_linears(1)["out"].weight[:, 0:head_dim] = 0  # head 0 of block 1 too
    ffn = prune(model, ("prune.ffn", {"keep": 0.9, "criterion": criterion, "multiple": 1}))
    kept_neurons = ffn.adapter.ffn_linears(1)["out"].in_features
    assert kept_neurons < adapter.ffn_linears(1)["out"].in_features
    assert not any(
        torch.equal(c, torch.zeros_like(c)) for c in ffn.adapter.ffn_linears(1)["out"].weight.T
    )
    if family == "llama":
        return  # heads come in KV groups there; the group test above covers them
    heads = prune(model, ("prune.heads", {"keep": 0.75, "criterion": criterion}))
    kept = heads.adapter.attention_linears(1)["out"].weight
    assert kept.shape[1] == 3 * head_dim
    assert kept.abs().sum() > 0 and all(
        kept[:, h * head_dim : (h + 1) * head_dim].abs().sum() > 0 for h in range(3)
    )


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_uneven_pruned_model_reloads_to_identical_outputs(family, tmp_path):
    model = tiny.build(family)
    pruned = prune(
        model,
        ("prune.ffn", {"keep": 0.5, "criterion": "fisher", "allocation": "global", "multiple": 1}),
        ("prune.heads", {"keep": 0.5, "criterion": "taylor", "allocation": "global"}),
        ("quantize.dynamic_int8", {"scope": "attention"}),
    )
    save_model(pruned, tmp_path / "m")
    reloaded = load_model(tmp_path / "m", head=pruned.head)
    batch = tiny.calibration(model)[0]
    assert torch.equal(tiny.output(pruned, batch), tiny.output(reloaded, batch))
    params = sum(p.numel() for p in model.module.parameters())
    assert sum(p.numel() for p in pruned.module.parameters()) < params  # really smaller


def test_global_allocation_gives_uneven_layers_and_uniform_even_ones():
    scores = [torch.tensor([9.0, 8, 7, 6]), torch.tensor([1.0, 1, 1, 50])]
    uniform = choose_kept(scores, 0.5, "uniform", 1, 1)
    assert [len(k) for k in uniform] == [2, 2]
    uneven = choose_kept(scores, 0.5, "global", 1, 1)
    assert [len(k) for k in uneven] == [3, 1] and uneven[1] == [3]
    assert [len(k) for k in choose_kept(scores, 0.5, "uniform", 4, 4)] == [4, 4]


def test_unknown_criterion_is_a_clear_error():
    model = tiny.build("bert")
    with pytest.raises(SlimformerError, match="criterion"):
        prune(model, ("prune.ffn", {"criterion": "vibes"}))


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_uniform_ffn_pruning_saves_as_plain_hugging_face(family, tmp_path):
    model = tiny.build(family)
    pruned = prune(model, ("prune.ffn", {"keep": 0.5, "criterion": "magnitude"}))
    assert pruned.config.intermediate_size == model.config.intermediate_size // 2
    out = save_model(pruned, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and not (out / "slimformer.safetensors").exists()
    plain = getattr(transformers, tiny.AUTO_CLASSES[family]).from_pretrained(out)
    wrapped = type(pruned)(module=plain.eval(), head=pruned.head, tokenizer=pruned.tokenizer)
    batch = tiny.calibration(model)[0]
    assert torch.equal(tiny.output(pruned, batch), tiny.output(wrapped, batch))


def test_uniform_llama_head_pruning_saves_as_plain_hugging_face(tmp_path):
    model = tiny.build("llama")
    pruned = prune(model, ("prune.heads", {"keep": 0.5, "criterion": "magnitude"}))
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    assert config.head_dim == model.adapter.head_dim()
    out = save_model(pruned, tmp_path / "m")
    assert (out / "model.safetensors").is_file()
    plain = getattr(transformers, tiny.AUTO_CLASSES["llama"]).from_pretrained(out)
    wrapped = type(pruned)(module=plain.eval(), head=pruned.head, tokenizer=pruned.tokenizer)
    batch = tiny.calibration(model)[0]
    assert torch.equal(tiny.output(pruned, batch), tiny.output(wrapped, batch))
