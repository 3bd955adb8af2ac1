"""A checkpoint folder: its file names, `slimformer.json` and the config."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimformer.adapters import adapter_class_for
from slimformer.errors import SlimformerError
from slimformer.files import read_json
from slimformer.model import head_from_architectures

SLIM_WEIGHTS = "slimformer.safetensors"
SLIM_META = "slimformer.json"
FORMAT_VERSION = 1
# Files sentence-transformers needs beside the weights; copied so a saved embedding model
# still loads there.
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling",
)


def checked_folder(path: str | os.PathLike[str], aliases: Sequence[str] = ()) -> Path:
    """`path` as a checkpoint folder (it exists, is a folder, holds config.json); a missing one
    is reported with the model `aliases` the user could have given instead."""
    folder = Path(path).expanduser()
    if not folder.exists():
        names = f" or one of: {', '.join(aliases)}" if aliases else ""
        raise SlimformerError(
            f"model not found: {path} — give a local Hugging Face checkpoint folder{names}"
        )
    if not folder.is_dir() and folder.suffix.lower() == ".gguf":
        raise SlimformerError(
            f"{folder} is a GGUF file: slimformer.load() serves it through llama.cpp as it is; "
            "here give a checkpoint folder (the Hugging Face one it was made from, or one "
            "saved by slimformer)"
        )
    if not folder.is_dir():
        raise SlimformerError(f"{folder} is a file; give the checkpoint folder that contains it")
    if not (folder / "config.json").is_file():
        raise SlimformerError(
            f"{folder} has no config.json — is it a Hugging Face checkpoint folder "
            "(saved with save_pretrained)?"
        )
    return folder


def check_out_folder(out: Path) -> None:
    """Refuse an `out` a model cannot be saved to without losing something: a file, a folder
    that holds other things than a saved model (saving replaces the whole folder), or a
    place whose nearest existing parent is not a writable folder."""
    if out.exists():
        if not out.is_dir():
            raise SlimformerError(f"{out} is a file; give a folder to save the model in")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise SlimformerError(
                f"{out} holds other files and saving would replace them; give a new folder or "
                "one holding a saved model"
            )
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SlimformerError(f"cannot create {out}: {parent} is not a writable folder")


def read_config(path: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as error:
        text = str(error)
        if "trust_remote_code" in text:
            raise SlimformerError(
                f"{path} needs its own code to load; pass --trust-remote-code if you trust it"
            ) from None
        model_type = _raw_model_type(path)
        raise SlimformerError(
            f"unsupported architecture '{model_type}' in {path}: transformers does not know it"
        ) from None
    except (OSError, json.JSONDecodeError, RecursionError):
        raise SlimformerError(f"{path}/config.json is not valid JSON; re-save the model") from None
    adapter_class_for(config.model_type)  # raises a clear error for families we lack
    return config


def _raw_model_type(path: Path) -> str:
    try:
        return str(read_json(path / "config.json").get("model_type", "?"))[:40]
    except (ValueError, AttributeError):
        return "?"


# The type of each slimformer.json entry the loader reads (absent ones take their defaults).
_META_TYPES: dict[str, tuple[type, ...]] = {
    "weights": (str,),
    "head": (str,),
    "source": (str,),
    "modules": (dict,),
    "shapes": (dict,),
    "dtype": (str,),
    "runtime": (dict, type(None)),
    "batching": (str,),
}


def read_meta(path: Path) -> dict[str, Any]:
    """`slimformer.json` of a saved folder ({} for a plain Hugging Face checkpoint), its
    entries checked for the types the loader reads them as."""
    file = path / SLIM_META
    if not file.is_file():
        return {}
    try:
        meta = read_json(file)
    except ValueError as error:
        raise SlimformerError(f"{file} {error}; the saved model is damaged") from None
    if not isinstance(meta, dict):
        raise SlimformerError(f"{file} is not a JSON object; the saved model is damaged")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SlimformerError(
            f"{file} has format {str(meta.get('format_version'))[:20]}; this slimformer reads "
            f"{FORMAT_VERSION} — upgrade slimformer"
        )
    wrong = [k for k, types in _META_TYPES.items() if k in meta and not isinstance(meta[k], types)]
    if not wrong and not _well_formed_parts(meta):
        wrong = ["modules, shapes or runtime"]
    if wrong:
        raise SlimformerError(
            f"{file} has a malformed {', '.join(wrong)} entry; the saved model is damaged"
        )
    return meta


def _well_formed_parts(meta: dict[str, Any]) -> bool:
    """The nested entries: codec modules {name: {kind, meta}}, resized Linear shapes
    {name: [out, in, bias]}, and the runtime {name, files}."""
    modules = meta.get("modules", {})
    shapes = meta.get("shapes", {})
    runtime = meta.get("runtime") or {}
    return (
        all(
            isinstance(info, dict)
            and isinstance(info.get("kind"), str)
            and isinstance(info.get("meta", {}), dict)
            for info in modules.values()
        )
        and all(
            isinstance(shape, list)
            and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape[:2])
            and isinstance(shape[2], bool)
            for shape in shapes.values()
        )
        and isinstance(runtime.get("name", ""), str)
        and isinstance(runtime.get("files", []), list)
        and all(isinstance(f, str) for f in runtime.get("files", []))
    )


def natural_head(path: Path) -> str:
    """The head a checkpoint was saved with, read without loading weights."""
    meta = read_meta(path)
    if meta.get("head"):
        return str(meta["head"])
    return head_from_architectures(read_config(path).architectures)


def source_of(path: Path) -> Path:
    """The original checkpoint a saved model was derived from (itself for an original)."""
    source = read_meta(path).get("source")
    return Path(source) if source and Path(source).is_dir() else path


def weights_size_bytes(path: Path) -> int:
    """Bytes of the weights: safetensors, or the runtime's files for a runtime-form model."""
    runtime_files = set((read_meta(path).get("runtime") or {}).get("files", ()))
    return sum(
        f.stat().st_size
        for f in path.iterdir()
        if f.suffix == ".safetensors" or f.name in runtime_files
    )


def copy_sentence_transformers_files(source: Path, tmp: Path) -> None:
    for name in SENTENCE_TRANSFORMERS_FILES:
        item = source / name
        if item.is_dir():
            shutil.copytree(item, tmp / name)
        elif item.is_file():
            shutil.copy2(item, tmp / name)
