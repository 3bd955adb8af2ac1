"""int4 codes between three forms: codes [out, in] (0..15), the saved bytes (two codes per byte,
row-major, even input column in the low nibble), and the running CPU kernel's packed layout.

aten's packing is today a fixed function of the dispatched instruction set (blocks of 64 output
rows under AVX-512, 32 under AVX2, each interleaved its own way), but probing the running
kernel, rather than restating aten's C++ here, stays right on every dispatch level and through
torch layout changes; a change that is no longer a rearrangement of codes is refused.
"""

from __future__ import annotations

import functools

import torch

from slimformer.errors import SlimformerError


@functools.cache
def _int4_unpacking_order(out_features: int, in_features: int) -> torch.Tensor:
    """For each code in row-major order, the position of its nibble among the packed tensor's
    nibbles (`_nibbles`) under the running kernel's packing: int32 [out·in].

    Packs "digit" probes, where every code is one base-16 digit of its own row-major index, so
    the nibbles at each packed position spell out which code landed there."""
    count = out_features * in_features
    index = torch.arange(count, dtype=torch.int32).reshape(out_features, in_features)
    digits = 1
    while 16**digits < count:
        digits += 1
    source = torch.zeros(count, dtype=torch.int32)
    for digit in range(digits):
        probe = (index >> (4 * digit)) & 15
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        source |= _nibbles(packed).to(torch.int32) << (4 * digit)
    hits = torch.bincount(source, minlength=count)
    if hits.numel() != count or not bool((hits == 1).all()):
        raise SlimformerError(
            f"torch {torch.__version__}'s int4 CPU packing of a {out_features}x{in_features} "
            "weight is not a rearrangement of its 4-bit codes; slimformer cannot read int4 "
            "weights back with this torch"
        )
    order = torch.empty(count, dtype=torch.int32)
    order[source.long()] = torch.arange(count, dtype=torch.int32)
    return order


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit value of a packed uint8 tensor, flat: low then high nibble of each byte."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)


def pack_int4_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] (0..15) in the running CPU kernel's packed layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)


def unpack_int4_codes(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Codes uint8 [out, in] from a tensor `pack_int4_codes` packed in this process."""
    in_features = packed.numel() * 2 // out_features
    order = _int4_unpacking_order(out_features, in_features)
    return _nibbles(packed).index_select(0, order).reshape(out_features, in_features)


def codes_to_bytes(codes: torch.Tensor) -> torch.Tensor:
    """The saved form of codes [out, in]: uint8 [out, in/2], even column in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def bytes_to_codes(data: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [out, in] from their saved form (`codes_to_bytes`)."""
    return _nibbles(data).reshape(data.shape[0], -1)
