"""stream_recv: receive images from stream_send into this server's own ImageBuffer.

Each received image goes into a local ImageBuffer slot and its ImageMetadata is published
like the assembler does, so consumers on the receiving server (writer, preview) work
unchanged. On one machine, give the receiving side a config with its own detector_name.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import zmq

from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import DetectorConfig
from fastcore.formats import code_dtype, parse_image_message
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address
from fastcore.runtime import add_common_arguments, announce_ready, run_service

log = logging.getLogger(__name__)

_LOG_EVERY_S = 5.0


@dataclass
class RecvStats:
    images: int = 0
    rejected: int = 0


def receive(config: DetectorConfig, ipc_dir: str, address: str,
            stop: threading.Event) -> RecvStats:
    """Receive images from stream_send into this server's own ImageBuffer."""
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 16)
    pull.bind(address)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.bind(ipc_address(ipc_dir, config.detector_name, Stream.IMAGE))
    images = ImageBuffer.create(shm_name(config.detector_name, Segment.IMAGE),
                                config.n_image_slots, config.image_shape, config.image_dtype)
    expected_bytes = images.data_bytes
    stats, last_log = RecvStats(), time.monotonic()
    announce_ready("receiving images on %s into %s", address, images.name)
    try:
        while not stop.is_set():
            if pull.poll(100):
                frames = [frame.buffer for frame in pull.recv_multipart(copy=False)]
                try:
                    meta, data = parse_image_message(frames)
                    _check(meta, data, images, expected_bytes)
                except ValueError as exc:
                    stats.rejected += 1
                    log.error("rejected a message: %s", exc)
                    continue
                meta = meta.copy()
                target = images.begin_write(int(meta["id"]))
                np.copyto(target, np.frombuffer(data, images.dtype).reshape(images.shape))
                images.commit(meta)
                pub.send(meta.tobytes())
                stats.images += 1
            if time.monotonic() - last_log > _LOG_EVERY_S:
                last_log = time.monotonic()
                log.info("%s", stats)
    finally:
        log.info("stopped: %s", stats)
        pull.close(0)
        pub.close(0)
        images.close()
    return stats


def _check(meta: np.void, data: memoryview, images: ImageBuffer, expected_bytes: int) -> None:
    """ValueError saying why a received image does not fit this server's ImageBuffer."""
    shape = (int(meta["height"]), int(meta["width"]))
    dtype = code_dtype(int(meta["dtype"]))
    if shape != images.shape or dtype != images.dtype or data.nbytes != expected_bytes:
        raise ValueError(
            f"image {int(meta['id'])} is {shape[1]}x{shape[0]} {dtype}, {data.nbytes} B; "
            f"this buffer holds {images.shape[1]}x{images.shape[0]} {images.dtype}: check "
            "both sides use the same detector geometry")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-stream-recv",
        description="Receive images from stddaq-stream-send into this server's own "
        "ImageBuffer and publish their ImageMetadata like an assembler.")
    add_common_arguments(parser)
    parser.add_argument("--address", required=True,
                        help="address to listen on, e.g. tcp://*:10000")
    args = parser.parse_args(argv)
    return run_service("stddaq-stream-recv", args, lambda config, stop: receive(
        config, args.ipc_dir, args.address, stop))


if __name__ == "__main__":
    raise SystemExit(main())
