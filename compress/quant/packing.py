"""Pack k-bit codes (k in 1, 2, 4, 8) into uint8 so a saved model really shrinks.

Written by hand: torch's sub-byte dtypes (torch.uint1..uint7) have no ops or packing, and
numpy.packbits only covers k = 1.
"""
from __future__ import annotations

import torch

BITS = (1, 2, 4, 8)


def packed_numel(n: int, bits: int) -> int:
    per = 8 // bits
    return (n + per - 1) // per


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes in [0, 2**bits) (any shape) -> flat uint8, ``8 // bits`` codes per byte."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    flat = codes.detach().reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    per = 8 // bits
    pad = (-flat.numel()) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack``: flat int32 codes, the first ``numel`` of them."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32).view(-1, 1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel]
