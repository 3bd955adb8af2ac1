"""Runtimes: ONNX Runtime, OpenVINO and torch.compile serve a model with eager's outputs,
save beside their artifact and load back into the same engine."""

from __future__ import annotations

import json

import pytest
import tiny
import torch

from slimformer.checkpoint import SLIM_META, load_model, save_model
from slimformer.engines.compiled import CompiledModule
from slimformer.engines.onnxruntime import OnnxRuntimeModule
from slimformer.engines.openvino import OpenVinoModule
from slimformer.errors import SlimformerError
from slimformer.pipeline import apply_recipe, recipe_from_dict
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")


def serve(model, *steps):
    recipe = Recipe(steps=tuple(Step(name, config) for name, config in steps))
    return apply_recipe(model, recipe, tiny.calibration(model))


def real_positions(model, batch, output):
    mask = batch.get("attention_mask")
    return output[mask.bool()] if mask is not None and output.dim() == 3 else output


def difference(model, served, batch) -> float:
    reference, got = tiny.output(model, batch), tiny.output(served, batch)
    return float((real_positions(model, batch, reference - got)).abs().max())


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_onnxruntime_float_matches_eager(family):
    model = tiny.build(family)
    served = serve(model, ("runtime.onnxruntime", {}))
    assert isinstance(served.module, OnnxRuntimeModule)
    assert difference(model, served, tiny.calibration(model)[1]) < 1e-4


def test_onnxruntime_applies_and_reports_the_transformer_fusions_on_bert():
    model = tiny.build("bert")
    served = serve(model, ("runtime.onnxruntime", {}))
    fusions = served.recipe.steps[-1].resolved["fusions"]
    assert fusions["Attention"] == tiny.NUM_LAYERS
    assert fusions["SkipLayerNormalization"] == 2 * tiny.NUM_LAYERS
    assert fusions["EmbedLayerNormalization"] == 1


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_onnxruntime_dynamic_int8_runs_integer_matmuls_and_stays_close(family):
    model = tiny.build(family)
    served = serve(model, ("runtime.onnxruntime", {"int8": "dynamic"}))
    ops = served.recipe.steps[-1].resolved["ops"]
    assert ops.get("MatMulInteger", 0) + ops.get("QAttention", 0) >= 3 * tiny.NUM_LAYERS
    assert "MatMul" not in ops or ops["MatMul"] < ops["MatMulInteger"]
    batch = tiny.calibration(model)[1]
    reference, got = tiny.output(model, batch), tiny.output(served, batch)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99


@pytest.mark.parametrize(
    ("steps", "engine"),
    [
        ((("runtime.onnxruntime", {"int8": "dynamic"}),), OnnxRuntimeModule),
        ((("runtime.openvino", {"int8": "nncf"}),), OpenVinoModule),
    ],
)
def test_served_model_reloads_in_its_engine_without_torch_weights(steps, engine, tmp_path):
    model = tiny.build("bert")
    served = serve(model, *steps)
    save_model(served, tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.safetensors"))
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.module, engine)
    assert sum(p.numel() for p in loaded.module.parameters()) == 0
    batch = tiny.calibration(model)[1]
    torch.testing.assert_close(tiny.output(loaded, batch), tiny.output(served, batch))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_openvino_float_matches_eager(family):
    model = tiny.build(family)
    served = serve(model, ("runtime.openvino", {}))
    assert isinstance(served.module, OpenVinoModule)
    assert served.recipe.steps[-1].resolved["precision"] == "f32"
    assert difference(model, served, tiny.calibration(model)[1]) < 1e-4


def test_openvino_nncf_int8_inserts_quantizers_and_stays_close():
    model = tiny.build("bert")
    served = serve(model, ("runtime.openvino", {"int8": "nncf"}))
    assert served.recipe.steps[-1].resolved["int8_ops"] >= 3 * tiny.NUM_LAYERS
    batch = tiny.calibration(model)[1]
    reference, got = tiny.output(model, batch), tiny.output(served, batch)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0)
    assert cosine > 0.99


def generated_kernels(served) -> int:
    """Layers of the compiled graph that run as kernels OpenVINO generated (snippets)."""
    layers = served.module.compiled().get_runtime_model().get_ops()
    return sum(layer.get_rt_info()["layerType"].astype(str) == "Subgraph" for layer in layers)


