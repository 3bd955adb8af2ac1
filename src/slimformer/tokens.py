"""Fewer tokens inside an encoder's forward pass, with the fused attention kernel kept.

- merge (ToMe, Bolya et al. 2023): in each reducing block, after attention, `r` tokens are
  merged into their most similar partner by bipartite soft matching on the attention keys (mean
  over heads). A merged token is the size-weighted average of what it absorbed, and later
  attention adds log(size) to its logits (proportional attention). That bias goes in as the
  float `attn_mask` of `scaled_dot_product_attention`, so the fused kernel keeps running:
  softmax(QK^T/sqrt(d) + log s)V is exactly SDPA with `attn_mask = log s`.
- prune (PoWER-BERT's attention criterion, without training): in each reducing block, after
  attention, only the fraction `keep` of the real tokens that receive the most attention stays.
  SDPA returns no attention weights, so the scores are recomputed from that block's q and k:
  `cls` takes the class token's query row only (softmax of one row per head, O(tokens·dim)),
  `mean` the full attention matrix averaged over real queries (one more QK^T, no PV).
- pool (token pooling, as PiT and Funnel-Transformer downsample): once, in one block after
  attention, each `window`x`window` square of image patches (`window` neighbours of a
  sequence) becomes its average; the class token stays alone. Where the merge is fixed,
  nothing is matched or sorted: a reshape and a sum, which every runtime compiles, and the
  blocks after it run on a window² of the tokens. It needs training after it
  (`recover.distill`): pooled tokens then attend as one token each, as in PiT and Funnel —
  no log-size bias, so image attention runs without a mask.

`attention="eager"` computes the same attention the way ToMe's own code does (the logits,
the log-size bias and the softmax as separate ops, then the product with V). It is there so a
benchmark can run "ToMe as its authors apply it" next to slimformer's fused path on the same
model; it gives the same outputs up to float rounding and is never searched.

Under `traced_for_onnxruntime()` an ONNX trace writes the attention in the one shape ONNX
Runtime's transformer optimizer fuses into its Attention operator (QAttention once int8):
logits divided by sqrt(d), a mask built as HF BERT's (1 - mask) x lowest float, softmax, then V.
The SDPA trace (its scale multiplied into q and k as constants) and a masked_fill mask fused
nothing, which left a pooled MiniLM's int8 attention as separate q, k, v MatMuls and float score
products (~18% of its int8 time). Only padding masks fit that operator, so it fuses pooled
text; merged and pruned tokens' log-size bias still trace unfused.

The first token (the class token: BERT's [CLS], ViT's CLS) is never merged or pruned and stays
first. Padding: a padded position is a token of size 0, so log(size) masks it as a key, a merge
involving it leaves the real token's average unchanged, and matching prefers real pairs; real
tokens are kept ahead of padding, so a sentence merges the same way whatever it is batched with.

The output keeps the input's length: each position gets the final state of the token it ended
in (merged tokens are copied back to every position they absorbed, ToMe's "unmerge"); a pruned
token's position gets the size-weighted mean of the tokens that stayed. So mean pooling over
the attention mask weights every merged token by its size and leaves pruned tokens out, and
sentence embeddings stay comparable with the untouched model's. (Giving a pruned position the
state it left with, as token dropping does, measured far worse on MiniLM's embedding task:
cosine fidelity 0.57 against 0.92 for keep=0.7 from block 3, because early-block states are
pooled with final ones.)

Written by hand because nothing packaged does this inside Hugging Face models: ToMe's own code
patches timm's classes and computes attention eagerly. `install` replaces the forward of the
model's base (backbone) instance with one that runs the blocks through the adapter; names,
weights and the config are untouched, so every other pass and the checkpoint see the same model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from slimformer.adapters import EncoderBlock, ModelAdapter, adapter_for
from slimformer.errors import SlimformerError

MODES = ("merge", "prune", "pool")
CRITERIA = ("cls", "mean")
ATTENTIONS = ("sdpa", "eager")
# The attribute of the base model that holds its installed reduction.
ATTRIBUTE = "slimformer_tokens"
# Matching score of any pair that involves padding: below every cosine similarity (>= -1), so
# real pairs merge first, and above the protected class token's -inf.
_PAD_SCORE = -3.0
_FOR_ONNXRUNTIME = contextvars.ContextVar("slimformer_tokens_for_onnxruntime", default=False)


@dataclass(frozen=True)
class TokenReduction:
    """What each block does to the tokens: merge `amounts[i]` tokens (int r), keep the
    fraction `amounts[i]` (prune; 1.0 keeps all) or pool windows of `amounts[i]` (1: none)."""

    mode: str
    amounts: tuple[float, ...]
    criterion: str = "cls"  # prune: which attention a token's score is
    attention: str = "sdpa"  # eager: ToMe's own explicit softmax, for comparisons only

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SlimformerError(f"token reduction mode must be one of {MODES}, got {self.mode!r}")
        if self.criterion not in CRITERIA:
            raise SlimformerError(
                f"token pruning criterion must be one of {CRITERIA}, got {self.criterion!r}"
            )
        if self.attention not in ATTENTIONS:
            raise SlimformerError(
                f"token reduction attention must be one of {ATTENTIONS}, got {self.attention!r}"
            )
        least = {"merge": 0, "pool": 1}.get(self.mode)
        for amount in self.amounts:
            bad = (
                not 0 < amount <= 1
                if least is None
                else not (float(amount).is_integer() and amount >= least)
            )
            if bad:
                expected = "fractions in (0, 1]" if least is None else f"whole numbers >= {least}"
                raise SlimformerError(
                    f"token {self.mode} amounts per block must be {expected}, got {amount!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"amounts": list(self.amounts)}

    @classmethod
    def from_dict(cls, data: Any) -> TokenReduction:
        try:
            return cls(
                mode=data["mode"],
                amounts=tuple(data["amounts"]),
                criterion=data.get("criterion", "cls"),
                attention=data.get("attention", "sdpa"),
            )
        except (KeyError, TypeError, AttributeError) as error:
            raise SlimformerError(f"unreadable token reduction settings ({error})") from None


# --- installing -----------------------------------------------------------------------------
@contextlib.contextmanager
def traced_for_onnxruntime() -> Iterator[None]:
    """Within it, a trace writes token-reduced attention as ONNX Runtime fuses it (see the top)."""
    token = _FOR_ONNXRUNTIME.set(True)
    try:
        yield
    finally:
        _FOR_ONNXRUNTIME.reset(token)


def check_supported(module: nn.Module) -> ModelAdapter:
    """The adapter of `module` if its family can run with token reduction, else one error."""
    adapter = adapter_for(module)
    try:
        adapter.encoder_block(0)
    except NotImplementedError:
        raise SlimformerError(
            f"reduce.tokens works on encoders (BERT family, ViT), not {adapter.family}"
        ) from None
    return adapter


def install(module: nn.Module, reduction: TokenReduction) -> None:
    """Make `module` (a Hugging Face model) run with `reduction` from now on."""
    adapter = check_supported(module)
    if len(reduction.amounts) != adapter.num_layers:
        raise SlimformerError(
            f"token reduction has settings for {len(reduction.amounts)} blocks, the model has "
            f"{adapter.num_layers}"
        )
    base = adapter.base
    setattr(base, ATTRIBUTE, reduction)
    # An instance attribute, so deepcopy rebinds it to the copy.
    base.forward = types.MethodType(_reduced_forward, base)


def installed(module: nn.Module) -> TokenReduction | None:
    """The reduction `module` runs with, if any."""
    base = getattr(module, "base_model", module)
    found = getattr(base, ATTRIBUTE, None)
    return found if isinstance(found, TokenReduction) else None


TEXT_EXPORT_REFUSAL = (
    "reduce.tokens on text: how many tokens each block keeps by merging or pruning depends on "
    "the sequence length, which a traced ONNX graph fixes; serve the model in PyTorch, or pool "
    "(mode=pool exports)"
)
# The modes whose token counts a trace would fix on text; pooling's follow the length in the
# exported graph.
TEXT_UNEXPORTABLE_MODES = ("merge", "prune")


def export_refusal(module: nn.Module) -> str | None:
    """Why `module`'s token reduction cannot go into an exported graph (None: it can)."""
    reduction = installed(module)
    if reduction is None or adapter_for(module).fixed_token_count:
        return None
    return TEXT_EXPORT_REFUSAL if reduction.mode in TEXT_UNEXPORTABLE_MODES else None


