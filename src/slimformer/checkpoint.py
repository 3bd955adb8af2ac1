"""Loading any supported checkpoint and saving slimformer's own, atomically.

Two on-disk forms:
- plain Hugging Face (`model.safetensors` + `config.json`) when every module is a standard one
  (e.g. after dropping layers): `transformers.AutoModel.from_pretrained` loads it too;
- slimformer form (`slimformer.safetensors` + `slimformer.json`) when passes swapped in modules
  transformers cannot rebuild (int8 layers). The file name differs on purpose, so plain
  transformers fails loudly instead of loading random weights;
- runtime form (`model.onnx`, or OpenVINO's `model.xml` + `model.bin`, + `slimformer.json`) when
  a runtime pass moved the model into another engine: loading returns a module served by that
  engine with the same call signature, and no PyTorch weights are kept.
Torch weights are safetensors only; nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from slimformer import assets
from slimformer.adapters import adapter_class_for
from slimformer.errors import SlimformerError
from slimformer.model import HEADS, SlimModel, head_from_architectures
from slimformer.recipe import Recipe
from slimformer.runtimes.base import ServedModule, load_served

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


# --- codecs for modules that transformers cannot rebuild from a config ---------------------
@dataclass(frozen=True)
class ModuleCodec:
    """How one non-standard module type goes to and from safetensors tensors."""

    kind: str
    module_type: type[nn.Module]
    encode: Callable[[nn.Module], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    decode: Callable[[dict[str, torch.Tensor], dict[str, Any]], nn.Module]
    num_parameters: Callable[[nn.Module], int]


_CODECS: dict[str, ModuleCodec] = {}


def register_codec(codec: ModuleCodec) -> ModuleCodec:
    _CODECS[codec.kind] = codec
    return codec


def codec_for(module: nn.Module) -> ModuleCodec | None:
    for codec in _CODECS.values():
        if type(module) is codec.module_type:
            return codec
    return None


def count_parameters(module: nn.Module) -> int:
    """Parameters including those packed inside quantized modules."""
    total = 0
    seen: set[int] = set()  # tied weights (shared by two modules) count once
    for sub in module.modules():
        codec = codec_for(sub)
        if codec is not None:
            total += codec.num_parameters(sub)
            continue
        for parameter in sub.parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
    return total


# --- loading --------------------------------------------------------------------------------
def resolve_path(name_or_path: str | os.PathLike[str]) -> Path:
    alias = assets.resolve_model_name(str(name_or_path))
    if alias is not None:
        return alias
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise SlimformerError(
            f"model not found: {name_or_path} — give a local Hugging Face checkpoint folder "
            f"or one of: {', '.join(sorted(set(assets.MODEL_ALIASES)))}"
        )
    if not path.is_dir():
        raise SlimformerError(f"{path} is a file; give the checkpoint folder that contains it")
    if not (path / "config.json").is_file():
        raise SlimformerError(
            f"{path} has no config.json — is it a Hugging Face checkpoint folder "
            "(saved with save_pretrained)?"
        )
    return path


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


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_model(
    name_or_path: str | os.PathLike[str],
    head: str | None = None,
    trust_remote_code: bool = False,
) -> SlimModel:
    """Load a Hugging Face checkpoint folder, a model alias, or a folder slimformer saved."""
    import transformers

    path = resolve_path(name_or_path)
    config = read_config(path, trust_remote_code)
    meta = _read_meta(path)
    head = head or meta.get("head") or head_from_architectures(config.architectures)
    if head not in HEADS:
        raise SlimformerError(f"unknown model head '{head}'; choose one of {', '.join(HEADS)}")
    runtime = meta.get("runtime")
    if meta.get("weights") == "runtime":
        return SlimModel(
            module=load_served(path, runtime or {}, config, head),
            head=head,
            tokenizer=_load_tokenizer(path),
            source=meta.get("source") or str(path),
            recipe=Recipe.load(path) if (path / "recipe.yaml").is_file() else Recipe(),
            batching=meta.get("batching", "bucketed"),
        )
    weight_files = _weight_files(path, meta)
    _check_safetensors(weight_files)
    auto = getattr(transformers, HEADS[head])
    with _quiet_transformers():
        if _slim_weights(meta):
            from accelerate import init_empty_weights

            # Parameters start on the meta device so the float layers that int8 ones replace
            # are never allocated (peak memory would otherwise count them).
            with init_empty_weights():
                module = auto.from_config(config, dtype=torch.float32)
            _load_slim_weights(module, weight_files[0], meta)
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
    if runtime:  # a runtime that serves the torch weights above (torch.compile)
        module = load_served(path, runtime, config, head, module)
    recipe = Recipe.load(path) if (path / "recipe.yaml").is_file() else Recipe()
    return SlimModel(
        module=module,
        head=head,
        tokenizer=_load_tokenizer(path),
        source=meta.get("source") or str(path),
        recipe=recipe,
        batching=meta.get("batching", "bucketed"),
    )


def natural_head(path: Path) -> str:
    """The head a checkpoint was saved with, read without loading weights."""
    meta = _read_meta(path)
    if meta.get("head"):
        return str(meta["head"])
    return head_from_architectures(read_config(path).architectures)


def source_of(path: Path) -> Path:
    """The original checkpoint a saved model was derived from (itself for an original)."""
    source = _read_meta(path).get("source")
    return Path(source) if source and Path(source).is_dir() else path


def _read_meta(path: Path) -> dict[str, Any]:
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


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    if not any(path.glob("tokenizer*")) and not (path / "vocab.txt").exists():
        return None
    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(path)


def _load_slim_weights(module: nn.Module, file: Path, meta: dict[str, Any]) -> None:
    from slimformer.passes import load_builtin_passes

    load_builtin_passes()  # the passes register the codecs of the modules they create
    tensors = load_file(str(file))
    special = meta.get("modules", {})
    from accelerate import init_empty_weights

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
        codec = _CODECS.get(info["kind"])
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


# --- saving ---------------------------------------------------------------------------------
def save_model(
    model: SlimModel,
    out: str | os.PathLike[str],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write the model, tokenizer, recipe and extra text files to `out`, atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        served = model.module if isinstance(model.module, ServedModule) else None
        runtime = {"name": served.runtime} | served.save_artifacts(tmp) if served else None
        # The torch module whose weights are saved: none when the runtime holds them.
        module = served.eager if served is not None else model.module
        with _quiet_transformers():
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
        }
        (tmp / SLIM_META).write_text(json.dumps(meta, indent=2))
        if model.source:
            _copy_sentence_transformers_files(Path(model.source), tmp)
        (tmp / "recipe.yaml").write_text(model.recipe.to_yaml())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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

    with _quiet_transformers(), init_empty_weights():
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
    """Write slimformer.safetensors; return how each special module was encoded."""
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


def _copy_sentence_transformers_files(source: Path, tmp: Path) -> None:
    for name in SENTENCE_TRANSFORMERS_FILES:
        item = source / name
        if item.is_dir():
            shutil.copytree(item, tmp / name)
        elif item.is_file():
            shutil.copy2(item, tmp / name)


def replace_dir(tmp: Path, out: Path) -> None:
    """Swap `tmp` into `out` so readers see the old folder or the new one, never half."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def weights_size_bytes(path: Path) -> int:
    """Bytes of the weights: safetensors, or the runtime's files for a runtime-form model."""
    runtime_files = set((_read_meta(path).get("runtime") or {}).get("files", ()))
    return sum(
        f.stat().st_size
        for f in path.iterdir()
        if f.suffix == ".safetensors" or f.name in runtime_files
    )
