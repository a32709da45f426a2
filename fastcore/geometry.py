"""Where each module's pixels go on the assembled image.

A module maps to one or more rectangular blocks (one per chip when the config leaves
2-pixel chip gaps). Each block is a pair of numpy index tuples (source in the decoded
module, destination on the image); flips become negative-step slices, so assembly is a
handful of ``np.copyto`` calls on views.
"""

from __future__ import annotations

import numpy as np

from fastcore.config import DetectorConfig
from fastcore.detectors import CHIP_GAP, gigafrost_quadrant, module_format

Index = tuple[slice, slice]
Block = tuple[Index, Index]  # (source index in the module, destination index on the image)


def _span(start: int, end: int, offset: int, length: int) -> slice:
    """``length`` image rows/cols from corner ``start`` towards ``end``, skipping ``offset``."""
    if start <= end:
        return slice(start + offset, start + offset + length)
    first = start - offset
    stop = first - length
    return slice(first, stop if stop >= 0 else None, -1)


def module_blocks(config: DetectorConfig, module_id: int) -> list[Block]:
    """The blocks that place module ``module_id`` on the image."""
    fmt = module_format(config.detector_type, config.bit_depth, config.image_shape)
    mod_h, mod_w = fmt.module_shape
    if config.detector_type == "gigafrost":
        height, width = config.image_shape
        quadrant, link = gigafrost_quadrant(module_id)
        cols = slice(width // 2, width) if quadrant % 2 else slice(0, width // 2)
        half = height // 2
        if quadrant >= 2:  # NW, NE: streamed from the centre row upwards
            first = half - 1 - link
            stop = first - 2 * mod_h
            rows = slice(first, stop if stop >= 0 else None, -2)
        else:  # SW, SE: from the centre row downwards
            rows = slice(half + link, height, 2)
        return [((slice(0, mod_h), slice(0, mod_w)), (rows, cols))]

    sx, sy, ex, ey = config.module_positions[module_id]
    with_gaps = (abs(ey - sy) + 1, abs(ex - sx) + 1) != fmt.module_shape
    chips_y, chips_x = fmt.chips if with_gaps else (1, 1)
    gap = CHIP_GAP if with_gaps else 0
    chip_h, chip_w = mod_h // chips_y, mod_w // chips_x
    blocks = []
    for cy in range(chips_y):
        for cx in range(chips_x):
            source = (slice(cy * chip_h, (cy + 1) * chip_h), slice(cx * chip_w, (cx + 1) * chip_w))
            dest = (_span(sy, ey, cy * (chip_h + gap), chip_h),
                    _span(sx, ex, cx * (chip_w + gap), chip_w))
            blocks.append((source, dest))
    return blocks


ROW_PLAN_FIELDS = ("src_row", "src_col", "dst_row", "dst_col", "n_cols", "dst_col_step",
                   "n_pieces", "dst_pitch")
"""A plan line copies ``n_pieces`` pieces of ``n_cols`` pixels: piece ``i`` is source row
``src_row``, columns ``src_col + i*n_cols`` on, to destination row ``dst_row`` starting at
column ``dst_col + i*dst_pitch`` and running with ``dst_col_step`` (+1, or -1 when the
module is mirrored). The chips of one module row with their gaps make one line."""


def row_plan(blocks: list[Block], image_shape: tuple[int, int]) -> np.ndarray:
    """The blocks as plan lines for the numba kernels: int64 (n, 8) of ROW_PLAN_FIELDS."""
    segments: dict[tuple[int, int, int, int], list[tuple[int, int]]] = {}
    for (src_rows, src_cols), (dst_rows, dst_cols) in blocks:
        s_rows = range(*src_rows.indices(10**9))
        d_rows = range(*dst_rows.indices(image_shape[0]))
        d_cols = range(*dst_cols.indices(image_shape[1]))
        s_cols = range(*src_cols.indices(10**9))
        if len(s_rows) != len(d_rows) or len(s_cols) != len(d_cols) or s_cols.step != 1 \
                or abs(d_cols.step) != 1:
            raise ValueError(f"block {src_rows, src_cols} -> {dst_rows, dst_cols}: sizes "
                             "differ or columns are not contiguous")
        for s_row, d_row in zip(s_rows, d_rows, strict=True):
            key = (s_row, d_row, len(s_cols), d_cols.step)
            segments.setdefault(key, []).append((s_cols.start, d_cols.start))
    lines = []
    for (s_row, d_row, n, step), pieces in segments.items():
        pieces.sort()
        run = [pieces[0]]
        for piece in pieces[1:]:
            pitch = run[1][1] - run[0][1] if len(run) > 1 else piece[1] - run[-1][1]
            if piece[0] == run[-1][0] + n and piece[1] - run[-1][1] == pitch:
                run.append(piece)
                continue
            lines.append(_line(s_row, d_row, n, step, run))
            run = [piece]
        lines.append(_line(s_row, d_row, n, step, run))
    return np.array(lines, np.int64).reshape(-1, len(ROW_PLAN_FIELDS))


def _line(s_row: int, d_row: int, n: int, step: int, run: list[tuple[int, int]]) -> tuple:
    pitch = run[1][1] - run[0][1] if len(run) > 1 else 0
    return (s_row, run[0][0], d_row, run[0][1], n, step, len(run), pitch)
