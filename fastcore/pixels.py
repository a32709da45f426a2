"""Packed pixel formats on the wire: Gigafrost 12-bit and Eiger 4-bit (vectorised numpy)."""

from __future__ import annotations

import numpy as np


def unpack_12bit(packed: np.ndarray, out: np.ndarray) -> None:
    """Unpack little-endian 12-bit pixels (3 bytes -> 2 pixels) of shape (rows, cols*3/2)
    into ``out`` (rows, cols), which may be a strided view."""
    b0 = packed[:, 0::3].astype(np.uint16)
    b1 = packed[:, 1::3].astype(np.uint16)
    b2 = packed[:, 2::3].astype(np.uint16)
    np.bitwise_or(b0, (b1 & 0x0F) << 8, out=out[:, 0::2])
    np.bitwise_or(b1 >> 4, b2 << 4, out=out[:, 1::2])


def pack_12bit(pixels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`unpack_12bit` (used by the simulator)."""
    p = pixels.astype(np.uint16)
    even, odd = p[:, 0::2], p[:, 1::2]
    packed = np.empty((p.shape[0], p.shape[1] * 3 // 2), np.uint8)
    packed[:, 0::3] = even & 0xFF
    packed[:, 1::3] = (even >> 8) | ((odd & 0x0F) << 4)
    packed[:, 2::3] = odd >> 4
    return packed


def unpack_4bit(packed: np.ndarray, out: np.ndarray) -> None:
    """Unpack 4-bit pixels (low nibble first) into uint8 ``out`` of twice the columns."""
    np.bitwise_and(packed, 0x0F, out=out[:, 0::2])
    np.right_shift(packed, 4, out=out[:, 1::2])


def pack_4bit(pixels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`unpack_4bit` (used by the simulator)."""
    p = pixels.astype(np.uint8)
    return (p[:, 0::2] & 0x0F) | (p[:, 1::2] << 4)
