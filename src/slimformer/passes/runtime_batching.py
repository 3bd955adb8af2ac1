"""`runtime.batching`: how a batch of variable-length inputs is formed and run.

- `padded`: inputs batched in arrival order, each batch padded to its longest input (what a
  Hugging Face pipeline does);
- `bucketed`: inputs sorted by length first, so each batch pads little (what
  sentence-transformers' `encode` does) — the default everywhere;
- `unpadded`: arrival order, and the model runs on real tokens only (ByteTransformer's
  padding-free transformer, `engines.unpadded`).

`unpadded` needs the PyTorch runtime and a post-norm encoder (BERT family, embedding head);
ONNX Runtime and OpenVINO take `padded` or `bucketed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimformer.engines.unpadded import UnpaddedEncoder
from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.base import Choice, Pass, PassContext, Phase, register_pass, searchable
from slimformer.tokens import installed

BATCHING = ("padded", "bucketed", "unpadded")


@dataclass(frozen=True)
class BatchingConfig:
    mode: str = searchable(
        "bucketed",
        Choice(BATCHING),
        "padded: arrival order, pad to the longest; bucketed: sort by length first; "
        "unpadded: arrival order, compute on real tokens only",
    )


def check_unpadded_supported(model: SlimModel) -> None:
    if model.head != "embedding":
        raise SlimformerError(
            f"runtime.batching mode=unpadded serves embedding models; this one is {model.head}"
        )
    if installed(model.module) is not None:
        raise SlimformerError(
            "runtime.batching mode=unpadded runs the blocks its own way and would skip the "
            "model's token reduction (reduce.tokens); use mode=bucketed"
        )
    try:
        model.adapter.post_norm_block(0)
    except NotImplementedError:
        raise SlimformerError(
            f"runtime.batching mode=unpadded is implemented for BERT-family encoders, not "
            f"{model.adapter.family}"
        ) from None


@register_pass
class BatchingPass(Pass):
    name = "runtime.batching"
    summary = "padded, length-bucketed or padding-free (unpadded) batches of real inputs"
    config_class = BatchingConfig
    phase = Phase.BATCHING  # before a runtime pass (ORT/OpenVINO refuse an unpadded model)

    @classmethod
    def applies_to(cls, model: SlimModel) -> bool:
        # Only embedding inputs vary in length here: decoders are timed on fixed windows.
        try:
            check_unpadded_supported(model)
        except SlimformerError:
            return False
        return True

    def apply(self, model: SlimModel, config: BatchingConfig, ctx: PassContext) -> dict[str, Any]:
        if config.mode == "unpadded":
            check_unpadded_supported(model)
            model.module = UnpaddedEncoder(model.module, model.head)
        model.batching = config.mode
        return {}
