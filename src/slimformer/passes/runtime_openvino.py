"""`runtime.openvino`: the model served by OpenVINO's CPU plugin (`engines.openvino`).

Encoders go through the exported ONNX graph; decoders are converted from PyTorch with their
KV cache as model state (`engines.openvino_stateful`), so they generate token by token inside
OpenVINO. Either may then be compressed by NNCF: `int8=nncf` quantizes weights and activations
(post-training quantization on the task's calibration batches); `weights=...` compresses
weights only (int8, or int4 with int8 for the layers kept back: groups, ratio, AWQ and scale
estimation on the calibration batches), the way OpenVINO GenAI serves LLMs.

The recipe records the float precision the compiled graph actually runs in: bf16 runs only on
CPUs with bf16 instructions (see `engines.openvino`).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimformer import cpu
from slimformer.engines.export import check_exportable, export_onnx
from slimformer.engines.openvino import OpenVinoModule
from slimformer.engines.openvino_stateful import export_stateful
from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    FloatRange,
    Interval,
    Pass,
    PassContext,
    Phase,
    register_pass,
    searchable,
)
from slimformer.passes.serving import (
    EXPORT_CONFLICTS,
    EagerReference,
    Stopwatch,
    export_conflicts_for,
)

WEIGHT_MODES = ("none", "int8_sym", "int8_asym", "int4_sym", "int4_asym")
INT4_MODES = ("int4_sym", "int4_asym")
# The int4-only settings and their defaults: any other value with int8 or no weight
# compression is refused rather than ignored.
INT4_DEFAULTS = {"group_size": 128, "ratio": 1.0, "awq": False, "scale_estimation": False}

NO_BF16_WHY = "no bf16 instructions (AVX-512 BF16 or AMX) on this CPU: OpenVINO runs f32 here"


@dataclass(frozen=True)
class OpenVinoConfig:
    int8: str = searchable(
        "none",
        Choice(("none", "nncf")),
        "nncf: int8 weights and activations by NNCF post-training quantization",
    )
    precision: str = searchable(
        "f32",
        Choice(("f32", "bf16")),
        "float math in f32, or bf16 (fast only on CPUs with bf16 instructions)",
    )
    snippets: bool = searchable(
        True,
        Choice((True, False)),
        "attention and element-wise chains as kernels OpenVINO generates (its default), or "
        "as separate oneDNN primitives (off: faster int8 on an AMX Xeon, the same under AVX2)",
        faster_depends_on_cpu=True,
    )
    weights: str = searchable(
        "none",
        Choice(WEIGHT_MODES),
        "weight-only compression by NNCF (activations stay float): int8 or int4, symmetric "
        "or asymmetric (zero point)",
        when=("int8", ("none",)),
    )
    group_size: int = searchable(
        128,
        Choice((32, 64, 128, -1)),
        "int4: weights sharing one scale along the input axis (-1: one per output channel); "
        "a layer whose inputs it does not divide gets the largest power of two that does",
        when=("weights", INT4_MODES),
    )
    ratio: float = searchable(
        1.0,
        FloatRange(0.6, 1.0, step=0.1),
        "int4: fraction of the block weights (by count) in int4, the rest int8 (the layers "
        "NNCF ranks most sensitive on the calibration data stay int8)",
        valid=Interval(0, 1, open_low=True),
        when=("weights", INT4_MODES),
    )
    awq: bool = searchable(
        False,
        Choice((False, True)),
        "int4: AWQ, rescaling weight channels by calibration activations before rounding",
        when=("weights", INT4_MODES),
    )
    scale_estimation: bool = searchable(
        False,
        Choice((False, True)),
        "int4: fit each group's scale to minimize the layer's output error on calibration data",
        when=("weights", INT4_MODES),
    )

    def __post_init__(self) -> None:
        if self.int8 == "nncf" and self.weights != "none":
            raise ValueError(
                f"int8=nncf already makes weights and activations int8; weights={self.weights} "
                "compresses weights only — choose one"
            )
        if self.weights not in INT4_MODES:
            for name, default in INT4_DEFAULTS.items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)} applies to int4 weights only "
                        f"(weights={self.weights}); drop it or choose weights=int4_sym or "
                        "int4_asym"
                    )
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")


@register_pass
class OpenVinoPass(Pass):
    name = "runtime.openvino"
    summary = (
        "serve through OpenVINO (decoders with a stateful KV cache), optionally int8 or int4 "
        "by NNCF"
    )
    config_class = OpenVinoConfig
    phase = Phase.RUNTIME
    group = "runtime"
    terminal = True
    conflicts = EXPORT_CONFLICTS

    @classmethod
    def conflicts_for(cls, facts: Any) -> dict[str, str]:
        return export_conflicts_for(facts)

    needs_calibration = True
    # bf16 runs as f32 without bf16 instructions; NNCF's int8 ran slower than f32 on an AVX2
    # CPU (no VNNI: oneDNN's int8 GEMMs there are not faster than its f32 ones).
    pays_off_only_with = {"precision=bf16": "native_bf16", "int8=nncf": "vnni"}

    def apply(self, model: SlimModel, config: OpenVinoConfig, ctx: PassContext) -> dict[str, Any]:
        import openvino as ov

        check_exportable(model, self.name)
        watch = Stopwatch()
        reference = EagerReference(model, ctx.calibration)
        if model.head == "causal-lm":
            ov_model = export_stateful(model, reference.inputs["input_ids"])
        else:
            with tempfile.TemporaryDirectory(prefix="slimformer-openvino-") as tmp:
                path = Path(tmp) / "exported.onnx"
                export_onnx(model, reference.inputs, path)
                ov_model = ov.Core().read_model(str(path))
        resolved: dict[str, Any] = {}
        if config.int8 == "nncf":
            ov_model, resolved["int8_ops"] = self._quantize(ov_model, model.head, ctx)
        if config.weights != "none":
            ov_model = self._compress_weights(ov_model, config, model.head, ctx)
            resolved["compressed_weights"] = compressed_weights(ov_model)
        served = OpenVinoModule(
            model.config, model.head, ov_model, config.precision, config.snippets
        )
        exact = config.int8 == "none" and config.weights == "none" and served.precision == "f32"
        difference = reference.difference(served, self.name, exact)
        resolved["precision"] = served.executed_precision()
        if resolved["precision"] != config.precision and not cpu.has_native_bf16():
            resolved["why"] = NO_BF16_WHY
        model.module = served
        return resolved | {"max_abs_difference": round(difference, 6), "seconds": watch.seconds()}

    def _samples(self, ov_model: Any, head: str, ctx: PassContext) -> Any:
        """The calibration batches as NNCF feeds the graph: decoders one unpadded row at a
        time with its positions (the stateful graph's inputs), others batch by batch."""
        import nncf

        names = [port.get_any_name() for port in ov_model.inputs]
        batches = list(ctx.calibration)
        if head == "causal-lm":
            rows = []
            for batch in batches:
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
                for ids, keep in zip(batch["input_ids"], mask.bool(), strict=True):
                    rows.append({"input_ids": ids[keep][None]})
            batches = rows

        def feed(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
            ctx.check_deadline(f"{self.name} (NNCF calibration)")
            if head == "causal-lm":
                ids = batch["input_ids"]
                batch = {
                    "input_ids": ids,
                    "attention_mask": torch.ones_like(ids),
                    "position_ids": torch.arange(ids.shape[1])[None],
                }
            return {n: batch[n].numpy() for n in names}

        return nncf.Dataset(batches, feed), len(batches)

    def _quantize(self, ov_model: Any, head: str, ctx: PassContext) -> tuple[Any, int]:
        import nncf  # imported here: it takes seconds

        dataset, size = self._samples(ov_model, head, ctx)
        with _quiet_nncf():
            quantized = nncf.quantize(
                ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=size
            )
        fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
        return quantized, fake_quantize

    def _compress_weights(
        self, ov_model: Any, config: OpenVinoConfig, head: str, ctx: PassContext
    ) -> Any:
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedCompressionParameters,
            GroupSizeFallbackMode,
        )

        mode = nncf.CompressWeightsMode[config.weights.upper()]
        if config.weights not in INT4_MODES:
            with _quiet_nncf():
                return nncf.compress_weights(ov_model, mode=mode)
        # Calibration data only where an algorithm reads activations: the int4/int8 split
        # (ranked by activation-weighted sensitivity), AWQ, scale estimation.
        data_aware = config.ratio < 1 or config.awq or config.scale_estimation
        dataset, size = self._samples(ov_model, head, ctx) if data_aware else (None, 0)
        try:
            with _quiet_nncf():
                return nncf.compress_weights(
                    ov_model,
                    mode=mode,
                    group_size=config.group_size,
                    ratio=config.ratio,
                    dataset=dataset,
                    subset_size=max(1, size),
                    awq=config.awq,
                    scale_estimation=config.scale_estimation,
                    advanced_parameters=AdvancedCompressionParameters(
                        group_size_fallback_mode=GroupSizeFallbackMode.ADJUST
                    ),
                )
        except (  # NNCF's own refusals (a setting this model cannot take)
            nncf.errors.ValidationError,
            nncf.errors.ParameterNotSupportedError,
            nncf.errors.InvalidGroupSizeError,
            nncf.errors.UnsupportedModelError,
        ) as error:
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            raise SlimformerError(
                f"{self.name}: NNCF refused the weight compression: {first}"
            ) from None


def compressed_weights(ov_model: Any) -> dict[str, int]:
    """How many weight matrices the graph holds in each integer type (int4 / int8)."""
    counts: dict[str, int] = {}
    for op in ov_model.get_ops():
        shape = op.get_output_partial_shape(0)
        # Rank 2 or more and not a zero point (one per row or group: last axis 1).
        if op.get_type_name() != "Constant" or len(shape) < 2 or shape[-1].get_length() == 1:
            continue
        kind = {"u4": "int4", "i4": "int4", "u8": "int8", "i8": "int8"}.get(
            op.get_output_element_type(0).get_type_name()
        )
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


@contextlib.contextmanager
def _quiet_nncf() -> Any:
    """NNCF logs at INFO and draws progress bars on stdout, which would break the study's
    live table."""
    import logging

    import nncf

    nncf.set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf.set_log_level(logging.INFO)
