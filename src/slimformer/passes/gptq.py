"""Weight quantization math: round-to-nearest and GPTQ (Frantar et al., 2022).

Both return integer codes plus the per-group parameters the packed CPU kernels consume, so
what is evaluated is exactly what is served. Written here rather than taken from a library:
torchao's GPTQ targets CUDA tensor-core layouts and AutoGPTQ/GPTQModel need CUDA builds; the
algorithm is ~60 lines on top of torch.linalg.

Formats (the kernels decide them; `slimformer.layers.QuantizedWeight` holds the result):
- int4: asymmetric, per group of `group_size` input columns: w ≈ q·scale + low, q ∈ [0, 15]
  (`torch.ops.aten._weight_int4pack_mm_for_cpu` takes scale and zero = low + 8·scale).
- int8: symmetric per output channel: w ≈ q·scale, q ∈ [-127, 127]
  (`torch.ops.aten._weight_int8pack_mm` takes one scale per row).
"""

from __future__ import annotations

import torch

from slimformer.layers.weight_only import QuantizedWeight

BLOCK_COLUMNS = 128  # GPTQ's lazy batch: columns updated together before the trailing update


def group_params(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and low end, for int4) of each row of `weight` [out, columns]."""
    if bits == 8:
        return (weight.abs().amax(1) / 127).clamp(min=1e-8), None
    low = weight.amin(1).clamp(max=0)
    high = weight.amax(1).clamp(min=0)
    return ((high - low) / 15).clamp(min=1e-8), low


def quantize_column(
    column: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Integer codes of one column (or block of columns) given its rows' parameters."""
    if bits == 8:
        return torch.clamp(torch.round(column / scale), -127, 127)
    return torch.clamp(torch.round((column - low) / scale), 0, 15)


def _dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, bits: int
) -> torch.Tensor:
    return codes * scale if bits == 8 else codes * scale + low


def _check(weight: torch.Tensor, bits: int, group_size: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    columns = weight.shape[1]
    group = columns if bits == 8 else group_size
    if columns % group:
        raise ValueError(f"{columns} input columns are not a multiple of group size {group}")
    return group


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest: each group quantized on its own, no error compensation."""
    group = _check(weight, bits, group_size)
    weight = weight.detach().float()
    rows, columns = weight.shape
    grouped = weight.reshape(rows, columns // group, group)
    if bits == 8:
        scale, _ = group_params(weight, 8)
        codes = quantize_column(weight, scale[:, None], None, 8)
        return QuantizedWeight(codes.to(torch.int32), scale, None, 8, columns)
    low = grouped.amin(2).clamp(max=0)
    high = grouped.amax(2).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=1e-8)
    codes = quantize_column(grouped, scale[..., None], low[..., None], 4).reshape(rows, columns)
    return QuantizedWeight(codes.to(torch.int32), scale, low, 4, group)


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H); λ grows tenfold
    (up to three times) if H is too ill-conditioned to factor."""
    mean_diagonal = torch.diag(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
    for attempt in range(4):
        damped = hessian + damp * 10**attempt * mean_diagonal * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()
    raise ValueError("the calibration Hessian is not positive definite even after damping")


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    act_order: bool = False,
) -> QuantizedWeight:
    """GPTQ: quantize columns one by one, folding each one's error into the columns not yet
    quantized through the inverse Hessian of the layer's inputs (H = 2·XᵀX / n).

    The inverse comes from a Cholesky factorization (numerically stable, computed once), and
    updates are applied lazily in blocks of BLOCK_COLUMNS columns. With `act_order`, columns
    go in order of decreasing Hessian diagonal (largest activations first); group parameters
    are then fixed up front from the original weights ("static groups") so each group still
    covers consecutive input columns, as the packed kernel requires.
    """
    group = _check(weight, bits, group_size)
    w = weight.detach().float().clone()
    rows, columns = w.shape
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    groups = columns // group
    scales = torch.empty(rows, groups)
    lows = torch.empty(rows, groups) if bits == 4 else None
    # Lazy groups need a group inside one block; per-channel int8 spans the whole row.
    static_groups = act_order or group > BLOCK_COLUMNS
    if static_groups:
        for g in range(groups):
            scale, low = group_params(w[:, g * group : (g + 1) * group], bits)
            scales[:, g] = scale
            if lows is not None:
                lows[:, g] = low
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(columns)
    w = w[:, order]
    h = h[order][:, order]
    inverse = _upper_cholesky_of_inverse(h, damp)

    codes = torch.zeros(rows, columns)
    for start in range(0, columns, BLOCK_COLUMNS):
        end = min(start + BLOCK_COLUMNS, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        block_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group
            if not static_groups and column % group == 0:
                # Parameters from the weights as updated so far (the reference's lazy groups).
                scale, low = group_params(block[:, i : i + group], bits)
                scales[:, g] = scale
                if lows is not None:
                    lows[:, g] = low
            low = lows[:, g] if lows is not None else None
            q = quantize_column(block[:, i], scales[:, g], low, bits)
            codes[:, start + i] = q
            error = (block[:, i] - _dequantize_codes(q, scales[:, g], low, bits)) / block_inverse[
                i, i
            ]
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]

    codes = codes[:, torch.argsort(order)]
    if bits == 8:
        return QuantizedWeight(codes.to(torch.int32), scales[:, 0], None, 8, columns)
    return QuantizedWeight(codes.to(torch.int32), scales, lows, 4, group)
