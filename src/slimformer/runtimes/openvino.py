"""`runtime.openvino`: the exported ONNX graph read by OpenVINO, optionally int8 by NNCF's
post-training quantization (calibrated on the task's calibration batches), served by
OpenVINO's CPU plugin.

The recipe records the float precision the compiled graph actually runs in. bf16 runs only on
CPUs with bf16 instructions: elsewhere OpenVINO itself falls back to f32, and under a forced
oneDNN cap (ONEDNN_MAX_CPU_ISA=AVX2 without OV_CPU_MAX_ISA) the plugin still believes in bf16
while oneDNN refuses it, and compiling fails, so f32 is asked for there instead.
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
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, register_pass, searchable
from slimformer.runtimes.base import EagerReference, ServedModule, Stopwatch, register_served
from slimformer.runtimes.export import EXPORT_CONFLICTS, check_exportable, export_onnx

XML_FILE, BIN_FILE = "model.xml", "model.bin"
NO_BF16_WHY = "no bf16 instructions (AVX-512 BF16 or AMX) on this CPU: OpenVINO runs f32 here"


@register_served
class OpenVinoModule(ServedModule):
    runtime = "openvino"

    def __init__(self, config: Any, head: str, ov_model: Any, precision: str):
        super().__init__(config, head)
        self.ov_model = ov_model
        self.precision = runnable_precision(precision)
        self._compiled: Any = None

    def compiled(self) -> Any:
        """Compiled on first use so it takes the thread count set for measurement."""
        if self._compiled is None:
            import openvino as ov

            self._compiled = ov.Core().compile_model(
                self.ov_model,
                "CPU",
                {
                    "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                    # Set explicitly: on CPUs with bf16 instructions the default is bf16.
                    "INFERENCE_PRECISION_HINT": self.precision,
                },
            )
        return self._compiled

    def executed_precision(self) -> str:
        """The float precision the compiled graph's layers run in, read from its execution
        graph: bf16 if any layer runs bf16, else f32 (int8 layers run int8 either way)."""
        layers = self.compiled().get_runtime_model().get_ops()
        ran = {layer.get_rt_info()["runtimePrecision"].astype(str) for layer in layers}
        return "bf16" if "bf16" in ran else "f32"

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        request = self.compiled()
        result = request({n: t.numpy() for n, t in inputs.items()})
        return torch.from_numpy(result[request.output(0)].copy())

    def __deepcopy__(self, memo: dict) -> OpenVinoModule:
        return OpenVinoModule(self.config, self.head, self.ov_model, self.precision)

    def save_artifacts(self, folder: Path) -> dict[str, Any]:
        import openvino as ov

        # fp32 weights on disk: int8 layers stay int8; float ones are not rounded to fp16.
        ov.save_model(self.ov_model, str(folder / XML_FILE), compress_to_fp16=False)
        return {"files": [XML_FILE, BIN_FILE], "precision": self.precision}

    @classmethod
    def load_artifacts(
        cls, folder: Path, meta: dict[str, Any], config: Any, head: str, module: Any = None
    ) -> OpenVinoModule:
        import openvino as ov

        return cls(config, head, ov.Core().read_model(str(folder / XML_FILE)), meta["precision"])


def runnable_precision(precision: str) -> str:
    """`precision`, or f32 for bf16 on a CPU without bf16 instructions (see the module doc)."""
    return "f32" if precision == "bf16" and not cpu.has_native_bf16() else precision


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
    stage = 50
    group = "runtime"
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
            ov_model, resolved["int8_ops"] = self._quantize(ov_model, model.head, ctx.calibration)
        served = OpenVinoModule(model.config, model.head, ov_model, config.precision)
        exact = config.int8 == "none" and served.precision == "f32"
        difference = reference.difference(served, self.name, exact)
        resolved["precision"] = served.executed_precision()
        if resolved["precision"] != config.precision and not cpu.has_native_bf16():
            resolved["why"] = NO_BF16_WHY
        model.module = served
        return resolved | {"max_abs_difference": round(difference, 6), "seconds": watch.seconds()}

    @staticmethod
    def _quantize(ov_model: Any, head: str, calibration: Any) -> tuple[Any, int]:
        import logging

        import nncf  # imported here: it takes seconds

        names = [port.get_any_name() for port in ov_model.inputs]

        def feed(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
            return {n: batch[n].numpy() for n in names}

        batches = list(calibration)
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
