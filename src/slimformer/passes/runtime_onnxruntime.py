"""`runtime.onnxruntime`: export to ONNX, apply ONNX Runtime's transformer fusions, optionally
quantize to int8 inside ONNX Runtime, and serve the result (`engines.onnxruntime`).

This is the recipe Optimum runs (`optimum-cli export onnx` + `ORTOptimizer` + `ORTQuantizer`
dynamic int8), done with onnxruntime directly because Optimum's exporter pins an older
transformers. The fusions actually applied are counted and recorded in the recipe; which
families ONNX Runtime's optimizer knows is each adapter's `onnx_optimizer_type`.

int8 and the CPU: without VNNI, ONNX Runtime's uint8×int8 kernels sum pairs of products in
saturating 16-bit arithmetic, so where the effective instruction sets (`slimformer.cpu`) lack
VNNI weights are quantized to 7 bits (`reduce_range`, ONNX Runtime's advice: 255 × 64 × 2 fits);
the served module takes care of models quantized to 8 bits elsewhere.
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimformer import cpu
from slimformer.engines.export import check_exportable, export_onnx
from slimformer.engines.onnxruntime import ONNX_FILE, OnnxRuntimeModule
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    Pass,
    PassContext,
    Phase,
    fixed,
    register_pass,
    searchable,
)
from slimformer.passes.serving import (
    EXPORT_CONFLICTS,
    EagerReference,
    Stopwatch,
    export_conflicts_for,
)
from slimformer.tokens import traced_for_onnxruntime

INTERESTING_OPS = ("Attention", "MatMulInteger", "DynamicQuantizeLinear", "MatMul", "QAttention")
REDUCE_RANGE_WHY = (
    "no VNNI on this CPU: ONNX Runtime's uint8×int8 kernels sum pairs of products in "
    "saturating 16-bit arithmetic (VPMADDUBSW); 7-bit weights keep every pair in range"
)


@dataclass(frozen=True)
class OnnxRuntimeConfig:
    optimize: bool = searchable(
        True,
        Choice((True, False)),
        "ONNX Runtime's transformer optimizer: fused Attention, LayerNorm, GELU",
    )
    int8: str = searchable(
        "none",
        Choice(("none", "dynamic")),
        "dynamic: int8 weights, activations quantized per batch (MatMulInteger, QAttention)",
    )
    # Measured on all-MiniLM-L6-v2: embedding fidelity 0.992 per channel, 0.957 per tensor, at
    # the same speed; with the 7-bit weights of CPUs without VNNI, 0.990 against 0.864.
    per_channel: bool = fixed(True, "int8: a weight scale per output channel (else one per tensor)")


def _uniform_heads(model: SlimModel) -> int:
    """Heads per layer if every layer has the same count (after pruning), else 0 (unknown)."""
    adapter = model.adapter
    head_dim = adapter.head_dim()
    counts = {
        adapter.attention_linears(i)["query"].out_features // head_dim
        for i in range(adapter.num_layers)
    }
    return counts.pop() if len(counts) == 1 else 0


def _node_counts(path: Path) -> dict[str, int]:
    import onnx

    counts = Counter(
        node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node
    )
    return {op: counts[op] for op in INTERESTING_OPS if counts[op]}


@register_pass
class OnnxRuntimePass(Pass):
    name = "runtime.onnxruntime"
    summary = "serve through ONNX Runtime: export, transformer fusions, optional int8 inside ORT"
    config_class = OnnxRuntimeConfig
    phase = Phase.RUNTIME
    group = "runtime"
    terminal = True
    conflicts = EXPORT_CONFLICTS

    @classmethod
    def conflicts_for(cls, facts: Any) -> dict[str, str]:
        return export_conflicts_for(facts)

    needs_calibration = True  # a real batch to trace and to check outputs against eager

    def apply(
        self, model: SlimModel, config: OnnxRuntimeConfig, ctx: PassContext
    ) -> dict[str, Any]:
        check_exportable(model, self.name)
        watch = Stopwatch()
        reference = EagerReference(model, ctx.calibration)
        keep = tempfile.TemporaryDirectory(prefix="slimformer-onnx-")
        folder = Path(keep.name)
        with traced_for_onnxruntime():
            export_onnx(model, reference.inputs, folder / "exported.onnx")
        current = folder / "exported.onnx"
        resolved: dict[str, Any] = {}
        model_type = model.adapter.onnx_optimizer_type
        if config.optimize and model_type:
            current, resolved["fusions"] = self._optimize(model, model_type, current, folder)
        elif config.optimize:
            resolved["fusions"] = (
                f"none: ONNX Runtime's optimizer has no {model.adapter.family} patterns"
            )
        if config.int8 == "dynamic":
            reduce_range = not cpu.has_vnni()
            current = self._quantize_dynamic(current, folder, config.per_channel, reduce_range)
            resolved["reduce_range"] = reduce_range
            if reduce_range:
                resolved["why"] = REDUCE_RANGE_WHY
        final = folder / ONNX_FILE
        current.replace(final)
        for leftover in folder.glob("*.onnx"):
            if leftover != final:
                leftover.unlink()
        served = OnnxRuntimeModule(model.config, model.head, final, keep)
        exact = config.int8 == "none"
        difference = reference.difference(served, self.name, exact, " (try optimize=false)")
        model.module = served
        return resolved | {
            "ops": _node_counts(final),
            "onnx_mb": round(final.stat().st_size / 2**20, 2),
            "max_abs_difference": round(difference, 6),
            "seconds": watch.seconds(),
        }

    @staticmethod
    def _optimize(
        model: SlimModel, model_type: str, source: Path, folder: Path
    ) -> tuple[Path, dict]:
        from onnxruntime.transformers.optimizer import optimize_model

        heads = _uniform_heads(model)
        logging.disable(logging.WARNING)  # the optimizer logs every pattern it did not find
        try:
            optimized = optimize_model(
                str(source),
                model_type=model_type,
                num_heads=heads,
                # The attention's width, not the model's: 9 heads pruned from 12 attend over
                # 9 x 32 = 288 values, and 384 would fail the optimizer's divisibility check.
                hidden_size=heads * model.adapter.head_dim(),
                opt_level=0,  # only the transformer fusions; the session applies the rest
            )
        finally:
            logging.disable(logging.NOTSET)
        fusions = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
        target = folder / "optimized.onnx"
        optimized.save_model_to_file(str(target))
        return target, fusions

    @staticmethod
    def _quantize_dynamic(
        source: Path, folder: Path, per_channel: bool, reduce_range: bool
    ) -> Path:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target = folder / "quantized.onnx"
        # ONNX Runtime's per-channel int8 MatMul takes a matrix as its weight; a MatMul against a
        # stack of per-head matrices (token pruning's class-token scores: the key projection
        # folded into heads) quantizes but then fails at run time ("b zero point is not
        # valid"). Those stay float; they are a sliver of the work.
        stacked = _matmuls_with_stacked_weights(onnx.load(str(source))) if per_channel else []
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(
                str(source),
                str(target),
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                reduce_range=reduce_range,
                nodes_to_exclude=stacked,
                # Fused graphs (Attention, SkipLayerNorm) carry no type info for the quantizer.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        finally:
            logging.disable(logging.NOTSET)
        return target


def _matmuls_with_stacked_weights(graph_model: Any) -> list[str]:
    """The MatMul nodes whose weight (second input) is a constant of more than two dimensions."""
    stacked = {i.name for i in graph_model.graph.initializer if len(i.dims) > 2}
    return [
        node.name
        for node in graph_model.graph.node
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in stacked
    ]
