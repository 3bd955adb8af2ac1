"""The math of `factorize.lowrank`: calibration statistics, weighted SVD, and the two factors.

Every method factorizes a weighted matrix M = W·R (R on the input side), truncates its SVD to
rank r and moves the weights back out, so W ≈ up @ down with up = U_r·√Σ_r and
down = √Σ_r·V_rᵀ·R⁻¹. The truncation error of M at rank r is
Σ_{i>r} σ_i², which is what each method makes mean something:
- `svd`: R = I (plain Frobenius error of the weights; no data);
- `asvd` (ASVD, Yuan et al. 2023): R = diag(s), s_j = (mean |x_j|)^α over calibration tokens,
  so input channels that carry large activations are kept more faithfully;
- `whiten` (SVD-LLM, Wang et al. 2024): R = L, the Cholesky factor of the calibration inputs'
  XᵀX (+ damping), so Σ_{i>r} σ_i² is exactly the output error ‖X(W − W_r)ᵀ‖²_F on those
  inputs: truncation-aware whitening;
- `fisher` (FWSVD, Hsu et al. 2022): R = diag(√I), I_j = Σ (∂L/∂W_ij)² over calibration
  inputs (one gradient per input) and output rows i: the input channels the loss is sensitive
  to are kept more faithfully. FWSVD sums each row of its weight, laid out (in, out); torch's
  Linear holds (out, in), so that is a column here. (Weighting the output rows instead, as an
  earlier version did, was worse than plain SVD: SmolLM2-135M at 10% removed read 2.8 million
  perplexity against SVD's 1.3 million, and 1,698 with the input side.) L is the loss
  `importance` uses for its gradient criteria: next-token cross
  entropy for causal LMs, ½‖last hidden state‖² otherwise. A distillation loss against the
  original would be the task's own, but its gradient is zero at the original weights, so it
  cannot weight anything before the model has changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimformer.errors import SlimformerError
from slimformer.model import SlimModel
from slimformer.passes.importance import _loss as gradient_loss
from slimformer.passes.observers import visit_layer_inputs

METHODS = ("svd", "asvd", "whiten", "fisher")
ASVD_ALPHA = 0.5  # the ASVD paper's exponent of the activation scale
# Damping for a Gram matrix Cholesky cannot factor (rank-deficient calibration: fewer tokens
# than input features, dead channels): λ·mean(diag) added, λ growing tenfold from the first.
DAMPING_STEPS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Floors, relative to the largest weight, so that unweighting never divides by ~0.
SCALE_FLOOR = 1e-3


@dataclass
class Weighting:
    """M = W · in_factor, in float64; None means identity. `in_factor` is a vector (diagonal)
    or a lower-triangular matrix."""

    in_factor: torch.Tensor | None = None
    damping: float = 0.0  # λ added to the Gram matrix before its Cholesky (whiten)

    def weigh(self, weight: torch.Tensor) -> torch.Tensor:
        m = weight.detach().double()
        if self.in_factor is None:
            return m
        if self.in_factor.dim() == 1:
            return m * self.in_factor[None, :]
        return m @ self.in_factor

    def unweigh_down(self, down: torch.Tensor) -> torch.Tensor:
        """down · R⁻¹."""
        if self.in_factor is None:
            return down
        if self.in_factor.dim() == 1:
            return down / self.in_factor[None, :]
        return torch.linalg.solve_triangular(self.in_factor, down, upper=False, left=False)


def channel_scaling(scale: torch.Tensor) -> Weighting:
    """A per-input-channel weighting (asvd, fisher), floored at SCALE_FLOOR of its largest
    entry so that unweighting never divides by a vanishing scale."""
    return Weighting(in_factor=scale.clamp(min=SCALE_FLOOR * scale.max()))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the decompositions on one thread: LAPACK's SVD and eigensolvers gain little from a
    second one at these sizes and lose badly when another process holds a core (a 576×1536
    SVD measured 1.5 s on one thread, 11–17 s on two, on a 2-core machine under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spectrum(weight: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """Squared singular values of the weighted matrix, largest first (float64): the
    eigenvalues of its smaller Gram matrix, which cost a third of an SVD's."""
    m = weighting.weigh(weight)
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp(min=0)


