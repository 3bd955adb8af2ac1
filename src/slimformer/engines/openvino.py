"""A model served by OpenVINO's CPU plugin (read from ONNX, possibly int8 by NNCF).

bf16 runs only on CPUs with bf16 instructions: elsewhere OpenVINO itself falls back to f32, and
under a forced oneDNN cap (ONEDNN_MAX_CPU_ISA=AVX2 without OV_CPU_MAX_ISA) the plugin still
believes in bf16 while oneDNN refuses it, and compiling fails, so f32 is asked for there instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimformer import cpu
from slimformer.engines.base import ServedModule, register_served

XML_FILE, BIN_FILE = "model.xml", "model.bin"


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
