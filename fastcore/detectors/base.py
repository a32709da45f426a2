"""What a detector type is: the interface each type implements, and the defaults most share.

A detector type (one module of this package each) owns everything that differs between
detectors: the UDP packet header, the wire format of a module frame (:class:`ModuleFormat`),
which header fields hold the frame number, packet number, pulse id and daq_rec, where its
modules go on the image, how packed pixels decode, and how the simulator encodes them. The
receiver, sync, assembler, config and simulator ask the type; none of them names one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from fastcore.config import DetectorConfig

CHIP_GAP = 2
"""Pixels between two chips on an image laid out with chip gaps."""

Index = tuple[slice, slice]
Block = tuple[Index, Index]
"""(source index in the decoded module, destination index on the image)."""
Corners = tuple[int, int, int, int]
"""A module's (start_x, start_y, end_x, end_y) in the config's ``module_positions``."""


@dataclass(frozen=True)
class ModuleFormat:
    """Wire format of one module's frames.

    A frame occupies ``frame_bytes = n_packets * payload_bytes`` in the FrameBuffer; packet
    ``p`` lands at ``p * payload_bytes``. ``last_payload_bytes`` is the size of the last
    packet's payload (shorter for some Gigafrost geometries). The header fields named here
    give each packet's frame number, its packet index (``packet_field // packet_step``),
    and the frame's pulse id and daq_rec (None: the detector sends none, 0 is recorded).
    """

    detector_type: str
    header: np.dtype
    payload_bytes: int
    last_payload_bytes: int
    n_packets: int
    module_shape: tuple[int, int]
    pixel_bits: int
    chips: tuple[int, int]
    frame_field: str
    packet_field: str
    pulse_id_field: str | None
    daq_rec_field: str | None
    packet_step: int = 1
    rows_per_packet: int = 0  # pixel rows each packet carries, where packets hold whole rows

    @property
    def frame_bytes(self) -> int:
        return self.n_packets * self.payload_bytes

    def payload_sizes(self, packets: np.ndarray) -> np.ndarray:
        """Payload bytes of each packet index (the last packet of a frame may be shorter)."""
        return np.where(packets == self.n_packets - 1, self.last_payload_bytes,
                        self.payload_bytes)

    @property
    def pixel_dtype(self) -> np.dtype:
        """Pixel type on the wire (4-bit pixels come packed two per byte)."""
        return np.dtype(f"<u{max(self.pixel_bits // 8, 1)}")

    def frame_numbers(self, headers: np.ndarray) -> np.ndarray:
        """Frame number of each parsed header (vectorised)."""
        return headers[self.frame_field].astype(np.uint64, copy=False)

    def packet_numbers(self, headers: np.ndarray) -> np.ndarray:
        """Packet index within its frame of each parsed header (vectorised)."""
        numbers = headers[self.packet_field].astype(np.int64)
        return numbers // self.packet_step if self.packet_step != 1 else numbers

    def frame_fields(self, header: np.void) -> tuple[int, int]:
        """(pulse id, daq_rec) of a frame, from the header of one of its packets."""
        return (int(header[self.pulse_id_field]) if self.pulse_id_field else 0,
                int(header[self.daq_rec_field]) if self.daq_rec_field else 0)

    def chip_gap_shape(self) -> tuple[int, int]:
        """Module size on the image with 2-pixel gaps between chips."""
        rows, cols = self.chips
        return (self.module_shape[0] + CHIP_GAP * (rows - 1),
                self.module_shape[1] + CHIP_GAP * (cols - 1))


class DetectorType(ABC):
    """One kind of detector. Subclasses set the class attributes and implement the abstract
    methods; the defaults serve detectors whose modules sit where the config's
    ``module_positions`` put them (optionally with chip gaps) and whose pixels travel as
    little-endian integers, placed on the image straight from the FrameBuffer."""

    name: ClassVar[str]
    """The config's ``detector_type``."""
    bit_depths: ClassVar[tuple[int, ...]]
    """Allowed ``bit_depth`` values."""
    nominal_rate_hz: ClassVar[float]
    """Frame rate the buffers are sized for unless a config sets ``nominal_rate_hz``."""
    uses_module_positions: ClassVar[bool] = True
    """False: the type places its modules itself; ``module_positions`` is ignored."""
    converts: ClassVar[bool] = False
    """True: pedestal/gain conversion (float32 images) can be configured."""

    @abstractmethod
    def module_format(self, bit_depth: int, image_shape: tuple[int, int]) -> ModuleFormat:
        """The wire format of one module (sizes from the detector config)."""

    def image_dtype(self, bit_depth: int) -> np.dtype:
        """Pixel type of the assembled (unconverted) image."""
        return np.dtype(f"uint{max(8, bit_depth)}")

    def geometry_errors(self, bit_depth: int, n_modules: int, image_shape: tuple[int, int],
                        positions: dict[int, Corners]) -> list[str]:
        """What is wrong with this geometry, one message per problem naming the field."""
        height, width = image_shape
        fmt = self.module_format(bit_depth, image_shape)
        sizes = {fmt.module_shape, fmt.chip_gap_shape()}
        allowed = " or ".join(f"{w}x{h}" for h, w in sorted(sizes))
        errors = []
        for module, (sx, sy, ex, ey) in sorted(positions.items()):
            size = (abs(ey - sy) + 1, abs(ex - sx) + 1)
            where = f"module_positions[\"{module}\"]"
            if size not in sizes:
                errors.append(f"{where}: a {self.name} module is {allowed} pixels "
                              f"(width x height), got {size[1]}x{size[0]}")
            if (min(sx, ex) < 0 or max(sx, ex) >= width or min(sy, ey) < 0
                    or max(sy, ey) >= height):
                errors.append(f"{where}: corners {[sx, sy, ex, ey]} outside the "
                              f"{width}x{height} image")
        return errors

    def module_blocks(self, config: DetectorConfig, module_id: int) -> list[Block]:
        """The blocks that place module ``module_id`` on the image: one per chip when the
        config leaves chip gaps, else one; flips are negative-step slices."""
        fmt = self.module_format(config.bit_depth, config.image_shape)
        mod_h, mod_w = fmt.module_shape
        sx, sy, ex, ey = config.module_positions[module_id]
        with_gaps = (abs(ey - sy) + 1, abs(ex - sx) + 1) != fmt.module_shape
        chips_y, chips_x = fmt.chips if with_gaps else (1, 1)
        gap = CHIP_GAP if with_gaps else 0
        chip_h, chip_w = mod_h // chips_y, mod_w // chips_x
        blocks = []
        for cy in range(chips_y):
            for cx in range(chips_x):
                source = (slice(cy * chip_h, (cy + 1) * chip_h),
                          slice(cx * chip_w, (cx + 1) * chip_w))
                dest = (_span(sy, ey, cy * (chip_h + gap), chip_h),
                        _span(sx, ex, cx * (chip_w + gap), chip_w))
                blocks.append((source, dest))
        return blocks

    def module_origin(self, config: DetectorConfig, module_id: int) -> tuple[int, int]:
        """(pos_y, pos_x) of a module's top-left corner on the image."""
        sx, sy, ex, ey = config.module_positions[module_id]
        return (min(sy, ey), min(sx, ex))

    def unpacks(self, fmt: ModuleFormat) -> bool:
        """True when a frame's bytes are not its pixels as they are (packed pixels,
        padding): :meth:`unpack` decodes them first."""
        return False

    def unpack(self, fmt: ModuleFormat, frame: np.ndarray, out: np.ndarray) -> None:
        """Decode a frame's bytes into ``out`` (module shape; may be a strided view of the
        image). Only called when :meth:`unpacks` is True."""
        raise NotImplementedError(f"{self.name} frames are placed as they are")

    @abstractmethod
    def simulated_pixels(self, bit_depth: int, shape: tuple[int, int], frame: int,
                         module: int) -> np.ndarray:
        """The simulator's pixel values of one module frame, before any packing."""

    def encode_frame(self, fmt: ModuleFormat, pixels: np.ndarray) -> np.ndarray:
        """Module pixels -> the frame bytes as the payloads of its packets, concatenated."""
        return pixels.astype(f"<u{fmt.pixel_bits // 8}").view(np.uint8).ravel()

    @abstractmethod
    def packet_headers(self, config: DetectorConfig, fmt: ModuleFormat, frame: int,
                       module: int) -> np.ndarray:
        """Headers of all packets of one module frame, as the detector fills them."""


def _span(start: int, end: int, offset: int, length: int) -> slice:
    """``length`` image rows/cols from corner ``start`` towards ``end``, skipping ``offset``."""
    if start <= end:
        return slice(start + offset, start + offset + length)
    first = start - offset
    stop = first - length
    return slice(first, stop if stop >= 0 else None, -1)
