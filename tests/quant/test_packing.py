"""Bit packing: exact round trips at every width, real shrinkage, bad codes refused."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress.quant.packing import pack, packed_numel, unpack


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 1001])
def test_pack_round_trips_exactly(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n + bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.int32))


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), data=st.data())
def test_pack_round_trips_any_codes(bits, data):
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=1, max_size=50))
    codes = torch.tensor(values)
    assert unpack(pack(codes, bits), bits, len(values)).tolist() == values


def test_pack_keeps_shape_independent_of_layout():
    codes = torch.randint(0, 4, (3, 5, 2))
    assert torch.equal(unpack(pack(codes, 2), 2, codes.numel()).view(3, 5, 2), codes.to(torch.int32))


@pytest.mark.parametrize("bits,bad", [(2, 4), (1, -1), (4, 16)])
def test_pack_refuses_codes_outside_the_range(bits, bad):
    with pytest.raises(ValueError, match="codes must lie"):
        pack(torch.tensor([0, bad]), bits)


def test_pack_refuses_unsupported_widths():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.tensor([0, 1]), 3)
