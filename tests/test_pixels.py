"""Packed pixel formats of the detector types: Gigafrost 12-bit and Eiger 4-bit."""

from __future__ import annotations

import numpy as np
import pytest

from fastcore.detectors.eiger import pack_4bit, unpack_4bit
from fastcore.detectors.gigafrost import pack_12bit, unpack_12bit

RNG = np.random.default_rng(12)


def test_12bit_known_triplet():
    """12-bit little-endian bit stream: p0 = b0 | (b1 & 0xF) << 8, p1 = b1 >> 4 | b2 << 4."""
    packed = np.array([[0xAB, 0xCD, 0xEF, 0x01, 0x20, 0x00]], np.uint8)
    out = np.zeros((1, 4), np.uint16)
    unpack_12bit(packed, out)
    assert out.tolist() == [[0xDAB, 0xEFC, 0x001, 0x002]]
    np.testing.assert_array_equal(pack_12bit(out), packed)


def test_12bit_extremes():
    pixels = np.array([[0, 0xFFF, 0xFFF, 0, 0x800, 0x001]], np.uint16)
    packed = pack_12bit(pixels)
    assert packed.tolist() == [[0x00, 0xF0, 0xFF, 0xFF, 0x0F, 0x00, 0x00, 0x18, 0x00]]
    out = np.empty_like(pixels)
    unpack_12bit(packed, out)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize("shape", [(1, 2), (7, 24), (50, 1008)])
def test_12bit_round_trip(shape):
    pixels = RNG.integers(0, 4096, shape, dtype=np.uint16)
    packed = pack_12bit(pixels)
    assert packed.shape == (shape[0], shape[1] * 3 // 2)
    assert packed.dtype == np.uint8
    out = np.full(shape, 0xFFFF, np.uint16)
    unpack_12bit(packed, out)
    np.testing.assert_array_equal(out, pixels)


def test_12bit_pack_keeps_only_12_bits():
    pixels = np.array([[0x1ABC, 0xF123]], np.uint16)
    out = np.empty_like(pixels)
    unpack_12bit(pack_12bit(pixels), out)
    assert out.tolist() == [[0xABC, 0x123]]


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[::-1],  # rows upwards
        lambda a: a[::-2],  # every second row, upwards (Gigafrost north quadrants)
        lambda a: a[1::2],  # every second row downwards (south quadrants, link 1)
        lambda a: a[::-2, ::-1],  # flipped in both directions
        lambda a: a[3:, 6:30],  # a window in a wider image
    ],
    ids=["rows_reversed", "rows_step_-2", "rows_step_2", "both_reversed", "window"],
)
def test_12bit_unpack_into_strided_destination(view):
    image = np.full((40, 48), 0xEEEE, np.uint16)
    dest = view(image)
    pixels = RNG.integers(0, 4096, dest.shape, dtype=np.uint16)
    unpack_12bit(pack_12bit(pixels), dest)
    np.testing.assert_array_equal(dest, pixels)
    # nothing outside the view was written
    mask = np.ones(image.shape, bool)
    view(mask)[...] = False
    assert (image[mask] == 0xEEEE).all()


def test_12bit_unpack_from_strided_source():
    pixels = RNG.integers(0, 4096, (10, 24), dtype=np.uint16)
    frame = np.zeros((20, 50), np.uint8)  # padded rows, as in Gigafrost packets
    frame[::2, :36] = pack_12bit(pixels)
    out = np.empty_like(pixels)
    unpack_12bit(frame[::2, :36], out)
    np.testing.assert_array_equal(out, pixels)


def test_4bit_known_byte():
    """Low nibble first: 0x5A -> pixels 0xA, 0x5."""
    packed = np.array([[0x5A, 0x0F, 0xF0]], np.uint8)
    out = np.zeros((1, 6), np.uint8)
    unpack_4bit(packed, out)
    assert out.tolist() == [[0xA, 0x5, 0xF, 0x0, 0x0, 0xF]]
    np.testing.assert_array_equal(pack_4bit(out), packed)


@pytest.mark.parametrize("shape", [(1, 2), (256, 512)])
def test_4bit_round_trip(shape):
    pixels = RNG.integers(0, 16, shape, dtype=np.uint8)
    packed = pack_4bit(pixels)
    assert packed.shape == (shape[0], shape[1] // 2)
    out = np.full(shape, 0xFF, np.uint8)
    unpack_4bit(packed, out)
    np.testing.assert_array_equal(out, pixels)


@pytest.mark.parametrize(
    "view",
    [lambda a: a[::-1], lambda a: a[::-1, ::-1], lambda a: a[2:7, 4:12]],
    ids=["rows_reversed", "both_reversed", "window"],
)
def test_4bit_unpack_into_strided_destination(view):
    image = np.full((9, 16), 0xEE, np.uint8)
    dest = view(image)
    pixels = RNG.integers(0, 16, dest.shape, dtype=np.uint8)
    unpack_4bit(pack_4bit(pixels), dest)
    np.testing.assert_array_equal(dest, pixels)
    mask = np.ones(image.shape, bool)
    view(mask)[...] = False
    assert (image[mask] == 0xEE).all()