# --- the forward pass -----------------------------------------------------------------------
_SIGNATURES: dict[type, inspect.Signature] = {}


def _inputs(base: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, as the family's own forward would have bound them."""
    cls = type(base)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    bound = _SIGNATURES[cls].bind(base, *args, **kwargs).arguments
    extra = bound.pop("kwargs", {})
    bound.pop("self", None)
    return {**bound, **extra}


def _reduced_forward(self: nn.Module, *args: Any, **kwargs: Any) -> BaseModelOutputWithPooling:
    inputs = _inputs(self, args, kwargs)
    if inputs.get("output_attentions"):
        raise SlimformerError(
            "a model with reduce.tokens does not return attention weights (its fused attention "
            "kernel computes none)"
        )
    adapter = adapter_for(self)
    hidden, mask = adapter.embed(inputs)
    want_states = bool(inputs.get("output_hidden_states"))
    reduction = getattr(self, ATTRIBUTE)
    grid = adapter.patch_grid(inputs)
    reduced = reduce_blocks(adapter, hidden, mask, reduction, want_states, grid)
    out, states = reduced
    norm = adapter.final_norm()
    if norm is not None:
        out = norm(out)
    pooler = adapter.pooler()
    return BaseModelOutputWithPooling(
        last_hidden_state=out,
        pooler_output=pooler(out) if pooler is not None else None,
        hidden_states=states,
    )


def reduce_blocks(
    adapter: ModelAdapter,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    reduction: TokenReduction,
    want_states: bool = False,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run the encoder blocks on `hidden` ([batch, tokens, width], `mask` of real tokens) with
    `reduction`; return the last block's output at every input position (and each block's,
    with `want_states`). `grid`: the rows and columns of an image's patch tokens (pooling
    takes squares of them; None pools neighbours in sequence order)."""
    batch, length, _ = hidden.shape
    if grid is not None and grid[0] * grid[1] != length - 1:
        raise SlimformerError(
            f"the model gives {length - 1} patch tokens for a {grid[0]}x{grid[1]} patch grid; "
            "token reduction expects the class token followed by the patches row by row"
        )
    size = (
        torch.ones(batch, length, dtype=torch.float32, device=hidden.device)
        if mask is None
        else mask.to(torch.float32)
    )
    # A trace keeps one branch: a text model's exported graph must handle padded batches.
    padded = mask is not None and (torch.jit.is_tracing() or not bool(mask.bool().all()))
    source = torch.arange(length, device=hidden.device).expand(batch, length)  # -1: pruned
    pruning = reduction.mode == "prune"
    head_dim = adapter.head_dim()
    x = hidden
    states = [hidden] if want_states else None
    biased = padded  # whether sizes other than 1 exist, so attention needs the log-size mask
    eager = reduction.attention == "eager"
    for index, amount in enumerate(reduction.amounts):
        block = adapter.encoder_block(index)
        bias = _attention_bias(size, x.dtype, reduction.mode) if biased else None
        x, h = _attention(block, x, bias, head_dim, eager)
        if reduction.mode == "merge" and amount >= 1:
            metric = _merge_metric(block, h, head_dim)
            x, size, source = merge_tokens(x, size, source, metric, int(amount), padded)
            biased = True
        elif reduction.mode == "prune" and amount < 1:
            rows = 1 if reduction.criterion == "cls" else None
            logits = _scoring_logits(block, h, head_dim, rows)
            scores = attention_received(logits * head_dim**-0.5, bias, size, reduction.criterion)
            x, size, source = prune_tokens(x, size, source, scores, amount)
            # Every row keeps as many tokens when none is padding (images), all of size 1:
            # no mask, so the attention kernel runs without one.
        elif reduction.mode == "pool" and amount > 1:
            x, size, source, grid = pool_tokens(x, size, source, int(amount), grid)
        x = _feed_forward(block, x)
        if states is not None:
            states.append(unmerge(x, source, size if pruning else None))
    return unmerge(x, source, size if pruning else None), tuple(states) if states else None


def _attention_bias(size: torch.Tensor, dtype: torch.dtype, mode: str) -> torch.Tensor:
    """The float attention mask [batch, 1, 1, tokens]: log(size) (proportional attention; -inf
    masks padding), or for pooled tokens, which attend as one token each, padding alone: as
    (1 - real) x the lowest float, the expression ONNX Runtime's optimizer takes for a mask."""
    if mode == "pool":
        real = (size > 0).unsqueeze(1).unsqueeze(2)
        return (1.0 - real.to(dtype)) * torch.finfo(dtype).min
    return size.log()[:, None, None, :].to(dtype)


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, tokens, heads·head_dim] -> [batch, heads, tokens, head_dim]."""
    batch, tokens, _ = t.shape
    return t.view(batch, tokens, -1, head_dim).transpose(1, 2)


def _attention(
    block: EncoderBlock,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    head_dim: int,
    eager: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's attention with its residual (and norm); also its input to q, k and v."""
    h = block.attention_norm(x) if block.pre_norm else x
    batch, tokens, _ = x.shape
    q, k, v = (
        _heads(block.query(h), head_dim),
        _heads(block.key(h), head_dim),
        _heads(block.value(h), head_dim),
    )
    for_onnxruntime = _FOR_ONNXRUNTIME.get() and torch.jit.is_tracing()
    if eager or for_onnxruntime:  # (q k^T)·scale + bias, softmax, then V, as separate ops
        logits = q @ k.transpose(-2, -1)
        # ToMe's ToMeAttention.forward multiplies by the scale; ONNX Runtime's optimizer
        # matches a division by sqrt(d) (see the top)
        logits = logits / head_dim**0.5 if for_onnxruntime else logits * head_dim**-0.5
        if bias is not None:
            logits = logits + bias
        context = logits.softmax(dim=-1) @ v
    else:
        # scale as transformers passes it, so no reduction reproduces the model bit for bit
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=head_dim**-0.5)
    out = block.attention_out(context.transpose(1, 2).reshape(batch, tokens, -1))
    x = x + out if block.pre_norm else block.attention_norm(out + x)
    return x, h


