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
    if not folder.is_dir():
        raise SlimformerError(f"{folder} is a file; give the checkpoint folder that contains it")
    if not (folder / "config.json").is_file():
        raise SlimformerError(
            f"{folder} has no config.json — is it a Hugging Face checkpoint folder "
            "(saved with save_pretrained)?"
        )
    return folder


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
    except (OSError, json.JSONDecodeError):
        raise SlimformerError(f"{path}/config.json is not valid JSON; re-save the model") from None
    adapter_class_for(config.model_type)  # raises a clear error for families we lack
    return config


def _raw_model_type(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type", "?"))
    except (OSError, ValueError):
        return "?"


def read_meta(path: Path) -> dict[str, Any]:
    """`slimformer.json` of a saved folder ({} for a plain Hugging Face checkpoint)."""
    file = path / SLIM_META
    if not file.is_file():
        return {}
    try:
        meta = json.loads(file.read_text())
    except ValueError:
        raise SlimformerError(f"{file} is not valid JSON; the saved model is damaged") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise SlimformerError(
            f"{file} has format {meta.get('format_version')}; this slimformer reads "
            f"{FORMAT_VERSION} — upgrade slimformer"
        )
    return meta


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
