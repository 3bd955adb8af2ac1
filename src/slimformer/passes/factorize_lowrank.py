"""`factorize.lowrank`: replace attention and FFN matrices by two thinner ones, W ≈ up · down.

Four ways to choose the factors (`lowrank_svd`: plain SVD, ASVD's activation scaling, SVD-LLM's
whitening, FWSVD's Fisher input-channel weights), one parameter budget spread over the selected
matrices uniformly or by their spectra (`lowrank_allocation`), ranks rounded to a multiple that
suits the GEMM kernels, and a matrix stays dense unless its pair is measured faster on this CPU at
the row counts the task serves (`lowrank_timing`). Each factorized matrix becomes a
`slimformer.layers.LowRankLinear` of two plain Linears, which later passes (distillation, int8)
treat like any other Linear.

Runs last among the structural passes, so pruning first removes what is not needed at all and
the factors are fitted to the model that remains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimformer.errors import SlimformerError
from slimformer.layers.lowrank import PARTS, LowRankLinear
from slimformer.model import SlimModel
from slimformer.passes.base import (
    Choice,
    Interval,
    Pass,
    PassContext,
    Phase,
    fixed,
    register_pass,
    searchable,
    setting_default,
)
from slimformer.passes.layer_selection import Refusal, scope_field, select_layers
from slimformer.passes.lowrank_allocation import (
    ALLOCATIONS,
    DENSE,
    Matrix,
    allocate_fixed,
    allocate_global,
    candidate_ranks,
    removed_fraction,
    uniform_rank,
)
from slimformer.passes.lowrank_svd import (
    METHODS,
    Weighting,
    factorize,
    fisher_weightings,
    input_weightings,
    one_thread,
    served_rows,
    spectrum,
)
from slimformer.passes.lowrank_timing import ENGINE, MIN_GAIN, GemmTimer

BUDGETS = (0.1, 0.2, 0.3, 0.4)
MAX_TIMED_ROWS = 4096  # a larger batch times like this one, only slower


@dataclass(frozen=True)
class LowRankConfig:
    method: str = searchable(
        "whiten",
        Choice(METHODS),
        "how the factors are fitted: plain SVD of the weights, ASVD (input channels scaled by "
        "their mean activation), whitening by the calibration inputs (SVD-LLM), or Fisher-"
        "weighted input channels (FWSVD)",
    )
    budget: float = searchable(
        0.2,
        Choice(BUDGETS, only=False),
        "fraction of the selected matrices' weights (and FLOPs) removed",
        cheaper="higher",
    )
    # Uniform by default: measured better for whitening on MiniLM (30% removed: 77.65% probe
    # accuracy vs 75.55% global), worse on SmolLM2 (20% removed: perplexity 182 vs 113); the
    # study searches both.
    allocation: str = searchable(
        "uniform",
        Choice(ALLOCATIONS),
        "global: spread over the matrices by their truncation errors; uniform: the same "
        "fraction of each",
    )
    scope: str = scope_field("which Linear layers inside the blocks may be factorized")
    multiple: int = fixed(16, "ranks round to a multiple of this (for fast kernels)")
    rank: int = fixed(
        0,
        "one rank for every selected matrix instead of the budget (0: budget)",
        valid=Interval(0, None),
    )
    speed_check: bool = fixed(
        True, "keep a matrix dense unless its factorized pair is measured faster on this CPU"
    )
    skip: tuple[str, ...] = fixed((), "module names (or name prefixes) to keep dense")

    def __post_init__(self) -> None:
        if not 0 < self.budget < 1:
            raise ValueError(
                f"budget is the fraction of the weights removed, between 0 and 1 (exclusive); "
                f"got {self.budget}"
            )
        if self.multiple < 1:
            raise ValueError(f"multiple must be at least 1, got {self.multiple}")
        if self.rank < 0:
            raise ValueError(f"rank must be positive (or 0 for the budget), got {self.rank}")


@register_pass
class FactorizeLowRank(Pass):
    name = "factorize.lowrank"
    summary = (
        "replace attention/FFN matrices by low-rank pairs (SVD, ASVD, whitened, Fisher), "
        "kept dense where the pair is not measured faster"
    )
    config_class = LowRankConfig
    phase = Phase.STRUCTURE
    order = 3  # after blocks, FFN neurons and heads are pruned: factorize what remains
    needs_calibration = True

    @classmethod
    def calibration_required(cls, config: LowRankConfig) -> bool:
        # The speed check times the row counts the task's inputs produce.
        return config.method != "svd" or config.speed_check

    @classmethod
    def normalize(cls, config: LowRankConfig) -> LowRankConfig:
        if config.rank:  # one rank for all: the budget and its allocation play no part
            return dataclasses.replace(
                config,
                budget=setting_default(config, "budget"),
                allocation=setting_default(config, "allocation"),
            )
        return config

    def apply(self, model: SlimModel, config: LowRankConfig, ctx: PassContext) -> dict[str, Any]:
        calibration = list(ctx.calibration)
        if self.calibration_required(config) and not calibration:
            use = "the speed check" if config.method == "svd" else f"method={config.method}"
            raise SlimformerError(f"factorize.lowrank needs calibration data for {use}")
        selection = select_layers(model, config.scope, config.skip, refuse=_factor_refusal(model))
        layers: dict[str, nn.Linear] = dict(selection.layers)
        kept_dense = dict(selection.kept_float)
        if config.rank:
            _check_rank_fits(layers, config.rank)
        if not layers:
            return {"factorized": 0, "kept_dense": kept_dense}

        ctx.progress(f"factorize.lowrank: weighting ({config.method})")
        weightings = _weightings(model, layers, calibration, config.method)
        timer = _timer(model, layers, calibration) if config.speed_check else None
        ctx.progress("factorize.lowrank: choosing ranks")
        with one_thread():
            energies = {n: spectrum(layer.weight, weightings[n]) for n, layer in layers.items()}
        plan = _Plan(layers, energies, config, timer)
        ranks = plan.allocate()
        kept_dense.update(plan.dense_reasons)

        ctx.progress(f"factorize.lowrank: factorizing {sum(r > 0 for r in ranks.values())}")
        factorized: dict[str, Any] = {}
        for name, rank in ranks.items():
            if rank == DENSE:
                continue
            linear = layers[name]
            with one_thread():
                up, down = factorize(linear.weight, weightings[name], rank)
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
            model.module.set_submodule(name, LowRankLinear.from_factors(up, down, bias))
            factorized[name] = {"rank": rank, "spectrum_lost": round(plan.tail(name, rank), 5)}
        if timer is not None:
            timer.save()

        resolved: dict[str, Any] = {
            "factorized": len(factorized),
            # Of the selected matrices' weights; below the budget where matrices stayed dense.
            "removed_fraction": round(removed_fraction(plan.matrices, ranks), 4),
            "weights_before": sum(m.weights for m in plan.matrices),
            "ranks": factorized,
            "kept_dense": kept_dense,
        }
        damped = {n: w.damping for n, w in weightings.items() if w.damping > 0}
        if damped:
            resolved["damped"] = damped  # λ·mean(diag) added where Cholesky failed
        if timer is not None:
            resolved["timing"] = {
                "engine": ENGINE,
                "threads": timer.threads,
                "rows": list(timer.rows),
                "min_gain": MIN_GAIN,
                "pair_vs_dense_ms": plan.timings_used,
            }
        return resolved


def _factor_refusal(model: SlimModel) -> Refusal:
    """Factors of an earlier factorization are not factorized again."""

    def refuse(name: str, module: nn.Module) -> str | None:
        parent, _, part = name.rpartition(".")
        if part in PARTS and isinstance(model.module.get_submodule(parent), LowRankLinear):
            return "already factorized"
        return None

    return refuse


def _check_rank_fits(layers: dict[str, nn.Linear], rank: int) -> None:
    for name, linear in layers.items():
        limit = min(linear.out_features, linear.in_features)
        if rank > limit:
            raise SlimformerError(
                f"factorize.lowrank: rank {rank} is larger than {name} "
                f"({linear.out_features}×{linear.in_features}, rank at most {limit})"
            )


def _weightings(
    model: SlimModel,
    layers: dict[str, nn.Linear],
    calibration: list[dict[str, torch.Tensor]],
    method: str,
) -> dict[str, Weighting]:
    if method == "svd":
        return {name: Weighting() for name in layers}
    if method == "fisher":
        return fisher_weightings(model, layers, calibration)
    return input_weightings(model, layers, calibration, method)


def _timer(
    model: SlimModel, layers: dict[str, nn.Linear], calibration: list[dict[str, torch.Tensor]]
) -> GemmTimer:
    """A timer at the row counts the task serves: one input's tokens, one batch's, and a
    single token for decoders (each generated token is a one-row GEMM)."""
    one_input, one_batch = served_rows(model, next(iter(layers.values())), calibration[0])
    rows = {one_input, min(one_batch, MAX_TIMED_ROWS)}
    if model.head == "causal-lm":
        rows.add(1)
    return GemmTimer(sorted(rows))


class _Plan:
    """The allowed ranks of each matrix, the allocation, and why each dense one stays dense."""

    def __init__(
        self,
        layers: dict[str, nn.Linear],
        energies: dict[str, torch.Tensor],
        config: LowRankConfig,
        timer: GemmTimer | None,
    ):
        self.config = config
        self.timer = timer
        self.dense_reasons: dict[str, str] = {}
        self.timings_used: dict[str, dict[str, list[float]]] = {}
        self.matrices = []
        for name, linear in layers.items():
            allowed = self._allowed(name, linear.out_features, linear.in_features)
            self.matrices.append(
                Matrix(
                    name, linear.out_features, linear.in_features, energies[name], tuple(allowed)
                )
            )
        self._by_name = {m.name: m for m in self.matrices}

    def allocate(self) -> dict[str, int]:
        config = self.config
        if config.rank or config.allocation == "uniform":
            ranks = allocate_fixed(self.matrices)
        else:
            ranks = allocate_global(self.matrices, config.budget)
            for name, rank in ranks.items():
                if rank == DENSE and name not in self.dense_reasons:
                    matrix = self._by_name[name]
                    largest = matrix.allowed[-1]
                    self.dense_reasons[name] = (
                        f"kept by the allocation: its allowed ranks (up to {largest}) would "
                        f"lose {matrix.tail(largest):.1%} of its weighted spectrum"
                    )
        if self.timer is not None:
            # The cap was found by bisection; the rank chosen below it is checked itself.
            for name, rank in ranks.items():
                matrix = self._by_name[name]
                if rank != DENSE and not self.timer.pays_off(
                    matrix.out_features, matrix.in_features, rank
                ):
                    self._note_timings(matrix.out_features, matrix.in_features, [rank], 0)
                    self.dense_reasons[name] = self._slower(
                        matrix.out_features, matrix.in_features, rank
                    )
                    ranks[name] = DENSE
        return ranks

    def _slower(self, out_features: int, in_features: int, rank: int) -> str:
        assert self.timer is not None
        timings = self.timer.timings(out_features, in_features, rank)
        slower = next(t for t in timings if not t.faster)
        return f"the pair is not faster here: rank {rank}, {slower.describe()}"

    def tail(self, name: str, rank: int) -> float:
        return self._by_name[name].tail(rank)

    def _allowed(self, name: str, out_features: int, in_features: int) -> list[int]:
        """The ranks this matrix may take, recording why there are none."""
        config = self.config
        candidates = candidate_ranks(out_features, in_features, config.multiple)
        if config.rank or config.allocation == "uniform":
            wanted = config.rank or uniform_rank(
                out_features, in_features, config.budget, config.multiple
            )
            if wanted * (out_features + in_features) >= out_features * in_features:
                self.dense_reasons[name] = f"rank {wanted} would not hold fewer weights"
                return []
            candidates = [wanted]
        elif not candidates:
            self.dense_reasons[name] = f"no rank (multiple of {config.multiple}) saves weights"
            return []
        if self.timer is None:
            return candidates
        cap = self.timer.fastest_rank_cap(out_features, in_features, candidates)
        self._note_timings(out_features, in_features, candidates, cap)
        if cap == 0:
            self.dense_reasons[name] = self._slower(out_features, in_features, candidates[0])
            return []
        return [r for r in candidates if r <= cap]

    def _note_timings(
        self, out_features: int, in_features: int, ranks: list[int], cap: int
    ) -> None:
        """Record the measurements the decision rests on: at the cap and the rank above it."""
        assert self.timer is not None
        index = ranks.index(cap) if cap else -1
        for rank in ranks[max(0, index) : index + 2]:
            key = f"{out_features}x{in_features} rank {rank}"
            self.timings_used[key] = {
                f"{t.rows} rows": [round(t.pair_ms, 4), round(t.dense_ms, 4)]
                for t in self.timer.timings(out_features, in_features, rank)
            }