def _head_key_weights(block: EncoderBlock, head_dim: int) -> torch.Tensor | None:
    """The key projection's weight per head [heads, head_dim, width] where it is a plain
    Linear (None otherwise: factorized, quantized)."""
    key = block.key
    if not isinstance(key, nn.Linear):
        return None
    return key.weight.view(-1, head_dim, key.in_features)


def _merge_metric(block: EncoderBlock, h: torch.Tensor, head_dim: int) -> torch.Tensor:
    """ToMe's metric, the keys averaged over heads [batch, tokens, head_dim] — for a Linear key
    as one projection by the heads' mean weights (see `_scoring_logits` for why not k)."""
    weight = _head_key_weights(block, head_dim)
    if weight is None:
        return _heads(block.key(h), head_dim).mean(1)
    bias = block.key.bias
    return F.linear(h, weight.mean(0), None if bias is None else bias.view(-1, head_dim).mean(0))


def _scoring_logits(
    block: EncoderBlock, h: torch.Tensor, head_dim: int, rows: int | None
) -> torch.Tensor:
    """q·k [batch, heads, queries, tokens] of the first `rows` queries (None: all), unscaled,
    for scoring tokens. Not from the attention's q and k: a q or k that also feeds anything
    else keeps OpenVINO from fusing the attention, and NNCF's int8 then runs it unfused (on
    vit-fashion's shape pruning cost more than the tokens it removed). With a Linear key the
    product is taken through its weights, q·(W h + b) = (qW)·h + q·b, dropping q·b: the same
    for every token of a query, so the softmax over tokens does not see it."""
    q = _heads(block.query(h if rows is None else h[:, :rows]), head_dim)
    weight = _head_key_weights(block, head_dim)
    if weight is None:
        return q @ _heads(block.key(h), head_dim).transpose(-1, -2)
    return (q @ weight) @ h.unsqueeze(1).transpose(-1, -2)