def factorize(
    weight: torch.Tensor, weighting: Weighting, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, rank], down [rank, in]), float32, with up @ down ≈ weight as the weighting
    measures it. A rank at or above min(out, in) reproduces the weight (to rounding)."""
    out_features, in_features = weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise SlimformerError(
            f"rank {rank} does not fit a {out_features}×{in_features} matrix "
            f"(1..{min(out_features, in_features)})"
        )
    u, s, vh = torch.linalg.svd(weighting.weigh(weight), full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root[None, :]
    down = weighting.unweigh_down(root[:, None] * vh[:rank])
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise SlimformerError(
            "factorization gave non-finite factors: the weights or the calibration statistics "
            "hold inf or NaN"
        )
    return up.float(), down.float()


# --- calibration statistics -------------------------------------------------------------------
def shared_inputs(
    model: SlimModel, layers: dict[str, nn.Module], batch: dict[str, torch.Tensor]
) -> dict[str, str]:
    """name -> the first layer that receives the very same input tensor (q, k and v read one
    hidden state; gate and up another), so statistics are gathered once per input."""
    first_by_tensor: dict[int, tuple[torch.Tensor, str]] = {}
    owner: dict[str, str] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            seen = first_by_tensor.get(id(x))
            owner[name] = seen[1] if seen is not None and seen[0] is x else name
            first_by_tensor.setdefault(id(x), (x, name))

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: owner.get(name, name) for name in layers}


def input_weightings(
    model: SlimModel,
    layers: dict[str, nn.Module],
    calibration: Sequence[dict[str, torch.Tensor]],
    method: str,
) -> dict[str, Weighting]:
    """The input-side weighting of each layer for `asvd` or `whiten`, from one pass over the
    calibration batches (padding tokens left out)."""
    owner = shared_inputs(model, layers, calibration[0])
    unique = {n: layers[n] for n in layers if owner[n] == n}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(unique, 0)

    def accumulate(name: str, x: torch.Tensor) -> None:
        x = x.double()
        update = x.abs().sum(0) if method == "asvd" else x.T @ x
        sums[name] = sums[name] + update if name in sums else update
        counts[name] += x.shape[0]

    visit_layer_inputs(model, unique, list(calibration), accumulate)
    missing = [n for n in unique if n not in sums]
    if missing:
        raise SlimformerError(f"no calibration input reached {missing[0]}")
    weightings = {}
    for name in unique:
        if method == "asvd":
            mean_abs = sums[name] / counts[name]
            scale = mean_abs.pow(ASVD_ALPHA)
            weightings[name] = channel_scaling(scale)
        else:
            factor, damping = damped_cholesky(sums[name])
            weightings[name] = Weighting(in_factor=factor, damping=damping)
    return {name: weightings[owner[name]] for name in layers}


def damped_cholesky(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of `gram` (float64), with λ·mean(diag)·I added when it cannot be
    factored as it is (λ from DAMPING_STEPS, the first that works); returns it and λ."""
    if not torch.isfinite(gram).all():
        raise SlimformerError("calibration inputs hold inf or NaN; cannot whiten")
    mean_diagonal = float(torch.diagonal(gram).mean())
    if mean_diagonal <= 0:
        raise SlimformerError("calibration inputs are all zero; cannot whiten")
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    for damping in (0.0, *DAMPING_STEPS):
        factor, info = torch.linalg.cholesky_ex(gram + damping * mean_diagonal * eye)
        # A factor whose pivots underflowed is as bad as a failed one: its inverse explodes.
        pivots = torch.diagonal(factor)
        if int(info) == 0 and float(pivots.min()) > 1e-7 * float(pivots.max()):
            return factor, damping
    raise SlimformerError(
        f"the calibration inputs' Gram matrix cannot be factored even with "
        f"{DAMPING_STEPS[-1]}×mean(diag) damping; use method=asvd or svd"
    )


def fisher_weightings(
    model: SlimModel,
    layers: dict[str, nn.Module],
    calibration: Sequence[dict[str, torch.Tensor]],
) -> dict[str, Weighting]:
    """Input-channel weights √I of each layer: I_j = Σ over calibration inputs of
    Σ_i (∂L/∂W_ij)², one gradient per input (the empirical Fisher's diagonal, summed over
    each input channel's column of the (out, in) weight: FWSVD's row sum in its layout)."""
    weights = {name: layer.weight for name, layer in layers.items()}
    columns = {name: torch.zeros(w.shape[1], dtype=torch.float64) for name, w in weights.items()}
    trainable = [p for p in model.module.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        for batch in calibration:
            for single in _inputs_of(batch):
                with torch.enable_grad():
                    gradient_loss(model, single).backward()
                for name, weight in weights.items():
                    columns[name] += weight.grad.double().pow(2).sum(0)
                    weight.grad = None
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
    weightings = {}
    for name, importance in columns.items():
        scale = importance.sqrt()
        if float(scale.max()) <= 0:
            raise SlimformerError(f"the loss does not depend on {name}; cannot weight it")
        weightings[name] = channel_scaling(scale)
    return weightings


def _inputs_of(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The batch as one-input batches, each cut to its real length (no padding)."""
    size = next(iter(batch.values())).shape[0]
    mask = batch.get("attention_mask")
    singles = []
    for row in range(size):
        single = {k: v[row : row + 1] for k, v in batch.items()}
        if mask is not None:
            length = int(mask[row].sum())
            single = {
                k: v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v
                for k, v in single.items()
            }
        singles.append(single)
    return singles


def served_rows(
    model: SlimModel, layer: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[int, int]:
    """(rows of one input, rows of one batch) that `layer`'s GEMM runs on for this batch:
    real tokens only (batches are sorted by length when served, so padding is small)."""
    shape: list[int] = []

    def record(module: nn.Module, args: tuple) -> None:
        shape[:] = list(args[0].shape)

    handle = layer.register_forward_pre_hook(record)
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        handle.remove()
    inputs = shape[0] if len(shape) >= 3 else 1
    mask = batch.get("attention_mask")
    if mask is not None and len(shape) >= 3 and mask.shape == tuple(shape[:2]):
        tokens = int(mask.sum())
    else:
        tokens = inputs * (shape[1] if len(shape) >= 3 else shape[0])
    return max(1, round(tokens / inputs)), max(1, tokens)
