"""A model served by OpenVINO's CPU plugin (read from ONNX, or a decoder converted with its KV
cache as state; possibly int8 or int4 by NNCF).

A stateful decoder (`engines.openvino_stateful`) serves both full forward passes (perplexity,
prefill: the state is reset before each) and KV-cached generation: a call with
`use_cache=True` starts a generation in the module's cache request and returns an
`OpenVinoCache` as `past_key_values`; a call given that handle continues it.

bf16 runs only on CPUs with bf16 instructions: elsewhere OpenVINO itself falls back to f32, and
under a forced oneDNN cap (ONEDNN_MAX_CPU_ISA=AVX2 without OV_CPU_MAX_ISA) the plugin still
believes in bf16 while oneDNN refuses it, and compiling fails, so f32 is asked for there instead.

`snippets` is the CPU plugin's SNIPPETS_MODE: on (OpenVINO's default), attention and chains of
element-wise ops run as kernels the plugin generates for the graph; off, as separate oneDNN
primitives. Which is faster depends on the CPU and the input lengths, so it is a searched
setting of `runtime.openvino`, recorded with the model and applied when it is compiled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from slimformer import cpu
from slimformer.engines.base import ServedModule, register_served
from slimformer.engines.openvino_stateful import (
    INPUTS,
    OUTPUT,
    CacheSession,
    OpenVinoCache,
    is_stateful,
)
from slimformer.errors import SlimformerError

XML_FILE, BIN_FILE = "model.xml", "model.bin"


def _cap_plugin_like_onednn() -> None:
    """Under a forced oneDNN cap without OV_CPU_MAX_ISA, the plugin picks kernels for the
    CPU's own ISA that oneDNN then refuses: compressed-weight (int8/int4) layers fail to
    compile. The plugin reads its cap when it first compiles, so it is set at import to the
    one oneDNN obeys (the same names)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if cap and "OV_CPU_MAX_ISA" not in os.environ:
        os.environ["OV_CPU_MAX_ISA"] = cap


_cap_plugin_like_onednn()


@register_served
class OpenVinoModule(ServedModule):
    runtime = "openvino"

    def __init__(
        self, config: Any, head: str, ov_model: Any, precision: str, snippets: bool = True
    ):
        super().__init__(config, head)
        self.ov_model = ov_model
        self.precision = runnable_precision(precision)
        self.snippets = snippets
        self.stateful = is_stateful(ov_model)
        self._compiled: Any = None
        self._full: Any = None  # the request for full forward passes (stateful models)
        self._session: CacheSession | None = None  # the request holding a generation's cache

    @property
    def supports_kv_cache(self) -> bool:  # type: ignore[override]
        return self.stateful

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
                    "SNIPPETS_MODE": "ENABLE" if self.snippets else "DISABLE",
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
        if self.stateful:  # a full pass: from an empty cache, in its own request
            if self._full is None:
                self._full = self.compiled().create_infer_request()
            self._full.reset_state()
            ids = inputs["input_ids"]
            feed = _feed(ids, inputs["attention_mask"], _positions(ids, 0))
            return torch.from_numpy(self._full.infer(feed)[OUTPUT].copy())
        request = self.compiled()
        result = request({n: t.numpy() for n, t in inputs.items()})
        return torch.from_numpy(result[request.output(0)].copy())

    def forward(self, **inputs: Any) -> Any:
        past = inputs.get("past_key_values")
        if not self.stateful or (past is None and not inputs.get("use_cache")):
            return super().forward(**inputs)
        ids = inputs.get("input_ids")
        if ids is None:
            raise SlimformerError("openvino model needs input(s) input_ids")
        ids = ids.detach().cpu()
        if past is None:
            if self._session is None:
                self._session = CacheSession(self.compiled().create_infer_request())
            self._session.start()
            session, start = self._session, 0
        else:
            if not isinstance(past, OpenVinoCache) or past.session is not self._session:
                raise SlimformerError(
                    "past_key_values for an OpenVINO model must be the one it returned "
                    f"(got {type(past).__name__}); start generation with use_cache=True"
                )
            past.check_current()
            session, start = past.session, past.length
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(ids.shape[0], start + ids.shape[1], dtype=torch.long)
        elif mask.shape != (ids.shape[0], start + ids.shape[1]):
            raise SlimformerError(
                f"attention_mask must cover the cached and the new tokens, shape "
                f"({ids.shape[0]}, {start + ids.shape[1]}); got {tuple(mask.shape)}"
            )
        positions = inputs.get("position_ids")
        if positions is None:
            positions = _positions(ids, start)
        logits = session.run(_feed(ids, mask.detach().cpu(), positions), ids.shape[1])
        return CausalLMOutputWithPast(
            logits=torch.from_numpy(logits.copy()),
            past_key_values=OpenVinoCache(session, start + ids.shape[1]),
        )

    def __deepcopy__(self, memo: dict) -> OpenVinoModule:
        return OpenVinoModule(self.config, self.head, self.ov_model, self.precision, self.snippets)

    def save_artifacts(self, folder: Path) -> dict[str, Any]:
        import openvino as ov

        # fp32 weights on disk: int8 layers stay int8; float ones are not rounded to fp16.
        ov.save_model(self.ov_model, str(folder / XML_FILE), compress_to_fp16=False)
        return {
            "files": [XML_FILE, BIN_FILE],
            "precision": self.precision,
            "snippets": self.snippets,
            "kv_cache": self.stateful,
        }

    @classmethod
    def load_artifacts(
        cls, folder: Path, meta: dict[str, Any], config: Any, head: str, module: Any = None
    ) -> OpenVinoModule:
        import openvino as ov

        graph = ov.Core().read_model(str(folder / XML_FILE))
        # Saved before the setting existed: OpenVINO's default, as they were measured.
        return cls(config, head, graph, meta["precision"], meta.get("snippets", True))


def runnable_precision(precision: str) -> str:
    """`precision`, or f32 for bf16 on a CPU without bf16 instructions (see the module doc)."""
    return "f32" if precision == "bf16" and not cpu.has_native_bf16() else precision


def _positions(ids: torch.Tensor, start: int) -> torch.Tensor:
    """Positions of the new tokens after `start` cached ones (as eager Llama numbers them
    without position_ids: padding does not shift them)."""
    return torch.arange(start, start + ids.shape[1]).expand(ids.shape[0], -1)


def _feed(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> dict[str, Any]:
    tensors = zip(INPUTS, (ids, mask, positions), strict=True)
    return {name: t.to(torch.long).contiguous().numpy() for name, t in tensors}
