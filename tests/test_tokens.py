"""reduce.tokens: token merging (ToMe) and attention-based pruning inside BERT and ViT encoders,
with PyTorch's fused attention kernel kept, padding respected, and saved models reloaded."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import tiny
import torch
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from slimformer.checkpoint import load_model, save_model
from slimformer.errors import SlimformerError
from slimformer.passes import get_pass
from slimformer.passes.reduce_tokens import per_block
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step
from slimformer.tasks.base import collate
from slimformer.tokens import (
    TokenReduction,
    install,
    merge_tokens,
    pool_tokens,
    prune_tokens,
    unmerge,
)

pytestmark = pytest.mark.usefixtures("single_thread")
FUSED = "aten::_scaled_dot_product_flash_attention_for_cpu"


def reduced(model, *steps):
    return apply_recipe(model, Recipe(steps=tuple(steps)), tiny.calibration(model))


def padded_batch(model):
    return collate(model, [model.tokenizer(text)["input_ids"] for text in tiny.SENTENCES])


def batch_for(family, model):
    return padded_batch(model) if family == "bert" else tiny.calibration(model)[0]


def at_real(output, batch):
    mask = batch.get("attention_mask")
    return output[mask.bool()] if mask is not None and output.dim() == 3 else output


@pytest.mark.parametrize("family", ["bert", "vit"])
@pytest.mark.parametrize(
    "reduction",
    [
        TokenReduction("merge", (0,) * tiny.NUM_LAYERS),
        TokenReduction("prune", (1.0,) * 4),
        TokenReduction("pool", (1,) * 4),
    ],
    ids=["merge-r0", "prune-keep1", "pool-window1"],
)
def test_reducing_nothing_reproduces_the_original_outputs_exactly(family, reduction):
    original = tiny.build(family)
    model = original.copy()
    install(model.module, reduction)
    batch = batch_for(family, original)
    expected, got = tiny.output(original, batch), tiny.output(model, batch)
    assert torch.equal(at_real(got, batch), at_real(expected, batch))


def kernel_calls(model, batch) -> Counter:
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**batch)
    return Counter(event.name for event in prof.events())


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_merging_keeps_the_fused_attention_kernel_and_computes_no_softmax(family):
    model = reduced(tiny.build(family), Step("reduce.tokens", {"r": 2}))
    calls = kernel_calls(model, batch_for(family, model))
    assert calls[FUSED] == tiny.NUM_LAYERS  # every block's attention, bias and all
    assert not any("softmax" in name for name in calls)  # no eager attention anywhere


def test_pruning_keeps_the_fused_kernel_and_scores_with_one_query_row():
    model = reduced(tiny.tiny_vit(), Step("reduce.tokens", {"mode": "prune", "keep": 0.6}))
    batch = tiny.calibration(model)[0]
    with (
        torch.inference_mode(),
        profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p,
    ):
        model(**batch)
    softmax_shapes = [e.input_shapes[0] for e in p.events() if e.name == "aten::softmax"]
    assert Counter(e.name for e in p.events())[FUSED] == tiny.NUM_LAYERS
    # the score is the class token's row per head: [batch, heads, 1, tokens]
    assert softmax_shapes and all(shape[2] == 1 for shape in softmax_shapes)


def test_proportional_attention_through_sdpa_equals_the_eager_formula():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=generator) for _ in range(3))
    size = torch.tensor([[1.0, 3, 2, 1, 5, 1, 0], [2.0, 1, 1, 4, 1, 0, 0]])  # 0: padding
    bias = size.log()[:, None, None, :]
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=8**-0.5)
    eager = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + bias, dim=-1) @ v
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    # ...which is attention over each token repeated `size` times, without any bias
    repeats = size[0].long()
    unrolled = F.scaled_dot_product_attention(
        q[:1], k[:1].repeat_interleave(repeats, dim=2), v[:1].repeat_interleave(repeats, dim=2)
    )
    torch.testing.assert_close(fused[:1], unrolled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_the_eager_attention_setting_computes_tomes_softmax_with_the_same_outputs(family):
    """`attention=eager` (the benchmark's "ToMe as its authors apply it") runs the explicit
    softmax in every block instead of the fused kernel, and agrees with the fused path."""
    merge = {"r": 2, "schedule": "decreasing"}
    fused = reduced(tiny.build(family), Step("reduce.tokens", merge))
    eager = reduced(tiny.build(family), Step("reduce.tokens", merge | {"attention": "eager"}))
    batch = batch_for(family, fused)
    calls = kernel_calls(eager, batch)
    assert calls[FUSED] == 0 and calls["aten::softmax"] == tiny.NUM_LAYERS
    torch.testing.assert_close(
        at_real(tiny.output(eager, batch), batch),
        at_real(tiny.output(fused, batch), batch),
        rtol=1e-4,
        atol=1e-5,
    )
    assert eager.recipe.steps[-1].config["attention"] == "eager"


def test_merged_tokens_are_size_weighted_and_unmerge_to_size_weighted_means():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=generator)
    size = torch.tensor([[1.0] * 9, [1.0] * 6 + [0.0] * 3])
    source = torch.arange(9).expand(2, 9)
    merged_x, merged_size, merged_source = merge_tokens(x, size, source, x, 3, padded=True)
    assert merged_x.shape[1] == 6
    assert torch.equal(merged_size.sum(1), size.sum(1))  # no real token lost or duplicated
    # mean pooling of the unmerged output over real positions = size-weighted mean of tokens
    back = unmerge(merged_x, merged_source, None)
    pooled = (back * size[..., None]).sum(1) / size.sum(1, keepdim=True)
    weighted = (merged_x * merged_size[..., None]).sum(1) / merged_size.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, weighted)
    torch.testing.assert_close(pooled, x.mul(size[..., None]).sum(1) / size.sum(1, keepdim=True))


def test_the_class_token_is_never_merged_even_when_it_is_the_best_match():
    x = torch.randn(1, 8, 4)
    metric = torch.ones(1, 8, 4)  # every pair equally similar, the class token included
    size = torch.ones(1, 8)
    merged_x, merged_size, source = merge_tokens(x, size, torch.arange(8)[None], metric, 3, False)
    assert merged_size[0, 0] == 1 and torch.equal(merged_x[0, 0], x[0, 0])
    assert source[0, 0] == 0 and (source[0, 1:] != 0).all()


def test_pruned_tokens_never_include_the_class_token():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 12, 4, generator=generator)
    size = torch.ones(3, 12)
    size[1, 8:] = 0  # a padded row
    source = torch.arange(12).expand(3, 12)
    for _ in range(6):  # prune hard, block after block, with the class token scored lowest
        scores = torch.rand(x.shape[:2], generator=generator) + 1
        scores[:, 0] = 0
        x, size, source = prune_tokens(x, size, source, scores, 0.5)
        assert (source[:, 0] == 0).all() and (size[:, 0] == 1).all()
    assert (size.sum(1) == 2).all()  # the class token and the one token every row keeps
    # pruned positions add nothing to a mean over the input positions
    back = unmerge(x, source, size)
    for row, real in enumerate((12, 8, 12)):
        torch.testing.assert_close(back[row, :real].mean(0), x[row, :2].mean(0))


@pytest.mark.parametrize(
    "settings",
    [
        {"r": 2},
        {"mode": "prune", "keep": 0.6},
        {"mode": "prune", "keep": 0.5, "criterion": "mean"},
        {"mode": "pool", "window": 2, "start": 1},
    ],
    ids=["merge", "prune-cls", "prune-mean", "pool"],
)
def test_a_sentence_reduces_the_same_alone_and_in_a_padded_batch(settings):
    model = reduced(tiny.tiny_bert(), Step("reduce.tokens", settings))
    examples = [model.tokenizer(text)["input_ids"] for text in tiny.SENTENCES]
    together = tiny.output(model, collate(model, examples))
    for row, example in enumerate(examples):
        alone = tiny.output(model, collate(model, [example]))
        torch.testing.assert_close(alone[0], together[row, : len(example)], atol=2e-6, rtol=0)


def test_merging_changes_outputs_and_keeps_the_input_length():
    original = tiny.tiny_bert()
    model = reduced(original, Step("reduce.tokens", {"r": 2}))
    batch = padded_batch(model)
    got, expected = tiny.output(model, batch), tiny.output(original, batch)
    assert got.shape == expected.shape
    assert not torch.allclose(at_real(got, batch), at_real(expected, batch))


@pytest.mark.parametrize(
    ("family", "steps"),
    [
        (
            "bert",
            (
                Step("prune.heads", {"keep": 0.5, "allocation": "global"}),
                Step("prune.ffn", {"keep": 0.5, "allocation": "global"}),
                Step("reduce.tokens", {"r": 2, "schedule": "decreasing", "start": 1}),
                Step("quantize.dynamic_int8", {}),
            ),
        ),
        ("vit", (Step("reduce.tokens", {"mode": "prune", "keep": 0.7, "criterion": "mean"}),)),
        ("vit", (Step("reduce.tokens", {"r": 3, "attention": "eager"}),)),
        ("vit", (Step("reduce.tokens", {"mode": "pool", "window": 3, "start": 1}),)),
    ],
    ids=["bert-uneven-int8-merge", "vit-prune", "vit-eager-merge", "vit-pool"],
)
def test_saved_models_reload_with_identical_outputs(family, steps, tmp_path):
    model = reduced(tiny.build(family), *steps)
    batch = batch_for(family, model)
    before = tiny.output(model, batch)
    folder = save_model(model, tmp_path / "saved")
    assert json.loads((folder / "slimformer.json").read_text())["tokens"]["mode"] in (
        "merge",
        "prune",
        "pool",
    )
    again = load_model(folder)
    assert torch.equal(tiny.output(again, batch), before)
    assert not torch.equal(tiny.output(tiny.build(family), batch), before)


def test_a_copy_of_a_reduced_model_reduces_on_its_own():
    model = reduced(tiny.tiny_vit(), Step("reduce.tokens", {"r": 3}))
    copy = model.copy()
    batch = tiny.calibration(model)[0]
    assert torch.equal(tiny.output(copy, batch), tiny.output(model, batch))
    with torch.no_grad():
        copy.adapter.attention_linears(0)["key"].weight.mul_(2)
    assert not torch.equal(tiny.output(copy, batch), tiny.output(model, batch))


def test_hidden_states_come_back_at_input_length_and_attention_weights_are_refused():
    model = reduced(tiny.tiny_bert(), Step("reduce.tokens", {"r": 2}))
    batch = padded_batch(model)
    with torch.inference_mode():
        states = model(**batch, output_hidden_states=True).hidden_states
        assert len(states) == tiny.NUM_LAYERS + 1
        assert all(s.shape == states[0].shape for s in states)
        with pytest.raises(SlimformerError, match="attention weights"):
            model(**batch, output_attentions=True)


def test_a_vit_with_merged_tokens_exports_to_onnx_runtime():
    model = reduced(tiny.tiny_vit(), Step("reduce.tokens", {"r": 3, "schedule": "decreasing"}))
    served = reduced(
        tiny.tiny_vit(),
        Step("reduce.tokens", {"r": 3, "schedule": "decreasing"}),
        Step("runtime.onnxruntime", {}),
    )
    batch = {"pixel_values": torch.randn(5, 3, 16, 16)}  # another batch size than traced
    torch.testing.assert_close(
        tiny.output(served, batch), tiny.output(model, batch), atol=1e-5, rtol=0
    )


def test_a_vit_with_pruned_tokens_serves_in_onnx_runtime_per_channel_int8():
    # The class-token scores multiply by the key projection folded into heads, a 3-D weight
    # ONNX Runtime's per-channel int8 MatMul rejects at run time; it stays float.
    pruning = Step("reduce.tokens", {"mode": "prune", "keep": 0.5, "start": 1})
    model = reduced(tiny.tiny_vit(), pruning)
    int8 = Step("runtime.onnxruntime", {"optimize": True, "int8": "dynamic", "per_channel": True})
    served = reduced(tiny.tiny_vit(), pruning, int8)
    batch = {"pixel_values": torch.randn(5, 3, 16, 16)}
    logits, expected = tiny.output(served, batch), tiny.output(model, batch)
    assert logits.shape == expected.shape
    assert torch.nn.functional.cosine_similarity(logits, expected).min() > 0.9


def test_a_vit_with_pruned_tokens_exports_to_openvino():
    pruning = Step("reduce.tokens", {"mode": "prune", "keep": 0.5, "start": 1})
    model = reduced(tiny.tiny_vit(), pruning)
    served = reduced(tiny.tiny_vit(), pruning, Step("runtime.openvino", {}))
    batch = {"pixel_values": torch.randn(5, 3, 16, 16)}  # another batch size than traced
    torch.testing.assert_close(
        tiny.output(served, batch), tiny.output(model, batch), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "squash"}, "mode=.squash. is not one of merge | prune | pool"),
        ({"mode": "pool", "window": 1}, "window must be an integer"),
        ({"r": -1}, "r must be an integer in"),
        ({"r": 2.5}, "r must be an integer"),
        ({"mode": "prune", "keep": 0}, "keep must be a number in"),
        ({"mode": "prune", "keep": 1.5}, "keep must be a number in"),
        ({"criterion": "max"}, "criterion=.max. is not one of cls | mean"),
        ({"attention": "flash"}, "attention=.flash. is not one of sdpa | eager"),
        ({"rate": 2}, "unknown setting"),
    ],
)
def test_bad_settings_are_refused_with_one_clear_line(settings, message):
    with pytest.raises(SlimformerError, match=message):
        get_pass("reduce.tokens").make_config(settings)


def test_what_cannot_work_is_refused_with_a_reason(tmp_path):
    bert = tiny.tiny_bert()
    with pytest.raises(SlimformerError, match="start must be an integer in .0, 3."):
        reduced(bert, Step("reduce.tokens", {"start": tiny.NUM_LAYERS}))
    with pytest.raises(SlimformerError, match="encoders .BERT family, ViT., not llama"):
        reduced(tiny.tiny_llama(), Step("reduce.tokens", {}))
    with pytest.raises(SlimformerError, match="padding-free batching .* skip the token"):
        reduced(bert, Step("reduce.tokens", {}), Step("runtime.batching", {"mode": "unpadded"}))
    with pytest.raises(SlimformerError, match="onnxruntime: reduce.tokens on text"):
        reduced(bert, Step("reduce.tokens", {}), Step("runtime.onnxruntime", {}))
    model = reduced(bert, Step("reduce.tokens", {}))
    with pytest.raises(SlimformerError, match="already reduces its tokens"):
        reduced(model, Step("reduce.tokens", {}))
    folder = save_model(model, tmp_path / "saved")
    meta = json.loads((folder / "slimformer.json").read_text())
    meta["tokens"]["amounts"] = [2, 2]
    (folder / "slimformer.json").write_text(json.dumps(meta))
    with pytest.raises(SlimformerError, match="settings for 2 blocks, the model has 4"):
        load_model(folder)


def test_schedules_give_one_amount_per_block_and_start_follows_dropped_blocks():
    token_pass = get_pass("reduce.tokens")
    decreasing = token_pass.make_config({"r": 4, "schedule": "decreasing", "start": 1})
    assert per_block(decreasing, 5) == (0, 6, 5, 3, 2)  # 1.5·r down to 0.5·r
    assert per_block(token_pass.make_config({"r": 4}), 3) == (4, 4, 4)
    assert per_block(token_pass.make_config({"mode": "prune", "start": 2}), 3) == (1.0, 1.0, 0.8)
    pool_once = token_pass.make_config({"mode": "pool", "window": 3, "start": 1})
    assert per_block(pool_once, 4) == (1, 3, 1, 1)
    # start=3 sampled for 4 blocks, one of them dropped first: the last block still reduces
    model = reduced(
        tiny.tiny_bert(), Step("prune.layers", {"count": 1}), Step("reduce.tokens", {"start": 3})
    )
    assert model.recipe.steps[-1].resolved["per_block"] == [0, 0, 2]


def test_normalize_resets_the_settings_the_mode_does_not_use():
    token_pass = get_pass("reduce.tokens")
    merge = token_pass.make_config({"mode": "merge", "keep": 0.6, "criterion": "mean"})
    prune = token_pass.make_config({"mode": "prune", "r": 8, "schedule": "decreasing"})
    assert (merge.keep, merge.criterion) == (0.8, "cls")
    assert (prune.r, prune.schedule) == (2, "constant")
    pool = token_pass.make_config({"mode": "pool", "window": 3, "r": 8, "keep": 0.6})
    assert (pool.window, pool.r, pool.keep) == (3, 2, 0.8)
    assert token_pass.make_config({"mode": "merge", "window": 3}).window == 2


def test_pooling_averages_each_square_of_patches_and_leaves_the_class_token_alone():
    # class token, then a 4x4 grid of patches numbered row by row
    x = torch.arange(17, dtype=torch.float32).view(1, 17, 1).repeat(1, 1, 3)
    size = torch.ones(1, 17)
    source = torch.arange(17).unsqueeze(0)
    pooled, new_size, new_source, grid = pool_tokens(x, size, source, 2, (4, 4))
    assert grid == (2, 2)
    assert pooled[0, :, 0].tolist() == [0, 3.5, 5.5, 11.5, 13.5]  # (1+2+5+6)/4, ...
    assert new_size.tolist() == [[1, 4, 4, 4, 4]]
    assert new_source.tolist() == [[0, 1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]]
    # A grid short of whole windows pools what its edge has, by size.
    pooled, new_size, _, grid = pool_tokens(x, size, source, 3, (4, 4))
    assert grid == (2, 2)
    assert new_size.tolist() == [[1, 9, 3, 3, 1]]
    assert pooled[0, :, 0].tolist() == [0, 6, 8, 14, 16]
    # Text: runs of neighbours; a padded position (size 0) adds nothing to its run.
    size = torch.tensor([[1.0, 1, 1, 1, 1, 0, 0]])
    x = torch.tensor([[0.0, 1, 2, 3, 4, 50, 60]]).unsqueeze(-1)
    pooled, new_size, new_source, grid = pool_tokens(x, size, torch.arange(7)[None], 2, None)
    assert grid is None
    assert new_size.tolist() == [[1, 2, 2, 0]]
    assert pooled[0, :3, 0].tolist() == [0, 1.5, 3.5]
    assert new_source.tolist() == [[0, 1, 1, 2, 2, 3, 3]]


def test_pooling_a_vit_runs_the_fused_kernel_without_a_mask_on_a_quarter_of_the_tokens():
    model = reduced(tiny.tiny_vit(), Step("reduce.tokens", {"mode": "pool", "start": 1}))
    batch = tiny.calibration(model)[0]
    with (
        torch.inference_mode(),
        profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p,
    ):
        output = model(**batch, output_hidden_states=True)
    fused = [e.input_shapes for e in p.events() if e.name == FUSED]
    assert [shapes[0][2] for shapes in fused] == [17, 17, 5, 5]  # 1 + 16 patches, then 1 + 4
    assert not any("softmax" in e.name for e in p.events())
    assert all(s.shape[1] == 17 for s in output.hidden_states)


def test_a_vit_with_pooled_tokens_exports_to_openvino_and_onnx_runtime():
    pooling = Step("reduce.tokens", {"mode": "pool", "window": 3, "start": 1})
    model = reduced(tiny.tiny_vit(), pooling)
    batch = {"pixel_values": torch.randn(5, 3, 16, 16)}  # another batch size than traced
    for runtime in ("runtime.openvino", "runtime.onnxruntime"):
        served = reduced(tiny.tiny_vit(), pooling, Step(runtime, {}))
        torch.testing.assert_close(
            tiny.output(served, batch), tiny.output(model, batch), atol=1e-4, rtol=0
        )


def test_a_sentence_encoder_with_pooled_tokens_exports_for_any_length_and_padding():
    # Traced on the calibration batches; served on sentences alone (other lengths, odd and
    # even, no padding) and together (padded): the graph keeps the run count open.
    pooling = Step("reduce.tokens", {"mode": "pool", "window": 2, "start": 1})
    model = reduced(tiny.tiny_bert(), pooling)
    examples = [model.tokenizer(text)["input_ids"] for text in tiny.SENTENCES]
    batches = [collate(model, examples), *(collate(model, [e]) for e in examples[:3])]
    assert len({b["input_ids"].shape[1] for b in batches}) > 2
    for runtime in ("runtime.openvino", "runtime.onnxruntime"):
        served = reduced(tiny.tiny_bert(), pooling, Step(runtime, {}))
        for batch in batches:
            torch.testing.assert_close(
                at_real(tiny.output(served, batch), batch),
                at_real(tiny.output(model, batch), batch),
                atol=1e-4,
                rtol=0,
            )


def test_pooled_sentences_get_onnx_runtimes_fused_attention_in_every_block():
    # Without its fused Attention (QAttention in int8) ONNX Runtime ran a pooled encoder's
    # attention as separate q, k, v MatMuls and float score products; outputs on padded
    # batches through the fused path are checked by the test above.
    pooling = Step("reduce.tokens", {"mode": "pool", "window": 2, "start": 1})
    for int8, fused in (("none", "Attention"), ("dynamic", "QAttention")):
        served = reduced(tiny.tiny_bert(), pooling, Step("runtime.onnxruntime", {"int8": int8}))
        ops = served.recipe.steps[-1].resolved["ops"]
        assert ops.get(fused) == tiny.NUM_LAYERS, ops
    # int8: every float MatMul left is the pooling's (its sums of sizes and of tokens)
    assert ops.get("MatMul") == 2, ops


def test_merged_or_pruned_sentences_are_refused_by_an_exporting_runtime():
    bert = tiny.tiny_bert()
    for mode in ("merge", "prune"):
        with pytest.raises(SlimformerError, match="openvino: reduce.tokens on text: .* pool"):
            reduced(bert, Step("reduce.tokens", {"mode": mode}), Step("runtime.openvino", {}))


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_token_scores_are_taken_apart_from_the_attention_and_agree_with_its_q_and_k(family):
    from slimformer.tokens import _heads, _merge_metric, _scoring_logits

    model = tiny.build(family)
    block = model.adapter.encoder_block(1)
    head_dim = model.adapter.head_dim()
    h = torch.randn(3, 9, model.module.config.hidden_size)
    q, k = _heads(block.query(h), head_dim), _heads(block.key(h), head_dim)
    with torch.no_grad():
        reference = (q @ k.transpose(-1, -2)).softmax(-1)
        # Through the key's weights, without its bias: a shift per query, the same softmax.
        for rows in (1, None):
            logits = _scoring_logits(block, h, head_dim, rows)
            expected = reference[:, :, :1] if rows == 1 else reference
            assert torch.allclose(logits.softmax(-1), expected, atol=1e-5)
        assert torch.allclose(_merge_metric(block, h, head_dim), k.mean(1), atol=1e-5)


def test_rows_are_gathered_as_torch_gathers_them():
    from slimformer.tokens import gather_rows

    x = torch.randn(4, 7, 5)
    index = torch.tensor([[0, 3, 6], [1, 1, 2], [6, 5, 4], [0, 0, 0]])
    assert torch.equal(gather_rows(x, index), x.gather(1, index.unsqueeze(-1).expand(-1, -1, 5)))
    assert torch.equal(
        gather_rows(x[:, ::2], index % 4),
        x[:, ::2].gather(1, (index % 4).unsqueeze(-1).expand(-1, -1, 5)),
    )