def test_openvino_without_snippets_runs_no_generated_kernels_matches_eager_and_reloads_so(
    tmp_path,
):
    model = tiny.build("bert")
    assert generated_kernels(serve(model, ("runtime.openvino", {}))) > 0  # the default: on
    served = serve(model, ("runtime.openvino", {"snippets": False}))
    assert generated_kernels(served) == 0
    batch = tiny.calibration(model)[1]
    assert difference(model, served, batch) < 1e-4
    save_model(served, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert generated_kernels(loaded) == 0
    torch.testing.assert_close(tiny.output(loaded, batch), tiny.output(served, batch))


def test_openvino_model_saved_before_the_snippets_setting_loads_with_openvinos_default(tmp_path):
    model = tiny.build("bert")
    save_model(serve(model, ("runtime.openvino", {"snippets": False})), tmp_path / "m")
    meta_path = tmp_path / "m" / SLIM_META
    meta = json.loads(meta_path.read_text())
    del meta["runtime"]["snippets"]
    meta_path.write_text(json.dumps(meta))
    loaded = load_model(tmp_path / "m")
    assert generated_kernels(loaded) > 0


def test_pruned_model_with_uneven_heads_exports_and_matches():
    model = tiny.build("bert")
    pruned = serve(
        model,
        ("prune.heads", {"keep": 0.5, "criterion": "magnitude", "allocation": "global"}),
        ("prune.ffn", {"keep": 0.5, "criterion": "magnitude", "multiple": 1}),
    )
    widths = {
        pruned.adapter.attention_linears(i)["query"].out_features for i in range(tiny.NUM_LAYERS)
    }
    assert len(widths) > 1  # heads kept differ per layer: no uniform head count to fuse with
    served = apply_recipe(
        pruned, Recipe(steps=(Step("runtime.onnxruntime", {}),)), tiny.calibration(model)
    )
    assert difference(pruned, served, tiny.calibration(model)[1]) < 1e-4


def test_fused_export_of_a_head_count_that_does_not_divide_the_hidden_size_matches_eager():
    model = tiny.build("bert")  # 4 heads of 8 over a hidden size of 32
    pruned = serve(model, ("prune.heads", {"keep": 0.75, "criterion": "magnitude"}))
    assert {
        pruned.adapter.attention_linears(i)["query"].out_features for i in range(tiny.NUM_LAYERS)
    } == {24}  # 3 heads in every block: 32 % 3 != 0
    served = apply_recipe(
        pruned,
        Recipe(steps=(Step("runtime.onnxruntime", {"optimize": True}),)),
        tiny.calibration(model),
    )
    assert served.recipe.steps[-1].resolved["fusions"]  # the optimizer ran
    assert difference(pruned, served, tiny.calibration(model)[1]) < 1e-4


def test_model_quantized_by_a_torch_pass_is_refused_with_the_reason():
    model = tiny.build("bert")
    with pytest.raises(SlimformerError, match="cannot export layers quantized by a PyTorch"):
        serve(model, ("quantize.dynamic_int8", {}), ("runtime.onnxruntime", {}))


def test_kv_cached_generation_through_onnxruntime_is_a_clear_error():
    model = tiny.build("llama")
    served = serve(model, ("runtime.onnxruntime", {}))
    ids = tiny.calibration(model)[0]["input_ids"][:1]
    with pytest.raises(SlimformerError, match="KV-cached generation"):
        served(input_ids=ids, use_cache=True)


@pytest.mark.slow
def test_compiled_model_matches_eager_and_reloads_compiled(tmp_path):
    model = tiny.build("bert")
    served = serve(model, ("runtime.compiled", {}))
    assert isinstance(served.module, CompiledModule)
    batch = tiny.calibration(model)[1]
    assert difference(model, served, batch) < 1e-4
    save_model(served, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert isinstance(loaded.module, CompiledModule)
    torch.testing.assert_close(tiny.output(loaded, batch), tiny.output(model, batch))


def test_recipe_with_two_runtimes_is_refused():
    with pytest.raises(SlimformerError, match="one runtime pass"):
        recipe_from_dict(
            {
                "format": "slimformer-recipe/1",
                "steps": [{"pass": "runtime.onnxruntime"}, {"pass": "runtime.openvino"}],
            }
        )


def test_study_samples_at_most_one_runtime_per_recipe():
    import optuna

    from slimformer.passes import get_pass
    from slimformer.search.space import sample_recipe
    from slimformer.tasks import TaskSpec

    names = ("runtime.onnxruntime", "runtime.openvino", "prune.ffn", "quantize.dynamic_int8")
    passes = [get_pass(n) for n in names]
    facts = tiny.build("bert").adapter.facts()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    runtimes_seen = set()
    for _ in range(30):
        trial = study.ask()
        recipe = sample_recipe(trial, passes, facts, TaskSpec("embedding"), 0)
        runtimes = [s.pass_name for s in recipe.steps if s.pass_name.startswith("runtime.")]
        assert len(runtimes) <= 1
        # never torch int8 before an export: such a recipe could not run
        assert not runtimes or "quantize.dynamic_int8" not in {s.pass_name for s in recipe.steps}
        runtimes_seen.update(runtimes)
        study.tell(trial, 0.0)
    assert runtimes_seen == {"runtime.onnxruntime", "runtime.openvino"}


def test_recipe_exporting_a_torch_quantized_model_is_refused_before_any_pass_runs():
    with pytest.raises(
        SlimformerError, match="runtime.openvino cannot follow quantize.weight_only"
    ):
        recipe_from_dict(
            {
                "format": "slimformer-recipe/1",
                "steps": [
                    {"pass": "recover.distill"},
                    {"pass": "quantize.weight_only"},
                    {"pass": "runtime.openvino"},
                ],
            }
        )
