"""The simulator's documented content, shared by every detector type: pixel base values,
pulse ids and daq_rec words, as functions of frame and module (tests compute them too)."""

from __future__ import annotations

import functools

import numpy as np


def pulse_id_of(frame: int) -> int:
    """Pulse id the simulator sends with a frame (where the detector's header has one)."""
    return 1_000_000 + 10 * frame


def daq_rec_of(frame: int) -> int:
    """daq_rec word the simulator sends with a frame (where the header has one)."""
    return frame % 7


@functools.lru_cache(maxsize=64)
def base_pattern(shape: tuple[int, int], module: int) -> np.ndarray:
    """``3*row + 7*col + 101*module`` as uint32 (read-only; add ``11*frame`` per frame)."""
    rows = np.arange(shape[0], dtype=np.uint32)[:, None]
    cols = np.arange(shape[1], dtype=np.uint32)[None, :]
    base = 3 * rows + 7 * cols + np.uint32(101 * module)
    base.flags.writeable = False
    return base


def base_values(shape: tuple[int, int], frame: int, module: int) -> np.ndarray:
    """``3*row + 7*col + 11*frame + 101*module`` as uint32 (wrapping mod 2**32)."""
    return base_pattern(tuple(shape), module) + np.uint32((11 * frame) % 2**32)
