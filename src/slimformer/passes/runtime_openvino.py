"""`runtime.openvino`: the exported ONNX graph read by OpenVINO, optionally int8 by NNCF's
post-training quantization (calibrated on the task's calibration batches), served by
OpenVINO's CPU plugin (`engines.openvino`).

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
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, Phase, register_pass, searchable
from slimformer.passes.serving import EXPORT_CONFLICTS, EagerReference, Stopwatch

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


@register_pass
class OpenVinoPass(Pass):
    name = "runtime.openvino"
    summary = "serve through OpenVINO (from ONNX), optionally int8 by NNCF"
    config_class = OpenVinoConfig
    phase = Phase.RUNTIME
    group = "runtime"
    terminal = True
    conflicts = EXPORT_CONFLICTS
    needs_calibration = True
    # bf16 runs as f32 without bf16 instructions; NNCF's int8 ran slower than f32 on an AVX2
    # CPU (no VNNI: oneDNN's int8 GEMMs there are not faster than its f32 ones).
    pays_off_only_with = {"precision=bf16": "native_bf16", "int8=nncf": "vnni"}

    def apply(self, model: SlimModel, config: OpenVinoConfig, ctx: PassContext) -> dict[str, Any]:
        import openvino as ov

        check_exportable(model, self.name)
        watch = Stopwatch()
        reference = EagerReference(model, ctx.calibration)
        with tempfile.TemporaryDirectory(prefix="slimformer-openvino-") as tmp:
            path = Path(tmp) / "exported.onnx"
            export_onnx(model, reference.inputs, path)
            ov_model = ov.Core().read_model(str(path))
        resolved: dict[str, Any] = {}
        if config.int8 == "nncf":
            ov_model, resolved["int8_ops"] = self._quantize(ov_model, ctx)
        served = OpenVinoModule(model.config, model.head, ov_model, config.precision)
        exact = config.int8 == "none" and served.precision == "f32"
        difference = reference.difference(served, self.name, exact)
        resolved["precision"] = served.executed_precision()
        if resolved["precision"] != config.precision and not cpu.has_native_bf16():
            resolved["why"] = NO_BF16_WHY
        model.module = served
        return resolved | {"max_abs_difference": round(difference, 6), "seconds": watch.seconds()}

    def _quantize(self, ov_model: Any, ctx: PassContext) -> tuple[Any, int]:
        import logging

        import nncf  # imported here: it takes seconds

        names = [port.get_any_name() for port in ov_model.inputs]

        def feed(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
            ctx.check_deadline(f"{self.name} (NNCF calibration)")
            return {n: batch[n].numpy() for n in names}

        batches = list(ctx.calibration)
        nncf.set_log_level(logging.ERROR)
        # NNCF draws progress bars on stdout, which would break the study's live table.
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantized = nncf.quantize(
                    ov_model,
                    nncf.Dataset(batches, feed),
                    model_type=nncf.ModelType.TRANSFORMER,
                    subset_size=len(batches),
                )
        finally:
            nncf.set_log_level(logging.INFO)
        fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
        return quantized, fake_quantize
