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
from fastcore.formats import IMAGE_METADATA, code_dtype
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
                frames = pull.recv_multipart(copy=False)
                problem = _check(frames, images, expected_bytes)
                if problem:
                    stats.rejected += 1
                    log.error("rejected a message: %s", problem)
                    continue
                meta = np.frombuffer(frames[0].buffer, IMAGE_METADATA)[0].copy()
                target = images.begin_write(int(meta["id"]))
                np.copyto(target, np.frombuffer(frames[1].buffer, images.dtype).reshape(
                    images.shape))
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


def _check(frames: list, images: ImageBuffer, expected_bytes: int) -> str | None:
    """Why a received message does not fit this server's ImageBuffer, or None."""
    if len(frames) != 2 or len(frames[0]) != IMAGE_METADATA.itemsize:
        return f"expected [ImageMetadata, image], got {len(frames)} frame(s)"
    meta = np.frombuffer(frames[0].buffer, IMAGE_METADATA)[0]
    shape = (int(meta["height"]), int(meta["width"]))
    try:
        dtype = code_dtype(int(meta["dtype"]))
    except ValueError as exc:
        return str(exc)
    if shape != images.shape or dtype != images.dtype or len(frames[1]) != expected_bytes:
        return (f"image {int(meta['id'])} is {shape[1]}x{shape[0]} {dtype}, "
                f"{len(frames[1])} B; this buffer holds {images.shape[1]}x{images.shape[0]} "
                f"{images.dtype}: check both sides use the same detector geometry")
    return None


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
