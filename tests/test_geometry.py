"""Module placement (fastcore.geometry.module_blocks) against an independent construction.

The reference images here are built the plain way (explicit loops, np.flipud/np.fliplr)
from the documented geometry, never with fastcore.geometry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastcore.assembler import ImageAssembler
from fastcore.config import parse_config
from fastcore.detectors import module_format
from fastcore.geometry import coalesce_plan, module_blocks, row_plan
from fastcore.simulator import encode_frame, simulated_pixels
from fastcore.udp_recv import module_origin

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GAP = 0  # marker of pixels no module covers (markers of module pixels start at 1)


def config_of(det_type, height, width, positions, bit_depth=16, n_modules=None):
    return parse_config({
        "detector_name": "GEO", "detector_type": det_type,
        "n_modules": n_modules if n_modules is not None else len(positions),
        "bit_depth": bit_depth, "image_pixel_height": height, "image_pixel_width": width,
        "start_udp_port": 40000, "writer_user_id": 0,
        "module_positions": {str(m): p for m, p in positions.items()},
    })


def example(name, **changes):
    raw = json.loads((CONFIGS / name).read_text())
    raw.update(changes)
    return parse_config(raw)


JUNGFRAU_CONFIGS = {
    # the example: chip gaps, both modules flipped in y
    "jf1m_gaps_flipped_y": example("jungfrau_1m.json"),
    # no chip gaps; module 1 rotated by 180 degrees (flipped in x and y)
    "no_gaps_rotated": config_of("jungfrau", 1024, 1024,
                                 {0: [0, 0, 1023, 511], 1: [1023, 1023, 0, 512]}),
    # chip gaps, flipped in x only, inside a larger image
    "gaps_flipped_x": config_of("jungfrau", 520, 1040, {0: [1035, 3, 6, 516]}),
    # one module with gaps and one without in the same image
    "mixed": config_of("jungfrau", 1040, 1030,
                       {0: [0, 0, 1029, 513], 1: [3, 520, 1026, 1031]}),
}


def marker_modules(config) -> list[np.ndarray]:
    """Module pixels that are unique over the whole detector (1, 2, 3, ...)."""
    mod_h, mod_w = module_format(config.detector_type, config.bit_depth,
                                 config.image_shape).module_shape
    size = mod_h * mod_w
    return [np.arange(1 + m * size, 1 + (m + 1) * size, dtype=np.uint32).reshape(mod_h, mod_w)
            for m in range(config.n_modules)]


def reference_positioned(config, modules: list[np.ndarray], chips: tuple[int, int],
                         dtype) -> np.ndarray:
    """Jungfrau/Eiger image built the plain way: each module laid out chip by chip (with
    2-pixel gaps when its position is 2 pixels per chip boundary larger than the module),
    then flipped as its corners say, then put at its corners."""
    image = np.full(config.image_shape, GAP, dtype)
    for m, pixels in enumerate(modules):
        sx, sy, ex, ey = config.module_positions[m]
        height, width = abs(ey - sy) + 1, abs(ex - sx) + 1
        mod_h, mod_w = pixels.shape
        if (height, width) == (mod_h, mod_w):
            laid_out = pixels.copy()
        else:
            assert (height, width) == (mod_h + 2 * (chips[0] - 1), mod_w + 2 * (chips[1] - 1))
            chip_h, chip_w = mod_h // chips[0], mod_w // chips[1]
            laid_out = np.full((height, width), GAP, dtype)
            for cy in range(chips[0]):
                for cx in range(chips[1]):
                    for r in range(chip_h):
                        y = cy * (chip_h + 2) + r
                        x = cx * (chip_w + 2)
                        laid_out[y, x : x + chip_w] = pixels[cy * chip_h + r,
                                                             cx * chip_w : (cx + 1) * chip_w]
        if sy > ey:
            laid_out = np.flipud(laid_out)
        if sx > ex:
            laid_out = np.fliplr(laid_out)
        top, left = min(sy, ey), min(sx, ex)
        region = image[top : top + height, left : left + width]
        assert (region == GAP).all(), "test configs must not overlap"
        region[...] = laid_out
    return image


def reference_gigafrost(config, modules: list[np.ndarray], dtype) -> np.ndarray:
    """Gigafrost: module m = quadrant m // 2 (SW=0, SE=1, NW=2, NE=3), link m % 2. Each link
    holds every second row of its quadrant, counted from the image centre: the south
    quadrants downwards, the north ones upwards (streamed bottom-up)."""
    height, width = config.image_shape
    image = np.full(config.image_shape, GAP, dtype)
    for m, pixels in enumerate(modules):
        quadrant, link = m // 2, m % 2
        east = quadrant in (1, 3)
        north = quadrant in (2, 3)
        left = width // 2 if east else 0
        for r in range(pixels.shape[0]):
            distance = 2 * r + link  # rows from the centre line
            y = height // 2 - 1 - distance if north else height // 2 + distance
            assert (image[y, left : left + width // 2] == GAP).all()
            image[y, left : left + width // 2] = pixels[r]
    return image


def reference(config, modules, dtype):
    if config.detector_type == "gigafrost":
        return reference_gigafrost(config, modules, dtype)
    fmt = module_format(config.detector_type, config.bit_depth, config.image_shape)
    return reference_positioned(config, modules, fmt.chips, dtype)


def place_with_blocks(config, modules, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(image, coverage count) built with module_blocks."""
    image = np.full(config.image_shape, GAP, dtype)
    count = np.zeros(config.image_shape, np.int32)
    for m, pixels in enumerate(modules):
        for source, dest in module_blocks(config, m):
            image[dest] = pixels[source]
            count[dest] += 1
    return image, count


