"""stream_send: replicate this server's ImageBuffer to another server over ZMQ TCP.

Follows the local ImageMetadata stream and sends ``[ImageMetadata, image bytes]``
(``formats.image_message``, PUSH) to a stddaq-stream-recv. The image is copied out of the
ImageBuffer once, the slot is checked to still hold it, and the copy is queued without
blocking: when the link is slower than the detector, whole images are dropped and
counted, never torn.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass

import zmq

from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import DetectorConfig
from fastcore.formats import image_message, image_records
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address, subscribe
from fastcore.runtime import add_common_arguments, announce_ready, run_service

log = logging.getLogger(__name__)

_LOG_EVERY_S = 5.0


@dataclass
class SendStats:
    images: int = 0
    dropped_slow_link: int = 0
    dropped_overwritten: int = 0


def send(config: DetectorConfig, ipc_dir: str, address: str, stop: threading.Event,
         queue_images: int = 8) -> SendStats:
    """Follow the local images and push them to ``address`` (a stream_recv)."""
    ctx = zmq.Context.instance()
    sub = subscribe(ctx, ipc_address(ipc_dir, config.detector_name, Stream.IMAGE))
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, queue_images)  # libzmq counts a multipart message once
    push.setsockopt(zmq.LINGER, 1000)
    push.connect(address)
    images = ImageBuffer.attach(shm_name(config.detector_name, Segment.IMAGE))
    stats, last_log = SendStats(), time.monotonic()
    announce_ready("sending %s images to %s", config.detector_name, address)
    try:
        while not stop.is_set():
            if sub.poll(100):
                for meta in image_records(sub.recv()):
                    image_id = int(meta["id"])
                    if not images.holds(image_id):
                        images = images.refreshed()  # the assembler may have restarted
                    data = images.image(image_id).tobytes()  # the one copy
                    if not images.holds(image_id):
                        stats.dropped_overwritten += 1
                        continue
                    try:
                        push.send_multipart(image_message(meta, data), flags=zmq.NOBLOCK,
                                            copy=False)
                        stats.images += 1
                    except zmq.Again:
                        stats.dropped_slow_link += 1
            if time.monotonic() - last_log > _LOG_EVERY_S:
                last_log = time.monotonic()
                log.info("%s", stats)
    finally:
        log.info("stopped: %s", stats)
        sub.close(0)
        push.close()
        images.close()
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-stream-send",
        description="Send this server's images (ImageBuffer) to a stddaq-stream-recv.")
    add_common_arguments(parser)
    parser.add_argument("--address", required=True,
                        help="stream_recv address to connect to, e.g. tcp://daq2:10000")
    parser.add_argument("--queue", type=int, default=8,
                        help="images queued for a slow link before images are dropped")
    args = parser.parse_args(argv)
    if args.queue < 1:
        parser.error(f"--queue: expected an integer >= 1, got {args.queue}")
    return run_service("stddaq-stream-send", args, lambda config, stop: send(
        config, args.ipc_dir, args.address, stop, args.queue))


if __name__ == "__main__":
    raise SystemExit(main())
