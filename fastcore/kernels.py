"""numba kernels of the assembler: place a module's rows onto the image, raw or converted.

A module's placement is a row plan (``geometry.row_plan``): one line per module row and
destination row, holding the row's pieces (one per chip when chip gaps are inserted).
Lines run in parallel (numba threads). Pieces are handled through 1-D row views indexed
from 0, which keeps numba free of negative-index checks; the usual +1 column step gets its
own contiguous view, so copies and the stage-0 conversion compile to vector loops.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, nogil=True, cache=True)
def place_rows(src, dst, plan):  # pragma: no cover - compiled
    """Copy every plan line of ``src`` (module pixels) onto ``dst`` (the image)."""
    for k in numba.prange(plan.shape[0]):
        sr, sc, dr, dc, n, step, pieces, pitch = (
            plan[k, 0], plan[k, 1], plan[k, 2], plan[k, 3], plan[k, 4], plan[k, 5],
            plan[k, 6], plan[k, 7])
        for i in range(pieces):
            s0, d0 = sc + i * n, dc + i * pitch
            if step == 1:
                dst[dr, d0:d0 + n] = src[sr, s0:s0 + n]
            else:
                dst[dr, d0 - n + 1:d0 + 1] = src[sr, s0:s0 + n][::-1]


@numba.njit(inline="always")
def _convert_piece(pixels, calibration, row, col, out):  # pragma: no cover - compiled
    stage0 = calibration[0, row, col:col + pixels.shape[0]]
    for j in range(pixels.shape[0]):
        out[j] = (np.float32(pixels[j] & 0x3FFF) - stage0[j, 0]) * stage0[j, 1]
    for j in range(pixels.shape[0]):
        value = pixels[j]
        if value >= 0x4000:
            stage = 1 if (value >> 14) == 1 else 2
            pair = calibration[stage, row, col + j]
            out[j] = (np.float32(value & 0x3FFF) - pair[0]) * pair[1]


@numba.njit(parallel=True, nogil=True, cache=True)
def convert_rows(src, calibration, dst, plan):  # pragma: no cover - compiled
    """Jungfrau conversion while placing: ``(adc - pedestal[stage]) / gain[stage]``.

    ``calibration`` is (3, rows, cols, 2) float32 of (pedestal, 1/gain) in module
    coordinates. Each piece is first converted as gain stage 0 (a vector loop), then the
    pixels in stage 1 or 2 (gain bits 01, 11; the invalid 10 counts as 2) are redone.
    """
    for k in numba.prange(plan.shape[0]):
        sr, sc, dr, dc, n, step, pieces, pitch = (
            plan[k, 0], plan[k, 1], plan[k, 2], plan[k, 3], plan[k, 4], plan[k, 5],
            plan[k, 6], plan[k, 7])
        for i in range(pieces):
            s0, d0 = sc + i * n, dc + i * pitch
            pixels = src[sr, s0:s0 + n]
            if step == 1:
                _convert_piece(pixels, calibration, sr, s0, dst[dr, d0:d0 + n])
            else:
                _convert_piece(pixels, calibration, sr, s0, dst[dr, d0 - n + 1:d0 + 1][::-1])
