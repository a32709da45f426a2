"""Where each module's pixels go on the assembled image.

A module maps to one or more rectangular blocks (one per chip when the config leaves
2-pixel chip gaps). Each block is a pair of numpy index tuples (source in the decoded
module, destination on the image); flips become negative-step slices, so assembly is a
handful of ``np.copyto`` calls on views.
"""

from __future__ import annotations

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
