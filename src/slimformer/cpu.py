"""What this CPU offers the kernels, and a fingerprint that says which machine a figure is from.

Users' CPUs differ (AVX-512 with VNNI/BF16/AMX, or AVX2 only), and which technique pays off
depends on it: bf16 math is fast only with native bf16 instructions, int8 GEMMs win big only
with VNNI, and some int8 kernels saturate without it. The *effective* instruction sets are the
CPU's own, lowered by the dispatch caps a user (or CI) forces: `ATEN_CPU_CAPABILITY` for
PyTorch's kernels and `ONEDNN_MAX_CPU_ISA` for oneDNN's, so a forced-AVX2 run on an AVX-512
machine plans and records itself as the AVX2 machine it imitates.

Every study trial, `run.json`, `metrics.json` and model card carry `fingerprint()`; timings are
only compared between runs whose `same_machine` holds.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# The instruction sets that decide which kernels run, lowest first. `avx_vnni` is VNNI in
# AVX2 form (Alder Lake, Zen 5); `amx` the AMX tile unit with its int8/bf16 parts.
ISA_ORDER = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx")

# How far each dispatch cap lets the kernels go (values as the libraries spell them).
# What each dispatch cap removes, as the libraries spell their values. PyTorch's own vector
# kernels (ATEN_CPU_CAPABILITY) use no VNNI or bf16 instructions, so their cap only drops
# their AVX-512 code; oneDNN's and fbgemm's caps lower everything above their level.
_ATEN_CAPS = {"default": {"avx2", "avx512f"}, "avx2": {"avx512f"}, "avx512": set()}
# How many of ISA_ORDER each oneDNN / fbgemm cap keeps.
_FBGEMM_CAPS = {"avx2": 1, "avx512": 3, "avx512_256": 3, "avx512_e1": 4, "avx512_vnni": 4}
_ONEDNN_CAPS = {
    "sse41": 0,
    "avx": 0,
    "avx2": 1,
    "avx2_vnni": 2,
    "avx2_vnni_2": 2,
    "avx512_core": 3,
    "avx512_core_vnni": 4,
    "avx512_core_bf16": 5,
    "avx512_core_fp16": 5,
    "avx512_core_amx": 6,
    "avx512_core_amx_fp16": 6,
    "all": 6,
}
LIBRARIES = ("torch", "onnxruntime", "openvino", "nncf", "transformers")
# Set by a worker pinned to its own cores (search/cores.py): the cores of the machine it was
# given, which its fingerprint keeps, so that its timings compare with the unpinned study's.
MACHINE_CORES = "SLIMFORMER_MACHINE_CORES"


@dataclass(frozen=True)
class CpuFingerprint:
    """The machine a measurement comes from. `isa` is what the kernels may use (after forced
    caps); `native_isa` what the CPU has; `forced` the caps in force."""

    model: str
    isa: tuple[str, ...]
    native_isa: tuple[str, ...]
    cores: int
    threads: int
    forced: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def has(self, instruction_set: str) -> bool:
        return instruction_set in self.isa

    @property
    def label(self) -> str:
        """One line for tables and cards: 'AMD EPYC · avx2 avx512f … · 2 cores, 2 threads'."""
        forced = f" (forced: {', '.join(f'{k}={v}' for k, v in self.forced.items())})"
        return (
            f"{self.model} · {' '.join(self.isa) or 'no AVX2'} · {self.cores} cores, "
            f"{self.threads} threads{forced if self.forced else ''}"
        )

    def same_machine(self, other: CpuFingerprint) -> bool:
        """Whether timings from `other` can be compared with ours: the same CPU model, the same
        effective instruction sets, cores and threads, and the same engine versions."""
        return (
            self.model == other.model
            and self.isa == other.isa
            and self.cores == other.cores
            and self.threads == other.threads
            and self.versions == other.versions
        )

    def differences(self, other: CpuFingerprint) -> list[str]:
        """What differs from `other`, as short phrases for an error line."""
        found = []
        for name in ("model", "isa", "cores", "threads"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                show = " ".join if name == "isa" else str
                found.append(f"{name} {show(theirs) or '-'} → {show(mine) or '-'}")
        for lib in sorted(set(self.versions) | set(other.versions)):
            mine, theirs = self.versions.get(lib), other.versions.get(lib)
            if mine != theirs:
                found.append(f"{lib} {theirs} → {mine}")
        return found

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["isa"], data["native_isa"] = list(self.isa), list(self.native_isa)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CpuFingerprint:
        return cls(
            model=str(data.get("model", "?")),
            isa=tuple(data.get("isa") or ()),
            native_isa=tuple(data.get("native_isa") or ()),
            cores=int(data.get("cores", 0)),
            threads=int(data.get("threads", 0)),
            forced=dict(data.get("forced") or {}),
            versions=dict(data.get("versions") or {}),
        )


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_instruction_sets(flags: set[str] | None = None) -> tuple[str, ...]:
    flags = cpu_flags() if flags is None else flags
    found = {isa for isa in ISA_ORDER[:-1] if isa in flags}
    if {"amx_tile", "amx_int8", "amx_bf16"} <= flags:
        found.add("amx")
    return tuple(isa for isa in ISA_ORDER if isa in found)


def forced_caps(environ: dict[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    return {
        name: environ[name]
        for name in (
            "ATEN_CPU_CAPABILITY",
            "ONEDNN_MAX_CPU_ISA",
            "FBGEMM_ENABLE_INSTRUCTIONS",
            "OV_CPU_MAX_ISA",
        )
        if environ.get(name)
    }


def effective_instruction_sets(native: tuple[str, ...], forced: dict[str, str]) -> tuple[str, ...]:
    """`native` lowered by every forced cap: ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN: static int8, bf16
    matmuls), OV_CPU_MAX_ISA=AVX2 (OpenVINO's CPU plugin) and FBGEMM_ENABLE_INSTRUCTIONS=AVX2
    (fbgemm: dynamic int8) keep avx2 only;
    ATEN_CPU_CAPABILITY=avx2 drops AVX-512 from PyTorch's own kernels (their int4 packing
    included) but leaves VNNI and bf16 to oneDNN. Together they imitate an AVX2 CPU (ONNX
    Runtime's MLAS has no such cap: it always uses this CPU's own kernels)."""
    level = len(ISA_ORDER)
    for name in ("ONEDNN_MAX_CPU_ISA", "OV_CPU_MAX_ISA"):  # OpenVINO's takes oneDNN's names
        cap = forced.get(name, "").lower()
        if cap in _ONEDNN_CAPS:
            level = min(level, _ONEDNN_CAPS[cap])
    fbgemm = forced.get("FBGEMM_ENABLE_INSTRUCTIONS", "").lower()
    if fbgemm in _FBGEMM_CAPS:
        level = min(level, _FBGEMM_CAPS[fbgemm])
    dropped = _ATEN_CAPS.get(forced.get("ATEN_CPU_CAPABILITY", "").lower(), set())
    return tuple(isa for isa in native if ISA_ORDER.index(isa) < level and isa not in dropped)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _static_facts() -> tuple[str, tuple[str, ...], int, tuple[tuple[str, str | None], ...]]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = tuple((lib, _version(lib)) for lib in LIBRARIES)
    return _cpu_model(), native_instruction_sets(), cores or 1, versions


def fingerprint(threads: int | None = None) -> CpuFingerprint:
    """This process's machine: CPU model, effective and native instruction sets, cores,
    the thread count measurements use (default: every core), forced caps, engine versions."""
    model, native, cores, versions = _static_facts()
    given = os.environ.get(MACHINE_CORES, "")
    cores = int(given) if given.isdigit() and int(given) > 0 else cores
    forced = forced_caps()
    return CpuFingerprint(
        model=model,
        isa=effective_instruction_sets(native, forced),
        native_isa=native,
        cores=cores,
        threads=threads or cores,
        forced=forced,
        versions={lib: v for lib, v in versions if v is not None},
    )


def has_vnni(cpu: CpuFingerprint | None = None) -> bool:
    """int8 dot products in one instruction (u8×s8 summed in 32 bits, no 16-bit saturation)."""
    cpu = cpu or fingerprint()
    return any(cpu.has(isa) for isa in ("avx_vnni", "avx512_vnni", "amx"))


def has_native_bf16(cpu: CpuFingerprint | None = None) -> bool:
    """bf16 math in hardware (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    cpu = cpu or fingerprint()
    return cpu.has("avx512_bf16") or cpu.has("amx")


# Capabilities a pass can declare it needs to pay off (Pass.pays_off_only_with), by name.
CAPABILITIES = {"native_bf16": has_native_bf16, "vnni": has_vnni}
