"""cast.half: 16-bit models compute close to fp32, reload in their dtype, and compose with
weight-only quantization (not with dynamic int8)."""

from __future__ import annotations

import pytest
import tiny
import torch

from slimformer.checkpoint import load_model, save_model
from slimformer.errors import SlimformerError
from slimformer.layers import Int8WeightLinear
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step
from slimformer.search.settings import StudySettings
from slimformer.tasks import TaskSpec

pytestmark = pytest.mark.usefixtures("single_thread")


def cast(model, *before, dtype="bfloat16"):
    steps = (*(Step(n, c) for n, c in before), Step("cast.half", {"dtype": dtype}))
    return apply_recipe(model, Recipe(steps=steps), tiny.calibration(model))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_half_model_stays_close_to_fp32_and_reloads_in_its_dtype(family, dtype, tmp_path):
    model = tiny.build(family)
    half = cast(model, dtype=dtype)
    assert {p.dtype for p in half.module.parameters()} == {getattr(torch, dtype)}
    batch = tiny.calibration(model)[0]
    out, reference = tiny.output(half, batch).float(), tiny.output(model, batch)
    assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), 0) > 0.99
    reloaded = load_model(save_model(half, tmp_path / "half"))
    assert {p.dtype for p in reloaded.module.parameters()} == {getattr(torch, dtype)}
    torch.testing.assert_close(
        tiny.output(reloaded, batch), tiny.output(half, batch), rtol=0, atol=0
    )


def test_half_composes_with_weight_only_int8():
    model = tiny.tiny_llama()
    half = cast(model, ("quantize.weight_only", {"bits": 8, "method": "rtn"}))
    assert any(isinstance(m, Int8WeightLinear) for m in half.module.modules())
    batch = tiny.calibration(model)[0]
    out = tiny.output(half, batch)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_half_after_dynamic_int8_fails_with_a_clear_reason():
    with pytest.raises(SlimformerError, match="cannot follow quantize.dynamic_int8"):
        cast(tiny.tiny_bert(), ("quantize.dynamic_int8", {}))


def test_the_study_searches_half_only_when_named():
    default = StudySettings(model="m", task=TaskSpec("embedding"), max_drop=0.01, trials=1)
    assert "cast.half" not in [p.name for p in default.pass_classes()]
    named = StudySettings(
        model="m", task=TaskSpec("embedding"), max_drop=0.01, trials=1, passes=("cast.half",)
    )
    assert [p.name for p in named.pass_classes()] == ["cast.half"]


def test_an_unknown_dtype_in_the_saved_metadata_is_refused(tmp_path):
    import json

    folder = save_model(cast(tiny.tiny_bert()), tmp_path / "half")
    meta = json.loads((folder / "slimformer.json").read_text())
    meta["dtype"] = "load"  # not a float type: must not reach getattr(torch, ...)
    (folder / "slimformer.json").write_text(json.dumps(meta))
    with pytest.raises(SlimformerError, match="unknown dtype 'load'"):
        load_model(folder)
