"""Saved int4 models are plain codes, so they load and compute the same on any CPU dispatch level.

The int4 kernel's packed layout differs between AVX-512 and AVX2 dispatch; `ATEN_CPU_CAPABILITY=
avx2` makes a process on an AVX-512 machine pack (and compute) as an AVX2-only CPU would.
"""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from dispatch import FORCED_AVX2, findings_at
from safetensors.torch import load_file, save_file

from slimformer.checkpoint import SLIM_META, SLIM_WEIGHTS, load_model, save_model
from slimformer.errors import SlimformerError
from slimformer.layers.weight_only import INT4_LAYOUT, Int4WeightLinear
from slimformer.pipeline import apply_recipe
from slimformer.recipe import Recipe, Step

pytestmark = pytest.mark.usefixtures("single_thread")

# Run in a fresh process at another dispatch level: load the model saved in argv[1]'s
# `saved_here`, record the int4 codes each layer reads back and the outputs for the saved
# batches (safetensors, no pickle), and save the model again.
OTHER_PROCESS = """
import json, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimformer.checkpoint import load_model, save_model
from slimformer.layers.weight_only import Int4WeightLinear

torch.set_num_threads(1)
folder = Path(sys.argv[1])
model = load_model(folder / "saved_here")
found = {}
with torch.inference_mode():
    for key, tensor in load_file(folder / "batches.safetensors").items():
        batch_name, input_name = key.split("/")
        found.setdefault(batch_name, {})[input_name] = tensor
    found = {f"outputs/{k}": model(**batch).logits for k, batch in found.items()}
for name, module in model.module.named_modules():
    if isinstance(module, Int4WeightLinear):
        found[f"codes/{name}"] = module.codes()
save_file({k: v.contiguous() for k, v in found.items()}, folder / "there.safetensors")
save_model(model, folder / "saved_there")
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}))
"""


def int4_model():
    model = tiny.tiny_llama()
    config = {"bits": 4, "group_size": 32, "method": "rtn"}
    recipe = Recipe(steps=(Step("quantize.weight_only", config),))
    return apply_recipe(model, recipe, tiny.calibration(model))


def int4_codes(model) -> dict[str, torch.Tensor]:
    return {
        n: m.codes() for n, m in model.module.named_modules() if isinstance(m, Int4WeightLinear)
    }


def test_a_model_saved_under_one_dispatch_level_computes_the_same_under_the_other(tmp_path):
    """Both directions in one extra process: saved here and loaded there, then saved there and
    loaded here."""
    here = torch.backends.cpu.get_cpu_capability()
    # The other level: forced AVX2 when this process runs AVX-512, else the native one.
    caps = FORCED_AVX2 if here == "AVX512" else {}
    model = int4_model()
    prompt = tiny.calibration(model)[0]  # many rows: the unpacked-weight path
    batches = {"prompt": prompt, "one_row": {k: v[:1, :1] for k, v in prompt.items()}}
    outputs = {k: tiny.output(model, batch) for k, batch in batches.items()}
    save_model(model, tmp_path / "saved_here")
    flat = {f"{b}/{k}": v.clone() for b, batch in batches.items() for k, v in batch.items()}
    save_file(flat, tmp_path / "batches.safetensors")
    found = findings_at(caps, OTHER_PROCESS, str(tmp_path))
    there = load_file(tmp_path / "there.safetensors")
    there_codes = {k.removeprefix("codes/"): v for k, v in there.items() if k.startswith("codes/")}
    if here == "AVX512":  # the forced level took effect, so the layouts really differed
        assert found["capability"] == "AVX2"
    codes = int4_codes(model)
    assert codes and there_codes.keys() == codes.keys()
    assert all(torch.equal(there_codes[n], c) for n, c in codes.items())
    reloaded = load_model(tmp_path / "saved_there")
    assert all(torch.equal(c, codes[n]) for n, c in int4_codes(reloaded).items())
    # Kernels and GEMMs round differently across dispatch levels (and a reloaded model's
    # one-row GEMMs by ~1e-7 even on one level), nothing more.
    for name, batch in batches.items():
        torch.testing.assert_close(there[f"outputs/{name}"], outputs[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(tiny.output(reloaded, batch), outputs[name])


def test_int4_layers_are_saved_as_the_documented_plain_codes(tmp_path):
    model = int4_model()
    save_model(model, tmp_path / "q")
    modules = json.loads((tmp_path / "q" / SLIM_META).read_text())["modules"]
    tensors = load_file(tmp_path / "q" / SLIM_WEIGHTS)
    name, layer = next(
        (n, m) for n, m in model.module.named_modules() if isinstance(m, Int4WeightLinear)
    )
    meta = modules[name]["meta"]
    assert meta["layout"] == INT4_LAYOUT and "low nibble = even" in meta["format"]
    data = tensors[f"{name}.codes"]
    assert data.dtype == torch.uint8
    assert data.shape == (layer.out_features, layer.in_features // 2)
    # Decoded by the format string alone: w = (code - 8)·scale + zero per group of columns.
    codes = torch.stack([data & 15, data >> 4], dim=-1).reshape(layer.out_features, -1)
    group = meta["group_size"]
    scales = tensors[f"{name}.scales"].repeat_interleave(group, dim=1)
    zeros = tensors[f"{name}.zeros"].repeat_interleave(group, dim=1)
    torch.testing.assert_close((codes.float() - 8) * scales + zeros, layer.dequantized_weight())


def test_a_model_saved_in_the_old_cpu_specific_int4_layout_is_refused(tmp_path):
    model = int4_model()
    save_model(model, tmp_path / "q")
    # Rewrite the save as slimformer did before: the kernel-packed tensor, no layout marker.
    meta = json.loads((tmp_path / "q" / SLIM_META).read_text())
    tensors = load_file(tmp_path / "q" / SLIM_WEIGHTS)
    for name, module in model.module.named_modules():
        if isinstance(module, Int4WeightLinear):
            for key in ("codes", "scales", "zeros"):
                del tensors[f"{name}.{key}"]
            tensors[f"{name}.packed"] = module.packed
            tensors[f"{name}.scales_and_zeros"] = module.scales_and_zeros
            old_meta = meta["modules"][name]["meta"]
            meta["modules"][name]["meta"] = {
                k: old_meta[k] for k in ("in_features", "out_features", "group_size")
            }
    save_file(tensors, tmp_path / "q" / SLIM_WEIGHTS, metadata={"format": "slimformer"})
    (tmp_path / "q" / SLIM_META).write_text(json.dumps(meta))
    with pytest.raises(SlimformerError, match="older slimformer") as refused:
        load_model(tmp_path / "q")
    message = str(refused.value)
    assert "\n" not in message and "slimformer apply <recipe.yaml> <model> --out DIR" in message
