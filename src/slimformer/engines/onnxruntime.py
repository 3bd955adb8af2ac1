"""A model served by ONNX Runtime: an ONNX file run by a CPU `InferenceSession`.

int8 and the CPU: ONNX Runtime multiplies uint8 activations by int8 weights. Without VNNI
(AVX2 CPUs, AVX-512 ones before Cascade Lake) its kernels add each pair of neighbouring
products with VPMADDUBSW in saturating 16-bit arithmetic (255 × 127 × 2 = 64,770 > 32,767).
Where the effective instruction sets (`slimformer.cpu`) lack VNNI, sessions ask for
`session.x64quantprecision`, so a model quantized to 8 bits on a VNNI CPU runs exact (uint8
weights, about as slow as fp32) rather than clipped.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from slimformer import cpu
from slimformer.engines.base import ServedModule, register_served

ONNX_FILE = "model.onnx"
# Makes ONNX Runtime turn int8 weights outside the 7-bit range into uint8 (its exact uint8×uint8
# kernels) on x86 CPUs whose uint8×int8 kernels saturate; it also acts on VNNI CPUs, where
# nothing saturates, so it is set only where VNNI is missing.
EXACT_INT8_ON_SATURATING_CPUS = "session.x64quantprecision"


@register_served
class OnnxRuntimeModule(ServedModule):
    runtime = "onnxruntime"

    def __init__(
        self,
        config: Any,
        head: str,
        onnx_path: Path,
        keep: tempfile.TemporaryDirectory | None = None,
    ):
        super().__init__(config, head)
        self.onnx_path = onnx_path
        self._keep = keep  # owns the temporary folder of a model not saved yet
        self._session: Any = None

    def session(self) -> Any:
        """Created on first use so it takes the thread count set for measurement."""
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if not cpu.has_vnni():
                options.add_session_config_entry(EXACT_INT8_ON_SATURATING_CPUS, "1")
            self._session = ort.InferenceSession(
                str(self.onnx_path), options, providers=["CPUExecutionProvider"]
            )
        return self._session

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {n: t.numpy() for n, t in inputs.items()}
        return torch.from_numpy(self.session().run(["output"], feed)[0])

    def __deepcopy__(self, memo: dict) -> OnnxRuntimeModule:
        # The file is immutable once written; copies share it (and its temporary owner).
        return OnnxRuntimeModule(self.config, self.head, self.onnx_path, self._keep)

    def save_artifacts(self, folder: Path) -> dict[str, Any]:
        shutil.copyfile(self.onnx_path, folder / ONNX_FILE)
        return {"files": [ONNX_FILE]}

    @classmethod
    def load_artifacts(
        cls, folder: Path, meta: dict[str, Any], config: Any, head: str, module: Any = None
    ) -> OnnxRuntimeModule:
        return cls(config, head, folder / ONNX_FILE)
