"""PSI Jungfrau: slsDetector packets of 8192 B of 16-bit pixels, 128 per 512 x 1024 module.

Pixels carry the gain stage in bits 14-15 and the ADC value in bits 0-13; pedestal/gain
conversion to float32 is available (fastcore.conversion).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from fastcore.detectors.base import DetectorType, ModuleFormat
from fastcore.detectors.simulated import base_pattern, daq_rec_of, pulse_id_of
from fastcore.detectors.sls import sls_packet_headers

if TYPE_CHECKING:
    from fastcore.config import DetectorConfig

HEADER = np.dtype(
    [
        ("framenum", "<u8"),
        ("exptime", "<u4"),
        ("packetnum", "<u4"),
        ("bunchid", "<f8"),
        ("timestamp", "<u8"),
        ("module_id", "<u2"),
        ("x", "<u2"),
        ("y", "<u2"),
        ("z", "<u2"),
        ("debug", "<u4"),
        ("round_robin", "<u2"),
        ("detector_type", "u1"),
        ("header_version", "u1"),
    ]
)
"""slsDetector header of Jungfrau packets (48 B); payload 8192 B."""

MODULE_SHAPE = (512, 1024)
PAYLOAD_BYTES = 8192
N_PACKETS = 128
SLS_DETECTOR_TYPE = 3  # the header's detector_type byte
_GAIN_CODES = np.array([0, 0, 0, 0, 0, 0, 1, 3], np.uint16)


@functools.lru_cache(maxsize=64)
def _gain_bits(shape: tuple[int, int], module: int) -> np.ndarray:
    """Gain bits (14-15) of each of the 8 phases ``(row//32 + col//32 + module + frame) % 8``
    as uint16 (8, rows, cols)."""
    rows = np.arange(shape[0])[:, None]
    cols = np.arange(shape[1])[None, :]
    block = (rows // 32 + cols // 32 + module) % 8
    bits = np.stack([(_GAIN_CODES[(block + phase) % 8] << 14)
                     for phase in range(8)]).astype(np.uint16)
    bits.flags.writeable = False
    return bits


class Jungfrau(DetectorType):
    name = "jungfrau"
    bit_depths = (16,)
    nominal_rate_hz = 2000.0  # its top rate
    converts = True

    def module_format(self, bit_depth: int, image_shape: tuple[int, int]) -> ModuleFormat:
        return ModuleFormat(self.name, HEADER, PAYLOAD_BYTES, PAYLOAD_BYTES, N_PACKETS,
                            MODULE_SHAPE, 16, (2, 4), frame_field="framenum",
                            packet_field="packetnum", pulse_id_field="bunchid",
                            daq_rec_field="debug")

    def simulated_pixels(self, bit_depth: int, shape: tuple[int, int], frame: int,
                         module: int) -> np.ndarray:
        """ADC = base % 16384 with the gain bits 14-15 set per 32x32 block
        ``b = row//32 + col//32``: code ``[0,0,0,0,0,0,1,3][(b + frame + module) % 8]``."""
        shape = tuple(shape)
        value = base_pattern(shape, module).astype(np.uint16)
        value += np.uint16((11 * frame) % 2**16)  # wraps mod 2**16
        value &= 0x3FFF
        value |= _gain_bits(shape, module)[frame % 8]
        return value

    def packet_headers(self, config: DetectorConfig, fmt: ModuleFormat, frame: int,
                       module: int) -> np.ndarray:
        headers = sls_packet_headers(fmt, frame, module, SLS_DETECTOR_TYPE)
        headers["bunchid"] = pulse_id_of(frame)
        headers["debug"] = daq_rec_of(frame)
        return headers
