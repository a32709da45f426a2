"""Assembler: FrameBuffer modules -> ImageBuffer images (+ ImageMetadata on ZMQ PUB).

For each RawMetadata from sync, every module frame of that id is decoded (12-bit and 4-bit
packed pixels are unpacked), optionally converted (Jungfrau pedestal/gain), and copied
block by block into the image slot. A module whose slot does not hold the frame is zeroed
and flagged; a module slot rewritten during assembly flags the image ID_MISMATCH.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time

import numba
import numpy as np
import zmq

from fastcore.buffers import FrameBuffer, ImageBuffer, shm_name
from fastcore.config import DetectorConfig
from fastcore.conversion import load_calibration
from fastcore.detectors import ModuleFormat
from fastcore.formats import (
    IMAGE_METADATA,
    INVALID_ID,
    RAW_METADATA,
    Encoding,
    ImageStatus,
    dtype_code,
)
from fastcore.geometry import coalesce_plan, module_blocks, row_plan
from fastcore.kernels import convert_rows, place_rows
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address
from fastcore.runtime import add_common_arguments, announce_ready, run_service

log = logging.getLogger(__name__)

# a batch of one: row 0 of a single frame or image (writable, like the assembler's own
# row arrays, so warm_up compiles the kernel signature the batches use)
_ROW_0 = np.zeros(1, np.intp)


class ImageAssembler:
    """Pure assembly of module frames into an image array (no sockets, no processes)."""

    def __init__(self, config: DetectorConfig, calibration: list[np.ndarray] | None = None):
        self.config = config
        self.kind = config.kind
        self.fmt: ModuleFormat = config.module_format
        self.blocks = [module_blocks(config, m) for m in range(config.n_modules)]
        self.plans = [row_plan(blocks, config.image_shape) for blocks in self.blocks]
        self.copy_plans = [coalesce_plan(plan, self.fmt.module_shape[1], config.image_shape[1])
                           for plan in self.plans]  # raw placement: rows joined
        self.calibration = calibration
        unpacks = self.kind.unpacks(self.fmt)
        self._scratch = np.empty(self.fmt.module_shape, self.kind.image_dtype(
            config.bit_depth)) if unpacks else None
        # an unpacked module that is one block goes straight onto the image
        whole = (slice(0, self.fmt.module_shape[0]), slice(0, self.fmt.module_shape[1]))
        self._direct = [unpacks and calibration is None and len(blocks) == 1
                        and blocks[0][0] == whole for blocks in self.blocks]

    def decode_frame(self, frame: np.ndarray) -> np.ndarray:
        """Decoded (rows, cols) pixels of a module frame (a view where the format allows;
        else a scratch array that the next call overwrites)."""
        fmt = self.fmt
        if self._scratch is not None:
            self.kind.unpack(fmt, frame, self._scratch)
            return self._scratch
        return frame.view(fmt.pixel_dtype).reshape(fmt.module_shape)

    @property
    def places_from_buffer(self) -> bool:
        """True when frames are placed straight from the FrameBuffer by the numba kernels
        (not for detector types whose frames are unpacked first)."""
        return self._scratch is None

    def place_module(self, module: int, frame: np.ndarray, image: np.ndarray) -> None:
        """Decode, convert if configured, and copy one module frame onto ``image`` (a
        C-contiguous array of the image shape)."""
        if self._direct[module]:  # unpack straight into the (strided) destination
            (_, dest), = self.blocks[module]
            self.kind.unpack(self.fmt, frame, image[dest])
            return
        if not image.flags.c_contiguous:
            raise ValueError("place_module needs a C-contiguous image")
        pixels = self.decode_frame(frame)
        self.place_frames(module, (pixels.reshape(1, -1), _ROW_0, 0),
                          (image.reshape(1, -1), _ROW_0, 0))

    def place_frames(self, module: int, frames: tuple[np.ndarray, np.ndarray, int],
                     images: tuple[np.ndarray, np.ndarray, int]) -> None:
        """Place a batch of frames of ``module`` (only when :attr:`places_from_buffer`, or decoded
        pixels): ``frames`` and ``images`` are (2-D pixel rows, row of each batch member,
        first pixel column), as ``pixel_rows`` of the FrameBuffer and ImageBuffer give
        them."""
        src, src_rows, src_offset = frames
        dst, dst_rows, dst_offset = images
        src_width, dst_width = self.fmt.module_shape[1], self.config.image_shape[1]
        if self.calibration is not None:
            convert_rows(src, src_rows, src_offset, src_width, self.calibration[module], dst,
                         dst_rows, dst_offset, dst_width, self.plans[module])
        else:
            place_rows(src, src_rows, src_offset, src_width, dst, dst_rows, dst_offset,
                       dst_width, self.copy_plans[module])

    def warm_up(self) -> None:
        """Compile the numba kernels for this detector's pixel types now (they are cached on
        disk), so the first images are not late."""
        image = np.zeros(self.config.image_shape, self.config.image_dtype)
        frame = np.zeros(self.fmt.frame_bytes, np.uint8)
        frame.flags.writeable = False  # as the FrameBuffer is attached: another numba type
        self.place_module(0, frame, image)

    def clear_module(self, module: int, image: np.ndarray) -> None:
        for _, dest in self.blocks[module]:
            image[dest] = 0


# Raw images up to this size are copied on one thread. Measured (1 MiB Jungfrau module,
# ring to ring, batches of one): 0.29 ms CPU per image on one thread, 0.37 ms on two
# (0.25 ms wall): waking a worker per image costs more CPU than it saves in time.
SERIAL_COPY_MAX_BYTES = 16 * 2**20


class Assembler:
    """The assembler process: RawMetadata (PULL) -> ImageBuffer + ImageMetadata (PUB).

    Images are assembled in batches of whatever RawMetadata is already queued (up to
    ``MAX_BATCH``): when the assembler keeps up a batch is one image and adds no latency;
    when it falls behind, one pass over a module's rows serves several images, which reads
    the Jungfrau calibration once per batch instead of once per image.
    """

    MAX_BATCH = 8

    def __init__(self, config: DetectorConfig, ipc_dir: str):
        self.config = config
        self.raw_address = ipc_address(ipc_dir, config.detector_name, Stream.RAW)
        self.image_address = ipc_address(ipc_dir, config.detector_name, Stream.IMAGE)
        calibration = load_calibration(config) if config.converts else None
        self.assembler = ImageAssembler(config, calibration)
        self.max_batch = max(1, min(self.MAX_BATCH, config.n_frame_slots // 2,
                                    config.n_image_slots // 2))
        self.images = 0
        self.flagged = 0

    def run(self, stop: threading.Event) -> None:
        config = self.config
        image_bytes = config.image_dtype.itemsize * config.image_shape[0] * config.image_shape[1]
        if not config.converts and image_bytes <= SERIAL_COPY_MAX_BYTES:
            numba.set_num_threads(1)  # this thread's kernels: a raw copy on one thread
        self.assembler.warm_up()
        self.open_buffers()
        ctx = zmq.Context.instance()
        pull = ctx.socket(zmq.PULL)
        pull.bind(self.raw_address)
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        pub.bind(self.image_address)
        last_log = time.monotonic()
        announce_ready("assembling %s %dx%d %s into %s", config.detector_name,
                       *config.image_shape, config.image_dtype, self.image_buffer.name)
        try:
            while not stop.is_set():
                if not pull.poll(1000):  # idle: wake once a second to see a stop
                    continue
                batch = [pull.recv()]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(pull.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                raws = np.frombuffer(b"".join(batch), RAW_METADATA)  # sync batches too
                committed = [record for start in range(0, len(raws), self.max_batch)
                             for record in self.assemble(raws[start:start + self.max_batch])]
                if committed:  # one message per batch: consumers take several records
                    pub.send(b"".join(committed))
                if time.monotonic() - last_log > 5:
                    last_log = time.monotonic()
                    log.info("%d images assembled, %d flagged", self.images, self.flagged)
        finally:
            log.info("stopped: %d images assembled, %d flagged", self.images, self.flagged)
            pull.close(0)
            pub.close(0)
            self.close_buffers()

    def open_buffers(self) -> None:
        """Attach the FrameBuffer and create the ImageBuffer."""
        config = self.config
        self.frames = FrameBuffer.attach(shm_name(config.detector_name, Segment.FRAMES))
        self.image_buffer = ImageBuffer.create(shm_name(config.detector_name, Segment.IMAGE),
                                               config.n_image_slots, config.image_shape,
                                               config.image_dtype)
        self._frame_rows: tuple[np.ndarray, int] | None = None  # FrameBuffer.pixel_rows
        self._image_rows = self.image_buffer.pixel_rows(config.image_dtype)
        self._meta = np.zeros((), IMAGE_METADATA)
        self._meta["height"], self._meta["width"] = config.image_shape
        self._meta["dtype"] = dtype_code(config.image_dtype)
        self._meta["encoding"] = Encoding.RAW

    def close_buffers(self) -> None:
        self.frames.close()
        self.image_buffer.close()

    def assemble(self, raws: np.ndarray) -> list[bytes]:
        """Assemble the images of a batch of RawMetadata into the ImageBuffer; returns the
        committed ImageMetadata records, in order."""
        config, assembler, images = self.config, self.assembler, self.image_buffer
        ids = raws["id"]  # uint64, like the FrameBuffer's ids
        if len(ids) > 1 and len(np.unique(ids % images.n_slots)) < len(ids):  # a shared slot
            return [m for k in range(len(raws)) for m in self.assemble(raws[k:k + 1])]
        statuses = [ImageStatus(int(status)) for status in raws["status"]]
        held = self.frames.held_ids(ids)
        if (held != ids[:, None]).any():
            self.frames = self.frames.refreshed()  # the receivers may have been restarted
            self._frame_rows = None
            held = self.frames.held_ids(ids)
        targets = [images.begin_write(int(i)) for i in ids]
        from_buffer = assembler.places_from_buffer
        if from_buffer:
            if self._frame_rows is None:
                self._frame_rows = self.frames.pixel_rows(assembler.fmt.pixel_dtype)
            frame_rows, frame_offset = self._frame_rows
            image_rows, image_offset = self._image_rows
            frame_slots = (ids % self.frames.n_slots * config.n_modules).astype(np.intp)
            image_slots = (ids % images.n_slots).astype(np.intp)
        placed = held == ids[:, None]
        short = placed & (self.frames.received_packets(ids) < assembler.fmt.n_packets)
        for k in np.flatnonzero(short.any(axis=1)):
            statuses[k] |= ImageStatus.MISSING_PACKETS
        for module in range(config.n_modules):
            for k in np.flatnonzero(~placed[:, module]):
                assembler.clear_module(module, targets[k])
                # a newer frame in the slot: the assembler was too late; an older one or
                # none: this module's frame never came
                late = int(ids[k]) < int(held[k, module]) < INVALID_ID
                statuses[k] |= ImageStatus.ID_MISMATCH if late else ImageStatus.MISSING_MODULES
            members = np.flatnonzero(placed[:, module])
            if not len(members):
                continue
            if from_buffer:
                assembler.place_frames(
                    module, (frame_rows, frame_slots[members] + module, frame_offset),
                    (image_rows, image_slots[members], image_offset))
            else:
                for k in members:
                    assembler.place_module(module, self.frames.frame(int(ids[k]), module),
                                           targets[k])
        published = []
        meta = self._meta
        overwritten = (self.frames.held_ids(ids) != ids[:, None]) & placed  # meanwhile
        for k, raw in enumerate(raws):
            if overwritten[k].any():
                statuses[k] |= ImageStatus.ID_MISMATCH
            meta["id"], meta["status"] = ids[k], statuses[k]
            meta["user_1"], meta["user_2"] = raw["pulse_id"], raw["daq_rec"]
            meta["frame_index"] = raw["frame_index"]
            images.commit(meta)
            published.append(meta.tobytes())
            self.images += 1
            self.flagged += bool(statuses[k])
        return published


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-assembler",
        description="Assemble module frames into images in the ImageBuffer (shared memory) "
        "and publish ImageMetadata on ZMQ.",
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    return run_service("stddaq-assembler", args,
                       lambda config, stop: Assembler(config, args.ipc_dir).run(stop))


if __name__ == "__main__":
    raise SystemExit(main())
