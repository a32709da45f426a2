"""What each detector type sends: packet header, payload size, packets and pixels per module.

Pure facts and pure functions (no sockets): the receiver, the simulator and the assembler
all take their sizes from :func:`module_format`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastcore.formats import EIGER_HEADER, GIGAFROST_HEADER, JUNGFRAU_HEADER

JUNGFRAU_MODULE_SHAPE = (512, 1024)
EIGER_MODULE_SHAPE = (256, 512)  # a half module: one UDP port
CHIP_GAP = 2
GIGAFROST_MAX_PAYLOAD = 7400
GIGAFROST_N_MODULES = 8
# Frame rate the buffers are sized for unless a config sets nominal_rate_hz: Jungfrau's
# 2 kHz is its top rate; for Eiger (rate depends on bit depth) and Gigafrost (on the image
# size) these are working defaults, to be set per beamline.
NOMINAL_RATE_HZ = {"jungfrau": 2000.0, "eiger": 2000.0, "gigafrost": 1000.0}


@dataclass(frozen=True)
class ModuleFormat:
    """Wire format of one module's frames.

    A frame occupies ``frame_bytes = n_packets * payload_bytes`` in the FrameBuffer; packet
    ``p`` lands at ``p * payload_bytes``. ``last_payload_bytes`` is the size of the last
    packet's payload (shorter for some Gigafrost geometries).
    """

    detector_type: str
    header: np.dtype
    payload_bytes: int
    last_payload_bytes: int
    n_packets: int
    module_shape: tuple[int, int]
    pixel_bits: int
    chips: tuple[int, int]
    rows_per_packet: int = 0  # Gigafrost only: packet number = packet_starting_row / this

    @property
    def frame_bytes(self) -> int:
        return self.n_packets * self.payload_bytes

    def payload_sizes(self, packets: np.ndarray) -> np.ndarray:
        """Payload bytes of each packet index (the last packet of a frame may be shorter)."""
        return np.where(packets == self.n_packets - 1, self.last_payload_bytes,
                        self.payload_bytes)

    @property
    def pixel_dtype(self) -> np.dtype:
        """Pixel type on the wire (Eiger 4-bit pixels are packed two per byte)."""
        return np.dtype(f"<u{max(self.pixel_bits // 8, 1)}")


    def frame_numbers(self, headers: np.ndarray) -> np.ndarray:
        """Frame number of each parsed header (vectorised)."""
        if self.detector_type == "gigafrost":
            return headers["frame_index"].astype(np.uint64)
        return headers["framenum"]

    def packet_numbers(self, headers: np.ndarray) -> np.ndarray:
        """Packet index within its frame of each parsed header (vectorised)."""
        if self.detector_type == "gigafrost":
            return headers["packet_starting_row"].astype(np.int64) // self.rows_per_packet
        return headers["packetnum"].astype(np.int64)

    def chip_gap_shape(self) -> tuple[int, int]:
        """Module size on the image with 2-pixel gaps between chips."""
        rows, cols = self.chips
        return (self.module_shape[0] + CHIP_GAP * (rows - 1),
                self.module_shape[1] + CHIP_GAP * (cols - 1))


def gigafrost_packet_layout(image_height: int, image_width: int) -> tuple[int, int, int, int]:
    """(rows per packet, payload bytes, last payload bytes, packets per frame) of a module."""
    module_x, module_y = image_width // 2, image_height // 4
    blocks12 = module_x // 12
    cache_blocks = int(GIGAFROST_MAX_PAYLOAD / (36 * blocks12) * blocks12 / 2)
    rows = int(min(cache_blocks * 48 / module_x, module_y))
    payload = module_x * rows * 3 // 2
    if rows % 2 and module_x % 48:
        payload += 36
    n_packets = math.ceil(module_y / rows)
    last_rows = module_y - (n_packets - 1) * rows
    last_payload = module_x * last_rows * 3 // 2
    return rows, payload, last_payload, n_packets


def module_format(detector_type: str, bit_depth: int, image_shape: tuple[int, int]
                  ) -> ModuleFormat:
    """The wire format of one module of a detector (sizes from the detector config)."""
    if detector_type == "jungfrau":
        return ModuleFormat("jungfrau", JUNGFRAU_HEADER, 8192, 8192, 128,
                            JUNGFRAU_MODULE_SHAPE, 16, (2, 4))
    if detector_type == "eiger":
        frame_bytes = EIGER_MODULE_SHAPE[0] * EIGER_MODULE_SHAPE[1] * bit_depth // 8
        return ModuleFormat("eiger", EIGER_HEADER, 4096, 4096, frame_bytes // 4096,
                            EIGER_MODULE_SHAPE, bit_depth, (1, 2))
    if detector_type == "gigafrost":
        height, width = image_shape
        rows, payload, last_payload, n_packets = gigafrost_packet_layout(height, width)
        return ModuleFormat("gigafrost", GIGAFROST_HEADER, payload, last_payload, n_packets,
                            (height // 4, width // 2), 12, (1, 1), rows_per_packet=rows)
    raise ValueError(f"unknown detector_type {detector_type!r}")


def gigafrost_quadrant(module_id: int) -> tuple[int, int]:
    """(quadrant id as in the header: SW=0, SE=1, NW=2, NE=3; link) of a Gigafrost module."""
    return module_id // 2, module_id % 2
