"""Loading any supported checkpoint folder and saving slimformer's own, atomically.

Three on-disk forms:
- plain Hugging Face (`model.safetensors` + `config.json`) when every module is a standard one
  (e.g. after dropping layers): `transformers.AutoModel.from_pretrained` loads it too;
- slimformer form (`slimformer.safetensors` + `slimformer.json`) when passes swapped in layers
  transformers cannot rebuild (int8 layers, unevenly pruned ones). The file name differs on
  purpose, so plain transformers fails loudly instead of loading random weights;
- runtime form (`model.onnx`, or OpenVINO's `model.xml` + `model.bin`, + `slimformer.json`) when
  a runtime pass moved the model into another engine: loading returns a module served by that
  engine with the same call signature, and no PyTorch weights are kept.
Torch weights are safetensors only; nothing is pickled.

A saved model is rebuilt from its files through the layer codecs (`slimformer.layers`) and the
served-module registry (`slimformer.engines`) alone; no pass is imported. Paths only: model
aliases (`default`, `smollm2`) are resolved above this package, by `assets.resolve_path`.
"""

from slimformer.checkpoint.folder import (
    FORMAT_VERSION,
    SLIM_META,
    SLIM_WEIGHTS,
    check_out_folder,
    checked_folder,
    natural_head,
    read_config,
    read_meta,
    source_of,
    weights_size_bytes,
)
from slimformer.checkpoint.load import load_gguf, load_model
from slimformer.checkpoint.save import save_model

__all__ = [
    "FORMAT_VERSION",
    "SLIM_META",
    "SLIM_WEIGHTS",
    "check_out_folder",
    "checked_folder",
    "load_gguf",
    "load_model",
    "natural_head",
    "read_config",
    "read_meta",
    "save_model",
    "source_of",
    "weights_size_bytes",
]
