"""How `factorize.lowrank` spreads a parameter budget over the matrices it may factorize.

Each matrix has its options: dense (m·n weights, no error) or a rank r from `allowed` (the
multiples of the rounding step at which the pair holds fewer weights than the dense matrix and,
when speed is checked, runs faster on this CPU), holding r·(m+n) weights and losing tail(r),
the share of its weighted spectrum (Σσ²) beyond r — the method's own truncation error,
relative, so matrices of different scale compete fairly. A linear layer's FLOPs per token are
2× its weights, so a parameter budget is a FLOP budget too.

- `uniform`: every matrix keeps the same fraction of its weights, rounded to the step
  (`uniform_rank`; dense where that rank is not allowed);
- `global`: greedily, the cheapest move first — the one that loses the least spectrum per
  weight removed — so matrices whose spectrum decays fast give up more. A dense matrix's first
  move can go to any allowed rank (the step from dense to the largest one may save almost
  nothing), so moves follow each matrix's lower convex hull; and the move that finishes the
  budget is the cheapest one that does, so the budget is met without a needless deep cut.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ALLOCATIONS = ("uniform", "global")
DENSE = 0  # the rank that means "kept dense"


@dataclass(frozen=True)
class Matrix:
    name: str
    out_features: int
    in_features: int
    energies: torch.Tensor  # squared singular values of the weighted matrix, largest first
    allowed: tuple[int, ...]  # ranks it may take, ascending (empty: stays dense)

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features

    def weights_at(self, rank: int) -> int:
        return self.weights if rank == DENSE else rank * (self.out_features + self.in_features)

    def tail(self, rank: int) -> float:
        """Share of the spectrum's energy lost at `rank` (0 when dense)."""
        if rank == DENSE:
            return 0.0
        total = float(self.energies.sum())
        return float(self.energies[rank:].sum()) / total if total > 0 else 0.0


def candidate_ranks(out_features: int, in_features: int, multiple: int) -> list[int]:
    """Multiples of `multiple` at which a pair holds fewer weights than the dense matrix."""
    limit = min(out_features, in_features)
    return [
        r
        for r in range(multiple, limit + 1, multiple)
        if r * (out_features + in_features) < out_features * in_features
    ]


def uniform_rank(out_features: int, in_features: int, budget: float, multiple: int) -> int:
    """The rank that keeps (1 − budget) of the weights, rounded to `multiple` (at least one)."""
    exact = (1 - budget) * out_features * in_features / (out_features + in_features)
    return max(multiple, multiple * round(exact / multiple))


def allocate_fixed(matrices: Sequence[Matrix]) -> dict[str, int]:
    """Uniform allocation (or one rank for all): each matrix was allowed at most the one rank
    its share asks for (`uniform_rank`, or the given rank) and takes it, else stays dense."""
    return {m.name: m.allowed[-1] if m.allowed else DENSE for m in matrices}


def allocate_global(matrices: Sequence[Matrix], budget: float) -> dict[str, int]:
    """Greedy on each matrix's lower convex hull of (weights, spectrum lost): from all dense,
    take the move that loses the least spectrum per weight removed — from a matrix's current
    rank to whichever lower one is cheapest per weight — until `budget` of the weights is
    gone. The move that would finish is replaced by the cheapest move that finishes, so a
    large last step does not overshoot the budget at the price of a deep cut."""
    tails = {m.name: {r: m.tail(r) for r in (DENSE, *m.allowed)} for m in matrices}
    ranks = {m.name: DENSE for m in matrices}
    need = budget * sum(m.weights for m in matrices)

    def moves(matrix: Matrix) -> list[tuple[float, int, int]]:
        """(spectrum lost, weights removed, new rank) of every move down from here."""
        rank = ranks[matrix.name]
        kept = matrix.weights_at(rank)
        return [
            (tails[matrix.name][r] - tails[matrix.name][rank], kept - matrix.weights_at(r), r)
            for r in matrix.allowed
            if rank == DENSE or r < rank
        ]

    steps: list[tuple[float, str, int, int]] = []  # (loss per weight, name, new rank, gained)

    def push(matrix: Matrix) -> None:
        options = moves(matrix)
        if options:
            loss, gained, rank = min(options, key=lambda o: (o[0] / o[1], -o[2]))
            heapq.heappush(steps, (loss / gained, matrix.name, rank, gained))

    for matrix in matrices:
        push(matrix)
    by_name = {m.name: m for m in matrices}
    while need > 0 and steps:
        _, name, rank, gained = heapq.heappop(steps)
        if gained >= need:
            _, name, rank = min(
                (loss, m.name, r) for m in matrices for loss, g, r in moves(m) if g >= need
            )
            ranks[name] = rank
            break
        ranks[name] = rank
        need -= gained
        push(by_name[name])
    return ranks


def removed_fraction(matrices: Sequence[Matrix], ranks: dict[str, int]) -> float:
    total = sum(m.weights for m in matrices)
    kept = sum(m.weights_at(ranks[m.name]) for m in matrices)
    return 1 - kept / total if total else 0.0
