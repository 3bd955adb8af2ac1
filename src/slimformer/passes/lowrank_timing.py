"""Whether a factorized pair is faster than the dense GEMM it replaces, measured on this CPU.

A rank-r pair does r·(m+n)/(m·n) of the dense layer's FLOPs, but as two smaller GEMMs that run
further from the machine's rate (a thin [rows, r] intermediate, two calls instead of one), so
on a 2-core CPU fewer FLOPs are not a given speedup. `GemmTimer` times both on random data of
the real shapes — the served row counts (one input's tokens, one batch's tokens) — with torch's
fp32 GEMM in this process's thread count: the kernels eager PyTorch serves the model with (ONNX
Runtime and OpenVINO run their own GEMMs; `engine` in the key leaves room to time those).

Timings are cached in `<cache>/lowrank-gemm.json` per (engine, CPU fingerprint, threads,
shape, rank, rows): measured once per machine, so a recipe replayed here decides the same.
Each timing takes the fastest of alternating samples, in rounds until they settle; a machine
busy with other work can still distort them (a 2-thread GEMM then waits for its second thread,
which costs a pair of GEMMs twice) — delete the file to measure again (`bench/lowrank.py`
starts from an empty one).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from slimformer.cpu import fingerprint
from slimformer.files import cache_dir, write_atomic

ENGINE = "torch-fp32"
CACHE_FILE = "lowrank-gemm.json"
# The pair must be this much faster at every served row count: a margin above the noise of
# back-to-back timings, so a decision does not flip between runs.
MIN_GAIN = 0.05
# Alternating dense/pair samples; the fastest of each is compared: on a machine shared with
# other work, slow samples measure the other work, the fastest one the kernel.
REPEATS = 9
SAMPLE_SECONDS = 1e-3  # each sample repeats the call to last about this long
MAX_ROUNDS = 5
STABLE = 0.1
# Between rounds: other processes that held a core during one (its GEMMs then wait for both
# threads) may have let go by the next.
PAUSE_SECONDS = 0.05


@dataclass(frozen=True)
class Timing:
    rows: int
    pair_ms: float
    dense_ms: float

    @property
    def faster(self) -> bool:
        return self.pair_ms <= (1 - MIN_GAIN) * self.dense_ms

    def describe(self) -> str:
        return f"{self.pair_ms:.4g} ms vs {self.dense_ms:.4g} ms dense at {self.rows} rows"


class GemmTimer:
    """Times dense [rows, n]×[n, m] against the pair [rows, n]×[n, r]×[r, m], with a cache."""

    def __init__(self, rows: Sequence[int], cache_path: Path | None = None):
        self.rows = tuple(sorted(set(rows)))
        self.threads = torch.get_num_threads()
        self.path = cache_path or cache_dir() / CACHE_FILE
        cpu = fingerprint(self.threads)
        machine = {"model": cpu.model, "isa": cpu.isa, "torch": cpu.versions.get("torch")}
        digest = hashlib.sha1(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
        self.prefix = f"{ENGINE}|{digest}|threads={self.threads}"
        self.cached = self._read()
        self.fresh: dict[str, list[float]] = {}

    def timings(self, out_features: int, in_features: int, rank: int) -> list[Timing]:
        """Pair and dense times at every served row count (measured now or cached)."""
        found = []
        for rows in self.rows:
            key = f"{self.prefix}|{out_features}x{in_features}|rank={rank}|rows={rows}"
            if key not in self.cached:
                self.cached[key] = self.fresh[key] = _measure(out_features, in_features, rank, rows)
            pair_ms, dense_ms = self.cached[key]
            found.append(Timing(rows, pair_ms, dense_ms))
        return found

    def pays_off(self, out_features: int, in_features: int, rank: int) -> bool:
        return all(t.faster for t in self.timings(out_features, in_features, rank))

    def fastest_rank_cap(self, out_features: int, in_features: int, ranks: Sequence[int]) -> int:
        """The largest of `ranks` (ascending) at which the pair is faster, 0 if none; found by
        bisection (the pair's time grows with the rank)."""
        return largest_true(ranks, lambda r: self.pays_off(out_features, in_features, r))

    def save(self) -> None:
        """Merge this run's measurements into the cache file (others may have written it)."""
        if not self.fresh:
            return
        merged = self._read() | self.fresh
        write_atomic(self.path, json.dumps({"timings_ms": merged}, indent=0, sort_keys=True))
        self.fresh = {}

    def _read(self) -> dict[str, list[float]]:
        try:
            return dict(json.loads(self.path.read_text())["timings_ms"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # no cache yet, or a damaged one: measure again


def largest_true(values: Sequence[int], test: Callable[[int], bool]) -> int:
    """The largest value of an ascending sequence whose test holds, assuming the test holds on
    a prefix; 0 when it holds for none."""
    low, high = 0, len(values)  # test holds below `low`, fails from `high` on
    while low < high:
        middle = (low + high) // 2
        if test(values[middle]):
            low = middle + 1
        else:
            high = middle
    return values[low - 1] if low else 0


@torch.inference_mode()
def _measure(out_features: int, in_features: int, rank: int, rows: int) -> list[float]:
    """[pair ms, dense ms]: the fastest samples, in rounds until another round no longer
    finds either faster by more than STABLE (a busy machine stalls whole rounds)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=generator)
    dense = torch.randn(out_features, in_features, generator=generator)
    down = torch.randn(rank, in_features, generator=generator)
    up = torch.randn(out_features, rank, generator=generator)

    def run_pair() -> None:
        F.linear(F.linear(x, down), up)

    def run_dense() -> None:
        F.linear(x, dense)

    runs = (run_pair, run_dense)
    calls = [_calls_per_sample(run) for run in runs]
    best = [float("inf"), float("inf")]
    for _ in range(MAX_ROUNDS):
        fastest = [float("inf"), float("inf")]
        for _ in range(REPEATS):
            for index, run in enumerate(runs):
                began = time.perf_counter()
                for _ in range(calls[index]):
                    run()
                elapsed = (time.perf_counter() - began) / calls[index] * 1e3
                fastest[index] = min(fastest[index], elapsed)
        settled = all(new >= (1 - STABLE) * old for new, old in zip(fastest, best, strict=True))
        best = [min(a, b) for a, b in zip(fastest, best, strict=True)]
        if settled:
            break
        time.sleep(PAUSE_SECONDS)
    return best


def _calls_per_sample(run: Callable[[], None]) -> int:
    for _ in range(3):  # warm-up: first calls allocate and pick kernels
        run()
    began = time.perf_counter()
    run()
    once = max(time.perf_counter() - began, 1e-7)
    return max(1, min(1000, round(SAMPLE_SECONDS / once)))