def check_markers(config):
    modules = marker_modules(config)
    image, count = place_with_blocks(config, modules, np.uint32)
    expected = reference(config, modules, np.uint32)
    np.testing.assert_array_equal(image, expected)
    assert count.max() == 1, "a pixel is covered by two blocks"
    # every module pixel is on the image exactly once; the rest are gap pixels
    n_pixels = sum(p.size for p in modules)
    assert int(count.sum()) == n_pixels
    assert np.array_equal(count == 0, expected == GAP)
    values = np.sort(image[image != GAP])
    np.testing.assert_array_equal(values, np.arange(1, n_pixels + 1, dtype=np.uint32))


@pytest.mark.parametrize("name", list(JUNGFRAU_CONFIGS))
def test_jungfrau_blocks(name):
    check_markers(JUNGFRAU_CONFIGS[name])


def test_jungfrau_chip_gaps_are_where_expected():
    """Chip gaps: 2 rows between the chip rows, 2 columns between each of 4 chip columns."""
    config = config_of("jungfrau", 514, 1030, {0: [0, 0, 1029, 513]})
    modules = marker_modules(config)
    image, count = place_with_blocks(config, modules, np.uint32)
    gap_rows = [256, 257]
    gap_cols = [256, 257, 514, 515, 772, 773]
    assert (count[gap_rows, :] == 0).all()
    assert (count[:, gap_cols] == 0).all()
    rows = [r for r in range(514) if r not in gap_rows]
    cols = [c for c in range(1030) if c not in gap_cols]
    np.testing.assert_array_equal(image[np.ix_(rows, cols)], modules[0])


def test_jungfrau_flipped_module_corner_pixels():
    """start_y > end_y: module row 0 is on image row start_y (here the bottom)."""
    config = JUNGFRAU_CONFIGS["jf1m_gaps_flipped_y"]  # module 0: [0, 513, 1029, 0]
    modules = marker_modules(config)
    image, _ = place_with_blocks(config, modules, np.uint32)
    assert image[513, 0] == modules[0][0, 0]
    assert image[0, 0] == modules[0][511, 0]
    assert image[513, 1029] == modules[0][0, 1023]
    assert image[0, 1029] == modules[0][511, 1023]
    rotated = JUNGFRAU_CONFIGS["no_gaps_rotated"]  # module 1: [1023, 1023, 0, 512]
    modules = marker_modules(rotated)
    image, _ = place_with_blocks(rotated, modules, np.uint32)
    assert image[1023, 1023] == modules[1][0, 0]
    assert image[512, 0] == modules[1][511, 1023]


@pytest.mark.parametrize("bit_depth", [4, 8, 16, 32])
def test_eiger_blocks(bit_depth):
    config = example("eiger_500k.json", bit_depth=bit_depth)
    check_markers(config)


@pytest.mark.parametrize(
    ("height", "width"),
    [(2016, 2016), (48, 96), (160, 624), (2012, 2016)],
)
def test_gigafrost_blocks(height, width):
    config = example("gigafrost.json", image_pixel_height=height, image_pixel_width=width)
    check_markers(config)


def test_gigafrost_quadrant_corners():
    config = example("gigafrost.json", image_pixel_height=48, image_pixel_width=96)
    modules = marker_modules(config)
    image, _ = place_with_blocks(config, modules, np.uint32)
    # module 0 (SW, link 0) row 0 is the first row below the centre, on the left
    assert image[24, 0] == modules[0][0, 0]
    # module 3 (SE, link 1) row 0 is the second row below the centre, on the right
    assert image[25, 48] == modules[3][0, 0]
    # module 4 (NW, link 0) row 0 is the first row above the centre
    assert image[23, 0] == modules[4][0, 0]
    # module 7 (NE, link 1): its last row is the image's top row
    assert image[0, 95] == modules[7][-1, -1]


