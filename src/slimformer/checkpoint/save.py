"""Saving a model atomically, in the first of the three forms (see the package docstring) that
holds it: runtime files, plain Hugging Face, or slimformer form with each codec layer encoded."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from slimformer.checkpoint.folder import (
    FORMAT_VERSION,
    SLIM_META,
    SLIM_WEIGHTS,
    check_out_folder,
    copy_sentence_transformers_files,
)
from slimformer.engines import ServedModule
from slimformer.errors import SlimformerError
from slimformer.files import replace_dir
from slimformer.layers import codec_for
from slimformer.model import HEADS, SlimModel
from slimformer.quiet import quiet_transformers
from slimformer.tokens import installed


def save_model(
    model: SlimModel,
    out: str | os.PathLike[str],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write the model, tokenizer, recipe and extra text files to `out`, atomically."""
    out = Path(out)
    check_out_folder(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as error:
        raise SlimformerError(f"cannot create {out}: {error.strerror or error}") from None
    try:
        served = model.module if isinstance(model.module, ServedModule) else None
        runtime = {"name": served.runtime} | served.save_artifacts(tmp) if served else None
        # The torch module whose weights are saved: none when the runtime holds them.
        module = served.eager if served is not None else model.module
        with quiet_transformers():
            if module is None:
                model.module.config.save_pretrained(tmp)
                weights, modules, resized = "runtime", {}, {}
            else:
                special = {n: m for n, m in module.named_modules() if codec_for(m) is not None}
                resized = _resized_linears(module, model.head)
                weights = "slimformer" if special or resized else "hf"
                if weights == "slimformer":
                    modules = _save_slim_weights(module, special, tmp)
                else:
                    module.save_pretrained(tmp, safe_serialization=True)
                    modules = {}
            if model.tokenizer is not None:
                model.tokenizer.save_pretrained(tmp)
        # Written for every form: it keeps the head and where the model came from (the
        # reference its quality is measured against).
        meta = {
            "format_version": FORMAT_VERSION,
            "weights": weights,
            "head": model.head,
            "source": model.source,
            "modules": modules,
            "shapes": resized,
            "dtype": _float_dtype(module) if module is not None else "float32",
            "runtime": runtime,
            "batching": model.batching,
            # A behaviour, not weights: the loader installs it again (plain transformers
            # loads the same weights without it).
            "tokens": _token_reduction(module),
        }
        (tmp / SLIM_META).write_text(json.dumps(meta, indent=2))
        if model.source:
            copy_sentence_transformers_files(Path(model.source), tmp)
        (tmp / "recipe.yaml").write_text(model.recipe.to_yaml())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _token_reduction(module: nn.Module | None) -> dict[str, Any] | None:
    reduction = installed(module) if module is not None else None
    return reduction.to_dict() if reduction is not None else None


def _float_dtype(module: nn.Module) -> str:
    """The floating dtype of the model's float parameters (float32 unless cast)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return str(parameter.dtype).removeprefix("torch.")
    return "float32"


def _resized_linears(root: nn.Module, head: str) -> dict[str, list[int]]:
    """Linear layers whose shape differs from what the config builds (pruned heads or FFN
    neurons, possibly uneven per layer): name -> [out_features, in_features, has_bias]."""
    import transformers
    from accelerate import init_empty_weights

    with quiet_transformers(), init_empty_weights():
        reference = getattr(transformers, HEADS[head]).from_config(root.config)
    expected = {n: m for n, m in reference.named_modules() if isinstance(m, nn.Linear)}
    resized = {}
    for name, module in root.named_modules():
        if type(module) is not nn.Linear or name not in expected:
            continue
        if module.weight.shape != expected[name].weight.shape:
            resized[name] = [module.out_features, module.in_features, module.bias is not None]
    return resized


def _save_slim_weights(root: nn.Module, special: dict[str, nn.Module], tmp: Path) -> dict[str, Any]:
    """Write slimformer.safetensors; return how each codec layer was encoded."""
    root.config.save_pretrained(tmp)
    tensors: dict[str, torch.Tensor] = {}
    modules_meta: dict[str, Any] = {}
    for name, sub in special.items():
        codec = codec_for(sub)
        assert codec is not None
        own, meta = codec.encode(sub)
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in own.items()})
        modules_meta[name] = {"kind": codec.kind, "meta": meta}
    state = root.state_dict()
    seen_storage: set[int] = set()
    for key, value in state.items():
        if any(key.startswith(n + ".") for n in special) or not isinstance(value, torch.Tensor):
            continue
        if value.untyped_storage().data_ptr() in seen_storage:
            continue  # tied weights are stored once
        seen_storage.add(value.untyped_storage().data_ptr())
        tensors[key] = value.detach().contiguous()
    save_file(tensors, str(tmp / SLIM_WEIGHTS), metadata={"format": "slimformer"})
    return modules_meta
