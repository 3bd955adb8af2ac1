"""Tiny random-weight models of each supported family, built identically on every call.

Every builder seeds torch before it creates the module, so two calls give bit-identical
weights (a "fresh copy of the original"). Calibration batches are fixed as well.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from slimformer import SlimModel, assets
from slimformer.tasks.base import collate

FAMILIES = ("bert", "llama", "vit")
HEADS = {"bert": "embedding", "llama": "causal-lm", "vit": "image-classification"}
# The transformers auto class that loads each family's plain Hugging Face save.
AUTO_CLASSES = {
    "bert": "AutoModel",
    "llama": "AutoModelForCausalLM",
    "vit": "AutoModelForImageClassification",
}
NUM_LAYERS = 4

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A short sentence.",
    "Transformers can be made faster by removing layers and quantizing their weights.",
    "Hello world",
    "Calibration data should look like the inputs the model will see in production.",
    "It rained all day, so we stayed inside and read books by the window.",
)


@functools.lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The all-MiniLM-L6-v2 tokenizer (a BERT WordPiece tokenizer with a [PAD] token)."""
    return AutoTokenizer.from_pretrained(assets.minilm_path())


def _wrap(module: nn.Module, head: str, tok: Any) -> SlimModel:
    module.eval()
    return SlimModel(module=module, head=head, tokenizer=tok, source="")


def tiny_bert(seed: int = 0) -> SlimModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
    )
    return _wrap(BertModel(config), "embedding", tokenizer())


def tiny_llama(seed: int = 0, tie_word_embeddings: bool = True) -> SlimModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    return _wrap(LlamaForCausalLM(config), "causal-lm", tokenizer())


def tiny_vit(seed: int = 0) -> SlimModel:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=10,
    )
    return _wrap(ViTForImageClassification(config), "image-classification", None)


def tiny_qwen2(seed: int = 0) -> SlimModel:
    """A Llama-layout decoder whose config carries per-layer `layer_types`."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    return _wrap(Qwen2ForCausalLM(config), "causal-lm", tokenizer())


def build(family: str, **kwargs: Any) -> SlimModel:
    return {"bert": tiny_bert, "llama": tiny_llama, "vit": tiny_vit}[family](**kwargs)


def corpus_file(path: Path, sentences: int = 240) -> Path:
    """A small corpus of distinct made-up sentences for `--task embedding --data`: a tiny
    model's study scores it in a fraction of the built-in task's time (2,000 sentences on
    each of two domains), which matters where a test is about the run, not the score."""
    subjects = ("the cat", "a dog", "my neighbour", "the old train", "our team", "a student")
    verbs = ("likes", "avoids", "paints", "remembers", "carries", "finds")
    objects = ("red apples", "the river", "a small box", "loud music", "the last page")
    places = ("at noon", "in the park", "after school", "near the sea")
    made_up = [
        f"{s.capitalize()} {v} {o} {p}."
        for s in subjects
        for v in verbs
        for o in objects
        for p in places
    ]
    path.write_text("\n".join(made_up[:sentences]) + "\n")
    return path


def calibration(model: SlimModel, batches: int = 2) -> list[dict[str, torch.Tensor]]:
    """Fixed calibration batches: padded token ids for text models, pixels for ViT."""
    if model.tokenizer is None:
        generator = torch.Generator().manual_seed(1234)
        return [
            {"pixel_values": torch.randn(8, 3, 16, 16, generator=generator)} for _ in range(batches)
        ]
    examples = [model.tokenizer(text)["input_ids"] for text in SENTENCES]
    size = -(-len(examples) // batches)
    return [collate(model, examples[i : i + size]) for i in range(0, len(examples), size)]


def output(model: SlimModel, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """The model's main output tensor: logits for heads that have them, else hidden states."""
    with torch.inference_mode():
        result = model(**batch, **kwargs)
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state


def plant_identity_block(model: SlimModel, index: int) -> None:
    """Make block `index` a (near-)identity: zero its attention and FFN output projections,
    so it adds nothing to the residual stream."""
    adapter = model.adapter
    with torch.no_grad():
        for linear in (adapter.attention_linears(index)["out"], adapter.ffn_linears(index)["out"]):
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a forward pass dispatches (to check which kernel really ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def varied(model: SlimModel) -> SlimModel:
    """The model with its weights scaled up: at initialization (std 0.02) greedy decoding
    repeats one token, which would let a broken KV cache or a wrong rotary layout pass; scaled,
    the tokens vary every step."""
    with torch.no_grad():
        for name, parameter in model.module.named_parameters():
            if "norm" not in name:
                parameter.mul_(10)
    return model
