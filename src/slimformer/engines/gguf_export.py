"""Writing a decoder as a GGUF file (llama.cpp's format), with the `gguf` package's writer.

The mapping from the model to llama.cpp's tensor names and metadata is written here, from the
adapter's roles (never a family's attribute paths), for the Llama layout: Llama and SmolLM2,
Mistral, Qwen2. Like llama.cpp's own converter (convert_hf_to_gguf.py), read, not copied:

- architecture: `llama` for Llama and Mistral, `qwen2` for Qwen2 (q/k/v biases), and `deci`
  for a model pruned to uneven widths: llama.cpp's llama and qwen2 graphs take one head count
  and one FFN width for every layer, while its deci graph (Llama-3_1-Nemotron, a Llama whose
  layers differ) reads per-layer arrays of query heads, key-value heads and FFN widths;
- rotary embedding: Hugging Face rotates the two halves of each head, llama.cpp's `llama` and
  `deci` graphs rotate adjacent pairs (rope type NORM), so the query and key rows of each head
  are interleaved on the way (`permute_rotary`); `qwen2` rotates halves (NEOX) like Hugging
  Face, so its rows stay as they are;
- tied embeddings: no `output.weight`; llama.cpp then reuses `token_embd.weight`;
- the tokenizer: a byte-level BPE (SmolLM2, Qwen2, Llama 3) as llama.cpp's `gpt2` model with
  its pre-tokenizer named the way llama.cpp identifies it (the ids of a fixed text, hashed), or
  a WordPiece vocabulary as its `bert` model; its merges and special ids through the `gguf`
  package's `SpecialVocab`.

Everything is written in f32: llama.cpp's own quantizer makes the smaller types from it.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from slimformer.errors import SlimformerError

if TYPE_CHECKING:
    from slimformer.model import SlimModel

# model_type -> the llama.cpp architecture it is written as while every layer has the same
# widths (uneven widths: `deci`).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
UNEVEN_ARCHITECTURE = "deci"
# Architectures whose rope rotates adjacent pairs (NORM): Hugging Face's q/k rows interleaved.
PAIRWISE_ROPE = frozenset({"llama", "deci"})

# How llama.cpp names a byte-level BPE pre-tokenizer: the sha256 of the ids this text encodes
# to (the rule of llama.cpp's convert_hf_to_gguf_update.py; hashes for the families served).
_PRE_TOKENIZER_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# Adapter roles -> llama.cpp tensor names (the `gguf` package's templates).
_ATTENTION = {"query": "ATTN_Q", "key": "ATTN_K", "value": "ATTN_V", "out": "ATTN_OUT"}
_FFN = {"in0": "FFN_GATE", "in1": "FFN_UP", "out": "FFN_DOWN"}
_NORMS = {"attention": "ATTN_NORM", "ffn": "FFN_NORM"}


@dataclass
class GgufLayout:
    """What was written: the architecture, and the llama.cpp name of each block Linear (by
    its name in the torch model), for importance matrices and per-tensor types."""

    architecture: str
    tensor_names: dict[str, str] = field(default_factory=dict)
    widths: dict[str, list[int]] = field(default_factory=dict)


def gguf_refusal(model: SlimModel) -> str | None:
    """Why `model` cannot be written as GGUF (None: it can)."""
    config = model.config
    model_type = getattr(config, "model_type", "?")
    if model.head != "causal-lm" or model_type not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        return (
            f"no GGUF mapping for {model_type} ({model.head}) models; the mapping covers the "
            f"causal LMs {known}"
        )
    if any(type(m).__name__ not in _PLAIN for m in _weight_modules(model)):
        return (
            "the model holds layers quantized by a PyTorch pass, which GGUF cannot carry; "
            "quantize with runtime.llamacpp's quant setting instead"
        )
    kind = _rope(config).get("rope_type", _rope(config).get("type", "default"))
    if kind not in ("default", None):
        return f"rope scaling '{kind}' is not in slimformer's GGUF mapping"
    window = getattr(config, "sliding_window", None)
    if window and (model_type != "qwen2" or getattr(config, "use_sliding_window", False)):
        return (
            f"sliding-window attention ({window} tokens), which llama.cpp's "
            f"{ARCHITECTURES[model_type]} graph does not apply"
        )
    adapter = model.adapter
    head_dim = adapter.head_dim()
    for index in range(adapter.num_layers):
        attention, ffn = adapter.attention_linears(index), adapter.ffn_linears(index)
        roles = [*attention.items(), *ffn.items()]
        factorized = [role for role, m in roles if not isinstance(m, nn.Linear)]
        if factorized:
            return (
                f"layer {index}'s {factorized[0]} projection is factorized (factorize.lowrank); "
                "llama.cpp's graphs hold one matrix per projection: serve it with "
                "runtime.onnxruntime or runtime.openvino"
            )
        if attention["query"].out_features == 0 or ffn["out"].in_features == 0:
            return f"layer {index} has no attention heads or no FFN neurons left"
        if attention["query"].out_features % head_dim or attention["key"].out_features % head_dim:
            return f"layer {index}'s projections are not whole heads of {head_dim}"
        if attention["value"].out_features != attention["key"].out_features:
            return f"layer {index} has different numbers of key and value heads"
        if any(attention[r].bias is not None for r in ("query", "key", "value")) and (
            model_type != "qwen2"
        ):
            return f"layer {index} has q/k/v biases, which {model_type} models do not"
    return None


_PLAIN = {"Linear", "Embedding", "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


def _weight_modules(model: SlimModel) -> list[nn.Module]:
    """The modules whose weights GGUF would carry: every leaf that holds parameters or
    buffers of its own (a quantized layer replaces a Linear with something else)."""
    leaves = []
    for module in model.module.modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own and not list(module.children()):
            leaves.append(module)
    return [m for m in leaves if not type(m).__name__.endswith("RotaryEmbedding")]


def _rope(config: Any) -> dict[str, Any]:
    """The rotary settings: transformers 5 keeps them in `rope_parameters` (theta included),
    older configs in `rope_theta` and `rope_scaling`."""
    found = dict(getattr(config, "rope_scaling", None) or {})
    if getattr(config, "rope_theta", None) is not None:
        found["rope_theta"] = config.rope_theta
    return found | dict(getattr(config, "rope_parameters", None) or {})


def check_gguf_exportable(model: SlimModel) -> None:
    why = gguf_refusal(model)
    if why:
        raise SlimformerError(f"GGUF export: {why}")


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Query/key rows (or biases) from Hugging Face's rotate-halves order to llama.cpp's
    adjacent pairs: within each head, row i of the first half and row i of the second half
    become rows 2i and 2i+1."""
    shape = weight.shape
    head_dim = shape[0] // heads
    return weight.reshape(heads, 2, head_dim // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def write_gguf(model: SlimModel, path: Path, name: str = "") -> GgufLayout:
    """Write `model` (an eager decoder, possibly pruned) to `path` in f32."""
    import gguf

    check_gguf_exportable(model)
    config, adapter = model.config, model.adapter
    head_dim = adapter.head_dim()
    layers = adapter.num_layers
    heads = [adapter.attention_linears(i)["query"].out_features // head_dim for i in range(layers)]
    kv_heads = [adapter.attention_linears(i)["key"].out_features // head_dim for i in range(layers)]
    widths = [adapter.ffn_linears(i)["out"].in_features for i in range(layers)]
    uneven = len(set(heads)) > 1 or len(set(kv_heads)) > 1 or len(set(widths)) > 1
    arch = UNEVEN_ARCHITECTURE if uneven else ARCHITECTURES[config.model_type]
    layout = GgufLayout(arch, widths={"heads": heads, "kv_heads": kv_heads, "ffn": widths})

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or getattr(config, "_name_or_path", "") or config.model_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(layers)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(widths if uneven else widths[0])
    writer.add_head_count(heads if uneven else heads[0])
    writer.add_head_count_kv(kv_heads if uneven else kv_heads[0])
    # Written always: after head pruning, hidden size / heads is no longer the head size.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    embedding = adapter.embeddings().weight
    writer.add_vocab_size(embedding.shape[0])
    _write_tokenizer(writer, model, embedding.shape[0])

    def add(tensor_name: str, tensor: torch.Tensor) -> None:
        writer.add_tensor(tensor_name, tensor.detach().float().contiguous().numpy())

    names = gguf.TENSOR_NAMES
    kinds = gguf.MODEL_TENSOR
    add(names[kinds.TOKEN_EMBD] + ".weight", embedding)
    add(names[kinds.OUTPUT_NORM] + ".weight", adapter.final_norm().weight)
    head = adapter.output_head()
    if head.weight.data_ptr() != embedding.data_ptr():
        add(names[kinds.OUTPUT] + ".weight", head.weight)
        layout.tensor_names[_module_name(model, head)] = names[kinds.OUTPUT] + ".weight"
    pairwise = arch in PAIRWISE_ROPE
    for i in range(layers):
        for role, norm in adapter.block_norms(i).items():
            add(names[getattr(kinds, _NORMS[role])].format(bid=i) + ".weight", norm.weight)
        # The adapter names both output projections "out": attention's and the FFN's.
        linears = [(_ATTENTION[r], r, m) for r, m in adapter.attention_linears(i).items()]
        linears += [(_FFN[r], r, m) for r, m in adapter.ffn_linears(i).items()]
        for kind, role, linear in linears:
            base = names[getattr(kinds, kind)].format(bid=i)
            weight, bias = linear.weight, linear.bias
            if pairwise and kind in ("ATTN_Q", "ATTN_K"):
                count = heads[i] if role == "query" else kv_heads[i]
                weight = permute_rotary(weight, count)
                bias = permute_rotary(bias, count) if bias is not None else None
            add(base + ".weight", weight)
            if bias is not None:
                add(base + ".bias", bias)
            layout.tensor_names[_module_name(model, linear)] = base + ".weight"
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return layout


def _module_name(model: SlimModel, module: nn.Module) -> str:
    return next(n for n, m in model.module.named_modules() if m is module)


def _write_tokenizer(writer: Any, model: SlimModel, rows: int) -> None:
    """The vocabulary as llama.cpp reads it: tokens by id (ids the tokenizer lacks, up to the
    embedding's rows, as unused placeholders), their types, the merges and special ids."""
    import gguf

    tokenizer = model.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SlimformerError(
            "GGUF export needs the model's fast (tokenizers) tokenizer to write its vocabulary"
        )
    kind = type(backend.model).__name__
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= rows:
        raise SlimformerError(
            f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the embedding "
            f"only {rows} rows"
        )
    if kind == "BPE":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    elif kind == "WordPiece":
        writer.add_tokenizer_model("bert")
    else:
        raise SlimformerError(
            f"GGUF export: no llama.cpp mapping for a {kind} tokenizer (byte-level BPE and "
            "WordPiece are mapped)"
        )
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    if kind == "WordPiece":
        # llama.cpp's WordPiece marks where a word starts (a leading "\u2581", as
        # SentencePiece does) rather than where one continues ("##").
        tokens = [
            t if k == gguf.TokenType.CONTROL else t[2:] if t.startswith("##") else "\u2581" + t
            for t, k in zip(tokens, types, strict=True)
        ]
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="slimformer-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=kind == "BPE", n_vocab=rows)
        special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(tokenizer: Any) -> str:
    ids = tokenizer.encode(_PRE_TOKENIZER_TEXT)
    digest = hashlib.sha256(str(ids).encode()).hexdigest()
    try:
        return _PRE_TOKENIZERS[digest]
    except KeyError:
        raise SlimformerError(
            "GGUF export: llama.cpp would not know this BPE tokenizer's pre-tokenizer (known: "
            f"{', '.join(sorted(set(_PRE_TOKENIZERS.values())))}); its text would split "
            "differently there"
        ) from None


def tensor_array(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a GGUF file by name (as stored: quantized types as raw blocks)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: np.asarray(t.data) for t in reader.tensors}
