"""The model adapter: where a model family keeps its blocks, attention and FFN projections.

Techniques ask an adapter for "the blocks" or "the FFN projections of block 3" and never spell a
family's attribute paths themselves, so a new family is one small subclass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

LINEAR_ROLES = ("attention", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class BlockLayout:
    """Attribute paths inside one transformer block, relative to the block."""

    query: str
    key: str
    value: str
    attention_out: str
    ffn_in: tuple[str, ...]  # up (and gate, for gated MLPs): output features = FFN neurons
    ffn_out: str  # down: input features = FFN neurons


@dataclass(frozen=True)
class EncoderBlock:
    """The modules of a bidirectional encoder block, for code that runs the block itself
    (token reduction). Post-norm (BERT):
    x = attention_norm(x + attention_out(attend(q, k, v of x)));
    x = ffn_norm(x + ffn_out(activation(ffn_in(x)))).
    Pre-norm (ViT, `pre_norm`): x = x + attention_out(attend(q, k, v of attention_norm(x)));
    x = x + ffn_out(activation(ffn_in(ffn_norm(x))))."""

    query: nn.Module
    key: nn.Module
    value: nn.Module
    attention_out: nn.Module
    attention_norm: nn.Module
    ffn_in: nn.Module
    activation: nn.Module
    ffn_out: nn.Module
    ffn_norm: nn.Module
    pre_norm: bool


@dataclass(frozen=True)
class ModelFacts:
    """Sizes a pass's search range may depend on (e.g. how many layers can be dropped)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    intermediate_size: int
    # Image patches: a fixed number of tokens, so token reduction can be exported (tokens.py).
    fixed_token_count: bool = False
    # Tokens per input where the model fixes them (patches + class token); None for text.
    tokens_per_example: int | None = None


# A kept block's index before blocks were removed: a plain attribute, so it lives as long as the
# module in memory and is never saved (a reloaded model is an original of its own).
ORIGIN_ATTRIBUTE = "slimformer_origin"


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


