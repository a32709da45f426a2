"""Simulator pure logic (fastcore.simulator): fault injection, pixel content, encoding."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fastcore.assembler import ImageAssembler
from fastcore.config import parse_config
from fastcore.detectors import module_format
from fastcore.simulator import (
    Faults,
    daq_rec_of,
    encode_frame,
    packet_headers,
    packet_order,
    pulse_id_of,
    simulated_pixels,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- packet_order ------------------------------------------------------------------------

def test_no_faults_sends_every_packet_in_order():
    np.testing.assert_array_equal(packet_order(128, 1, 0, Faults(), rng()), np.arange(128))


def test_drop_list_drops_only_its_frame_and_module():
    faults = Faults(drop={(5, 1, 0), (5, 1, 77), (5, 1, 500), (6, 1, 3), (5, 2, 4)})
    order = packet_order(128, 5, 1, faults, rng())
    np.testing.assert_array_equal(order, np.setdiff1d(np.arange(128), [0, 77]))
    np.testing.assert_array_equal(packet_order(128, 5, 0, faults, rng()), np.arange(128))
    np.testing.assert_array_equal(packet_order(128, 6, 1, faults, rng()),
                                  np.setdiff1d(np.arange(128), [3]))


def test_drop_fraction():
    faults = Faults(drop_fraction=0.25)
    order = packet_order(20000, 1, 0, faults, rng(3))
    assert np.all(np.diff(order) > 0)  # in order, no repeats
    assert order.min() >= 0 and order.max() < 20000
    assert 0.23 < 1 - len(order) / 20000 < 0.27
    # the same seed gives the same losses
    np.testing.assert_array_equal(order, packet_order(20000, 1, 0, faults, rng(3)))


def test_duplicates_follow_their_original():
    faults = Faults(duplicate_fraction=0.3)
    order = packet_order(5000, 1, 0, faults, rng(4))
    counts = Counter(order.tolist())
    assert set(counts) == set(range(5000))
    assert set(counts.values()) == {1, 2}
    assert 0.27 < sum(v == 2 for v in counts.values()) / 5000 < 0.33
    assert np.all(np.diff(order) >= 0)  # a duplicate comes right after its original


def test_drop_and_duplicate_together():
    faults = Faults(drop_fraction=0.2, drop={(1, 0, 0)}, duplicate_fraction=0.2)
    order = packet_order(1000, 1, 0, faults, rng(5))
    counts = Counter(order.tolist())
    assert 0 not in counts
    assert 150 < 1000 - len(counts) < 250
    assert max(counts.values()) == 2


@pytest.mark.parametrize("duplicate_fraction", [0.0, 0.2])
def test_reorder_keeps_the_multiset(duplicate_fraction):
    base = Faults(drop_fraction=0.1, drop={(1, 0, 9)}, duplicate_fraction=duplicate_fraction)
    shuffled = Faults(drop_fraction=0.1, drop={(1, 0, 9)},
                      duplicate_fraction=duplicate_fraction, reorder=True)
    in_order = packet_order(500, 1, 0, base, rng(6))
    reordered = packet_order(500, 1, 0, shuffled, rng(6))
    assert Counter(reordered.tolist()) == Counter(in_order.tolist())
    assert not np.array_equal(reordered, in_order)
    assert 9 not in reordered


# --- simulated_pixels -----------------------------------------------------------------------

FRAMES = [0, 1, 13, 2**32 + 3]
MODULES = [0, 5]
GAIN_CODES = np.array([0, 0, 0, 0, 0, 0, 1, 3])


def direct_base(shape, frame, module) -> np.ndarray:
    rows, cols = np.indices(shape, dtype=np.int64)
    return 3 * rows + 7 * cols + 11 * frame + 101 * module


@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("module", MODULES)
def test_jungfrau_pixels_formula(frame, module):
    shape = (512, 1024)
    pixels = simulated_pixels("jungfrau", 16, shape, frame, module)
    rows, cols = np.indices(shape)
    block = rows // 32 + cols // 32
    gain = GAIN_CODES[(block + frame + module) % 8]
    expected = direct_base(shape, frame, module) % 16384 | gain << 14
    assert pixels.dtype == np.uint16 and pixels.shape == shape
    np.testing.assert_array_equal(pixels, expected)
    assert set(np.unique(pixels >> 14).tolist()) == {0, 1, 3}  # G0, G1, G2 all occur


@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize(
    ("bit_depth", "dtype"), [(4, np.uint8), (8, np.uint8), (16, np.uint16), (32, np.uint32)]
)
def test_eiger_pixels_formula(frame, module, bit_depth, dtype):
    shape = (256, 512)
    pixels = simulated_pixels("eiger", bit_depth, shape, frame, module)
    expected = direct_base(shape, frame, module) % 2**bit_depth
    assert pixels.dtype == dtype and pixels.shape == shape
    np.testing.assert_array_equal(pixels, expected)


@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("module", MODULES)
def test_gigafrost_pixels_formula(frame, module):
    shape = (504, 1008)
    pixels = simulated_pixels("gigafrost", 12, shape, frame, module)
    assert pixels.dtype == np.uint16 and pixels.shape == shape
    np.testing.assert_array_equal(pixels, direct_base(shape, frame, module) % 4096)


def test_pixels_differ_between_frames_and_modules():
    a = simulated_pixels("jungfrau", 16, (512, 1024), 1, 0)
    assert not np.array_equal(a, simulated_pixels("jungfrau", 16, (512, 1024), 2, 0))
    assert not np.array_equal(a, simulated_pixels("jungfrau", 16, (512, 1024), 1, 1))


# --- encode_frame and the assembler's decoding -------------------------------------------

def make_config(det_type: str, bit_depth: int, height=None, width=None):
    if det_type == "jungfrau":
        positions = {"0": [0, 0, 1023, 511], "1": [0, 1029, 1029, 516]}
        height, width = 1030, 1030
    elif det_type == "eiger":
        positions = {"0": [0, 0, 511, 255], "1": [516, 255, 1029, 0]}
        height, width = 256, 1030
    else:
        positions = {}
    return parse_config({
        "detector_name": "SIM", "detector_type": det_type,
        "n_modules": len(positions) or 8, "bit_depth": bit_depth,
        "image_pixel_height": height, "image_pixel_width": width, "start_udp_port": 40000,
        "writer_user_id": 0, "module_positions": positions,
    })


ROUND_TRIP = [
    ("jungfrau", 16, None, None),
    ("eiger", 4, None, None),
    ("eiger", 8, None, None),
    ("eiger", 16, None, None),
    ("eiger", 32, None, None),
    ("gigafrost", 12, 2016, 2016),
    ("gigafrost", 16, 2016, 2016),
    ("gigafrost", 12, 2012, 2016),  # shorter last packet
    ("gigafrost", 12, 160, 624),  # odd rows per packet: padded payloads
]


@pytest.mark.parametrize(("det_type", "bit_depth", "height", "width"), ROUND_TRIP,
                         ids=[f"{d}{b}-{h}" for d, b, h, _ in ROUND_TRIP])
def test_encode_then_decode_round_trip(det_type, bit_depth, height, width):
    config = make_config(det_type, bit_depth, height, width)
    fmt = module_format(det_type, bit_depth, config.image_shape)
    assembler = ImageAssembler(config)
    for frame, module in [(1, 0), (2**32 + 7, 1)]:
        pixels = simulated_pixels(det_type, bit_depth, fmt.module_shape, frame, module)
        encoded = encode_frame(fmt, pixels)
        assert encoded.dtype == np.uint8
        assert encoded.nbytes == fmt.frame_bytes == fmt.n_packets * fmt.payload_bytes
        decoded = assembler.decode_frame(encoded)
        assert decoded.shape == fmt.module_shape
        np.testing.assert_array_equal(decoded, pixels)


def test_jungfrau_encoding_is_row_major_little_endian():
    """Packet p holds bytes [p*8192, (p+1)*8192) of the row-major uint16 frame."""
    fmt = module_format("jungfrau", 16, (512, 1024))
    pixels = simulated_pixels("jungfrau", 16, fmt.module_shape, 3, 1)
    encoded = encode_frame(fmt, pixels)
    value = int(pixels[4, 10])
    offset = 2 * (4 * 1024 + 10)
    assert encoded[offset] == value & 0xFF and encoded[offset + 1] == value >> 8
    packet = offset // 8192
    assert packet == 1  # 8192 B = 4 rows per packet


def test_eiger4_encoding_low_nibble_first():
    fmt = module_format("eiger", 4, (256, 1030))
    pixels = simulated_pixels("eiger", 4, fmt.module_shape, 1, 0)
    encoded = encode_frame(fmt, pixels)
    assert encoded.nbytes == 256 * 512 // 2
    assert encoded[0] == pixels[0, 0] | pixels[0, 1] << 4


def test_gigafrost_encoding_packets_hold_whole_rows():
    config = make_config("gigafrost", 12, 2012, 2016)
    fmt = module_format("gigafrost", 12, config.image_shape)
    pixels = simulated_pixels("gigafrost", 12, fmt.module_shape, 1, 0)
    frame = encode_frame(fmt, pixels).reshape(fmt.n_packets, fmt.payload_bytes)
    row_bytes = fmt.module_shape[1] * 3 // 2
    p = 2  # the first row of packet 2 starts its payload
    row = p * fmt.rows_per_packet
    b0, b1 = int(frame[p, 0]), int(frame[p, 1])
    assert b0 | (b1 & 0xF) << 8 == pixels[row, 0]
    last_rows = fmt.module_shape[0] - (fmt.n_packets - 1) * fmt.rows_per_packet
    assert fmt.last_payload_bytes == last_rows * row_bytes
    assert not frame[-1, fmt.last_payload_bytes :].any()  # unused tail of the last packet


# --- packet headers ----------------------------------------------------------------------

def test_jungfrau_packet_headers():
    config = make_config("jungfrau", 16)
    fmt = module_format("jungfrau", 16, config.image_shape)
    headers = packet_headers(config, fmt, 42, 1)
    assert len(headers) == 128
    np.testing.assert_array_equal(headers["packetnum"], np.arange(128))
    assert (headers["framenum"] == 42).all()
    assert (headers["bunchid"] == pulse_id_of(42)).all()
    assert (headers["debug"] == daq_rec_of(42)).all()
    assert (headers["module_id"] == 1).all()


@pytest.mark.parametrize("module", range(8))
def test_gigafrost_packet_headers(module):
    config = make_config("gigafrost", 12, 2016, 2016)
    fmt = module_format("gigafrost", 12, config.image_shape)
    headers = packet_headers(config, fmt, 9, module)
    assert (headers["protocol_id"] == 0xCB).all()
    assert (headers["frame_index"] == 9).all()
    assert (headers["status_flags"] >> 6 == module // 2).all()  # quadrant id
    assert ((headers["status_flags"] >> 5) & 1 == module % 2).all()  # link id
    assert (headers["quadrant_row_length_in_blocks"] == 1008 // 12).all()
    np.testing.assert_array_equal(fmt.packet_numbers(headers), np.arange(fmt.n_packets))
