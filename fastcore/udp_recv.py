"""UDP receiver: one module's packets -> FrameBuffer slots + ModuleFrame metadata on ZMQ.

A ZMQ message holds one or more consecutive ModuleFrame records (several when frames
arrive faster than they are announced one by one; see PUBLISH_BATCH).

Each recvmmsg call lands payloads at the *expected* places (the packets after the highest
one received, in order), so in the normal case every payload is already where it belongs
and a batch costs a few vectorised header checks. A batch holding a lost, reordered,
duplicated or foreign packet is staged and placed packet by packet. A frame is committed
when all its packets are in, when a packet of a newer frame arrives, or when the stream
goes quiet; missing packets are zeroed and counted (``n_recv_packets``), never hidden.

The receiver follows its own stream only: a packet whose frame id is behind it (late) or
more than ``n_frame_slots`` frames ahead of it (stray) is dropped and counted; it moves to
such a frame id range (a re-armed detector counting from 1 again, a detector that resumed
after a gap) once packets agree on it, see :class:`FramePlacer`.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import multiprocessing
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq

from fastcore.buffers import FrameBuffer, shm_name
from fastcore.config import DetectorConfig
from fastcore.detectors import ModuleFormat
from fastcore.formats import INVALID_ID
from fastcore.geometry import module_origin
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address
from fastcore.runtime import (
    add_common_arguments,
    announce_ready,
    run_service,
    stop_on_signals,
)
from fastcore.udp import MSG_TRUNC, MessageVector, open_receive_socket, set_receive_timeout

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
PUBLISH_BATCH = 8
"""ModuleFrames per ZMQ message at most: the receiver sends what it committed as soon as its
socket is empty, and batches of up to this many while packets keep coming."""
RESTART_AFTER_QUIET_FLUSHES = 10
"""Quiet receive timeouts (100 ms each) after which the id just committed may start a new
acquisition; before that, packets of that id are stragglers and counted late."""
QUIET_TIMEOUT_S = 0.1
"""Receive timeout while a stream runs or just went quiet: an open frame is committed this
long after its last packet."""
IDLE_TIMEOUT_S = 1.0
"""Receive timeout once the stream has been quiet for RESTART_AFTER_QUIET_FLUSHES timeouts
with nothing open or held: an idle receiver wakes once a second, not ten times (each wake
costs the best part of a millisecond of CPU on a VM); a signal still ends the wait."""
RESYNC_PACKETS = 8
"""Agreeing packets after which the receiver moves to a frame id range outside its stream
(at most half a frame's packets, at least 2; see :class:`FramePlacer`)."""
HELD_RUNS = 4
"""Groups of agreeing packets outside the stream held at once (the smallest goes first)."""
WARNING_INTERVAL = 1.0
"""Seconds between two warnings of one kind (stray packets, re-syncs); the counters in
ReceiverStats count every one."""


@dataclass
class ReceiverStats:
    frames: int = 0
    incomplete_frames: int = 0
    packets: int = 0
    lost_packets: int = 0
    duplicate_packets: int = 0
    late_packets: int = 0
    invalid_packets: int = 0
    stray_packets: int = 0
    """Dropped packets more than n_frame_slots frames ahead of the stream (or before it
    started)."""
    resyncs: int = 0
    """Times the stream moved to a frame id range outside it (a reset, a resume)."""


@dataclass
class _Run:
    """Packets outside the stream that agree: distinct, of consecutive frames [lo, hi]."""

    lo: int
    hi: int
    idle: bool  # the stream was quiet when the first one came
    quiet: int  # the placer's quiet_flushes then
    packets: list[tuple[int, int, np.void, np.ndarray, bool]] = field(default_factory=list)
    """(frame, packet, header copy, payload copy, counted as stray)"""
    seen: set[tuple[int, int]] = field(default_factory=set)

    def agrees(self, frame: int) -> bool:
        return self.lo <= frame <= self.hi + 1


@dataclass
class FramePlacer:
    """Receive state of one module over a FrameBuffer: the open frame and its packets.

    Socket-free: :class:`ModuleReceiver` feeds it batches. ``on_commit(frame_id)`` runs
    after a frame's ModuleFrame is written (its id last, so readers see a whole frame).

    Frame ids the stream follows at once: the open frame, and up to ``max_jump`` (=
    ``n_frame_slots``, the FrameBuffer ring) frames ahead of the current one (the frames
    between were lost). Any other packet, behind the stream (``late_packets``) or further
    ahead (``stray_packets``), is counted and held aside, in a run of packets that agree
    with it (distinct, their frames consecutive: each within [lowest, highest + 1]; up to
    HELD_RUNS runs, the smallest is dropped first); a packet of the stream drops them all.
    The stream moves to a run's frame ids (``resyncs``; its packets are then placed, none
    lost) once it holds ``resync_packets`` = max(2, min(RESYNC_PACKETS, n_packets // 2))
    packets and either

    - the stream has no frame yet (the receiver started), or
    - they are more than a frame's packets, with nothing of the stream among them (a
      reset without a pause: followed at the first packet of its second frame), or
    - the stream was quiet (a receive timeout) before them or after them (a resume after
      a pause, a re-arm), but a restart at the id just committed only after
      RESTART_AFTER_QUIET_FLUSHES quiet timeouts (before that those are stragglers).

    So one forged or corrupted packet never moves the stream, a burst of late packets
    never does while the stream runs unless it holds more than a frame's packets in frame
    order with nothing of the stream between them, and a genuine restart is followed.
    Stray packets and re-syncs are also logged, at most once per WARNING_INTERVAL.
    """

    fmt: ModuleFormat
    buffer: FrameBuffer
    module_id: int
    origin: tuple[int, int]
    on_commit: Callable[[int], None]
    stats: ReceiverStats = field(default_factory=ReceiverStats)

    def __post_init__(self) -> None:
        self.current: int | None = None  # id of the last opened frame
        self.is_open = False  # the current frame still takes packets
        self.idle = True  # stream quiet: the next packet may start any frame id
        self.quiet_flushes = 0  # receive timeouts in a row
        self.high = -1  # highest packet index received in the current frame
        self.received = np.zeros(self.fmt.n_packets, bool)
        self.n_received = 0
        self._fields = (0, 0)  # (pulse_id, daq_rec) of the current frame
        self.max_jump = self.buffer.n_slots
        self.resync_packets = max(2, min(RESYNC_PACKETS, self.fmt.n_packets // 2))
        self._runs: list[_Run] = []  # packets outside the stream, held aside
        self._next_warning: dict[str, float] = {}
        self._claimed = -1  # frame id whose slot was last marked INVALID
        self._base = self.buffer.segment.array
        self._base_address = np.uint64(self._base.ctypes.data)
        slot_addresses = np.array([self.buffer.data_address(slot, self.module_id)
                                   for slot in range(self.buffer.n_slots)], np.uint64)
        # address of every (slot, packet) landing place; the steady state, a whole frame
        # per batch, books a batch against a row of it and these expected values
        self._packet_index = np.arange(self.fmt.n_packets, dtype=np.int64)
        self._frame_addresses = slot_addresses[:, None] + (
            self._packet_index.astype(np.uint64) * np.uint64(self.fmt.payload_bytes))
        self._frame_addresses.flags.writeable = False
        self._full_lengths = (self.fmt.header.itemsize
                              + self.fmt.payload_sizes(self._packet_index)).astype(np.uint32)
        self._words = self.buffer.record_words(self.module_id)  # (n_slots, 8) uint64
        self._record = np.zeros(8, np.uint64)  # the ModuleFrame being committed
        self._record[5] = self.module_id
        self._record[6:8] = self.origin
        # what prepare() laid out: (whole frame id or None, landing frames, packets,
        # addresses); the frames and packets of a whole frame are made only if needed
        self._prepared: tuple = (None, None, None, self._frame_addresses[0])

    def batch_size(self, limit: int) -> int:
        """Packets to ask for next: up to ``limit``, but not past the end of the frame
        being received, so a receive call that waits for its whole batch never waits for
        the next frame to complete this one."""
        start = self.high + 1 if self.current is not None and self.is_open else 0
        return max(1, min(limit, self.fmt.n_packets - start))

    def payload_addresses(self, count: int) -> np.ndarray:
        """Addresses where the next ``count`` packets are expected (for the recvmmsg
        iovecs); :meth:`accept` books the batch received there. In the steady state (the
        last frame committed whole, the stream running, a batch of a whole frame) this is
        a precomputed row of a table."""
        if (count == self.fmt.n_packets and not self.is_open and not self.idle
                and self.current is not None):
            frame = self.current + 1
            self._claim(frame)
            addresses = self._frame_addresses[frame % self.buffer.n_slots]
            self._prepared = (frame, None, None, addresses)
            return addresses
        frames, packets = self.landing(count)
        addresses = self.landing_addresses(frames, packets)
        self._prepared = (None, frames, packets, addresses)
        return addresses

    def accept(self, headers: np.ndarray, lengths: np.ndarray, flags: np.ndarray) -> None:
        """Book a received batch (the first ``len(headers)`` of the prepared places)."""
        frame, land_frames, land_packets, addresses = self._prepared
        n = len(headers)
        if frame is not None:
            if (n == len(addresses) and (self.fmt.frame_numbers(headers) == frame).all()
                    and np.array_equal(self.fmt.packet_numbers(headers), self._packet_index)
                    and np.array_equal(lengths, self._full_lengths)
                    and not (flags & MSG_TRUNC).any()):
                self.stats.packets += n
                if self._runs:
                    self._runs.clear()
                self._open(frame, headers[0])
                self.received[:] = True
                self.n_received = n
                self.high = n - 1
                self._commit()
                self.quiet_flushes = 0
                return
            land_frames = np.full(len(addresses), frame, np.int64)
            land_packets = self._packet_index
        self.accept_landed(headers, lengths, flags, land_frames[:n], land_packets[:n],
                           addresses[:n])

    def _claim(self, frame: int) -> None:
        """Mark the frame's slot as being rewritten (id INVALID) before packets land."""
        if frame != self._claimed:
            self._words[frame % self.buffer.n_slots, 0] = INVALID_ID
            self._claimed = frame

    def landing(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(frame ids, packet indices) of the places where the next packets are expected."""
        n = self.fmt.n_packets
        first = 0 if self.current is None else self.current
        start = self.high + 1 if self.current is not None else 0
        seq = start + np.arange(count, dtype=np.int64)
        return first + seq // n, seq % n

    def landing_addresses(self, frames: np.ndarray, packets: np.ndarray) -> np.ndarray:
        """Addresses of the landing places; a slot is marked INVALID before first use."""
        for frame in {int(frames[0]), int(frames[-1])}:
            if not (frame == self.current and self.is_open):
                self._claim(frame)
        return self._frame_addresses[frames % self.buffer.n_slots, packets]

    def accept_landed(self, headers: np.ndarray, lengths: np.ndarray, flags: np.ndarray,
                      land_frames: np.ndarray, land_packets: np.ndarray,
                      addresses: np.ndarray) -> None:
        """Book a received batch that landed at ``addresses`` (from :meth:`landing`)."""
        fmt = self.fmt
        frames = fmt.frame_numbers(headers).astype(np.int64)
        packets = fmt.packet_numbers(headers)
        good = ((lengths == fmt.header.itemsize + fmt.payload_sizes(packets))
                & ((flags & MSG_TRUNC) == 0))
        self.stats.packets += len(frames)
        if (not self.idle and good.all() and (frames == land_frames).all()
                and (packets == land_packets).all()):
            if self._runs:
                self._runs.clear()
            self._accept_in_order(frames, packets, headers)
        else:
            self._accept_staged(frames, packets, headers, good, self._stage(addresses))
        self.quiet_flushes = 0

    def _stage(self, addresses: np.ndarray) -> np.ndarray:
        size = self.fmt.payload_bytes
        offsets = (addresses - self._base_address).astype(np.int64)
        staged = np.empty((len(offsets), size), np.uint8)
        for i, offset in enumerate(offsets):
            staged[i] = self._base[offset : offset + size]
        return staged

    def _accept_in_order(self, frames: np.ndarray, packets: np.ndarray,
                         headers: np.ndarray) -> None:
        split = int(np.searchsorted(frames, self.current, side="right"))
        self._mark(packets[:split])
        if split < len(frames):  # the batch ran into the next frame
            if self.is_open:
                self._commit()
            self._open(int(frames[split]), headers[split])
            self._mark(packets[split:])
        if self.n_received == self.fmt.n_packets:
            self._commit()

    def _mark(self, packets: np.ndarray) -> None:
        if len(packets):
            self.received[packets] = True
            self.n_received += len(packets)
            self.high = int(packets[-1])

    def _accept_staged(self, frames: np.ndarray, packets: np.ndarray, headers: np.ndarray,
                       good: np.ndarray, staged: np.ndarray) -> None:
        n_packets = self.fmt.n_packets
        for i in range(len(frames)):
            packet = int(packets[i])
            if not good[i] or not 0 <= packet < n_packets:
                self.stats.invalid_packets += 1
                continue
            frame = int(frames[i])
            if frame < 0:  # a frame number of 2**63 or more: never followed
                self._count_stray(frame + 2**64)
                continue
            self._take(frame, packet, headers[i], staged[i])

    def _take(self, frame: int, packet: int, header: np.void, payload: np.ndarray) -> None:
        """Place one packet of the stream; hold any other (see the class docstring)."""
        current = self.current
        if current is not None:
            if frame == current and self.is_open:
                self._place(packet, payload)
                return
            if current < frame <= current + self.max_jump:
                if self.is_open:
                    self._commit()
                self._open(frame, header)
                self._place(packet, payload)
                return
        self._hold(frame, packet, header, payload)

    def _place(self, packet: int, payload: np.ndarray) -> None:
        if self._runs:
            self._runs.clear()  # the stream goes on: the held packets are not a new one
        if self.received[packet]:
            self.stats.duplicate_packets += 1
            return
        size = self.fmt.payload_bytes
        start = packet * size
        self.buffer.frame(self.current, self.module_id)[start : start + size] = payload
        self.received[packet] = True
        self.n_received += 1
        self.high = max(self.high, packet)
        if self.n_received == self.fmt.n_packets:
            self._commit()

    def _hold(self, frame: int, packet: int, header: np.void, payload: np.ndarray) -> None:
        """A packet outside the stream: counted (late or stray) and held aside in a run of
        packets it agrees with; a run that agrees enough becomes the stream."""
        runs = [run for run in self._runs if run.agrees(frame)]
        run = max(runs, key=lambda r: len(r.packets)) if runs else None
        if run is not None and (frame, packet) in run.seen:
            self.stats.duplicate_packets += 1
            return
        stray = self.current is None or frame > self.current
        if stray:
            self._count_stray(frame)
        else:
            self.stats.late_packets += 1
        if run is None:
            if len(self._runs) >= HELD_RUNS:
                self._runs.remove(min(self._runs, key=lambda r: len(r.packets)))
            run = _Run(frame, frame, self.idle, self.quiet_flushes)
            self._runs.append(run)
        run.hi = max(run.hi, frame)
        run.packets.append((frame, packet, header.copy(), payload, stray))
        run.seen.add((frame, packet))
        if self._agreed(run):
            self._resync(run)

    def _count_stray(self, frame: int) -> None:
        self.stats.stray_packets += 1
        if self.current is not None:
            self._warn("stray", "module %d: dropped a stray packet of frame %d (current frame "
                       "%d, %d stray packets so far)", self.module_id, frame, self.current,
                       self.stats.stray_packets)

    def _agreed(self, run: _Run, quiet_after: bool = False) -> bool:
        """The run is a stream of its own (see the class docstring)."""
        n = len(run.packets)
        if n < self.resync_packets:
            return False
        if self.current is None or n > self.fmt.n_packets:
            return True
        if not (run.idle or quiet_after):
            return False
        return run.lo != self.current or run.quiet >= RESTART_AFTER_QUIET_FLUSHES

    def _resync(self, run: _Run) -> None:
        """Move the stream to the run and place its packets (no longer counted as dropped);
        the other held packets stay dropped."""
        self._runs.clear()
        for *_, stray in run.packets:
            if stray:
                self.stats.stray_packets -= 1
            else:
                self.stats.late_packets -= 1
        if self.is_open:
            self._commit()
        first, _, first_header, _, _ = run.packets[0]
        if self.current is not None:
            self.stats.resyncs += 1
            self._warn("resync", "module %d: frame ids moved from %d to %d (%d agreeing "
                       "packets): following them (%d re-syncs so far)", self.module_id,
                       self.current, first, len(run.packets), self.stats.resyncs)
        self._open(first, first_header)
        for frame, packet, header, payload, _ in run.packets:
            self._take(frame, packet, header, payload)

    def _warn(self, kind: str, message: str, *args) -> None:
        now = time.monotonic()
        if now >= self._next_warning.get(kind, 0.0):
            self._next_warning[kind] = now + WARNING_INTERVAL
            log.warning(message, *args)

    def _open(self, frame: int, header: np.void) -> None:
        self._claim(frame)
        self.current = frame
        self.is_open = True
        self.idle = False
        self.received[:] = False
        self.n_received = 0
        self.high = -1
        self._fields = self.fmt.frame_fields(header)

    def _commit(self) -> None:
        frame, n = self.current, self.n_received
        n_packets = self.fmt.n_packets
        if n < n_packets:
            rows = self.buffer.frame(frame, self.module_id).reshape(n_packets, -1)
            rows[~self.received] = 0
            self.stats.incomplete_frames += 1
            self.stats.lost_packets += n_packets - n
        record, words = self._record, self._words[frame % self.buffer.n_slots]
        record[1], record[2], record[3], record[4] = self._fields[0], frame, self._fields[1], n
        words[1:] = record[1:]
        words[0] = frame  # the id last: readers see a whole ModuleFrame
        self.stats.frames += 1
        self.is_open = False
        self.high = n_packets - 1  # in-order packets now land in the next frame
        self.on_commit(frame)

    def flush(self) -> None:
        """The stream went quiet: commit the open frame; held packets that agree become
        the stream (and their last frame is committed), others are dropped."""
        if self.is_open:
            self._commit()
        runs = [run for run in self._runs if self._agreed(run, quiet_after=True)]
        self._runs.clear()
        if runs:
            self._resync(max(runs, key=lambda r: len(r.packets)))
            if self.is_open:
                self._commit()
        self.idle = True
        self.quiet_flushes += 1

    @property
    def dormant(self) -> bool:
        """Quiet for RESTART_AFTER_QUIET_FLUSHES timeouts, no frame open, nothing held:
        nothing is left to flush until a packet comes."""
        return self.quiet_flushes >= RESTART_AFTER_QUIET_FLUSHES and not self._runs


class ModuleReceiver:
    """Receives one module's UDP stream into the FrameBuffer; pushes ModuleFrame to sync."""

    def __init__(self, config: DetectorConfig, module_id: int, frames_address: str,
                 batch: int = 128):
        self.config = config
        self.module_id = module_id
        self.fmt = config.module_format
        self.batch = min(batch, self.fmt.n_packets)
        self.frames_address = frames_address
        self.stop_event = threading.Event()

    def open_socket(self) -> socket.socket:
        return open_receive_socket(self.config.udp_host, self.config.udp_port(self.module_id),
                                   timeout_s=QUIET_TIMEOUT_S)

    def run(self, sock: socket.socket | None = None) -> ReceiverStats:
        """Receive until :attr:`stop_event` is set; returns the counters."""
        config, fmt = self.config, self.fmt
        sock = sock or self.open_socket()
        buffer = FrameBuffer.attach(shm_name(config.detector_name, Segment.FRAMES), writable=True)
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(self.frames_address)

        words = buffer.record_words(self.module_id)
        committed: list[bytes] = []  # ModuleFrames not sent yet
        readable = select.poll()
        readable.register(sock, select.POLLIN)

        def send_committed() -> None:
            push.send(b"".join(committed))
            committed.clear()

        placer = FramePlacer(fmt, buffer, self.module_id,
                             module_origin(config, self.module_id),
                             lambda frame: committed.append(
                                 words[frame % buffer.n_slots].tobytes()))
        vector = MessageVector(self.batch, fmt.header.itemsize)
        vector.set_payloads(np.zeros(self.batch, np.uint64), fmt.payload_bytes)
        headers = vector.headers.view(fmt.header)[:, 0]
        lengths, flags = vector.msgs["len"], vector.msgs["flags"]
        fd, last_log, logged = sock.fileno(), time.monotonic(), None
        dormant = False  # the socket waits IDLE_TIMEOUT_S, not QUIET_TIMEOUT_S
        log.info("module %d receiving on udp %s:%d (%d packets of %d B per frame)",
                 self.module_id, *sock.getsockname(), fmt.n_packets, fmt.payload_bytes)
        try:
            while not self.stop_event.is_set():
                # send committed ModuleFrames before the socket could block, or once
                # PUBLISH_BATCH are waiting: one ZMQ message (~27 us of CPU with its I/O
                # thread) per frame would be a tenth of the receiver's work at full rate
                if committed and (len(committed) >= PUBLISH_BATCH or not readable.poll(0)):
                    send_committed()
                count = placer.batch_size(self.batch)
                vector.set_payload_addresses(placer.payload_addresses(count))
                n = vector.recv(fd, count, wait_all=True)
                if n:
                    if dormant:
                        set_receive_timeout(sock, QUIET_TIMEOUT_S)
                        dormant = False
                    placer.accept(headers[:n], lengths[:n], flags[:n])
                else:
                    placer.flush()
                    if not dormant and placer.dormant:
                        set_receive_timeout(sock, IDLE_TIMEOUT_S)
                        dormant = True
                if time.monotonic() - last_log > 5 and placer.stats != logged:
                    logged, last_log = ReceiverStats(**placer.stats.__dict__), time.monotonic()
                    log.info("module %d: %s", self.module_id, placer.stats)
            placer.flush()
            if committed:
                send_committed()
            log.info("module %d stopped: %s", self.module_id, placer.stats)
        finally:
            sock.close()
            push.close()
            buffer.close()
        return placer.stats


def _run_module(receiver: ModuleReceiver, sock: socket.socket) -> None:
    """Child process body: receive until SIGTERM (sent also when the parent dies)."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    stop_on_signals(receiver.stop_event)
    receiver.run(sock)


def serve(config: DetectorConfig, modules: list[int], stop: threading.Event,
          ipc_dir: str) -> None:
    """Create the FrameBuffer, bind every module's port, run one process per module."""
    fmt = config.module_format
    address = ipc_address(ipc_dir, config.detector_name, Stream.FRAMES)
    receivers = [ModuleReceiver(config, m, address) for m in modules]
    sockets = [r.open_socket() for r in receivers]  # an occupied port fails here, clearly
    buffer = FrameBuffer.create(shm_name(config.detector_name, Segment.FRAMES),
                                config.n_frame_slots, config.n_modules, fmt.frame_bytes)
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_run_module, args=(r, s), name=f"udp-recv-{r.module_id}",
                            daemon=True) for r, s in zip(receivers, sockets, strict=True)]
    try:
        for child in children:
            child.start()
        for sock in sockets:
            sock.close()
        announce_ready("receiving modules %s of %s", modules, config.detector_name)
        while not stop.wait(1.0):
            dead = [c for c in children if not c.is_alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exitcode}")
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
        for child in children:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
        buffer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-udp-recv",
        description="Receive a detector's UDP module streams into the FrameBuffer "
        "(one process per module) and send ModuleFrame metadata to stddaq-sync.",
    )
    add_common_arguments(parser)
    parser.add_argument("--modules", default=None,
                        help="comma-separated module indices to receive (default: all)")
    args = parser.parse_args(argv)

    def body(config: DetectorConfig, stop: threading.Event) -> None:
        modules = list(range(config.n_modules))
        if args.modules:
            try:
                modules = [int(m) for m in args.modules.split(",")]
            except ValueError:
                raise ValueError(f"--modules: expected comma-separated integers, "
                                 f"got {args.modules!r}") from None
            bad = [m for m in modules if not 0 <= m < config.n_modules]
            if bad:
                raise ValueError(f"--modules: {bad} not in 0..{config.n_modules - 1}")
        serve(config, modules, stop, args.ipc_dir)

    return run_service("stddaq-udp-recv", args, body)


if __name__ == "__main__":
    raise SystemExit(main())