class ModelAdapter:
    """Base class; subclasses fill in the class attributes for their family."""

    family: ClassVar[str]
    model_types: ClassVar[frozenset[str]]
    # Candidate paths of the block list inside the *base* model; the first that exists wins
    # (transformers has renamed these between releases).
    block_paths: ClassVar[tuple[str, ...]]
    layout: ClassVar[BlockLayout]
    # The `model_type` ONNX Runtime's transformer optimizer knows this family's attention and
    # normalization patterns by; None where it has none (the export then runs unfused).
    onnx_optimizer_type: ClassVar[str | None] = None
    # Whether the model fixes its number of tokens (image patches), so a traced graph may fix
    # how many tokens each block keeps (token reduction); text lengths vary.
    fixed_token_count: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.base = getattr(model, "base_model", model)
        self._block_path = self._find_block_path()

    def _find_block_path(self) -> str:
        for path in self.block_paths:
            try:
                found = self.base.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(found, nn.ModuleList):
                return path
        raise ValueError(f"{type(self.model).__name__}: no block list at {self.block_paths}")

    # --- blocks -------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        return self.base.get_submodule(self._block_path)

    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    def block_origins(self) -> list[int]:
        """Each block's index in the model before any `keep_blocks` in this process (what a
        layer-to-layer distillation matches it to in the original)."""
        return [getattr(b, ORIGIN_ATTRIBUTE, i) for i, b in enumerate(self.blocks())]

    def keep_blocks(self, keep: Sequence[int]) -> None:
        """Keep only the blocks at these indices (in order) and update the config to match."""
        blocks = self.blocks()
        for block, origin in zip(blocks, self.block_origins(), strict=True):
            setattr(block, ORIGIN_ATTRIBUTE, origin)
        kept = nn.ModuleList(blocks[i] for i in sorted(keep))
        parent_path, _, attr = self._block_path.rpartition(".")
        setattr(get_submodule(self.base, parent_path), attr, kept)
        config = self.model.config
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and len(layer_types) == len(blocks):
            config.layer_types = [layer_types[i] for i in sorted(keep)]
        config.num_hidden_layers = len(kept)
        # Decoders index their KV cache by layer_idx; it must follow the new positions.
        for new_index, block in enumerate(kept):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index

    # --- projections --------------------------------------------------------------------
    def attention_linears(self, block_index: int) -> dict[str, nn.Linear]:
        block = self.blocks()[block_index]
        lay = self.layout
        names = {"query": lay.query, "key": lay.key, "value": lay.value, "out": lay.attention_out}
        return {role: block.get_submodule(path) for role, path in names.items()}

    def ffn_linears(self, block_index: int) -> dict[str, nn.Module]:
        block = self.blocks()[block_index]
        found = {f"in{i}": block.get_submodule(path) for i, path in enumerate(self.layout.ffn_in)}
        found["out"] = block.get_submodule(self.layout.ffn_out)
        return found

    def block_linears(
        self, block_index: int, roles: Iterable[str] = LINEAR_ROLES
    ) -> dict[str, nn.Module]:
        """Fully qualified name -> Linear layer of block `block_index` for these roles:
        'attention' (q, k, v, out), 'ffn_in' (up, gate), 'ffn_out' (down)."""
        roles = set(roles)
        unknown = roles - set(LINEAR_ROLES)
        if unknown:
            raise ValueError(f"unknown linear roles {sorted(unknown)}; known: {LINEAR_ROLES}")
        modules: list[nn.Module] = []
        if "attention" in roles:
            modules += self.attention_linears(block_index).values()
        ffn = self.ffn_linears(block_index)
        if "ffn_in" in roles:
            modules += [m for role, m in ffn.items() if role != "out"]
        if "ffn_out" in roles:
            modules.append(ffn["out"])
        names = {id(m): n for n, m in self.model.named_modules()}
        return {names[id(m)]: m for m in modules}

    def block_linear_names(self, roles: Iterable[str] = LINEAR_ROLES) -> list[str]:
        """Fully qualified names of the blocks' Linear layers that play these roles."""
        return [n for i in range(self.num_layers) for n in self.block_linears(i, roles)]

    def replace_linear(self, block_index: int, path: str, module: nn.Module) -> None:
        """Put `module` at `path` (a BlockLayout path) inside block `block_index`."""
        parent_path, _, attr = path.rpartition(".")
        setattr(get_submodule(self.blocks()[block_index], parent_path), attr, module)

    def fold_uniform_widths(self) -> None:
        """Write an FFN width shared by every block into the config, so plain transformers
        rebuilds the pruned model (uneven widths need slimformer's loader)."""
        widths = {self.ffn_linears(i)["out"].in_features for i in range(self.num_layers)}
        if len(widths) == 1:
            self.model.config.intermediate_size = widths.pop()
        self.fold_uniform_heads()

    def fold_uniform_heads(self) -> None:
        """Families whose config can say "fewer heads of the same size" override this; in
        BERT and ViT the head size is derived from the head count, so it cannot."""

    def head_dim(self) -> int:
        config = self.model.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    # --- padding-free execution (families that support it override these) ---------------
    def post_norm_block(self, block_index: int) -> EncoderBlock:
        """The block when it is post-norm (BERT): what padding-free execution runs."""
        block = self.encoder_block(block_index)
        if block.pre_norm:
            raise NotImplementedError(f"{self.family} blocks are not post-norm encoder blocks")
        return block

    def embeddings(self) -> nn.Module:
        raise NotImplementedError(f"{self.family} has no separate embedding module here")

    # --- running the encoder block by block (token reduction; encoders override these) -----
    # The sequence's first token is the class token ([CLS], ViT's CLS) the heads read.
    def encoder_block(self, block_index: int) -> EncoderBlock:
        raise NotImplementedError(f"{self.family} blocks are not bidirectional encoder blocks")

    def embed(
        self, inputs: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base model's forward inputs -> (embedded tokens [batch, tokens, hidden], the
        [batch, tokens] mask of real tokens, None where every token is real)."""
        raise NotImplementedError(f"{self.family} is not an encoder slimformer runs blockwise")

    def final_norm(self) -> nn.Module | None:
        """The norm after the last block (pre-norm encoders and decoders), if any."""
        return None

    def pooler(self) -> nn.Module | None:
        """The base model's pooler (reads the class token), if it has one."""
        return getattr(self.base, "pooler", None)

    # --- the modules around the projections (decoders written to other formats: GGUF) --
    def block_norms(self, block_index: int) -> dict[str, nn.Module]:
        """The norms of a pre-norm decoder block: "attention" (before attention), "ffn"."""
        raise NotImplementedError(f"{self.family} blocks are not pre-norm decoder blocks")

    def output_head(self) -> nn.Module:
        """The Linear that turns the last hidden states into logits (the LM head)."""
        raise NotImplementedError(f"{self.family} has no LM head")

    # --- facts --------------------------------------------------------------------------
    def facts(self) -> ModelFacts:
        config = self.model.config
        heads = config.num_attention_heads
        return ModelFacts(
            num_layers=self.num_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            fixed_token_count=self.fixed_token_count,
            tokens_per_example=self.tokens_per_example(),
        )

    def tokens_per_example(self) -> int | None:
        """How many tokens every input has, where the model fixes it (image patches)."""
        return None

    def patch_grid(self, inputs: dict[str, Any]) -> tuple[int, int] | None:
        """Rows and columns of the patch tokens that follow the class token, for an image
        input (None: a sequence, e.g. text)."""
        return None
