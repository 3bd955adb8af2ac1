"""`runtime.llamacpp`: the decoder written as GGUF (`engines.gguf_export`), quantized by
llama.cpp's own quantizer, and served by llama.cpp (`engines.llamacpp`).

The quantization types are llama.cpp's file types (Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0 searched;
any other the installed llama.cpp has may be named; F32 and F16 quantize nothing). Two inputs of
the quantizer come from slimformer:
- an importance matrix (`imatrix`), for the types whose rounding weighs columns by it (the
  k-quants and Q4_0; Q8_0 ignores it): what llama.cpp's `llama-imatrix` tool records, the mean
  squared input of each column of each weight, computed here on the task's calibration text
  with the eager model (the tool is not part of llama-cpp-python; its statistic is);
- per-tensor types (`keep_sensitive`): the N block weights whose rounding alone hurts the
  output most, ranked by slimformer's sensitivity probe, are kept at Q8_0. The probe rounds one
  weight at a time with the `gguf` package's block quantizer of the same width (Q4_0 for the
  4-bit types, Q5_0 for 5 and 6 bits: the package has no k-quant quantizer), a stand-in for
  llama.cpp's own rounding of that tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimformer.engines.gguf_export import (
    GgufLayout,
    check_gguf_exportable,
    gguf_refusal,
    write_gguf,
)
from slimformer.engines.llamacpp import (
    DEFAULT_CONTEXT,
    LlamaCppModule,
    installed_quant_types,
    quantize,
)
from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Interval, Pass, PassContext, Phase, register_pass
from slimformer.passes.sensitivity import most_sensitive
from slimformer.passes.serving import EagerReference, Stopwatch
from slimformer.passes.settings import fixed, searchable

FLOAT_TYPES = ("F32", "F16")
QUANTS = ("F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
# The searched types whose rounding reads an importance matrix (Q8_0's does not).
IMATRIX_QUANTS = ("Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
QUANTIZED = tuple(q for q in QUANTS if q not in FLOAT_TYPES)
KEPT_TYPE = "Q8_0"  # what keep_sensitive leaves the most fragile weights in


@dataclass(frozen=True)
class LlamaCppConfig:
    quant: str = searchable(
        "Q8_0",
        Choice(QUANTS, only=False),
        "llama.cpp file type the GGUF is quantized to by llama.cpp (any type the installed "
        "llama.cpp has may be named; F32/F16: no quantization)",
    )
    imatrix: bool = searchable(
        False,
        Choice((False, True)),
        "weigh rounding by an importance matrix from the calibration text",
        when=("quant", IMATRIX_QUANTS),
    )
    keep_sensitive: int = searchable(
        0,
        Choice((0, 2, 4)),
        f"keep the N block weights most hurt by rounding (sensitivity probe) at {KEPT_TYPE}",
        valid=Interval(0, None),
        when=("quant", QUANTIZED),
    )
    context: int = fixed(
        DEFAULT_CONTEXT, "tokens of context (KV cache) llama.cpp is given", Interval(1, None)
    )

    def __post_init__(self) -> None:
        installed = installed_quant_types()
        if self.quant not in installed:
            from slimformer.engines.llamacpp import llama_cpp_version

            raise ValueError(
                f"quant={self.quant}: the installed llama.cpp (llama-cpp-python "
                f"{llama_cpp_version()}) has no such quantization type; it has "
                f"{', '.join(sorted(installed))}"
            )
        if self.quant in FLOAT_TYPES and (self.imatrix or self.keep_sensitive):
            raise ValueError(
                f"imatrix and keep_sensitive apply to quantized types, not {self.quant}"
            )


@register_pass
class LlamaCppPass(Pass):
    name = "runtime.llamacpp"
    summary = "serve a Llama-family decoder through llama.cpp (GGUF, quantized by llama.cpp)"
    config_class = LlamaCppConfig
    phase = Phase.RUNTIME
    group = "runtime"
    terminal = True
    needs_calibration = True
    conflicts = {
        "quantize.dynamic_int8": "GGUF carries float weights; quantize with the quant setting",
        "quantize.static_int8": "GGUF carries float weights; quantize with the quant setting",
        "quantize.weight_only": "GGUF carries float weights; quantize with the quant setting",
        "quantize.smooth": "GGUF carries float weights; quantize with the quant setting",
        "runtime.batching:mode=unpadded": "llama.cpp runs the decoder itself",
        "factorize.lowrank": "llama.cpp's graphs hold one matrix per projection, not a "
        "factorized pair",
    }

    @classmethod
    def normalize(cls, config: LlamaCppConfig) -> LlamaCppConfig:
        # llama.cpp's Q8_0 rounding takes no importance weights: with or without, one model.
        if config.quant == "Q8_0" and config.imatrix:
            return dataclasses.replace(config, imatrix=False)
        return config

    @classmethod
    def applies_to(cls, model: SlimModel) -> bool:
        if gguf_refusal(model) is not None:
            return False
        try:  # not offered where llama-cpp-python is missing or built for another CPU
            installed_quant_types()
        except SlimformerError:
            return False
        return True

    def apply(self, model: SlimModel, config: LlamaCppConfig, ctx: PassContext) -> dict[str, Any]:
        check_gguf_exportable(model)
        watch = Stopwatch()
        reference = EagerReference(model, ctx.calibration)
        folder = tempfile.TemporaryDirectory(prefix="slimformer-llamacpp-")
        try:
            source = Path(folder.name) / "model-f32.gguf"
            layout = write_gguf(model, source)
            resolved: dict[str, Any] = {"architecture": layout.architecture}
            path = source
            if config.quant != "F32":
                path = Path(folder.name) / "model.gguf"
                importance, kept = None, {}
                if config.imatrix:
                    ctx.check_deadline(f"{self.name} (importance matrix)")
                    importance = importance_matrix(model, layout, ctx.calibration)
                if config.keep_sensitive:
                    ctx.check_deadline(f"{self.name} (sensitivity)")
                    kept = _sensitive(model, layout, config, ctx)
                    resolved["kept_sensitive"] = kept
                threads = torch.get_num_threads()
                types = {layout.tensor_names[name]: KEPT_TYPE for name in kept}
                quantize(source, path, config.quant, threads, importance, types)
                source.unlink()
            # F32 quantizes nothing and keeps its KV cache in f32 too: it must reproduce eager
            # logits; the quantized types take llama.cpp's usual f16 cache.
            kv_cache = "f32" if config.quant == "F32" else "f16"
            served = LlamaCppModule(
                model.config, model.head, path, config.quant, config.context, kv_cache, folder
            )
            difference = reference.difference(served, self.name, exact=config.quant == "F32")
        except BaseException:
            folder.cleanup()
            raise
        resolved |= {
            "tensor_types": tensor_types(path),
            "file_mb": round(path.stat().st_size / 2**20, 2),
            "max_abs_difference": round(difference, 6),
            "seconds": watch.seconds(),
        }
        model.module = served
        return resolved


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of the GGUF file are stored in each ggml type."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


@torch.inference_mode()
def importance_matrix(
    model: SlimModel, layout: GgufLayout, calibration: Any
) -> dict[str, np.ndarray]:
    """The mean squared input of each column of each written Linear over the calibration
    tokens (padding left out), by GGUF tensor name: llama-imatrix's statistic."""
    modules = dict(model.module.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[torch.Tensor] = []

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            rows = x[mask[0].bool()] if x.dim() == 3 and mask else x.reshape(-1, x.shape[-1])
            rows = rows.float()
            sums[name] = sums.get(name, 0) + rows.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return record

    with contextlib.ExitStack() as stack:
        for name in layout.tensor_names:
            handle = modules[name].register_forward_hook(hook(name))
            stack.callback(handle.remove)
        for batch in calibration:
            ids = batch["input_ids"]
            mask[:] = [batch.get("attention_mask", torch.ones_like(ids))]
            model(input_ids=ids, attention_mask=mask[0])
    return {
        layout.tensor_names[name]: (sums[name] / counts[name]).numpy()
        for name in layout.tensor_names
        if name in sums
    }


def _proxy_type(quant: str) -> str:
    return "Q4_0" if quant.startswith(("Q4", "Q3", "Q2", "IQ")) else "Q5_0"


def _sensitive(
    model: SlimModel, layout: GgufLayout, config: LlamaCppConfig, ctx: PassContext
) -> dict[str, float]:
    """The `keep_sensitive` block Linears whose rounding alone hurts the output most."""
    import gguf.quants

    kind = getattr(gguf.GGMLQuantizationType, _proxy_type(config.quant))
    block = gguf.GGML_QUANT_SIZES[kind][0]

    def rounded(name: str, linear: nn.Linear) -> nn.Module:
        copy = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None)
        copy.load_state_dict(linear.state_dict())
        if linear.in_features % block == 0:
            weight = linear.weight.detach().float().numpy()
            back = gguf.quants.dequantize(gguf.quants.quantize(weight, kind), kind)
            copy.weight.data = torch.from_numpy(np.ascontiguousarray(back)).to(linear.weight)
        return copy

    names = [n for n in layout.tensor_names if n in set(model.adapter.block_linear_names())]
    return most_sensitive(model, names, config.keep_sensitive, rounded, ctx.calibration)
