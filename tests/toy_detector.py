"""A detector type that exists only in the test folder ("toycam"), registered the way an
operator adds one: a module named in $STDDAQ_DETECTOR_MODULES.

It differs from the built-in types wherever the interface allows: its own 20-byte header,
a 32-bit frame number, packets numbered by their byte offset, 8-bit pixels stored bit-
inverted on the wire (so frames are unpacked, not placed as they are), 2 x 3 chips per
module, and its own pixel formula.
"""

from __future__ import annotations

import numpy as np

from fastcore.detectors import DetectorType, ModuleFormat, register
from fastcore.detectors.simulated import base_values

HEADER = np.dtype([("magic", "<u2"), ("offset", "<u2"), ("frame", "<u4"),
                   ("status", "<u4"), ("pulse", "<u8")])
MODULE_SHAPE = (64, 96)
PAYLOAD_BYTES = 1024
MAGIC = 0x7A7A


def toy_pulse_id(frame: int) -> int:
    return 5_000_000 + 3 * frame


def toy_status(frame: int) -> int:
    return frame % 5


class ToyCam(DetectorType):
    name = "toycam"
    bit_depths = (8,)
    nominal_rate_hz = 50.0

    def module_format(self, bit_depth: int, image_shape: tuple[int, int]) -> ModuleFormat:
        n_packets = MODULE_SHAPE[0] * MODULE_SHAPE[1] // PAYLOAD_BYTES
        return ModuleFormat(self.name, HEADER, PAYLOAD_BYTES, PAYLOAD_BYTES, n_packets,
                            MODULE_SHAPE, 8, (2, 3), frame_field="frame",
                            packet_field="offset", pulse_id_field="pulse",
                            daq_rec_field="status", packet_step=PAYLOAD_BYTES)

    def unpacks(self, fmt: ModuleFormat) -> bool:
        return True

    def unpack(self, fmt: ModuleFormat, frame: np.ndarray, out: np.ndarray) -> None:
        np.invert(frame.reshape(fmt.module_shape), out=out)

    def simulated_pixels(self, bit_depth: int, shape: tuple[int, int], frame: int,
                         module: int) -> np.ndarray:
        """(5 * base) % 251, base as every type's (3*row + 7*col + 11*frame + 101*module)."""
        return ((base_values(shape, frame, module) * np.uint32(5)) % 251).astype(np.uint8)

    def encode_frame(self, fmt: ModuleFormat, pixels: np.ndarray) -> np.ndarray:
        return np.invert(pixels.astype(np.uint8)).ravel()

    def packet_headers(self, config, fmt: ModuleFormat, frame: int, module: int
                       ) -> np.ndarray:
        headers = np.zeros(fmt.n_packets, fmt.header)
        headers["magic"] = MAGIC
        headers["offset"] = np.arange(fmt.n_packets) * PAYLOAD_BYTES
        headers["frame"] = frame
        headers["status"] = toy_status(frame)
        headers["pulse"] = toy_pulse_id(frame)
        return headers


register(ToyCam())
