"""Decoders in OpenVINO with a KV cache: the stateful export and the cache handle.

The decoder is converted from PyTorch (OpenVINO's PyTorch frontend, tracing) as one step that
takes `input_ids`, `attention_mask` (past + new tokens), `position_ids` and every layer's past
keys and values, and returns the logits and the grown keys and values. OpenVINO's own
make-stateful transformation then turns each past/present pair into model state (ReadValue /
Assign), so the cache stays inside the engine between calls, as OpenVINO GenAI serves LLMs.

Written here rather than taken from optimum-intel: optimum-intel 2.2 requires
transformers < 5.6 and cannot share this environment (transformers 5.x). What it adds on top of
the two OpenVINO calls is reproduced: the state's initial value, an empty cache whose batch
size is the input's, built as a small graph (`_initialize_state`).

The attention mask is built in the traced step from the 2-D mask and the positions, and given
to the model in 4-D, because transformers' own mask construction reads the cache length as a
Python int, which tracing would freeze to the example's length.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from slimformer.errors import SlimformerError

if TYPE_CHECKING:
    from slimformer.model import SlimModel

INPUTS = ("input_ids", "attention_mask", "position_ids")
OUTPUT = "logits"


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


class _CachedStep(nn.Module):
    """One forward with the KV cache, flat tensors in and out (what tracing can follow)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # Key j (0-based over past + new) is visible to a query at position p when j <= p and
        # the mask keeps it: causal and padding masks in one, from tensors only.
        keys = torch.cumsum(torch.ones_like(attention_mask[0]), 0) - 1
        visible = (keys[None, None, :] <= position_ids[:, :, None]) & attention_mask[
            :, None, :
        ].bool()
        dtype = self.module.dtype
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
        cache = DynamicCache(config=self.module.config)
        for index, layer in enumerate(cache.layers):
            # Filled directly: `update` would concatenate onto a 1-D empty tensor, which the
            # PyTorch frontend cannot convert.
            layer.keys, layer.values = past[2 * index], past[2 * index + 1]
            layer.is_initialized, layer.device = True, layer.keys.device
        out = self.module(
            input_ids=input_ids,
            attention_mask=mask[:, None],
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            return_dict=True,
        )
        flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)


def cache_shapes(model: SlimModel) -> list[tuple[int, int]]:
    """(key-value heads, head size) of each layer's cache; pruning may leave layers with
    different numbers of heads."""
    adapter = model.adapter
    head_dim = adapter.head_dim()
    return [
        (adapter.attention_linears(i)["key"].out_features // head_dim, head_dim)
        for i in range(adapter.num_layers)
    ]


def stateful_refusal(model: SlimModel) -> str | None:
    """Why `model` cannot be exported with its KV cache as state (None: it can)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = model.config
    try:
        cache = DynamicCache(config=config)
    except Exception as error:  # a config transformers cannot build a cache for
        return f"no KV cache for {config.model_type} ({type(error).__name__})"
    if len(cache.layers) != model.adapter.num_layers or any(
        type(layer) is not DynamicLayer for layer in cache.layers
    ):
        return (
            f"{config.model_type} has sliding-window or other non-growing cache layers, which "
            "the stateful export does not handle"
        )
    return None


def export_stateful(model: SlimModel, example: torch.Tensor) -> Any:
    """The decoder `model` as a stateful `ov.Model` (inputs `INPUTS`, output `OUTPUT`).

    `example` is a batch of real token ids to trace with; the graph has dynamic batch and
    sequence axes, the cache length included."""
    import copy

    import openvino as ov
    from openvino._offline_transformations import apply_make_stateful_transformation

    why = stateful_refusal(model)
    if why:
        raise SlimformerError(f"runtime.openvino: cannot serve this decoder with a KV cache: {why}")
    traced = copy.deepcopy(model.module).eval()  # the trace must not touch the live model
    if hasattr(traced, "set_attn_implementation"):
        traced.set_attn_implementation("eager")
    shapes = cache_shapes(model)
    layers = len(shapes)
    # A non-empty past in the example: with an empty one, tracing may drop the concatenation.
    ids = example[:1, :4]
    past_len = 3
    past = [torch.zeros(1, h, past_len, d) for h, d in shapes for _ in ("key", "value")]
    mask = torch.ones(1, past_len + ids.shape[1], dtype=torch.long)
    positions = torch.arange(past_len, past_len + ids.shape[1])[None]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ov_model = ov.convert_model(
                _CachedStep(traced), example_input=(ids, mask, positions, *past)
            )
    except Exception as error:  # the frontend raises many types; the study records the reason
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise SlimformerError(
            f"runtime.openvino: converting the decoder failed: {type(error).__name__}: {first}"
        ) from None
    past_names = [past_name(i, kind) for i in range(layers) for kind in ("key", "value")]
    present_names = [present_name(i, kind) for i in range(layers) for kind in ("key", "value")]
    for port, name in zip(ov_model.inputs, [*INPUTS, *past_names], strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, [OUTPUT, *present_names], strict=True):
        port.get_tensor().set_names({name})
    pasts = zip(ov_model.inputs[len(INPUTS) :], [s for s in shapes for _ in "kv"], strict=True)
    for port, (heads, head_dim) in pasts:
        # Heads and head size fixed: the state's initial value is built from this shape.
        port.get_node().set_partial_shape(ov.PartialShape([-1, heads, -1, head_dim]))
    ov_model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(ov_model, dict(zip(past_names, present_names, strict=True)))
    _initialize_state(ov_model)
    return ov_model


def _initialize_state(ov_model: Any) -> None:
    """Start each state as an empty cache [batch, heads, 0, head size], batch from input_ids
    (OpenVINO's default initial value has no batch to concatenate onto)."""
    import openvino.opset13 as ops

    ids_shape = ops.shape_of(ov_model.input(INPUTS[0]), output_type="i64")
    batch = ops.gather(ids_shape, ops.constant([0]), ops.constant(0))
    for op in ov_model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        shape = op.get_output_partial_shape(0)
        heads, head_dim = shape[1].get_length(), shape[3].get_length()
        dims = [batch, *(ops.constant(np.array([d], dtype=np.int64)) for d in (heads, 0, head_dim))]
        zero = ops.constant(0.0, dtype=op.get_output_element_type(0))
        zeros = ops.broadcast(zero, ops.concat(dims, 0))
        op.set_arguments([zeros])
    ov_model.validate_nodes_and_infer_types()


def is_stateful(ov_model: Any) -> bool:
    return any(op.get_type_name() == "ReadValue" for op in ov_model.get_ops())


class OpenVinoCache:
    """The KV cache of one generation, held as state inside an OpenVINO infer request.

    Returned as `past_key_values` and handed back to continue: only the newest handle of a
    request is valid, since the state it names has moved on (or was reset) since an older
    one was returned."""

    def __init__(self, session: CacheSession, length: int):
        self.session, self.length, self.generation = session, length, session.generation

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def check_current(self) -> None:
        if self.generation != self.session.generation or self.length != self.session.length:
            raise SlimformerError(
                "this OpenVINO KV cache is stale: the model generated past it or started a new "
                "prompt since; continue from the newest past_key_values"
            )


class CacheSession:
    """One infer request whose state is the cache of the current generation."""

    def __init__(self, request: Any):
        self.request = request
        self.generation = 0
        self.length = 0

    def start(self) -> None:
        self.request.reset_state()
        self.generation += 1
        self.length = 0

    def run(self, feed: dict[str, np.ndarray], new_tokens: int) -> np.ndarray:
        result = self.request.infer(feed)
        self.length += new_tokens
        return result[OUTPUT]
