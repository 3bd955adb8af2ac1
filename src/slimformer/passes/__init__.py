"""The pass registry; importing this package registers every built-in pass."""

from slimformer.passes.base import (
    Choice,
    FloatRange,
    IntRange,
    Pass,
    PassContext,
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
    "get_pass",
    "register_pass",
    "registered_passes",
    "searchable",
]


def load_builtin_passes() -> None:
    """Import the modules whose passes register themselves (kept lazy: they import torch.ao)."""
    from slimformer.passes import (  # noqa: F401
        cast,
        distill,
        prune,
        quantize,
        smooth,
        static_int8,
        weight_only,
    )
    from slimformer.runtimes import batching, compiled, onnxruntime, openvino  # noqa: F401
