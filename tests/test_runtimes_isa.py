"""Runtimes follow the CPU: int8 weights that cannot saturate where ONNX Runtime's int8 kernels
would, and recipes that say which float precision OpenVINO actually ran."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny
from onnx import numpy_helper

from slimformer import cpu
from slimformer.checkpoint import load_model, save_model
from slimformer.engines.openvino import OpenVinoModule
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")


def serve(model, name, config):
    return apply_recipe(model, Recipe(steps=(Step(name, config),)), tiny.calibration(model))


def int8_weight_range(path) -> tuple[int, int]:
    weights = [
        numpy_helper.to_array(tensor)
        for tensor in onnx.load(str(path)).graph.initializer
        if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) == 2
    ]
    assert weights
    return min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)


@pytest.mark.parametrize("vnni", [True, False])
def test_onnxruntime_int8_weights_are_7_bit_exactly_where_the_cpu_lacks_vnni(vnni, monkeypatch):
    monkeypatch.setattr(cpu, "has_vnni", lambda fingerprint=None: vnni)
    served = serve(tiny.build("bert"), "runtime.onnxruntime", {"int8": "dynamic"})
    resolved = served.recipe.steps[-1].resolved
    assert resolved["reduce_range"] is not vnni
    assert ("why" in resolved) is not vnni
    low, high = int8_weight_range(served.module.onnx_path)
    # 255 × 64 × 2 fits the 16-bit pair sums of VPMADDUBSW; 255 × 127 × 2 does not.
    assert (low >= -64 and high <= 64) is not vnni


def test_openvino_records_f32_for_bf16_on_a_cpu_without_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "has_native_bf16", lambda fingerprint=None: False)
    model = tiny.build("bert")
    served = serve(model, "runtime.openvino", {"precision": "bf16"})
    resolved = served.recipe.steps[-1].resolved
    assert resolved["precision"] == "f32"
    assert "bf16" in resolved["why"]
    # What is saved is what ran, and a bf16 model from another machine runs f32 here too.
    save_model(served, tmp_path / "m")
    assert load_model(tmp_path / "m").module.precision == "f32"
    assert (
        OpenVinoModule(model.config, model.head, served.module.ov_model, "bf16").precision == "f32"
    )


@pytest.mark.skipif(not cpu.has_native_bf16(), reason="this CPU (or its forced caps) lacks bf16")
def test_openvino_records_bf16_where_it_ran():
    model = tiny.build("bert")
    served = serve(model, "runtime.openvino", {"precision": "bf16"})
    assert served.recipe.steps[-1].resolved["precision"] == "bf16"
    batch = tiny.calibration(model)[1]
    reference, got = tiny.output(model, batch), tiny.output(served, batch)
    assert not np.array_equal(reference.numpy(), got.numpy())  # bf16 rounding shows
    np.testing.assert_allclose(got.numpy(), reference.numpy(), atol=0.1)
