"""Live preview: the newest image at most ``rate`` times per second, for viewers.

ZMQ PUB, two frames per image (:func:`preview_message`, read back by
:func:`parse_preview_message`): a JSON header ``{"type": numpy dtype, "shape": [h, w],
"frame": image id, "status": status}`` and the raw image bytes (the format of std-daq's
live stream). Only whole images are published: a slot rewritten while it was copied is
skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

import numpy as np
import zmq

from fastcore.buffers import ImageBuffer, SlotOverwrittenError, shm_name
from fastcore.config import DetectorConfig
from fastcore.formats import image_records
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address
from fastcore.runtime import add_common_arguments, announce_ready, run_service

log = logging.getLogger(__name__)


def preview_message(metadata: np.void, image: np.ndarray) -> list:
    """The frames of one preview: JSON header, image bytes."""
    header = {"type": image.dtype.name, "shape": list(image.shape),
              "frame": int(metadata["id"]), "status": int(metadata["status"])}
    return [json.dumps(header).encode(), image]


def parse_preview_message(frames: list) -> tuple[dict, np.ndarray]:
    """(header, image) of a :func:`preview_message` (frames: bytes-likes); ValueError on
    another message."""
    if len(frames) != 2:
        raise ValueError(f"expected [header, image], got {len(frames)} frame(s)")
    try:
        header = json.loads(bytes(frames[0]))
        image = np.frombuffer(frames[1], np.dtype(header["type"])).reshape(header["shape"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a preview message: {exc!r:.200}") from None
    return header, image


def serve(config: DetectorConfig, ipc_dir: str, address: str, rate_hz: float,
          stop: threading.Event) -> int:
    """Publish previews until stopped; returns how many were sent."""
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.CONFLATE, 1)  # keep only the newest ImageMetadata
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ipc_address(ipc_dir, config.detector_name, Stream.IMAGE))
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 4)
    pub.bind(address)
    images = ImageBuffer.attach(shm_name(config.detector_name, Segment.IMAGE))
    out = np.empty(images.shape, images.dtype)
    period, next_send, sent = 1.0 / rate_hz, time.monotonic(), 0
    pending = None  # newest ImageMetadata not yet previewed
    announce_ready("previewing %s on %s at <= %g Hz", config.detector_name, address, rate_hz)
    try:
        while not stop.is_set():
            wait = next_send - time.monotonic() if pending is not None else 0.1
            if sub.poll(max(1, int(wait * 1000))):
                pending = image_records(sub.recv())[-1].copy()  # the newest
            if pending is None or time.monotonic() < next_send:
                continue
            meta, pending = pending, None
            try:
                images.read(int(meta["id"]), out)
            except SlotOverwrittenError:
                images = images.refreshed()  # the assembler may have been restarted
                continue
            pub.send_multipart(preview_message(meta, out), copy=True)
            sent += 1
            next_send = max(next_send + period, time.monotonic())
    finally:
        log.info("stopped: %d previews sent", sent)
        sub.close(0)
        pub.close(0)
        images.close()
    return sent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-preview",
        description="Publish the newest image a few times per second for live viewers "
        "(ZMQ PUB: JSON header + image bytes).")
    add_common_arguments(parser)
    parser.add_argument("--address", default="tcp://*:20000",
                        help="address to publish on (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=2.0,
                        help="previews per second at most (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 1000:
        parser.error(f"--rate: expected previews per second in (0, 1000], got {args.rate}")
    return run_service("stddaq-preview", args, lambda config, stop: serve(
        config, args.ipc_dir, args.address, args.rate, stop))


if __name__ == "__main__":
    raise SystemExit(main())
