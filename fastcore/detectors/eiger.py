"""PSI/Dectris Eiger: slsDetector packets of 4096 B; one UDP port per half module of
256 x 512 pixels at 4, 8, 16 or 32 bits (4-bit pixels packed two per byte, low nibble
first)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fastcore.detectors.base import DetectorType, ModuleFormat
from fastcore.detectors.simulated import base_values, pulse_id_of
from fastcore.detectors.sls import sls_packet_headers

if TYPE_CHECKING:
    from fastcore.config import DetectorConfig

HEADER = np.dtype(
    [
        ("framenum", "<u8"),
        ("exp_length", "<u4"),
        ("packetnum", "<u4"),
        ("det_spec1", "<u8"),
        ("timestamp", "<u8"),
        ("module_id", "<u2"),
        ("row", "<u2"),
        ("column", "<u2"),
        ("det_spec2", "<u2"),
        ("det_spec3", "<u4"),
        ("round_robin", "<u2"),
        ("detector_type", "u1"),
        ("header_version", "u1"),
    ]
)
"""slsDetector header of Eiger packets (48 B); payload 4096 B."""

MODULE_SHAPE = (256, 512)  # a half module: one UDP port
PAYLOAD_BYTES = 4096
SLS_DETECTOR_TYPE = 1


def unpack_4bit(packed: np.ndarray, out: np.ndarray) -> None:
    """Unpack 4-bit pixels (low nibble first) into uint8 ``out`` of twice the columns."""
    np.bitwise_and(packed, 0x0F, out=out[:, 0::2])
    np.right_shift(packed, 4, out=out[:, 1::2])


def pack_4bit(pixels: np.ndarray) -> np.ndarray:
    """Inverse of :func:`unpack_4bit` (used by the simulator)."""
    p = pixels.astype(np.uint8)
    return (p[:, 0::2] & 0x0F) | (p[:, 1::2] << 4)


class Eiger(DetectorType):
    name = "eiger"
    bit_depths = (4, 8, 16, 32)
    nominal_rate_hz = 2000.0  # depends on the bit depth: a working default

    def module_format(self, bit_depth: int, image_shape: tuple[int, int]) -> ModuleFormat:
        frame_bytes = MODULE_SHAPE[0] * MODULE_SHAPE[1] * bit_depth // 8
        return ModuleFormat(self.name, HEADER, PAYLOAD_BYTES, PAYLOAD_BYTES,
                            frame_bytes // PAYLOAD_BYTES, MODULE_SHAPE, bit_depth, (1, 2),
                            frame_field="framenum", packet_field="packetnum",
                            pulse_id_field="det_spec1", daq_rec_field=None)

    def unpacks(self, fmt: ModuleFormat) -> bool:
        return fmt.pixel_bits == 4

    def unpack(self, fmt: ModuleFormat, frame: np.ndarray, out: np.ndarray) -> None:
        unpack_4bit(frame.reshape(fmt.module_shape[0], -1), out)

    def simulated_pixels(self, bit_depth: int, shape: tuple[int, int], frame: int,
                         module: int) -> np.ndarray:
        """base % 2**bit_depth (uint8 for 4 and 8 bit, uint16, uint32)."""
        value = base_values(shape, frame, module)
        if bit_depth == 32:
            return value
        dtype = np.uint8 if bit_depth <= 8 else np.uint16
        return (value & (2**bit_depth - 1)).astype(dtype)

    def encode_frame(self, fmt: ModuleFormat, pixels: np.ndarray) -> np.ndarray:
        if fmt.pixel_bits == 4:
            return pack_4bit(pixels).ravel()
        return super().encode_frame(fmt, pixels)

    def packet_headers(self, config: DetectorConfig, fmt: ModuleFormat, frame: int,
                       module: int) -> np.ndarray:
        headers = sls_packet_headers(fmt, frame, module, SLS_DETECTOR_TYPE)
        headers["det_spec1"] = pulse_id_of(frame)
        return headers
