"""Bit packing of codes (every width 0..8, odd dims), Elias-Fano and the compact id map."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoding.packing import (
    decode_id_map,
    ef_decode,
    ef_encode,
    ef_nbytes,
    encode_id_map,
    id_map_nbytes,
    id_map_to_index,
    pack_codes,
    pack_unsigned,
    unpack_codes,
    unpack_unsigned,
)


def random_codes(rng, n, dim, bits):
    if bits == 0:
        return np.zeros((n, dim), dtype=np.int8)
    half = 1 << (bits - 1)
    return rng.integers(-half, half, size=(n, dim)).astype(np.int8)


@pytest.mark.parametrize("bits", range(9))
@pytest.mark.parametrize("dim", [1, 3, 7, 16])
@pytest.mark.parametrize("n", [0, 1, 5, 33])
def test_pack_roundtrip_every_width(bits, dim, n):
    rng = np.random.default_rng(bits * 100 + dim * 10 + n)
    codes = random_codes(rng, n, dim, bits)
    buf = pack_codes(codes, bits)
    assert buf.dtype == np.uint8 and buf.size == (n * dim * bits + 7) // 8
    out = unpack_codes(buf, n, dim, bits)
    assert out.dtype == np.int8 and out.shape == (n, dim)
    assert np.array_equal(out, codes)


def test_known_bit_layout():
    # 3 bits, offset 4: codes -4, 3, 0 -> 0b000, 0b111, 0b100, LSB first, rows back to back
    buf = pack_codes(np.array([[-4, 3, 0]]), 3)
    assert buf.tolist() == [0b00111000, 0b00000001]
    assert pack_codes(np.array([[-1, 0]]), 1).tolist() == [0b10]
    assert pack_codes(np.array([[-128, 127]]), 8).tolist() == [0, 255]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_codes(np.array([[2]]), 2)  # 2-bit range is -2..1
    with pytest.raises(ValueError):
        pack_codes(np.array([[1]]), 0)
    with pytest.raises(ValueError):
        pack_codes(np.array([1, 2]), 4)
    with pytest.raises(ValueError):
        unpack_codes(np.zeros(4, dtype=np.uint8), 1, 7, 3)  # needs 3 bytes


@settings(max_examples=60, deadline=None, derandomize=True)
@given(bits=st.integers(0, 8), dim=st.integers(1, 19), n=st.integers(0, 20), seed=st.integers(0, 2**31))
def test_pack_roundtrip_property(bits, dim, n, seed):
    codes = random_codes(np.random.default_rng(seed), n, dim, bits)
    assert np.array_equal(unpack_codes(pack_codes(codes, bits), n, dim, bits), codes)


@pytest.mark.parametrize("width", [1, 5, 13, 23, 32])
def test_unsigned_wide_widths(width):
    rng = np.random.default_rng(width)
    v = rng.integers(0, 1 << width, 101, dtype=np.uint64)
    assert np.array_equal(unpack_unsigned(pack_unsigned(v, width), 101, width), v)


@pytest.mark.parametrize("n,universe", [(0, 10), (1, 1), (5, 5), (3, 1000), (50, 64), (400, 1 << 20)])
def test_elias_fano_roundtrip(n, universe):
    rng = np.random.default_rng(n)
    values = np.sort(rng.choice(universe, size=n, replace=False)).astype(np.int64)
    buf = ef_encode(values, universe)
    assert buf.size == ef_nbytes(n, universe)
    assert np.array_equal(ef_decode(buf, n, universe), values)


def id_map_cases():
    rng = np.random.default_rng(0)
    return [
        rng.choice(7, size=5000, p=[0.8, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01]),  # sparse buckets
        np.repeat(rng.permutation(7), rng.integers(100, 900, 7)),  # long runs -> run coding
        np.zeros(17, dtype=np.int64),  # everything pruned
        np.array([3]),
        rng.integers(0, 7, 999),
    ]


@pytest.mark.parametrize("case", range(5))
def test_id_map_roundtrip_and_size(case):
    idx = id_map_cases()[case]
    blob = encode_id_map(idx, 7)
    assert blob.dtype == np.uint8 and blob.size == id_map_nbytes(idx, 7)
    assert np.array_equal(id_map_to_index(blob, idx.size, 7), idx)
    kinds, sets = decode_id_map(blob, idx.size, 7)
    q = np.arange(idx.size)
    for i, s in sets.items():
        members = np.flatnonzero(idx == i)
        less, hit = s.rank(q)
        assert np.array_equal(hit, idx == i)
        assert np.array_equal(less, np.searchsorted(members, q))


def test_id_map_is_compact():
    idx = id_map_cases()[0]  # ~1 bit of entropy per row
    assert id_map_nbytes(idx, 7) * 8 / idx.size < 1.5  # bits per row (explicit map: 40)
    runs = id_map_cases()[1]
    assert id_map_nbytes(runs, 7) < 200


def test_id_map_rejects_corruption():
    idx = id_map_cases()[0]
    blob = encode_id_map(idx, 7)
    with pytest.raises(ValueError):
        decode_id_map(blob[:-1], idx.size, 7)
    with pytest.raises(ValueError):
        decode_id_map(blob, idx.size + 1, 7)
    bad = blob.copy()
    bad[0] = 9
    with pytest.raises(ValueError):
        decode_id_map(bad, idx.size, 7)
