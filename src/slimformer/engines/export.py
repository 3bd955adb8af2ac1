"""Export a (possibly pruned) model to ONNX for ONNX Runtime and OpenVINO.

The TorchScript-based exporter (`dynamo=False`) is used on purpose: on its graph ONNX Runtime's
transformer optimizer fuses Attention, EmbedLayerNormalization and SkipLayerNormalization; on the
dynamo exporter's graph it fused no Attention (measured when the exporter was chosen; the
comparison is not kept in bench/results). Attention is switched to the eager implementation for
the trace, the pattern those fusions match.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from slimformer.engines.base import HEAD_INPUTS, HEAD_OUTPUT, ServedModule
from slimformer.errors import SlimformerError
from slimformer.layers import codec_for
from slimformer.tokens import export_refusal

if TYPE_CHECKING:
    from slimformer.model import SlimModel

OPSET = 17


class _PositionalCall(nn.Module):
    """The exporter passes inputs by position; the Hugging Face module wants keywords."""

    def __init__(self, module: nn.Module, input_names: tuple[str, ...], output: str):
        super().__init__()
        self.module, self.input_names, self.output = module, input_names, output

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.input_names, inputs, strict=True))
        if "input_ids" in kwargs:
            kwargs["use_cache"] = False
        return getattr(self.module(**kwargs, return_dict=True), self.output)


def unexportable_layers(model: SlimModel) -> dict[str, tuple[str, str]]:
    """Layers whose codec refuses ONNX export, by kind: (name of the first one, why)."""
    found: dict[str, tuple[str, str]] = {}
    for name, module in model.module.named_modules():
        codec = codec_for(module)
        if codec is not None and codec.onnx_refusal and codec.kind not in found:
            found[codec.kind] = (name, codec.onnx_refusal)
    return found


def check_exportable(model: SlimModel, runtime: str) -> None:
    blocked = unexportable_layers(model)
    if blocked:
        kinds = ", ".join(f"{kind} (e.g. {name}: {why})" for kind, (name, why) in blocked.items())
        raise SlimformerError(
            f"{runtime}: cannot export layers quantized by a PyTorch pass: {kinds}; quantize "
            f"inside the runtime instead ({runtime} int8 setting)"
        )
    check_not_served(model, runtime)
    tokens = export_refusal(model.module)
    if tokens:
        raise SlimformerError(f"{runtime}: {tokens}")


def check_not_served(model: SlimModel, runtime: str) -> None:
    """Refuse a model some engine serves already (saved that way, loaded and given again)."""
    if isinstance(model.module, ServedModule):
        raise SlimformerError(f"{runtime}: {model.module.export_refusal()}")


def export_onnx(model: SlimModel, example: dict[str, torch.Tensor], path: Path) -> None:
    """Write `path` (ONNX, dynamic batch and sequence axes) for `model.head`'s inputs."""
    names = HEAD_INPUTS[model.head]
    traced = copy.deepcopy(model.module).eval()  # the trace must not touch the live model
    if hasattr(traced, "set_attn_implementation"):
        # Families without an eager switch keep their attention as it is.
        with contextlib.suppress(ValueError, AttributeError):
            traced.set_attn_implementation("eager")
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names if n != "pixel_values"}
    dynamic["pixel_values"] = {0: "batch"}
    axes = {n: dynamic[n] for n in names}
    axes["output"] = (
        {0: "batch", 1: "sequence"} if model.head != "image-classification" else {0: "batch"}
    )
    wrapper = _PositionalCall(traced, names, HEAD_OUTPUT[model.head])
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                tuple(example[n] for n in names),
                str(path),
                input_names=list(names),
                output_names=["output"],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as error:  # the exporter raises many types; the study records the reason
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise SlimformerError(f"ONNX export failed: {type(error).__name__}: {first}") from None