# --- the full decode + place path of the assembler, per detector and bit depth ----------

ASSEMBLY_CASES = [
    ("jungfrau", example("jungfrau_1m.json")),
    ("jungfrau_rotated", JUNGFRAU_CONFIGS["no_gaps_rotated"]),
    *[(f"eiger{bd}", example("eiger_500k.json", bit_depth=bd)) for bd in (4, 8, 16, 32)],
    ("gigafrost", example("gigafrost.json")),
    ("gigafrost_short_last", example("gigafrost.json", image_pixel_height=2012)),
    ("gigafrost_odd_rows", example("gigafrost.json", image_pixel_height=160,
                                   image_pixel_width=624)),
]


@pytest.mark.parametrize(("name", "config"), ASSEMBLY_CASES, ids=[c[0] for c in ASSEMBLY_CASES])
def test_assembler_places_encoded_frames(name, config):
    """Simulated module frames, encoded as on the wire, decoded and placed by the
    assembler, equal the plain construction from the simulator's pixels."""
    fmt = module_format(config.detector_type, config.bit_depth, config.image_shape)
    frame = 5
    modules = [simulated_pixels(config.detector_type, config.bit_depth, fmt.module_shape, frame, m)
               for m in range(config.n_modules)]
    assembler = ImageAssembler(config)
    image = np.full(config.image_shape, 0xAB, config.image_dtype)
    for m in range(config.n_modules):
        encoded = encode_frame(fmt, modules[m])
        assert encoded.nbytes == fmt.frame_bytes
        assembler.place_module(m, encoded, image)
    expected = reference(config, modules, config.image_dtype)
    covered = reference(config, [np.ones_like(p) for p in modules], np.uint8) == 1
    np.testing.assert_array_equal(image[covered], expected[covered])
    # the gaps between the chips of one module row are written as zero (as the ImageBuffer
    # holds them: one streamed run per row), nothing outside the module rows is touched
    within_rows = np.zeros_like(covered)
    for m in range(config.n_modules):
        only_m = [np.full_like(p, m == k) for k, p in enumerate(modules)]
        rows, cols = np.nonzero(reference(config, only_m, np.uint8) == 1)
        for row in np.unique(rows):
            in_row = cols[rows == row]
            within_rows[row, in_row.min():in_row.max() + 1] = True
    chip_gaps = within_rows & ~covered
    assert (image[chip_gaps] == 0).all()
    assert (image[~covered & ~chip_gaps] == 0xAB).all()
    if name.startswith(("jungfrau", "eiger")) and config.image_shape[1] % 1024:
        assert chip_gaps.any()  # laid out with chip gaps
    for m in range(config.n_modules):
        assembler.clear_module(m, image)
    assert (image[covered] == 0).all()


@pytest.mark.parametrize(
    "config",
    [*JUNGFRAU_CONFIGS.values(), example("eiger_500k.json")],
    ids=[*JUNGFRAU_CONFIGS, "eiger"],
)
def test_module_origin_is_top_left_of_the_module(config):
    for m in range(config.n_modules):
        rows, cols = set(), set()
        for _, (dest_rows, dest_cols) in module_blocks(config, m):
            rows.update(range(*dest_rows.indices(config.image_shape[0])))
            cols.update(range(*dest_cols.indices(config.image_shape[1])))
        assert module_origin(config, m) == (min(rows), min(cols))


