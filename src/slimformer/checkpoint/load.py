"""Loading a checkpoint folder: plain Hugging Face, slimformer form, or runtime form (see the
package docstring), rebuilt through the layer codecs and the served-module registry alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from slimformer.checkpoint.folder import (
    SLIM_META,
    SLIM_WEIGHTS,
    checked_folder,
    read_config,
    read_meta,
)
from slimformer.engines import load_served
from slimformer.errors import SlimformerError
from slimformer.layers import codec_of_kind
from slimformer.model import HEADS, SlimModel, head_from_architectures
from slimformer.quiet import quiet_transformers
from slimformer.recipe import Recipe
from slimformer.tokens import TokenReduction, install


def load_model(
    path: str | os.PathLike[str],
    head: str | None = None,
    trust_remote_code: bool = False,
) -> SlimModel:
    """Load a Hugging Face checkpoint folder or a folder slimformer saved (a path: aliases
    such as `default` are resolved by `assets.resolve_path`).

    `head` (a task's) may differ from the checkpoint's own only where nothing new is made:
    any model's backbone gives embeddings, but a causal-LM or classification head the
    checkpoint lacks would be randomly initialised, and a task would score noise."""
    import transformers

    path = checked_folder(path)
    config = read_config(path, trust_remote_code)
    meta = read_meta(path)
    natural = meta.get("head") or head_from_architectures(config.architectures)
    head = head or natural
    if head not in HEADS:
        raise SlimformerError(f"unknown model head '{head}'; choose one of {', '.join(HEADS)}")
    if head not in (natural, "embedding"):
        architecture = (config.architectures or [config.model_type])[0]
        raise SlimformerError(
            f"{path} is a{'n' if natural[0] in 'aeiou' else ''} {natural} model "
            f"({architecture}) without a {head} head; a task that needs one would score a "
            "randomly initialised head — choose a --task that fits the model"
        )
    runtime = meta.get("runtime")
    if meta.get("weights") == "runtime":
        return SlimModel(
            module=_served(path, runtime or {}, config, head),
            head=head,
            tokenizer=_load_tokenizer(path),
            source=meta.get("source") or str(path),
            recipe=_saved_recipe(path),
            batching=meta.get("batching", "bucketed"),
        )
    weight_files = _weight_files(path, meta)
    _check_safetensors(weight_files)
    auto = getattr(transformers, HEADS[head])
    with quiet_transformers():
        if _slim_weights(meta):
            from accelerate import init_empty_weights

            # Parameters start on the meta device so the float layers that int8 ones replace
            # are never allocated (peak memory would otherwise count them).
            try:
                with init_empty_weights():
                    module = auto.from_config(config, dtype=torch.float32)
                _load_slim_weights(module, weight_files[0], meta)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
                # The head, module names, shapes or codec settings in slimformer.json do not fit
                # the config or the tensors: the file was changed after slimformer wrote it.
                raise SlimformerError(
                    f"{path}/{SLIM_META} does not fit the saved weights ({type(e).__name__}: "
                    f"{str(e).strip()[:80]}); the saved model is damaged"
                ) from None
        else:
            try:
                module = auto.from_pretrained(
                    path, dtype=torch.float32, trust_remote_code=trust_remote_code
                )
            except (OSError, RuntimeError, ValueError) as error:
                first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
                raise SlimformerError(
                    f"cannot load {path} as a {head} model ({first}); check that the "
                    "architecture in config.json matches the task"
                ) from None
    dtype = meta.get("dtype", "float32")
    if dtype != "float32":
        if dtype not in ("bfloat16", "float16"):
            raise SlimformerError(f"{path}: unknown dtype '{dtype}' in {SLIM_META}")
        # Loaded in float32 above; a 16-bit save casts back exactly.
        module.to(getattr(torch, dtype))
    module.eval()
    if meta.get("tokens"):
        _install_tokens(path, module, meta["tokens"])
    if runtime:  # a runtime that serves the torch weights above (torch.compile)
        module = _served(path, runtime, config, head, module)
    return SlimModel(
        module=module,
        head=head,
        tokenizer=_load_tokenizer(path),
        source=meta.get("source") or str(path),
        recipe=_saved_recipe(path),
        batching=meta.get("batching", "bucketed"),
    )


def load_gguf(path: str | os.PathLike[str], context: int | None = None) -> SlimModel:
    """A GGUF file (llama.cpp's format, any type llama.cpp reads: Q4_1, Q8_0, Q4_K_M, ...)
    served as it is by llama.cpp, as a causal LM. Its config and tokenizer are read from the
    file's own metadata by transformers' GGUF support; `context` (default 2048, at most the
    model's trained length) is the llama.cpp context given to it. Saved, it is a llama.cpp
    runtime-form folder like any `runtime.llamacpp` result."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from slimformer.adapters import adapter_class_for
    from slimformer.engines.llamacpp import DEFAULT_CONTEXT, LlamaCppModule, file_type

    file = Path(path).expanduser().resolve()  # served from where it is: no copy is made
    if not file.is_file():
        raise SlimformerError(f"GGUF file not found: {file}")
    if context is not None and context < 1:
        raise SlimformerError(f"context={context}: give a positive number of tokens")
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
            tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except (OSError, ValueError, KeyError, TypeError) as error:
        first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise SlimformerError(
            f"cannot read {file} as a GGUF decoder ({type(error).__name__}: {first}); give a "
            "GGUF file of a Llama-family decoder with its tokenizer in the file"
        ) from None
    adapter_class_for(config.model_type)  # a clear refusal for families slimformer lacks
    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if architecture is None:
        raise SlimformerError(
            f"{file} holds a {config.model_type} model, not a causal language model; "
            "llama.cpp serves decoders here"
        )
    config.architectures = [architecture]  # the head a saved copy reloads with
    trained = getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT
    module = LlamaCppModule(
        config, "causal-lm", file, file_type(file), context or min(DEFAULT_CONTEXT, trained)
    )
    return SlimModel(module=module, head="causal-lm", tokenizer=tokenizer, source=str(file))


def _served(
    path: Path, runtime: dict[str, Any], config: Any, head: str, module: nn.Module | None = None
) -> nn.Module:
    """The module a runtime serves, from the files and settings slimformer.json names."""
    try:
        return load_served(path, runtime, config, head, module)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise SlimformerError(
            f"{path}/{SLIM_META}: its runtime entry does not fit the saved files "
            f"({type(error).__name__}: {str(error)[:80]}); the saved model is damaged"
        ) from None


def _install_tokens(path: Path, module: nn.Module, settings: Any) -> None:
    """Run the loaded model with the token reduction it was saved with."""
    try:
        install(module, TokenReduction.from_dict(settings))
    except SlimformerError as error:
        raise SlimformerError(f"{path}/{SLIM_META}: {error}; the saved model is damaged") from None


def _saved_recipe(path: Path) -> Recipe:
    """The recipe saved beside the model (read as data: the model is rebuilt from its files,
    not by replaying it)."""
    return Recipe.load(path) if (path / "recipe.yaml").is_file() else Recipe()


def _check_safetensors(files: list[Path]) -> None:
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
                if keys:
                    handle.get_slice(keys[-1])
            if file.stat().st_size < 8:
                raise SafetensorError("truncated")
        except (SafetensorError, OSError, ValueError) as error:
            raise SlimformerError(
                f"cannot read weights {file}: {str(error).splitlines()[0][:120]} — the file is "
                "corrupt or truncated; re-save or re-download the model"
            ) from None


def _slim_weights(meta: dict[str, Any]) -> bool:
    """Whether the folder holds slimformer-form weights (else plain Hugging Face ones)."""
    return bool(meta) and meta.get("weights", "slimformer") == "slimformer"


def _weight_files(path: Path, meta: dict[str, Any]) -> list[Path]:
    if _slim_weights(meta):
        return [path / SLIM_WEIGHTS]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise SlimformerError(
            f"{path} has only pickle weights (.bin/.pt); slimformer loads safetensors only — "
            "convert with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    raise SlimformerError(f"{path} has no model.safetensors; save the model with save_pretrained")


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not any(path.glob("tokenizer*")) and not (path / "vocab.txt").exists():
        return None
    with quiet_transformers():
        return AutoTokenizer.from_pretrained(path)


def _load_slim_weights(module: nn.Module, file: Path, meta: dict[str, Any]) -> None:
    from accelerate import init_empty_weights

    tensors = load_file(str(file))
    special = meta.get("modules", {})
    for name, (out_features, in_features, bias) in meta.get("shapes", {}).items():
        with init_empty_weights():
            resized = nn.Linear(in_features, out_features, bias=bias)
        module.set_submodule(name, resized)

    def owned(key: str) -> bool:
        return any(key.startswith(name + ".") for name in special)

    # Plain tensors first, into the float modules the config built; then the special
    # modules replace theirs (quantized modules refuse a partial state dict).
    plain = {k: v for k, v in tensors.items() if not owned(k)}
    missing, unexpected = module.load_state_dict(plain, strict=False, assign=True)
    # Tied weights (e.g. an LM head tied to the embeddings) are saved once.
    missing = [k for k in missing if not owned(k) and not _is_tied(module, k)]
    if missing or unexpected:
        raise SlimformerError(
            f"{file} does not match its config ({len(missing)} missing, {len(unexpected)} "
            "unexpected tensors); the saved model is damaged"
        )
    for name, info in special.items():
        codec = codec_of_kind(info["kind"])
        if codec is None:
            raise SlimformerError(
                f"{file.parent}: module {name} uses '{info['kind']}', unknown to this slimformer"
            )
        prefix = name + "."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            decoded = codec.decode(own, info.get("meta", {}))
        except SlimformerError as error:  # a codec cannot see the path; name the folder here
            raise SlimformerError(f"{file.parent}: {error}") from None
        module.set_submodule(name, decoded)
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    still_meta = [n for n, p in module.named_parameters() if p.is_meta]
    if still_meta:
        raise SlimformerError(
            f"{file} lacks {len(still_meta)} tensors (e.g. {still_meta[0]}); the saved model "
            "is damaged"
        )


def _is_tied(module: nn.Module, key: str) -> bool:
    tied = getattr(module, "_tied_weights_keys", None) or {}
    return key in tied
