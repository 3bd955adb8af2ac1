"""The passes: one technique per module, named after the pass it registers, and the registry.

Each built-in pass module registers its pass (`@register_pass`) when it is imported, and this
package imports every one of them, listed below; so importing `slimformer.passes` (or anything
in it) fills the registry before `get_pass` or `registered_passes` can be called from outside.
A new pass is a new module here, added to the list. The other modules are shared support:
`base` (the pass contract, phases, registry), `settings` (config fields: search spaces, valid
values and their checks), `layer_selection` (scope / skip / keep_sensitive),
`sensitivity`, `importance` and `unit_pruning` (pruning criteria and slicing), `observers`
(calibration statistics), `gptq` (weight quantization math), `lowrank_svd`, `lowrank_allocation`
and `lowrank_timing` (factorization math, rank budgets, GEMM timings) and `serving` (what the
runtime passes share).
"""

from slimformer.passes import (  # noqa: F401  (each registers its pass)
    cast_half,
    factorize_lowrank,
    prune_ffn,
    prune_heads,
    prune_layers,
    quantize_dynamic_int8,
    quantize_smooth,
    quantize_static_int8,
    quantize_weight_only,
    recover_distill,
    reduce_tokens,
    runtime_batching,
    runtime_compiled,
    runtime_llamacpp,
    runtime_onnxruntime,
    runtime_openvino,
)
from slimformer.passes.base import (
    Choice,
    FloatRange,
    IntRange,
    Pass,
    PassContext,
    Phase,
    get_pass,
    register_pass,
    registered_passes,
    searchable,
)

__all__ = [
    "Choice",
    "FloatRange",
    "IntRange",
    "Pass",
    "PassContext",
    "Phase",
    "get_pass",
    "register_pass",
    "registered_passes",
    "searchable",
]
