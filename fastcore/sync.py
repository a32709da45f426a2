"""Sync: groups the ModuleFrames of one frame id into a RawMetadata for the assembler.

Frames leave in id order. A frame waits for its missing modules at most ``timeout_s`` or
until ``max_pending`` newer frames are waiting, then leaves flagged MISSING_MODULES, so one
dead module never stalls the stream. Module frames of an id already sent are counted late.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from fastcore.config import DetectorConfig
from fastcore.detectors import module_format
from fastcore.formats import MODULE_FRAME, RAW_METADATA, ImageStatus
from fastcore.process import add_common_arguments, ipc_address, run_service

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    first_seen: float
    modules: dict[int, np.void] = field(default_factory=dict)


@dataclass
class SyncStats:
    frames: int = 0
    missing_modules: int = 0
    incomplete: int = 0
    late_module_frames: int = 0


class FrameSynchronizer:
    """Pure grouping logic: feed ModuleFrame records, get RawMetadata records out."""

    def __init__(self, n_modules: int, n_packets: int, timeout_s: float = 0.5,
                 max_pending: int = 50):
        self.n_modules = n_modules
        self.n_packets = n_packets
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.pending: dict[int, _Pending] = {}
        self.last_sent = -1
        self.last_activity = float("-inf")
        self.stats = SyncStats()

    def add(self, record: np.void, now: float) -> list[np.ndarray]:
        frame_id = int(record["id"])
        quiet = not self.pending and now - self.last_activity > self.timeout_s
        self.last_activity = now
        if frame_id <= self.last_sent:
            if not quiet:
                self.stats.late_module_frames += 1
                return self.ready(now)
            log.warning("frame id went back from %d to %d after a pause: new acquisition",
                        self.last_sent, frame_id)
            self.last_sent = frame_id - 1  # the other modules' frames of this id are not late
        pending = self.pending.setdefault(frame_id, _Pending(now))
        pending.modules[int(record["module_id"])] = record
        return self.ready(now)

    def ready(self, now: float) -> list[np.ndarray]:
        """Frames that may leave now, in id order."""
        out = []
        while self.pending:
            oldest = min(self.pending)
            pending = self.pending[oldest]
            complete = len(pending.modules) == self.n_modules
            expired = (now - pending.first_seen > self.timeout_s
                       or len(self.pending) > self.max_pending)
            if not (complete or expired):
                break
            del self.pending[oldest]
            out.append(self._raw(oldest, pending))
        return out

    def _raw(self, frame_id: int, pending: _Pending) -> np.ndarray:
        status = ImageStatus.GOOD
        if len(pending.modules) < self.n_modules:
            status |= ImageStatus.MISSING_MODULES
            self.stats.missing_modules += 1
        if any(int(m["n_recv_packets"]) < self.n_packets for m in pending.modules.values()):
            status |= ImageStatus.MISSING_PACKETS
            self.stats.incomplete += 1
        first = pending.modules[min(pending.modules)]
        raw = np.zeros((), RAW_METADATA)
        raw["id"] = frame_id
        raw["pulse_id"] = first["pulse_id"]
        raw["frame_index"] = first["frame_index"]
        raw["daq_rec"] = first["daq_rec"]
        raw["status"] = status
        self.last_sent = frame_id
        self.stats.frames += 1
        return raw


def run(config: DetectorConfig, ipc_dir: str, stop: threading.Event,
        timeout_s: float = 0.5) -> SyncStats:
    fmt = module_format(config.detector_type, config.bit_depth, config.image_shape)
    sync = FrameSynchronizer(config.n_modules, fmt.n_packets, timeout_s,
                             max_pending=max(2, min(50, config.n_frame_slots // 2)))
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(ipc_address(ipc_dir, config.detector_name, "frames"))
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(ipc_address(ipc_dir, config.detector_name, "raw"))
    log.info("ready: syncing %d modules of %s", config.n_modules, config.detector_name)
    last_log = time.monotonic()
    try:
        while not stop.is_set():
            if pull.poll(int(timeout_s * 200)):
                now = time.monotonic()  # a message holds one or more ModuleFrames
                out = [raw for record in np.frombuffer(pull.recv(), MODULE_FRAME)
                       for raw in sync.add(record, now)]
            else:
                out = sync.ready(time.monotonic())
            for raw in out:
                push.send(raw.tobytes())
            if time.monotonic() - last_log > 5:
                last_log = time.monotonic()
                log.info("%s", sync.stats)
    finally:
        log.info("stopped: %s", sync.stats)
        pull.close(0)
        push.close()
    return sync.stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-sync",
        description="Group the module frames of each frame id (from stddaq-udp-recv) and "
        "send one RawMetadata per frame to stddaq-assembler.",
    )
    add_common_arguments(parser)
    parser.add_argument("--timeout", type=float, default=0.5,
                        help="seconds a frame waits for missing modules (default: 0.5)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout: expected seconds > 0, got {args.timeout}")
    return run_service("stddaq-sync", args,
                       lambda config, stop: run(config, args.ipc_dir, stop, args.timeout))


if __name__ == "__main__":
    raise SystemExit(main())