def _feed_forward(block: EncoderBlock, x: torch.Tensor) -> torch.Tensor:
    if block.pre_norm:
        return x + block.ffn_out(block.activation(block.ffn_in(block.ffn_norm(x))))
    return block.ffn_norm(block.ffn_out(block.activation(block.ffn_in(x))) + x)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[batch, len(index[b]), width]: the rows `index` [batch, n] of each `x` [batch, tokens,
    width] — `x.gather(1, index expanded over width)`, written as one flat `index_select`.
    Why: a gather along dim 1 exports as GatherElements, which OpenVINO's CPU plugin runs with
    its reference kernel in a layout of its own (a reorder before and after); a flat row
    select is its jitted Gather. Same values."""
    batch, tokens, width = x.shape
    offsets = torch.arange(batch, device=x.device).unsqueeze(1) * tokens
    flat = x.reshape(batch * tokens, width).index_select(0, (index + offsets).reshape(-1))
    return flat.reshape(batch, index.shape[1], width)


def unmerge(x: torch.Tensor, source: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Each input position's state: its token's; with `size` (pruning), a pruned position
    (source -1) gets the size-weighted mean of the tokens left, so it adds nothing to a mean."""
    out = gather_rows(x, source.clamp(min=0))
    if size is None:
        return out
    weights = size.unsqueeze(-1).to(x.dtype)
    mean = (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
    return torch.where((source >= 0).unsqueeze(-1), out, mean)


# --- merging --------------------------------------------------------------------------------
def merge_tokens(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor,
    metric: torch.Tensor,
    r: int,
    padded: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching: tokens alternate between sets A (even positions) and B;
    each A token's most similar B token (cosine of `metric`) is its edge, and the `r` most
    similar edges merge (size-weighted averages). The first token (in A) never merges."""
    batch, tokens, width = x.shape
    n_a, n_b = (tokens + 1) // 2, tokens // 2
    r = min(r, n_a - 1, n_b)
    if r <= 0:
        return x, size, source
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)  # [batch, A, B]
        real = size > 0
        both_real = real[:, ::2, None] & real[:, None, 1::2]
        scores = scores.masked_fill(~both_real, _PAD_SCORE)
        scores[:, 0] = -math.inf  # the class token
        best, partner = scores.max(dim=-1)
        edges = best.argsort(dim=-1, descending=True)
        merged = edges[:, :r]
        kept = edges[:, r:].sort(dim=-1).values  # A tokens that stay, in their order
        target = partner.gather(1, merged)
    weighted = x * size.unsqueeze(-1).to(x.dtype)
    xa, xb = weighted[:, ::2], weighted[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]

    xb = xb.scatter_add(1, target.unsqueeze(-1).expand(-1, -1, width), gather_rows(xa, merged))
    sb = sb.scatter_add(1, target, sa.gather(1, merged))
    new_size = torch.cat([sa.gather(1, kept), sb], dim=1)
    new_x = torch.cat([gather_rows(xa, kept), xb], dim=1)
    new_x = new_x / new_size.clamp(min=1e-6).unsqueeze(-1).to(x.dtype)
    # Where each old position went: kept A tokens first, then the B tokens.
    n_kept = n_a - r
    new_a = torch.empty_like(edges)
    new_a.scatter_(1, kept, torch.arange(n_kept, device=x.device).expand(batch, n_kept))
    new_a.scatter_(1, merged, target + n_kept)
    new_b = (torch.arange(n_b, device=x.device) + n_kept).expand(batch, n_b)
    new_of_old = torch.stack([new_a[:, :n_b], new_b], dim=-1).reshape(batch, 2 * n_b)
    if n_a > n_b:
        new_of_old = torch.cat([new_of_old, new_a[:, n_b:]], dim=1)
    if padded:  # real tokens ahead of padding, so the next split matches the unpadded input
        order = (new_size == 0).to(torch.int8).argsort(dim=1, stable=True)
        new_x, new_size = gather_rows(new_x, order), new_size.gather(1, order)
        new_of_old = order.argsort(dim=1).gather(1, new_of_old)
    return new_x, new_size, new_of_old.gather(1, source)


# --- pooling --------------------------------------------------------------------------------
def pool_tokens(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor,
    window: int,
    grid: tuple[int, int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """Average each `window`x`window` square of the `grid` of tokens after the first (a
    sequence: each run of `window`), size-weighted; an edge short of a whole window pools
    what it has. Returns the tokens, their sizes, where each input position went and the
    pooled grid. A fixed assignment, so no index op to export: reshapes and sums on a grid
    (an image's, of fixed size), an assignment matrix on a sequence (text, of any length)."""
    batch, tokens, width = x.shape
    weighted = (x * size.unsqueeze(-1).to(x.dtype))[:, 1:]
    sizes = size[:, 1:].unsqueeze(-1)
    shape = (tokens - 1, 1) if grid is None else grid
    # (side + window - 1) // window: the ONNX trace follows the length through it, where it
    # kept -(-side // window) as the traced example's constant.
    rows, columns = ((side + window - 1) // window for side in shape)
    tall, wide = (window, 1) if grid is None else (window, window)

    def pooled_sums(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(batch, shape[0], shape[1], t.shape[-1])
        short_rows, short_columns = rows * tall - shape[0], columns * wide - shape[1]
        if short_rows or short_columns:  # zeros of size 0 fill the last windows
            t = F.pad(t, (0, 0, 0, short_columns, 0, short_rows))
        t = t.reshape(batch, rows, tall, columns, wide, t.shape[-1])
        return t.sum(dim=(2, 4)).reshape(batch, rows * columns, t.shape[-1])

    position = torch.arange(tokens - 1, device=x.device)
    window_of = (position // shape[1] // tall) * columns + (position % shape[1]) // wide
    if grid is None:
        # Text: the exported graph keeps the sequence length open, so each run is summed by an
        # assignment matrix built from `arange` (ONNX Range, traced with the length) rather
        # than a pad and reshape to Python-int shapes, which a trace would fix.
        runs = torch.arange(rows, device=x.device)
        assign = (runs.unsqueeze(1) == window_of.unsqueeze(0)).to(x.dtype)
        new_sizes = assign @ sizes.to(x.dtype)
        new_x = (assign @ weighted) / new_sizes.clamp(min=1e-6)
        new_sizes = new_sizes.to(size.dtype)
    else:
        new_sizes = pooled_sums(sizes)
        new_x = pooled_sums(weighted) / new_sizes.clamp(min=1e-6).to(x.dtype)
    new_x = torch.cat([x[:, :1], new_x], dim=1)
    new_size = torch.cat([size[:, :1], new_sizes.squeeze(-1)], dim=1)
    new_of_old = torch.cat([window_of.new_zeros(1), window_of + 1])
    new_grid = None if grid is None else (rows, columns)
    return new_x, new_size, new_of_old[source], new_grid


# --- pruning --------------------------------------------------------------------------------
def attention_received(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    size: torch.Tensor,
    criterion: str,
) -> torch.Tensor:
    """[batch, tokens]: the attention each token receives, mean over heads, from the scaled
    attention logits [batch, heads, queries, tokens] — of the class token's query alone
    (`cls`) or of the real queries, averaged by size (`mean`); recomputed because the fused
    kernel returns no weights."""
    if bias is not None:
        logits = logits + bias
    weights = logits.float().softmax(dim=-1).mean(dim=1)  # [batch, queries, tokens]
    if criterion == "cls":
        return weights[:, 0]
    per_query = size / size.sum(dim=1, keepdim=True)
    return (weights * per_query.unsqueeze(-1)).sum(dim=1)


def prune_tokens(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor,
    scores: torch.Tensor,
    keep: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the class token and ceil(keep × the other real tokens), the highest `scores`
    first, at least one; the others leave (their source becomes -1). Each row keeps its own
    count, so the tensor is as wide as the largest; the rest of a row's slots are padding."""
    batch, tokens, _ = x.shape
    real = size > 0
    others = real.sum(dim=1) - 1
    counts = torch.where(others > 0, (others * keep).ceil().clamp(min=1), others) + 1
    ranked = scores.float().masked_fill(~real, -math.inf)
    ranked[:, 0] = math.inf  # the class token
    order = ranked.argsort(dim=1, descending=True)
    wide = int(counts.max())
    chosen, position = order[:, :wide].sort(dim=1)
    alive = (torch.arange(wide, device=x.device) < counts.unsqueeze(1)).gather(1, position)
    alive = alive & real.gather(1, chosen)
    new_of_old = torch.full((batch, tokens), -1, dtype=source.dtype, device=x.device)
    slots = torch.arange(wide, device=x.device).expand(batch, wide)
    new_of_old = new_of_old.scatter(1, chosen, torch.where(alive, slots, -1))
    new_source = torch.where(source >= 0, new_of_old.gather(1, source.clamp(min=0)), -1)
    new_x = gather_rows(x, chosen)
    return new_x, size.gather(1, chosen) * alive, new_source
