"""Detector simulator: UDP streams of any detector type, with known pixel content.

Module ``m`` sends to ``start_udp_port + m``. Pixel content is a documented function of
frame, module and pixel (:func:`simulated_pixels`, defined by each detector type with its
packet headers and wire encoding), so tests can compute every expected image.
Faults can be injected: dropped, reordered and duplicated packets, and silent modules.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from fastcore.config import ConfigError, DetectorConfig, load_config
from fastcore.detectors import ModuleFormat, detector_type
from fastcore.detectors.simulated import daq_rec_of, pulse_id_of
from fastcore.runtime import add_log_level, setup_logging, stop_on_signals
from fastcore.udp import MessageVector

__all__ = ["DetectorSimulator", "Faults", "daq_rec_of", "encode_frame", "packet_headers",
           "packet_order", "pulse_id_of", "simulated_pixels"]

log = logging.getLogger(__name__)


def simulated_pixels(detector_type_name: str, bit_depth: int, shape: tuple[int, int],
                     frame: int, module: int) -> np.ndarray:
    """Pixel values of one module frame, before any packing on the wire: a function of
    ``base = 3*row + 7*col + 11*frame + 101*module`` documented by each detector type."""
    return detector_type(detector_type_name).simulated_pixels(bit_depth, shape, frame, module)


def encode_frame(fmt: ModuleFormat, pixels: np.ndarray) -> np.ndarray:
    """Module pixels -> the frame bytes as the payloads of its packets, concatenated."""
    return detector_type(fmt.detector_type).encode_frame(fmt, pixels)


def packet_headers(config: DetectorConfig, fmt: ModuleFormat, frame: int, module: int
                   ) -> np.ndarray:
    """Headers of all packets of one module frame, as the detector fills them."""
    return config.kind.packet_headers(config, fmt, frame, module)


@dataclass
class Faults:
    """Faults to inject. ``drop`` holds (frame, module, packet) triples."""

    drop_fraction: float = 0.0
    drop: set[tuple[int, int, int]] = field(default_factory=set)
    reorder: bool = False
    duplicate_fraction: float = 0.0
    silent_modules: set[int] = field(default_factory=set)
    seed: int = 0


def packet_order(n_packets: int, frame: int, module: int, faults: Faults,
                 rng: np.random.Generator) -> np.ndarray:
    """Indices of the packets to send for one module frame, faults applied, in send order."""
    keep = np.ones(n_packets, bool)
    if faults.drop_fraction:
        keep &= rng.random(n_packets) >= faults.drop_fraction
    for f, m, p in faults.drop:
        if f == frame and m == module and 0 <= p < n_packets:
            keep[p] = False
    order = np.flatnonzero(keep)
    if faults.duplicate_fraction:
        extra = order[rng.random(len(order)) < faults.duplicate_fraction]
        order = np.concatenate([order, extra])
        if not faults.reorder:  # a duplicate follows its original
            order = np.sort(order, kind="stable")
    if faults.reorder:
        rng.shuffle(order)
    return order


class DetectorSimulator:
    """Sends the UDP streams of all modules of a detector config."""

    def __init__(self, config: DetectorConfig, host: str = "127.0.0.1",
                 faults: Faults | None = None):
        self.config = config
        self.host = host
        self.faults = faults or Faults()
        self.kind = config.kind
        self.fmt = config.module_format
        self.stop_event = threading.Event()
        self.frames_sent = 0
        self.packets_sent = 0
        self.packets_refused = 0  # sent while no receiver listened (ICMP port unreachable)

    def module_frame(self, frame: int, module: int) -> tuple[np.ndarray, np.ndarray]:
        """(headers, frame bytes) of one module frame."""
        pixels = self.kind.simulated_pixels(self.config.bit_depth, self.fmt.module_shape,
                                            frame, module)
        return (self.kind.packet_headers(self.config, self.fmt, frame, module),
                self.kind.encode_frame(self.fmt, pixels))

    def run(self, n_frames: int, rate_hz: float = 0.0, start_frame: int = 1) -> int:
        """Send ``n_frames`` frames (0 = until stopped) at ``rate_hz`` (0 = at full speed)."""
        config, fmt = self.config, self.fmt
        rng = np.random.default_rng(self.faults.seed)
        modules = [m for m in range(config.n_modules) if m not in self.faults.silent_modules]
        sockets = {}
        for m in modules:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20)
            sock.connect((self.host, config.udp_port(m)))
            sockets[m] = sock
        n_max = 2 * fmt.n_packets
        vector = MessageVector(n_max, fmt.header.itemsize)
        sizes = np.full(fmt.n_packets, fmt.payload_bytes, np.uint64)
        sizes[-1] = fmt.last_payload_bytes
        start = time.monotonic()
        frame = start_frame
        try:
            while not self.stop_event.is_set() and (n_frames == 0 or
                                                     self.frames_sent < n_frames):
                for m in modules:
                    headers, data = self.module_frame(frame, m)
                    order = packet_order(fmt.n_packets, frame, m, self.faults, rng)
                    k = len(order)
                    vector.headers[:k] = headers.view(np.uint8).reshape(fmt.n_packets, -1)[order]
                    offsets = order.astype(np.uint64) * np.uint64(fmt.payload_bytes)
                    vector.set_payloads(np.uint64(data.ctypes.data) + offsets, sizes[order])
                    try:
                        self.packets_sent += vector.send(sockets[m].fileno(), k)
                    except ConnectionRefusedError:  # nobody listens (yet): a detector
                        self.packets_refused += k   # sends on, its packets are lost
                self.frames_sent += 1
                frame += 1
                if rate_hz > 0:
                    delay = start + self.frames_sent / rate_hz - time.monotonic()
                    if delay > 0:
                        self.stop_event.wait(delay)
        finally:
            for sock in sockets.values():
                sock.close()
        return self.frames_sent


def _drop_triple(text: str) -> tuple[int, int, int]:
    try:
        frame, module, packet = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FRAME:MODULE:PACKET integers, got {text!r}") from None
    return frame, module, packet


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-simulator",
        description="Simulate a Jungfrau, Eiger or Gigafrost detector: send its UDP module "
        "streams (port start_udp_port + module) with known pixel content.",
    )
    parser.add_argument("config", help="detector config JSON file")
    parser.add_argument("--host", default="127.0.0.1", help="receiver address (default: "
                        "%(default)s)")
    parser.add_argument("-n", "--frames", type=int, default=100,
                        help="frames to send, 0 = until stopped (default: %(default)s)")
    parser.add_argument("-r", "--rate", type=float, default=10.0,
                        help="frames per second, 0 = as fast as possible (default: %(default)s)")
    parser.add_argument("--start-frame", type=int, default=1, help="first frame number")
    parser.add_argument("--drop-fraction", type=_fraction, default=0.0,
                        help="drop this fraction of packets at random")
    parser.add_argument("--drop", type=_drop_triple, action="append", default=[],
                        metavar="FRAME:MODULE:PACKET", help="drop one packet (repeatable)")
    parser.add_argument("--reorder", action="store_true",
                        help="send each module frame's packets in random order")
    parser.add_argument("--duplicate-fraction", type=_fraction, default=0.0,
                        help="send this fraction of packets twice")
    parser.add_argument("--silent-module", type=int, action="append", default=[],
                        help="never send this module (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the faults")
    add_log_level(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.frames < 0 or args.rate < 0 or args.start_frame < 0:
        parser.error("--frames, --rate and --start-frame must be >= 0")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"stddaq-simulator: error: {exc}", file=sys.stderr)
        return 1
    faults = Faults(args.drop_fraction, set(args.drop), args.reorder, args.duplicate_fraction,
                    set(args.silent_module), args.seed)
    simulator = DetectorSimulator(config, args.host, faults)
    stop_on_signals(simulator.stop_event)
    began = time.monotonic()
    try:
        sent = simulator.run(args.frames, args.rate, args.start_frame)
    except OSError as exc:
        print(f"stddaq-simulator: error: sending to {args.host}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - began
    log.info("sent %d frames (%d packets) of %s in %.2f s (%.1f Hz)", sent,
             simulator.packets_sent, config.detector_name, elapsed, sent / max(elapsed, 1e-9))
    if simulator.packets_refused:
        log.warning("%d packets were refused: no receiver listened on their port then",
                    simulator.packets_refused)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
