"""A decoder served by llama.cpp (through llama-cpp-python's bindings of its C API) from a GGUF
file: full forward passes with the logits of every position (perplexity), and KV-cached
generation in the same context, like `engines.openvino`'s stateful decoders.

The C API is used rather than the binding's `Llama` class: `Llama(logits_all=True)` keeps a
context-by-vocabulary float buffer (400 MB for SmolLM2 at 2048 tokens), which would count in
every memory measurement, and it cannot place tokens at chosen positions, which a padded batch
needs to match eager PyTorch (positions are not shifted by padding).

llama-cpp-python is built from source on the machine (`make`'s environment, -march=native), so
its library may use instructions another CPU lacks: `library()` compares the instruction sets
it was compiled with against this CPU's and refuses with a rebuild hint rather than crash on an
illegal instruction. A library compiled with llama.cpp's AMX backend (-march=native on a Xeon
with AMX) is used without its extra weight buffers: that backend's quantized matmul segfaults
on some machines (llama.cpp#20824; q8_0 here on a 2-core AMX Xeon), so `make` builds without it.
"""

from __future__ import annotations

import ctypes
import shutil
import weakref
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from slimformer import cpu
from slimformer.engines.base import ServedModule, register_served
from slimformer.errors import SlimformerError

GGUF_FILE = "model.gguf"
DEFAULT_CONTEXT = 2048  # tokens of context (KV cache) a served model is given unless told
INSTALL_HINT = (
    "install it with `make test` (or: CMAKE_ARGS='-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF "
    "-DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8' pip install -c "
    "constraints.txt --no-binary llama-cpp-python --no-cache-dir llama-cpp-python)"
)
# llama.cpp's names for the instruction sets its CPU backend was compiled with -> Linux's.
_BUILD_FLAGS = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}
_ERROR_LEVEL = 4  # GGML_LOG_LEVEL_ERROR (ggml.h; the binding's own logger says 3, an older enum)
_errors: deque[str] = deque(maxlen=8)
_state: dict[str, Any] = {}


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _log(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp logs every load and quantization at length on stderr; only its errors are
    kept, for the message of the SlimformerError that follows them."""
    if level == _ERROR_LEVEL and text:
        _errors.append(text.decode("utf-8", "replace").strip())


def last_errors() -> str:
    text = " ".join(e for e in _errors if e)
    _errors.clear()
    return f": {text[:300]}" if text else ""


def library() -> Any:
    """The `llama_cpp` module, checked against this CPU, its logging captured, the backend
    initialized (once per process)."""
    if "lib" in _state:
        return _state["lib"]
    try:
        import llama_cpp
    except ImportError:
        raise SlimformerError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from None
    missing = missing_instructions(llama_cpp.llama_print_system_info().decode(), cpu.cpu_flags())
    if missing:
        raise SlimformerError(
            f"llama-cpp-python was built for a CPU with {', '.join(missing)}, which this one "
            f"lacks; rebuild it on this machine: {INSTALL_HINT}"
        )
    llama_cpp.llama_log_set(_log, None)
    llama_cpp.llama_backend_init()
    _state["lib"] = llama_cpp
    return llama_cpp


def built_instructions(system_info: str) -> list[str]:
    """The instruction sets llama.cpp's CPU backend was compiled with, from its system info
    (e.g. "CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 |")."""
    built = []
    for part in system_info.split("|"):
        name, _, value = part.rpartition(":")[2].partition("=")
        if value.strip() == "1" and name.strip() in _BUILD_FLAGS:
            built.append(name.strip())
    return built


def missing_instructions(system_info: str, flags: set[str]) -> list[str]:
    """Instruction sets the library was compiled with that the CPU's flags lack; none when
    the flags are unknown (not Linux)."""
    if not flags:
        return []
    return [name for name in built_instructions(system_info) if _BUILD_FLAGS[name] not in flags]


def model_params(lib: Any) -> Any:
    """llama.cpp's default model parameters, without the extra (repacked) weight buffers when
    the library was built with the AMX backend, whose quantized matmul can segfault
    (llama.cpp#20824): a crash would take the whole study down, a slower matmul does not."""
    params = lib.llama_model_default_params()
    if "AMX_INT8" in built_instructions(lib.llama_print_system_info().decode()):
        params.use_extra_bufts = False
    return params


def llama_cpp_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:  # not installed
        return "not installed"


def installed_quant_types() -> dict[str, int]:
    """The file types the installed llama.cpp can quantize to, by llama.cpp's names (Q8_0,
    Q4_K_M, F16, F32, ...) -> its enum value."""
    lib = library()
    types = {}
    for attr in dir(lib):
        if attr.startswith(("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_")):
            types[attr.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_ALL_")] = (
                getattr(lib, attr)
            )
    return types


def quantize(
    source: Path,
    target: Path,
    quant: str,
    threads: int,
    importance: dict[str, np.ndarray] | None = None,
    tensor_types: dict[str, str] | None = None,
) -> None:
    """llama.cpp's quantizer: `source` (a GGUF in f32) to `target` in the file type `quant`,
    with an importance matrix (tensor name -> mean squared input per column) and per-tensor
    types (tensor name -> ggml type name, e.g. Q8_0) where given."""
    lib = library()
    types = installed_quant_types()
    if quant not in types:
        raise SlimformerError(
            f"the installed llama.cpp (llama-cpp-python {llama_cpp_version()}) has no "
            f"quantization type {quant}; it has {', '.join(sorted(types))}"
        )
    params = lib.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = types[quant]
    keep_alive: list[Any] = []
    if importance:
        entries = (lib.llama_model_imatrix_data * (len(importance) + 1))()
        for entry, (name, values) in zip(entries, importance.items(), strict=False):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive += [data, name.encode()]
            entry.name = keep_alive[-1]
            entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = data.size
        params.imatrix = entries
        keep_alive.append(entries)
    if tensor_types:
        overrides = (lib.llama_model_tensor_override * (len(tensor_types) + 1))()
        for entry, (name, kind) in zip(overrides, tensor_types.items(), strict=False):
            keep_alive.append(("^" + name.replace(".", r"\.") + "$").encode())
            entry.pattern = keep_alive[-1]
            entry.type = getattr(lib, f"GGML_TYPE_{kind}")
        params.tt_overrides = overrides
        keep_alive.append(overrides)
    code = lib.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0:
        target.unlink(missing_ok=True)
        raise SlimformerError(f"llama.cpp could not quantize to {quant}{last_errors()}")


def file_type(path: Path) -> str:
    """llama.cpp's name of a GGUF file's type (its `general.file_type`: Q4_1, Q8_0, F32, ...),
    "unknown" where the file does not say or the installed llama.cpp has no name for it."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return "unknown"
    names = {value: name for name, value in installed_quant_types().items()}
    return names.get(int(field.contents()), "unknown")


class LlamaCppCache:
    """The KV cache of one generation, held in the llama.cpp context; returned as
    `past_key_values` and handed back to continue (only the newest handle is valid)."""

    def __init__(self, owner: LlamaCppModule, length: int):
        self.owner, self.length, self.generation = owner, length, owner.generation

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def check_current(self) -> None:
        if self.generation != self.owner.generation or self.length != self.owner.cached:
            raise SlimformerError(
                "this llama.cpp KV cache is stale: the model generated past it, ran a full "
                "forward pass or started a new prompt since; continue from the newest "
                "past_key_values"
            )


@register_served
class LlamaCppModule(ServedModule):
    runtime = "llamacpp"
    supports_kv_cache = True

    def __init__(
        self,
        config: Any,
        head: str,
        path: Path,
        quant: str,
        context: int,
        kv_cache: str = "f16",
        keep: Any = None,
    ):
        super().__init__(config, head)
        self.path, self.quant, self.context, self.kv_cache = Path(path), quant, context, kv_cache
        self._keep = keep  # the temporary folder holding the file, removed with the last copy
        self._handles: dict[str, Any] = {}
        self.generation = 0  # which generation the context's cache holds
        self.cached = 0  # tokens in it

    # --- the llama.cpp model and context, made on first use -------------------------------
    def _context(self) -> dict[str, Any]:
        handles = self._handles
        if handles:
            threads = torch.get_num_threads()
            if threads != handles["threads"]:
                handles["lib"].llama_set_n_threads(handles["ctx"], threads, threads)
                handles["threads"] = threads
            return handles
        lib = library()
        model = lib.llama_model_load_from_file(str(self.path).encode(), model_params(lib))
        if not model:
            raise SlimformerError(f"llama.cpp could not load {self.path}{last_errors()}")
        threads = torch.get_num_threads()
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = self.context
        params.n_ubatch = min(512, self.context)
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        kv_type = lib.GGML_TYPE_F32 if self.kv_cache == "f32" else lib.GGML_TYPE_F16
        params.type_k = params.type_v = kv_type
        if self.kv_cache == "f32":
            # llama.cpp's CPU flash attention rounds to f16 inside (logits off by ~1e-3 of
            # their scale); the plain attention path keeps f32 throughout.
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            lib.llama_model_free(model)
            raise SlimformerError(f"llama.cpp could not make a context{last_errors()}")
        batch = lib.llama_batch_init(self.context, 0, 1)
        view = {
            "token": np.ctypeslib.as_array(batch.token, shape=(self.context,)),
            "pos": np.ctypeslib.as_array(batch.pos, shape=(self.context,)),
            "logits": np.ctypeslib.as_array(batch.logits, shape=(self.context,)),
        }
        for i in range(self.context):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        handles.update(
            lib=lib, model=model, ctx=ctx, batch=batch, view=view, vocab=vocab, threads=threads
        )
        handles["memory"] = lib.llama_get_memory(ctx)
        handles["finalizer"] = weakref.finalize(self, _free, lib, model, ctx, batch)
        return handles

    def _decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Run `tokens` at `positions` after what the cache holds; their logits [n, vocab]."""
        handles = self._context()
        lib, batch, view = handles["lib"], handles["batch"], handles["view"]
        count = len(tokens)
        view["token"][:count] = tokens
        view["pos"][:count] = positions
        view["logits"][:count] = 1
        batch.n_tokens = count
        code = lib.llama_decode(handles["ctx"], batch)
        if code != 0:
            raise SlimformerError(f"llama.cpp could not decode (code {code}){last_errors()}")
        logits = np.ctypeslib.as_array(
            lib.llama_get_logits(handles["ctx"]), shape=(count, handles["vocab"])
        )
        return logits.copy()

    def _clear(self) -> None:
        handles = self._context()
        handles["lib"].llama_memory_clear(handles["memory"], True)
        self.generation += 1
        self.cached = 0

    def _check_fits(self, tokens: int) -> None:
        if tokens > self.context:
            raise SlimformerError(
                f"{tokens} tokens do not fit the llama.cpp model's context of {self.context}; "
                "shorten the prompt or rebuild with runtime.llamacpp context= larger"
            )

    # --- the served module's calls ---------------------------------------------------------
    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A full pass, each row from an empty cache: real tokens only, at the positions eager
        PyTorch gives them (padding does not shift them); padded positions' logits are 0."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        out = None
        for row in range(ids.shape[0]):
            keep = mask[row].numpy()
            tokens = ids[row].numpy()[keep]
            self._check_fits(len(tokens))
            self._clear()
            logits = self._decode(tokens, np.arange(ids.shape[1])[keep])
            if out is None:
                out = torch.zeros(*ids.shape, logits.shape[-1])
            out[row, torch.from_numpy(keep)] = torch.from_numpy(logits)
        assert out is not None
        return out

    def forward(self, **inputs: Any) -> Any:
        past = inputs.get("past_key_values")
        if past is None and not inputs.get("use_cache"):
            return super().forward(**inputs)
        ids = inputs.get("input_ids")
        if ids is None:
            raise SlimformerError("llamacpp model needs input(s) input_ids")
        if ids.shape[0] != 1:
            raise SlimformerError(
                f"llama.cpp generation here serves one sequence at a time; got a batch of "
                f"{ids.shape[0]}"
            )
        if past is None:
            self._clear()
            start = 0
        else:
            if not isinstance(past, LlamaCppCache) or past.owner is not self:
                raise SlimformerError(
                    "past_key_values for a llama.cpp model must be the one it returned "
                    f"(got {type(past).__name__}); start generation with use_cache=True"
                )
            past.check_current()
            start = past.length
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise SlimformerError("llama.cpp generation takes unpadded prompts (mask all ones)")
        self._check_fits(start + ids.shape[1])
        positions = inputs.get("position_ids")
        positions = (
            np.arange(start, start + ids.shape[1])
            if positions is None
            else positions[0].detach().cpu().numpy()
        )
        logits = self._decode(ids[0].detach().cpu().numpy(), positions)
        self.cached = start + ids.shape[1]
        return CausalLMOutputWithPast(
            logits=torch.from_numpy(logits)[None], past_key_values=LlamaCppCache(self, self.cached)
        )

    def __deepcopy__(self, memo: dict) -> LlamaCppModule:
        return LlamaCppModule(
            self.config, self.head, self.path, self.quant, self.context, self.kv_cache, self._keep
        )

    def save_artifacts(self, folder: Path) -> dict[str, Any]:
        shutil.copyfile(self.path, folder / GGUF_FILE)
        return {
            "files": [GGUF_FILE],
            "quant": self.quant,
            "context": self.context,
            "kv_cache": self.kv_cache,
        }

    @classmethod
    def load_artifacts(
        cls, folder: Path, meta: dict[str, Any], config: Any, head: str, module: Any = None
    ) -> LlamaCppModule:
        return cls(
            config, head, folder / GGUF_FILE, meta["quant"], meta["context"], meta["kv_cache"]
        )


def _free(lib: Any, model: Any, ctx: Any, batch: Any) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
