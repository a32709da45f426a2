"""PSI Gigafrost: 8 modules (4 quadrants x 2 links), 12-bit pixels packed 3 bytes per 2,
packets of up to 7400 B holding whole quadrant rows.

A quadrant is a quarter of the image; its two links send alternate rows, counted from
the image's centre row outwards. The packet layout follows from the image size, so the
config's ``module_positions`` are not used.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from fastcore.detectors.base import Block, Corners, DetectorType, ModuleFormat
from fastcore.detectors.simulated import base_values

if TYPE_CHECKING:
    from fastcore.config import DetectorConfig

HEADER = np.dtype(
    [
        ("protocol_id", "u1"),
        ("quadrant_row_length_in_blocks", "u1"),
        ("quadrant_rows", "u1"),
        ("status_flags", "u1"),
        ("scan_id", "<u4"),
        ("frame_index", "<u4"),
        ("image_status_flags", "<u2"),
        ("packet_starting_row", "<u2"),
        ("image_timing", "<u8"),
        ("sync_time", "<u4"),
        ("scan_time", "<u4"),
    ]
)
"""Gigafrost packet header (32 B); payload up to 7400 B of 12-bit packed pixels."""

PROTOCOL_ID = 0xCB
MAX_PAYLOAD = 7400
N_MODULES = 8


def quadrant_of(module_id: int) -> tuple[int, int]:
    """(quadrant id as in the header: SW=0, SE=1, NW=2, NE=3; link) of a module."""
    return module_id // 2, module_id % 2


def packet_layout(image_height: int, image_width: int) -> tuple[int, int, int, int]:
    """(rows per packet, payload bytes, last payload bytes, packets per frame) of a module."""
    module_x, module_y = image_width // 2, image_height // 4
    blocks12 = module_x // 12
    cache_blocks = int(MAX_PAYLOAD / (36 * blocks12) * blocks12 / 2)
    rows = int(min(cache_blocks * 48 / module_x, module_y))
    payload = module_x * rows * 3 // 2
    if rows % 2 and module_x % 48:
        payload += 36
    n_packets = math.ceil(module_y / rows)
    last_rows = module_y - (n_packets - 1) * rows
    last_payload = module_x * last_rows * 3 // 2
    return rows, payload, last_payload, n_packets


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


class Gigafrost(DetectorType):
    name = "gigafrost"
    bit_depths = (12, 16)
    nominal_rate_hz = 1000.0  # depends on the image size: a working default
    uses_module_positions = False

    def module_format(self, bit_depth: int, image_shape: tuple[int, int]) -> ModuleFormat:
        height, width = image_shape
        rows, payload, last_payload, n_packets = packet_layout(height, width)
        return ModuleFormat(self.name, HEADER, payload, last_payload, n_packets,
                            (height // 4, width // 2), 12, (1, 1), frame_field="frame_index",
                            packet_field="packet_starting_row", pulse_id_field=None,
                            daq_rec_field="image_status_flags", packet_step=rows,
                            rows_per_packet=rows)

    def image_dtype(self, bit_depth: int) -> np.dtype:
        return np.dtype("uint16")

    def geometry_errors(self, bit_depth: int, n_modules: int, image_shape: tuple[int, int],
                        positions: dict[int, Corners]) -> list[str]:
        height, width = image_shape
        errors = []
        if n_modules != N_MODULES:
            errors.append(f"n_modules: gigafrost has {N_MODULES} modules "
                          f"(4 quadrants x 2 links), got {n_modules}")
        if width % 24 or height % 4:
            errors.append("image_pixel_width, image_pixel_height: gigafrost needs a width "
                          f"divisible by 24 and a height divisible by 4, got {width}x{height}")
        return errors

    def module_blocks(self, config: DetectorConfig, module_id: int) -> list[Block]:
        """One block: the module's rows interleaved with its twin link's, from the centre
        row outwards."""
        height, width = config.image_shape
        mod_h, mod_w = height // 4, width // 2
        quadrant, link = quadrant_of(module_id)
        cols = slice(width // 2, width) if quadrant % 2 else slice(0, width // 2)
        half = height // 2
        if quadrant >= 2:  # NW, NE: streamed from the centre row upwards
            first = half - 1 - link
            stop = first - 2 * mod_h
            rows = slice(first, stop if stop >= 0 else None, -2)
        else:  # SW, SE: from the centre row downwards
            rows = slice(half + link, height, 2)
        return [((slice(0, mod_h), slice(0, mod_w)), (rows, cols))]

    def module_origin(self, config: DetectorConfig, module_id: int) -> tuple[int, int]:
        quadrant, _ = quadrant_of(module_id)
        height, width = config.image_shape
        return (0 if quadrant >= 2 else height // 2, width // 2 if quadrant % 2 else 0)

    def unpacks(self, fmt: ModuleFormat) -> bool:
        return True

    def unpack(self, fmt: ModuleFormat, frame: np.ndarray, out: np.ndarray) -> None:
        row_bytes = fmt.module_shape[1] * 3 // 2
        data = frame.reshape(fmt.n_packets, fmt.payload_bytes)[
            :, : fmt.rows_per_packet * row_bytes]  # packet padding dropped
        unpack_12bit(data.reshape(-1, row_bytes)[: fmt.module_shape[0]], out)

    def simulated_pixels(self, bit_depth: int, shape: tuple[int, int], frame: int,
                         module: int) -> np.ndarray:
        """base % 4096 (uint16)."""
        return (base_values(shape, frame, module) & 0xFFF).astype(np.uint16)

    def encode_frame(self, fmt: ModuleFormat, pixels: np.ndarray) -> np.ndarray:
        rows = pack_12bit(pixels)
        frame = np.zeros((fmt.n_packets, fmt.payload_bytes), np.uint8)
        per_packet = fmt.rows_per_packet * rows.shape[1]
        padded = np.zeros((fmt.n_packets * fmt.rows_per_packet, rows.shape[1]), np.uint8)
        padded[: len(rows)] = rows
        frame[:, :per_packet] = padded.reshape(fmt.n_packets, per_packet)
        return frame.ravel()

    def packet_headers(self, config: DetectorConfig, fmt: ModuleFormat, frame: int,
                       module: int) -> np.ndarray:
        headers = np.zeros(fmt.n_packets, fmt.header)
        quadrant, link = quadrant_of(module)
        half_height = config.image_pixel_height // 2
        headers["protocol_id"] = PROTOCOL_ID
        headers["quadrant_row_length_in_blocks"] = fmt.module_shape[1] // 12
        headers["quadrant_rows"] = (half_height & 0xFF) | (quadrant % 2 == 0)
        headers["status_flags"] = (quadrant << 6) | (link << 5) | (5 << 2) | (
            (half_height >> 8) & 3)
        headers["frame_index"] = frame
        headers["packet_starting_row"] = np.arange(fmt.n_packets) * fmt.rows_per_packet
        headers["image_timing"] = 300_000
        headers["sync_time"] = 200_000
        headers["scan_time"] = 100_000
        return headers
