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

import numpy as np
import zmq

from fastcore.buffers import FrameBuffer, ImageBuffer, shm_name
from fastcore.config import DetectorConfig
from fastcore.conversion import load_calibration
from fastcore.detectors import ModuleFormat, module_format
from fastcore.formats import (
    IMAGE_METADATA,
    INVALID_ID,
    RAW_METADATA,
    Encoding,
    ImageStatus,
    dtype_code,
)
from fastcore.geometry import module_blocks, row_plan
from fastcore.kernels import convert_rows, place_rows
from fastcore.pixels import unpack_4bit, unpack_12bit
from fastcore.process import add_common_arguments, ipc_address, run_service

log = logging.getLogger(__name__)


class ImageAssembler:
    """Pure assembly of module frames into an image array (no sockets, no processes)."""

    def __init__(self, config: DetectorConfig, calibration: list[np.ndarray] | None = None):
        self.config = config
        self.fmt: ModuleFormat = module_format(config.detector_type, config.bit_depth,
                                               config.image_shape)
        self.blocks = [module_blocks(config, m) for m in range(config.n_modules)]
        self.plans = [row_plan(blocks, config.image_shape) for blocks in self.blocks]
        self.calibration = calibration
        self._scratch = np.empty(self.fmt.module_shape, np.uint8) if (
            config.detector_type == "eiger" and config.bit_depth == 4) else None

    def _packed_rows(self, frame: np.ndarray) -> np.ndarray:
        """Gigafrost: the 12-bit packed pixel rows of a frame (packet padding dropped)."""
        fmt = self.fmt
        row_bytes = fmt.module_shape[1] * 3 // 2
        data = frame.reshape(fmt.n_packets, fmt.payload_bytes)[
            :, : fmt.rows_per_packet * row_bytes]
        return data.reshape(-1, row_bytes)[: fmt.module_shape[0]]

    def module_pixels(self, frame: np.ndarray) -> np.ndarray:
        """Decoded (rows, cols) pixels of a module frame (a view where the format allows)."""
        fmt = self.fmt
        if fmt.detector_type == "gigafrost":
            out = np.empty(fmt.module_shape, np.uint16)
            unpack_12bit(self._packed_rows(frame), out)
            return out
        if fmt.pixel_bits == 4:
            unpack_4bit(frame.reshape(fmt.module_shape[0], -1), self._scratch)
            return self._scratch
        return frame.view(f"<u{fmt.pixel_bits // 8}").reshape(fmt.module_shape)

    def place_module(self, module: int, frame: np.ndarray, image: np.ndarray) -> None:
        """Decode, convert if configured, and copy one module frame onto ``image``."""
        if self.fmt.detector_type == "gigafrost":  # unpack straight into the strided rows
            (_, dest), = self.blocks[module]
            unpack_12bit(self._packed_rows(frame), image[dest])
            return
        pixels = self.module_pixels(frame)
        if self.calibration is not None:
            convert_rows(pixels, self.calibration[module], image, self.plans[module])
        else:
            place_rows(pixels, image, self.plans[module])

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


class Assembler:
    """The assembler process: RawMetadata (PULL) -> ImageBuffer + ImageMetadata (PUB)."""

    def __init__(self, config: DetectorConfig, ipc_dir: str):
        self.config = config
        self.raw_address = ipc_address(ipc_dir, config.detector_name, "raw")
        self.image_address = ipc_address(ipc_dir, config.detector_name, "image")
        calibration = load_calibration(config) if config.converts else None
        self.assembler = ImageAssembler(config, calibration)
        self.images = 0
        self.flagged = 0

    def run(self, stop: threading.Event) -> None:
        config, assembler = self.config, self.assembler
        assembler.warm_up()
        frames = FrameBuffer.attach(shm_name(config.detector_name, "frames"))
        images = ImageBuffer.create(shm_name(config.detector_name, "image"),
                                    config.n_image_slots, config.image_shape, config.image_dtype)
        ctx = zmq.Context.instance()
        pull = ctx.socket(zmq.PULL)
        pull.bind(self.raw_address)
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        pub.bind(self.image_address)
        meta = np.zeros((), IMAGE_METADATA)
        meta["height"], meta["width"] = config.image_shape
        meta["dtype"] = dtype_code(config.image_dtype)
        meta["encoding"] = Encoding.RAW
        n_packets = assembler.fmt.n_packets
        last_log = time.monotonic()
        log.info("ready: assembling %s %dx%d %s into %s", config.detector_name,
                 *config.image_shape, config.image_dtype, images.name)
        try:
            while not stop.is_set():
                if not pull.poll(100):
                    continue
                raw = np.frombuffer(pull.recv(), RAW_METADATA)[0]
                image_id = int(raw["id"])
                status = ImageStatus(int(raw["status"]))
                image = images.begin_write(image_id)
                placed = np.zeros(config.n_modules, bool)
                if (frames.frame_ids(image_id) != image_id).any():
                    frames = frames.refreshed()  # the receivers may have been restarted
                for module in range(config.n_modules):
                    record = frames.module_frame(image_id, module)
                    held = int(record["id"])
                    if held != image_id:
                        assembler.clear_module(module, image)
                        # a newer frame in the slot: the assembler was too late; an older
                        # one or none: this module's frame never came
                        status |= (ImageStatus.ID_MISMATCH if image_id < held < INVALID_ID
                                   else ImageStatus.MISSING_MODULES)
                        continue
                    if int(record["n_recv_packets"]) < n_packets:
                        status |= ImageStatus.MISSING_PACKETS
                    assembler.place_module(module, frames.frame(image_id, module), image)
                    placed[module] = True
                if (frames.frame_ids(image_id)[placed] != image_id).any():
                    status |= ImageStatus.ID_MISMATCH
                meta["id"], meta["status"] = image_id, status
                meta["user_1"], meta["user_2"] = raw["pulse_id"], raw["daq_rec"]
                images.commit(meta)
                pub.send(meta.tobytes())
                self.images += 1
                self.flagged += bool(status)
                if time.monotonic() - last_log > 5:
                    last_log = time.monotonic()
                    log.info("%d images assembled, %d flagged", self.images, self.flagged)
        finally:
            log.info("stopped: %d images assembled, %d flagged", self.images, self.flagged)
            pull.close(0)
            pub.close(0)
            frames.close()
            images.close()


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