def test_gigafrost_module_origin_is_its_quadrant_corner():
    config = example("gigafrost.json")
    h, w = config.image_shape
    expected = [(h // 2, 0), (h // 2, 0), (h // 2, w // 2), (h // 2, w // 2),
                (0, 0), (0, 0), (0, w // 2), (0, w // 2)]
    assert [module_origin(config, m) for m in range(8)] == expected


def test_coalesced_plan_joins_only_rows_that_continue_each_other():
    """Module rows that fill whole image rows in order become a few long lines; flipped,
    mirrored or gapped rows stay one line each (the placement itself is checked pixel by
    pixel in test_assembler_places_encoded_frames)."""
    config = JUNGFRAU_CONFIGS["no_gaps_rotated"]
    width = config.module_format.module_shape[1]
    plans = [row_plan(module_blocks(config, m), config.image_shape) for m in range(2)]
    joined = [coalesce_plan(plan, width, config.image_shape[1]) for plan in plans]
    assert len(plans[0]) == 512 and joined[0][:, 4].tolist() == [2**17] * 4
    assert joined[0][:, :4].tolist() == [[0, 0, 0, 0], [128, 0, 128, 0], [256, 0, 256, 0],
                                         [384, 0, 384, 0]]
    np.testing.assert_array_equal(joined[1], plans[1])  # rotated: mirrored rows
    assert len(coalesce_plan(plans[0], width, config.image_shape[1], max_pixels=3000)) == 256
    for name in ("jf1m_gaps_flipped_y", "gaps_flipped_x", "mixed"):
        gapped = JUNGFRAU_CONFIGS[name]
        for m in range(gapped.n_modules):
            plan = row_plan(module_blocks(gapped, m), gapped.image_shape)
            np.testing.assert_array_equal(
                coalesce_plan(plan, width, gapped.image_shape[1]), plan)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.float32])
def test_raw_placement_copies_runs_of_any_length_and_type(dtype):
    """place_rows copies each piece as one run (short lines with rep movsb on x86-64, long
    ones streamed): odd lengths, odd offsets, empty runs, batches of frames and reversed
    pieces land exactly, nothing else is touched."""
    from fastcore.kernels import place_rows

    rng = np.random.default_rng(7)
    width, dst_width, frames = 37, 53, 3
    src = rng.integers(1, 200, size=(frames, 4 * width)).astype(dtype)
    # (src row, src col, dst row, dst col, n, step, pieces, pitch)
    plan = np.array([[0, 0, 0, 0, 37, 1, 1, 0],     # a whole row
                     [1, 3, 2, 5, 7, 1, 4, 9],      # 4 pieces of 7 with gaps
                     [2, 1, 1, 40, 0, 1, 1, 0],     # an empty run
                     [3, 2, 3, 30, 11, -1, 1, 0]],  # a reversed piece ending at column 30
                    dtype=np.int64)
    dst = np.full((frames + 1, 4 * dst_width), 250, dtype)
    src_rows, dst_rows = np.arange(frames), np.array([3, 0, 1])
    place_rows(src, src_rows, 0, width, dst, dst_rows, 0, dst_width, plan)
    expected = np.full_like(dst, 250)
    for f, d in zip(src_rows, dst_rows, strict=True):
        s, e = src[f].reshape(4, width), expected[d].reshape(4, dst_width)
        e[0, :37] = s[0]
        for i in range(4):
            e[2, 5 + 9 * i:12 + 9 * i] = s[1, 3 + 7 * i:10 + 7 * i]
        e[3, 20:31] = s[3, 2:13][::-1]
    np.testing.assert_array_equal(dst, expected)


def test_streamed_lines_land_exactly_at_any_alignment():
    """Lines streamed whole (non-temporal cache-line stores built from one or two source
    loads) and lines copied piece by piece: random piece lengths, gaps, pixel types and
    offsets on both sides land exactly, gaps inside a streamed line become zero and no
    pixel outside the line changes."""
    from fastcore.kernels import place_rows, streams_whole

    rng = np.random.default_rng(11)
    streamed = 0
    for _ in range(150):
        dtype = np.dtype(rng.choice([np.uint8, np.uint16, np.uint32, np.float64]))
        n, pieces = int(rng.integers(1, 700)), int(rng.integers(1, 6))
        pitch = n + int(rng.integers(0, 40 // dtype.itemsize + 2)) if pieces > 1 else 0
        span = (pieces - 1) * pitch + n
        width = n * pieces + int(rng.integers(0, 50))
        dst_width = span + int(rng.integers(0, 90))
        sc = int(rng.integers(0, width - n * pieces + 1))
        dc = int(rng.integers(0, dst_width - span + 1))
        src = rng.integers(1, 200, size=(2, 3 * width)).astype(dtype)
        dst = np.full((3, 3 * dst_width), 250, dtype)
        plan = np.array([[1, sc, 2, dc, n, 1, pieces, pitch]], np.int64)
        place_rows(src, np.array([0, 1]), 0, width, dst, np.array([2, 0]), 0, dst_width, plan)
        whole = streams_whole(n, pieces, pitch, dtype.itemsize)
        streamed += whole
        expected = np.full_like(dst, 250)
        for f, d in ((0, 2), (1, 0)):
            s, e = src[f].reshape(3, width), expected[d].reshape(3, dst_width)
            if whole:
                e[2, dc:dc + span] = 0
            for i in range(pieces):
                e[2, dc + i * pitch:dc + i * pitch + n] = s[1, sc + i * n:sc + (i + 1) * n]
        np.testing.assert_array_equal(dst, expected, err_msg=f"{dtype} {plan[0]}")
    assert 0 < streamed < 150  # both paths taken
