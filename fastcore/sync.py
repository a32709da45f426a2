"""Sync: groups the ModuleFrames of one frame id into a RawMetadata for the assembler.

Frames leave in id order. A frame waits for its missing modules at most ``timeout_s`` or
until ``max_pending`` newer frames are waiting, then leaves flagged MISSING_MODULES, so one
dead module never stalls the stream. Module frames of an id already sent are counted late.

A new acquisition whose frame ids start again below the last frame sent (a re-armed
detector, followed by the receivers' re-sync) is followed after a pause of ``timeout_s``,
or without a pause once a module's ids went back and it sent RESTART_FRAMES frames in a row
there (see :meth:`FrameSynchronizer.add`).
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
from fastcore.formats import MODULE_FRAME, RAW_METADATA, ImageStatus
from fastcore.names import Stream
from fastcore.process import ipc_address
from fastcore.runtime import add_common_arguments, announce_ready, run_service

log = logging.getLogger(__name__)

RESTART_FRAMES = 3
"""Frames of increasing ids a module must send after its ids went back below the last frame
sent before sync starts a new acquisition without a pause (fewer are late module frames)."""


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
    restarts: int = 0
    """New acquisitions whose frame ids went back (after a pause or on agreement)."""


class FrameSynchronizer:
    """Pure grouping logic: feed ModuleFrame records, get RawMetadata records out."""

    def __init__(self, n_modules: int, n_packets: int, timeout_s: float = 0.5,
                 max_pending: int = 50, restart_frames: int = RESTART_FRAMES):
        self.n_modules = n_modules
        self.n_packets = n_packets
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.restart_frames = restart_frames
        self.pending: dict[int, _Pending] = {}
        self.last_sent = -1
        self.last_activity = float("-inf")
        self.stats = SyncStats()
        self.module_last: dict[int, int] = {}  # the last frame id each module sent
        # per module: its frames since its ids went back below last_sent (counted late
        # until a restart takes them)
        self.restarting: dict[int, list[np.void]] = {}
        self.stale: set[int] = set()  # modules still in the acquisition before a restart
        self.stale_until = float("-inf")

    def add(self, record: np.void, now: float) -> list[np.ndarray]:
        """Take one ModuleFrame; return the frames that may leave now.

        An id at or below the last frame sent is late, unless the stream was quiet for
        ``timeout_s`` with nothing pending (a new acquisition), or unless this module's ids
        went back below its previous one and it has now sent ``restart_frames`` frames of
        increasing ids there (a new acquisition without a pause): then the pending frames
        leave as they are and the new ids are taken. For ``timeout_s`` after such a
        restart, a module that has not gone back yet and continues its old ids sends
        stragglers of the old acquisition: they are late.
        """
        out = self._restart_after_pause(now)
        frame_id, module = int(record["id"]), int(record["module_id"])
        quiet = not self.pending and now - self.last_activity > self.timeout_s
        self.last_activity = now
        previous = self.module_last.get(module)
        self.module_last[module] = frame_id
        went_back = previous is not None and frame_id < previous
        if module in self.stale:
            if now > self.stale_until or went_back:
                self.stale.discard(module)
            else:
                self.stats.late_module_frames += 1
                return out + self.ready(now)
        if frame_id <= self.last_sent and not quiet:
            self.stats.late_module_frames += 1
            held = self.restarting.get(module)
            if held and frame_id > int(held[-1]["id"]):
                held.append(record)
            elif went_back:
                self.restarting[module] = held = [record]
            else:
                return out + self.ready(now)
            if len(held) >= self.restart_frames:
                return out + self._restart(now)
            return out + self.ready(now)
        self.restarting.pop(module, None)  # went on above last_sent: those were late
        if frame_id <= self.last_sent:
            log.warning("frame id went back from %d to %d after a pause: new acquisition",
                        self.last_sent, frame_id)
            self.stats.restarts += 1
            self.last_sent = frame_id - 1  # the other modules' frames of this id are not late
        pending = self.pending.setdefault(frame_id, _Pending(now))
        pending.modules[module] = record
        return out + self.ready(now)

    def _restart_after_pause(self, now: float) -> list[np.ndarray]:
        """Held frames of a new acquisition followed by a pause: a restart."""
        if (self.restarting and not self.pending
                and now - self.last_activity > self.timeout_s):
            return self._restart(now)
        return []

    def _restart(self, now: float) -> list[np.ndarray]:
        """A new acquisition at lower ids: the pending frames leave as they are, the held
        frames of the modules that went back become pending."""
        held, self.restarting = self.restarting, {}
        out = [self._raw(frame_id, self.pending.pop(frame_id))
               for frame_id in sorted(self.pending)]
        first = min(int(records[0]["id"]) for records in held.values())
        log.warning("frame ids went back from %d to %d: new acquisition", self.last_sent, first)
        self.stats.restarts += 1
        self.last_sent = first - 1
        self.stale = set(self.module_last) - set(held)
        self.stale_until = now + self.timeout_s
        for module, records in held.items():
            self.stats.late_module_frames -= len(records)
            for record in records:
                self.pending.setdefault(int(record["id"]), _Pending(now)).modules[module] = record
        return out + self.ready(now)

    @property
    def waiting(self) -> bool:
        """Frames pending or held: :meth:`ready` has something to time out."""
        return bool(self.pending or self.restarting)

    def ready(self, now: float) -> list[np.ndarray]:
        """Frames that may leave now, in id order."""
        out = self._restart_after_pause(now)
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


IDLE_POLL_MS = 1000  # how often an idle sync wakes (to see a stop)
MAX_MESSAGES_PER_TURN = 64  # receiver messages taken per loop turn when they queue up


def run(config: DetectorConfig, ipc_dir: str, stop: threading.Event,
        timeout_s: float = 0.5) -> SyncStats:
    fmt = config.module_format
    sync = FrameSynchronizer(config.n_modules, fmt.n_packets, timeout_s,
                             max_pending=max(2, min(50, config.n_frame_slots // 2)))
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(ipc_address(ipc_dir, config.detector_name, Stream.FRAMES))
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(ipc_address(ipc_dir, config.detector_name, Stream.RAW))
    announce_ready("syncing %d modules of %s", config.n_modules, config.detector_name)
    last_log = time.monotonic()
    try:
        while not stop.is_set():
            # a fifth of the timeout while frames wait for modules, else a second (idle)
            if pull.poll(int(timeout_s * 200) if sync.waiting else IDLE_POLL_MS):
                now = time.monotonic()  # a message holds one or more ModuleFrames
                out = []
                for _ in range(MAX_MESSAGES_PER_TURN):  # what is queued, in one turn
                    try:
                        message = pull.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    out += [raw for record in np.frombuffer(message, MODULE_FRAME)
                            for raw in sync.add(record, now)]
            else:
                out = sync.ready(time.monotonic())
            if out:  # one message for the frames completed in this turn
                push.send(b"".join(raw.tobytes() for raw in out))
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
