"""Receive throughput of one Jungfrau module on loopback: fastcore receiver vs a plain drain.

A sender process sends pre-built Jungfrau packets (48-byte header + 8192-byte payload, 128
packets per 1 MiB frame) to 127.0.0.1 with sendmmsg (fastcore.udp.MessageVector), paced at
a target frame rate or unpaced; per frame only the frame number is rewritten. Two
receiving processes, each running for the whole benchmark like a real receiver, are fed by
the same sender in turn:

- drain: a UDP socket with the same receive buffer doing only ``sock.recv_into(buffer)``
  per packet and counting packets (what plain Python does per packet, nothing stored);
- receiver: the real ``fastcore.udp_recv.ModuleReceiver`` writing frames into a
  FrameBuffer (shared memory) and pushing a ModuleFrame per frame, which this process
  pulls and counts (packets per frame from ``n_recv_packets``).

Measurements:

1. rate steps (drain and receiver interleaved at each rate): the highest rate without any
   lost packet for each, and their ratio (target >= 0.9). On a 2-core machine the sender
   and the kernel's loopback path use a core of their own, so the sender often cannot
   outrun either receiver; such figures are flagged as sender-bound;
2. backlog: the receiving process is stopped (SIGSTOP), the sender fills a large socket
   buffer, then the process is resumed and empties it: its capacity, free of the sender;
3. sustained: a fresh receiver session, 60 s at 2 kHz (2.1 GB/s), lost packets (goal 0)
   from its ReceiverStats, the ModuleFrames and the kernel's drop counter; then the plain
   drain for the same time at the same rate: the receiver should lose no more than it.

Loopback only; every step is bounded in time and frame count. The last line of the output
is one JSON object holding every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing.connection import Connection

import numpy as np
import zmq

from fastcore.buffer_sizing import BUFFER_SECONDS
from fastcore.buffers import SHM_DIR_ENV, FrameBuffer, shm_dir, shm_name
from fastcore.config import DetectorConfig, parse_config
from fastcore.detectors import detector_type, module_format
from fastcore.detectors.jungfrau import HEADER as JUNGFRAU_HEADER
from fastcore.formats import MODULE_FRAME
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address
from fastcore.udp import DEFAULT_RCVBUF, SO_RCVBUFFORCE, MessageVector, open_receive_socket
from fastcore.udp_recv import ModuleReceiver

HOST = "127.0.0.1"
FMT = module_format("jungfrau", 16, (512, 1024))
N_PACKETS = FMT.n_packets  # 128
PAYLOAD = FMT.payload_bytes  # 8192
FRAME_BYTES = FMT.frame_bytes  # 1 MiB of payload per frame
PACKET_BYTES = JUNGFRAU_HEADER.itemsize + PAYLOAD
UDP_SEGMENT = 103  # setsockopt(IPPROTO_UDP, UDP_SEGMENT, size): UDP GSO (Linux >= 4.18)
GSO_PACKETS = 7  # whole packets per GSO message (a UDP datagram holds at most 65507 B)
PACKET_TRUESIZE = 8320  # receive-buffer bytes the kernel charges per queued packet (measured)
RCVTIMEO_S = 0.1  # the receiver's SO_RCVTIMEO (open_receive_socket's default)
DEFAULT_RATES = "200,500,1000,1500,2000,2500,3000,4000,0"
_PR_SET_PDEATHSIG = 1


def gbps(frames_per_s: float) -> float:
    """GB/s (1e9 bytes) of payload at a frame rate."""
    return frames_per_s * FRAME_BYTES / 1e9


def udp_counters() -> dict[str, int]:
    """The kernel's UDP counters (/proc/net/snmp); RcvbufErrors counts full-buffer drops.

    System-wide: other UDP traffic on the machine shows up too, so they are a cross-check.
    """
    with open("/proc/net/snmp") as f:
        lines = [line.split() for line in f if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _child_setup(cpu: int | None) -> None:
    """Die with the parent, ignore Ctrl-C (the parent stops us), optionally pin."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _granted(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel doubles


def _set_rcvbuf(sock: socket.socket, size: int) -> int:
    """Resize a socket's receive buffer (as open_receive_socket does); returns the grant."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return _granted(sock)


# --- huge pages for the buffers ---------------------------------------------------------

_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000


@contextlib.contextmanager
def huge_page_shm(size_mib: int):
    """Put the stddaq buffers (``$STDDAQ_SHM_DIR``) on a tmpfs with ``huge=always``, in a
    private mount namespace of this process and its children: the machine's mounts and
    settings stay untouched, and the mount goes away with the processes. Needs root."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_char_p]

    def check(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise SystemExit(f"--huge-pages: {what} failed: {os.strerror(err)} (needs root)")

    directory = tempfile.mkdtemp(prefix="stddaq-huge-")
    try:
        check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None),
              "making the mounts private")
        check(libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0,
                         f"huge=always,size={size_mib}m,mode=1777".encode()),
              f"mounting a huge=always tmpfs on {directory}")
        previous = os.environ.get(SHM_DIR_ENV)
        os.environ[SHM_DIR_ENV] = directory
        try:
            yield directory
        finally:
            if previous is None:
                os.environ.pop(SHM_DIR_ENV, None)
            else:
                os.environ[SHM_DIR_ENV] = previous
            libc.umount2(directory.encode(), 2)  # MNT_DETACH
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def shm_pages() -> str:
    """Where the buffers live and their page size (for the report)."""
    directory = os.path.realpath(shm_dir())
    point, options = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            mount_point, _, mount_options = line.split()[1:4]
            inside = directory == mount_point or directory.startswith(
                mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(point):
                point, options = mount_point, mount_options
    huge = next((o for o in options.split(",") if o.startswith("huge=")), "huge=never")
    pages = "2 MiB" if huge in ("huge=always", "huge=within_size") else "4 KiB"
    return f"{directory} ({huge}: {pages} pages)"


# --- sender process -------------------------------------------------------------------


def _sender_vector(gso: bool) -> tuple[MessageVector, int, np.ndarray]:
    """(message vector, messages per frame, framenum field view) of one pre-built frame.

    Plain: 128 messages of (48-byte header, 8192-byte payload). GSO: the frame is laid out
    as 128 whole packets back to back and each message carries GSO_PACKETS of them; the
    kernel cuts it into 8240-byte datagrams (UDP_SEGMENT), so the receiver gets the same
    datagrams while the sender pays the IP/UDP path once per message.
    """
    rng = np.random.default_rng(0)
    hlen = JUNGFRAU_HEADER.itemsize
    if not gso:
        vector = MessageVector(N_PACKETS, hlen)
        headers = vector.headers.view(JUNGFRAU_HEADER)[:, 0]
        payload = rng.integers(0, 2**16, FRAME_BYTES // 2, np.uint16).view(np.uint8)
        vector.keep = payload  # the iovecs point into it
        vector.set_payloads(np.uint64(payload.ctypes.data) + np.arange(
            N_PACKETS, dtype=np.uint64) * np.uint64(PAYLOAD), PAYLOAD)
        n_messages = N_PACKETS
    else:
        packets = rng.integers(0, 256, (N_PACKETS, PACKET_BYTES), np.uint8)
        headers = np.ndarray((N_PACKETS,), JUNGFRAU_HEADER, buffer=packets,
                             strides=(PACKET_BYTES,))
        starts = np.arange(0, N_PACKETS, GSO_PACKETS)
        counts = np.minimum(GSO_PACKETS, N_PACKETS - starts)
        n_messages = len(starts)
        vector = MessageVector(n_messages, hlen)
        vector.keep = packets
        first = np.uint64(packets.ctypes.data) + starts.astype(np.uint64) * PACKET_BYTES
        vector.iovs["base"][:, 0] = first  # header iovec: the first packet's header
        vector.iovs["len"][:, 0] = hlen
        vector.set_payloads(first + np.uint64(hlen), counts * PACKET_BYTES - hlen)
    headers[:] = np.zeros((), JUNGFRAU_HEADER)
    headers["packetnum"] = np.arange(N_PACKETS)
    headers["detector_type"] = 3
    headers["header_version"] = 2
    return vector, n_messages, headers["framenum"]


def sender_main(conn: Connection, cpu: int | None, gso: bool) -> None:
    """Serve ``(port, rate_hz, duration_s, max_frames, first_frame)`` commands.

    Per frame only ``framenum`` is rewritten, then one sendmmsg call (MessageVector.send)
    sends the frame. rate_hz 0 = unpaced. Pacing keeps an absolute schedule (a late frame
    is sent at once), so the mean rate holds. A paced command ends after ``max_frames``
    or, if the sender cannot keep up, at 1.1 x duration.
    Replies ``(frames, packets, seconds, cpu_seconds)``.
    """
    _child_setup(cpu)
    vector, n_messages, framenum = _sender_vector(gso)
    while (command := conn.recv()) is not None:
        port, rate, duration, max_frames, frame = command
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20)
        if gso:
            sock.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, PACKET_BYTES)
        sock.connect((HOST, port))
        fd, send = sock.fileno(), vector.send
        frames = 0
        period = 1.0 / rate if rate else 0.0
        cpu_start = _cpu_seconds()
        start = now = next_time = time.perf_counter()
        end = start + (duration * 1.1 if rate else duration)
        while frames < max_frames and now < end:
            if period:
                if now < next_time:
                    time.sleep(next_time - now)
                next_time += period
            framenum[:] = frame
            send(fd, n_messages)
            frames += 1
            frame += 1
            now = time.perf_counter()
        elapsed = time.perf_counter() - start
        sock.close()
        conn.send((frames, frames * N_PACKETS, elapsed, _cpu_seconds() - cpu_start))


# --- receiving processes ----------------------------------------------------------------


def drain_main(conn: Connection, port: int, rcvbuf: int, cpu: int | None) -> None:
    """Baseline: one socket (same buffer and timeout as the receiver's) for the whole run,
    ``recv_into`` one fixed buffer per packet, counting.

    The counters are published at quiet moments only (a receive timeout), so the
    per-packet path stays ``recv_into`` + a count. Commands (a control thread):
    ``("arm",)`` restart the first-packet clock at the next quiet moment, reply
    ``(packets, cpu)``; ``("snapshot",)`` reply ``(packets, first, last, at, cpu)`` as
    of the last quiet moment ``at``; ``("rcvbuf", n)``; ``("stop",)``.
    """
    _child_setup(cpu)
    sock = open_receive_socket(HOST, port, rcvbuf, RCVTIMEO_S)
    stop = threading.Event()
    arm = threading.Event()
    published = [(0, 0.0, 0.0, 0.0)]  # (packets, first, last, at), replaced whole

    def control() -> None:
        while True:
            command = conn.recv()
            if command[0] == "rcvbuf":
                conn.send(_set_rcvbuf(sock, command[1]))
            elif command[0] == "arm":
                arm.set()
                while arm.is_set():  # cleared by the receive loop at its next timeout
                    time.sleep(0.01)
                conn.send((published[0][0], _cpu_seconds()))
            elif command[0] == "snapshot":
                conn.send((*published[0], _cpu_seconds()))
            else:
                stop.set()
                return

    conn.send(("ready", _granted(sock)))
    thread = threading.Thread(target=control, daemon=True)
    thread.start()
    buffer = bytearray(PACKET_BYTES + 64)
    recv_into = sock.recv_into
    packets = seen = 0
    first: float | None = None
    last = 0.0
    while True:
        try:
            recv_into(buffer)
        except OSError:  # SO_RCVTIMEO: quiet for RCVTIMEO_S
            now = time.perf_counter()
            if packets != seen:
                seen, last = packets, now - RCVTIMEO_S
            armed = arm.is_set()
            if armed:
                first = None
            published[0] = (packets, first or 0.0, last, now)
            if armed:
                arm.clear()
            if stop.is_set():
                break
            continue
        if first is None:
            first = time.perf_counter()
        packets += 1
    sock.close()
    thread.join()
    conn.send(("result", packets))


def receiver_main(conn: Connection, config: DetectorConfig, frames_address: str, rcvbuf: int,
                  cpu: int | None) -> None:
    """The fastcore receiver, in sessions: ``("session",)`` binds a socket and runs one
    ModuleReceiver until ``("stop",)``, then replies its ReceiverStats. During a session
    a control thread answers ``("cpu",)`` and ``("rcvbuf", n)``."""
    _child_setup(cpu)
    while conn.recv() != "quit":
        receiver = ModuleReceiver(config, 0, frames_address)
        sock = open_receive_socket(HOST, config.udp_port(0), rcvbuf, RCVTIMEO_S)

        def control(sock: socket.socket = sock, receiver: ModuleReceiver = receiver) -> None:
            while True:
                command = conn.recv()
                if command[0] == "rcvbuf":
                    conn.send(_set_rcvbuf(sock, command[1]))
                elif command[0] == "cpu":
                    conn.send(_cpu_seconds())
                else:
                    receiver.stop_event.set()
                    return

        conn.send(("ready", _granted(sock)))
        thread = threading.Thread(target=control, daemon=True)
        thread.start()
        stats = receiver.run(sock)
        thread.join()
        conn.send(("result", dataclasses.asdict(stats)))


# --- the parent -----------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    kind: str  # "drain" or "receiver"
    target_hz: float  # 0 = unpaced
    backlog: bool = False  # the receiving side was stopped while the sender sent
    frames_sent: int = 0
    packets_sent: int = 0
    send_seconds: float = 0.0
    sender_cpu_seconds: float = 0.0
    packets_received: int = 0
    frames_received: int = 0  # receiver: ModuleFrames of this step's frames
    incomplete_frames: int = 0
    kernel_rcvbuf_errors: int = 0  # /proc/net/snmp delta (system-wide)
    receive_seconds: float = 0.0  # first to last packet (drain) or frame (receiver)
    cpu_seconds: float = 0.0  # CPU time (user + system) of the receiving process
    rcvbuf: int = 0

    @property
    def lost_packets(self) -> int:
        return max(self.packets_sent - self.packets_received, 0)

    @property
    def sent_hz(self) -> float:
        return self.frames_sent / self.send_seconds if self.send_seconds else 0.0

    @property
    def received_hz(self) -> float:
        """Frames (packets / 128) per second while receiving."""
        if not self.receive_seconds:
            return 0.0
        return self.packets_received / N_PACKETS / self.receive_seconds

    @property
    def cpu_us_per_frame(self) -> float:
        frames = self.packets_received / N_PACKETS
        return self.cpu_seconds / frames * 1e6 if frames else 0.0

    @property
    def sender_cpu_us_per_frame(self) -> float:
        return self.sender_cpu_seconds / self.frames_sent * 1e6 if self.frames_sent else 0.0

    @property
    def zero_loss(self) -> bool:
        ok = self.frames_sent > 0 and self.packets_received == self.packets_sent
        if self.kind == "receiver":
            ok = ok and self.frames_received == self.frames_sent
        return ok

    @property
    def sender_limited(self) -> bool:
        return bool(self.target_hz) and self.sent_hz < 0.97 * self.target_hz

    def summary(self) -> dict:
        return {
            "kind": self.kind, "target_hz": self.target_hz, "backlog": self.backlog,
            "sent_hz": round(self.sent_hz, 1), "received_hz": round(self.received_hz, 1),
            "frames_sent": self.frames_sent, "packets_sent": self.packets_sent,
            "packets_received": self.packets_received,
            "frames_received": self.frames_received, "lost_packets": self.lost_packets,
            "incomplete_frames": self.incomplete_frames,
            "kernel_rcvbuf_errors": self.kernel_rcvbuf_errors,
            "cpu_us_per_frame": round(self.cpu_us_per_frame, 1),
            "sender_cpu_us_per_frame": round(self.sender_cpu_us_per_frame, 1),
            "zero_loss": self.zero_loss, "sender_limited": self.sender_limited,
        }


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rcvbuf = int(args.rcvbuf_mib * 2**20)
        self.name = f"bench-recv-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ipc_dir = tempfile.mkdtemp(prefix="stddaq-bench-")
        self.drain_port = free_udp_port()
        self.config = parse_config({
            "detector_name": self.name, "detector_type": "jungfrau", "n_modules": 1,
            "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
            "start_udp_port": free_udp_port(), "writer_user_id": 0, "udp_host": HOST,
            "n_frame_slots": args.frame_slots,
            "module_positions": {"0": [0, 0, 1023, 511]},
        }, source="bench")
        self.frames_address = ipc_address(self.ipc_dir, self.name, Stream.FRAMES)
        self.buffer: FrameBuffer | None = None
        self.procs: dict[str, multiprocessing.Process] = {}
        self.conns: dict[str, Connection] = {}
        self.pull: zmq.Socket | None = None
        self.session = False
        self.next_frame = 1
        self.granted: dict[str, int] = {}

    # set-up and tear-down

    def start(self) -> None:
        self.buffer = FrameBuffer.create(shm_name(self.name, Segment.FRAMES),
                                         self.config.n_frame_slots, 1, FRAME_BYTES)
        pages = self.buffer.segment.array[::4096]
        pages[:] = pages.copy()  # allocate every page of the segment now
        ctx = multiprocessing.get_context("fork")
        cpu_send, cpu_recv = (0, 1) if self.args.pin else (None, None)
        targets = {
            "sender": (sender_main, (cpu_send, self.args.gso)),
            "drain": (drain_main, (self.drain_port, self.rcvbuf, cpu_recv)),
            "receiver": (receiver_main, (self.config, self.frames_address, self.rcvbuf,
                                         cpu_recv)),
        }
        # Fork every child before this process creates its ZMQ context.
        for name, (target, args) in targets.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, *args), name=f"bench-{name}",
                               daemon=True)
            proc.start()
            child.close()
            self.procs[name], self.conns[name] = proc, parent
        _, self.granted["drain"] = self.conns["drain"].recv()
        self.pull = zmq.Context.instance().socket(zmq.PULL)
        self.pull.setsockopt(zmq.RCVHWM, 0)
        self.pull.bind(self.frames_address)

    def close(self) -> None:
        for proc in self.procs.values():  # a backlog step may have left one stopped
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(proc.pid, signal.SIGCONT)
        if self.session:  # after an interruption replies may be out of step: best effort
            with contextlib.suppress(Exception):
                self.end_session(timeout=5.0)
        for name, conn in self.conns.items():
            with contextlib.suppress(OSError):
                conn.send({"sender": None, "drain": ("stop",), "receiver": "quit"}[name])
        for proc in self.procs.values():
            proc.join(3)
            if proc.is_alive():
                proc.terminate()
                proc.join(3)
        if self.pull is not None:
            self.pull.close(0)
        if self.buffer is not None:
            self.buffer.close()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def _request(self, kind: str, command: tuple):
        self.conns[kind].send(command)
        return self.conns[kind].recv()

    def begin_session(self) -> None:
        """Start a fresh ModuleReceiver (fresh ReceiverStats) and warm it up: its first
        pass over the FrameBuffer ring page-faults the mapping, as any receiver's first
        n_frame_slots frames do; steady state is what the steps measure."""
        conn = self.conns["receiver"]
        conn.send("session")
        _, self.granted["receiver"] = conn.recv()
        self.session = True
        self.warm_up("receiver")

    def end_session(self, timeout: float = 30.0) -> dict:
        """Stop the ModuleReceiver; returns its ReceiverStats (as a dict)."""
        self.session = False
        self.conns["receiver"].send(("stop",))
        messages: list[bytes] = []
        deadline = time.monotonic() + timeout
        while not self.conns["receiver"].poll(0.02):
            self._pull_all(messages, 0)
            if time.monotonic() > deadline:
                raise TimeoutError("the receiver did not stop")
        _, stats = self.conns["receiver"].recv()
        self._pull_all(messages, 200)
        return stats

    def warm_up(self, kind: str) -> Step:
        return self.run_step(kind, 1000.0, 2 * self.config.n_frame_slots / 1000.0)

    # one step

    def _pull_all(self, messages: list[bytes], timeout_ms: int) -> float | None:
        """Receive every ModuleFrame waiting (waits up to timeout_ms for the first);
        returns the arrival time of the last one, None if none came."""
        if not self.pull.poll(timeout_ms):
            return None
        while True:
            try:
                messages.append(self.pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return time.perf_counter()

    def run_step(self, kind: str, rate: float, duration: float, progress: bool = False,
                 backlog_rcvbuf: int = 0) -> Step:
        """One sender run into ``kind``, measured.

        With ``backlog_rcvbuf`` the receiving process gets a socket buffer of that size and
        is stopped (SIGSTOP) while the sender puts about 80 % of it in, unpaced; then it is
        resumed: its rate of emptying the backlog is its own capacity, with the sender done.
        """
        backlog = bool(backlog_rcvbuf)
        step = Step(kind, rate, backlog=backlog)
        sender = self.conns["sender"]
        port = self.drain_port if kind == "drain" else self.config.udp_port(0)
        step.rcvbuf = self.granted[kind]
        if backlog:
            step.rcvbuf = self._request(kind, ("rcvbuf", backlog_rcvbuf))
            max_frames = int(0.8 * step.rcvbuf / (N_PACKETS * PACKET_TRUESIZE))
        else:
            max_frames = round(rate * duration) if rate else 2**62
        before = udp_counters()
        if kind == "drain":
            packets_before, cpu_before = self._request(kind, ("arm",))
        else:
            cpu_before = self._request(kind, ("cpu",))
        first_frame = self.next_frame
        pid = self.procs[kind].pid
        if backlog:
            os.kill(pid, signal.SIGSTOP)
        sender.send((port, rate, duration, max_frames, first_frame))
        messages: list[bytes] = []
        records = 0
        first_msg = last_msg = sent_at = None
        started = last_report = time.perf_counter()
        try:
            while True:  # until sent, and everything received or the stream quiet
                if kind == "receiver":
                    seen = len(messages)
                    arrived = self._pull_all(messages, 20)
                    # a message holds one or more ModuleFrames
                    records += sum(len(m) for m in messages[seen:]) // MODULE_FRAME.itemsize
                    if arrived is not None:
                        last_msg = arrived
                        first_msg = first_msg or arrived
                else:
                    sender.poll(0.05)
                now = time.perf_counter()
                if sent_at is None and sender.poll():
                    (step.frames_sent, step.packets_sent, step.send_seconds,
                     step.sender_cpu_seconds) = sender.recv()
                    sent_at = now
                    self.next_frame += step.frames_sent
                    if backlog:
                        os.kill(pid, signal.SIGCONT)
                if progress and kind == "receiver" and now - last_report >= 5:
                    last_report = now
                    print(f"    {now - started:5.1f} s: {records} frames received "
                          f"({len(messages)} messages)", flush=True)
                if sent_at is None:
                    continue
                if kind == "drain":
                    snapshot = self._request(kind, ("snapshot",))
                    if snapshot[3] > sent_at:  # quiet after the sender was done: all in
                        break
                    time.sleep(0.05)
                elif (records >= step.frames_sent
                      or now - max(sent_at, last_msg or 0.0) > 0.5):
                    break
        finally:
            if backlog:
                os.kill(pid, signal.SIGCONT)
        if kind == "drain":
            packets, first, last, _, cpu_after = snapshot
            step.packets_received = packets - packets_before
            step.frames_received = step.packets_received // N_PACKETS
            step.receive_seconds = max(last - first, 0.0)
        else:
            cpu_after = self._request(kind, ("cpu",))
            self._pull_all(messages, 0)
            records = np.frombuffer(b"".join(messages), MODULE_FRAME)
            ids = records["frame_index"].astype(np.int64)
            records = records[(ids >= first_frame) & (ids < first_frame + step.frames_sent)]
            step.frames_received = len(records)
            step.packets_received = int(records["n_recv_packets"].sum())
            step.incomplete_frames = int((records["n_recv_packets"] < N_PACKETS).sum())
            if first_msg is not None and len(records) > 1:
                # first to last ModuleFrame spans frames - 1 frame intervals
                span = last_msg - first_msg
                step.receive_seconds = span * len(records) / (len(records) - 1)
        step.cpu_seconds = cpu_after - cpu_before
        if backlog:
            self._request(kind, ("rcvbuf", self.rcvbuf))
        after = udp_counters()
        step.kernel_rcvbuf_errors = after["RcvbufErrors"] - before["RcvbufErrors"]
        return step


def _print_step(step: Step) -> None:
    rate = f"{step.target_hz:6.0f} Hz" if step.target_hz else " unpaced "
    if step.backlog:
        rate = " backlog "
    flags = "ok  " if step.zero_loss else "LOSS"
    limited = "  (sender-limited)" if step.sender_limited else ""
    print(f"  {step.kind:8s} {rate}: sent {step.frames_sent:6d} frames at {step.sent_hz:7.1f} Hz"
          f" ({gbps(step.sent_hz):4.2f} GB/s), received {step.packets_received / N_PACKETS:8.1f}"
          f" at {step.received_hz:7.1f} Hz, lost {step.lost_packets:6d} packets "
          f"(kernel drops {step.kernel_rcvbuf_errors}), CPU {step.cpu_us_per_frame:4.0f} us/frame"
          f" {flags}{limited}", flush=True)


def best_zero_loss(steps: list[Step]) -> Step | None:
    good = [s for s in steps if s.zero_loss]
    return max(good, key=lambda s: s.sent_hz) if good else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Receive throughput of one Jungfrau module on loopback: the fastcore "
        "ModuleReceiver vs a plain recv_into drain, at stepped rates, emptying a full socket "
        "buffer (backlog), then a sustained run. Ends with one JSON line of all figures.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 s steps, 3 backlog repeats, 10 s sustained")
    parser.add_argument("--rates", default=DEFAULT_RATES,
                        help="comma-separated frame rates in Hz, 0 = unpaced "
                        "(default: %(default)s)")
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="seconds per rate step (default 5, --quick 2)")
    parser.add_argument("--backlog-repeats", type=int, default=None,
                        help="backlog runs per receiver, 0 = skip (default 5, --quick 3)")
    parser.add_argument("--backlog-rcvbuf-mib", type=float, default=1000.0,
                        help="receive buffer of the backlog runs (default: %(default)s MiB; "
                        "the kernel's limit is just under 1024)")
    parser.add_argument("--sustained-rate", type=float, default=2000.0,
                        help="frame rate of the sustained run (default: %(default)s Hz)")
    parser.add_argument("--sustained-seconds", type=float, default=None,
                        help="length of the sustained run, 0 = skip (default 60, --quick 10)")
    parser.add_argument("--rcvbuf-mib", type=float, default=DEFAULT_RCVBUF / 2**20,
                        help="receive buffer of both sockets in the rate steps and the "
                        "sustained run (default: %(default)s MiB, the receiver's default)")
    parser.add_argument("--frame-slots", type=int,
                        default=round(BUFFER_SECONDS * detector_type("jungfrau").nominal_rate_hz),
                        help="FrameBuffer slots (default: %(default)s, what a config without "
                        "n_frame_slots gets: 1 s at Jungfrau's nominal rate)")
    parser.add_argument("--gso", action=argparse.BooleanOptionalAction, default=True,
                        help="send with UDP GSO (default: on): the same datagrams reach the "
                        "receivers, the sender pays the IP path once per 7 packets")
    parser.add_argument("--huge-pages", action="store_true",
                        help="put the FrameBuffer on a tmpfs mounted with huge=always (2 MiB "
                        "pages), in a private mount namespace (needs root); default: "
                        "$STDDAQ_SHM_DIR or /dev/shm as they are")
    parser.add_argument("--pin", action="store_true",
                        help="pin the sender to CPU 0 and the receiving processes to CPU 1")
    args = parser.parse_args(argv)
    step_s = args.step_seconds or (2.0 if args.quick else 5.0)
    sustained_s = args.sustained_seconds
    if sustained_s is None:
        sustained_s = 10.0 if args.quick else 60.0
    repeats = args.backlog_repeats
    if repeats is None:
        repeats = 3 if args.quick else 5
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates: expected comma-separated numbers, got {args.rates!r}")
    if any(r < 0 for r in rates) or step_s <= 0 or sustained_s < 0 or repeats < 0:
        parser.error("rates, durations and repeats must be >= 0 (steps > 0)")
    logging.basicConfig(level=logging.WARNING)
    if args.huge_pages:
        with huge_page_shm(2 * args.frame_slots + 64):
            return run(args, rates, step_s, sustained_s, repeats)
    return run(args, rates, step_s, sustained_s, repeats)


def run(args: argparse.Namespace, rates: list[float], step_s: float, sustained_s: float,
        repeats: int) -> int:
    """The benchmark proper (buffers in ``shm_dir()``)."""
    with open("/proc/sys/net/core/rmem_max") as f:
        rmem_max = int(f.read())
    bench = Bench(args)
    print(f"bench_receive: one Jungfrau module ({N_PACKETS} x {PACKET_BYTES} B packets, "
          f"{FRAME_BYTES / 2**20:.0f} MiB payload per frame) on {HOST}; "
          f"{os.cpu_count()} CPUs; {'pinned' if args.pin else 'not pinned'}; sender "
          f"{'sendmmsg + UDP GSO' if args.gso else 'sendmmsg'}", flush=True)
    print(f"  FrameBuffer in {shm_pages()}", flush=True)
    print(f"  net.core.rmem_max = {rmem_max} B ({rmem_max / 2**20:.1f} MiB); sockets ask "
          f"{bench.rcvbuf / 2**20:.0f} MiB with SO_RCVBUFFORCE (uid {os.getuid()}; only root "
          "passes rmem_max)", flush=True)
    steps: list[Step] = []
    backlog: list[Step] = []
    sustained: Step | None = None
    sustained_drain: Step | None = None
    sessions: list[dict] = []
    interrupted = False
    try:
        bench.start()
        bench.begin_session()
        bench.warm_up("drain")
        print(f"rate steps of {step_s:g} s, drain and receiver interleaved:", flush=True)
        for i, rate in enumerate(rates):
            order = ("drain", "receiver") if i % 2 == 0 else ("receiver", "drain")
            previous = [s for s in steps if s.target_hz and s.target_hz < rate]
            if rate and previous and all(s.sender_limited for s in previous[-2:]):
                print(f"  {rate:6.0f} Hz: skipped, the sender fell short at "
                      f"{previous[-1].target_hz:g} Hz for both", flush=True)
                continue
            for kind in order:
                steps.append(bench.run_step(kind, rate, step_s))
                _print_step(steps[-1])
        if repeats:
            print(f"backlog: the receiving process is stopped while the sender fills a "
                  f"{args.backlog_rcvbuf_mib:g} MiB socket buffer, then resumed:", flush=True)
        for i in range(repeats):
            for kind in ("drain", "receiver") if i % 2 == 0 else ("receiver", "drain"):
                backlog.append(bench.run_step(kind, 0, 60.0, backlog_rcvbuf=int(
                    args.backlog_rcvbuf_mib * 2**20)))
                _print_step(backlog[-1])
        sessions.append(bench.end_session())
        if sustained_s:
            print(f"sustained: a fresh receiver session (warmed up with "
                  f"{2 * args.frame_slots} frames), then {sustained_s:g} s at "
                  f"{args.sustained_rate:g} Hz ({gbps(args.sustained_rate):.2f} GB/s):",
                  flush=True)
            bench.begin_session()
            sustained = bench.run_step("receiver", args.sustained_rate, sustained_s,
                                       progress=True)
            _print_step(sustained)
            sessions.append(bench.end_session())
            print(f"sustained, plain drain: the same {sustained_s:g} s at "
                  f"{args.sustained_rate:g} Hz:", flush=True)
            sustained_drain = bench.run_step("drain", args.sustained_rate, sustained_s,
                                             progress=True)
            _print_step(sustained_drain)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: partial results", flush=True)
    finally:
        bench.close()

    print("results:")
    figures = summarize(args, bench, rates, steps, backlog, sustained, sustained_drain,
                        sessions)
    figures.update({"quick": args.quick, "interrupted": interrupted, "step_seconds": step_s,
                    "rmem_max_bytes": rmem_max, "rcvbuf_asked_bytes": bench.rcvbuf,
                    "pinned": args.pin, "gso_sender": args.gso,
                    "huge_pages": args.huge_pages, "shm": shm_pages(),
                    "steps": [s.summary() for s in steps + backlog]})
    sys.stdout.flush()
    print(json.dumps({"benchmark": "bench_receive", **figures}), flush=True)
    return 1 if interrupted else 0


def summarize(args: argparse.Namespace, bench: Bench, rates: list[float], steps: list[Step],
              backlog: list[Step], sustained: Step | None, sustained_drain: Step | None,
              sessions: list[dict]) -> dict:
    """Print the figures and ratios; return them as a dict."""
    figures: dict = {}
    everything = steps + backlog + [s for s in (sustained, sustained_drain) if s]
    granted = bench.granted.get("receiver", 0)
    figures["rcvbuf_granted_bytes"] = granted
    figures["drain_rcvbuf_granted_bytes"] = bench.granted.get("drain", 0)
    figures["backlog_rcvbuf_granted_bytes"] = max((s.rcvbuf for s in backlog), default=0)
    print(f"  receive buffer granted: {granted} B ({granted / 2**20:.1f} MiB, about "
          f"{granted / (N_PACKETS * PACKET_TRUESIZE):.0f} frames); backlog runs "
          f"{figures['backlog_rcvbuf_granted_bytes'] / 2**20:.0f} MiB")
    figures["sender_max_hz"] = round(max((s.sent_hz for s in everything), default=0.0), 1)

    best = {}
    for kind in ("drain", "receiver"):
        kind_steps = [s for s in steps if s.kind == kind]
        top = best_zero_loss(kind_steps)
        best[kind] = top
        hz = top.sent_hz if top else 0.0
        # No loss even unpaced or when the sender fell short: the figure is the sender's.
        bounded = bool(top and (not top.target_hz or top.sender_limited))
        figures[f"{kind}_max_zero_loss_hz"] = round(hz, 1)
        figures[f"{kind}_max_zero_loss_gbps"] = round(gbps(hz), 3)
        figures[f"{kind}_max_zero_loss_sender_bound"] = bounded
        unpaced = [s for s in kind_steps if not s.target_hz]
        if unpaced:
            figures[f"{kind}_unpaced_received_hz"] = round(unpaced[-1].received_hz, 1)
            figures[f"{kind}_unpaced_lost_packets"] = unpaced[-1].lost_packets
        note = "  (no loss up to what the sender managed: a lower bound)" if bounded else ""
        print(f"  {kind:8s}: highest zero-loss rate {hz:7.1f} frames/s = {gbps(hz):.2f} "
              f"GB/s{note}")
    if best["drain"] and best["receiver"]:
        ratio = best["receiver"].sent_hz / best["drain"].sent_hz
        both_bound = (figures["drain_max_zero_loss_sender_bound"]
                      and figures["receiver_max_zero_loss_sender_bound"])
        figures["ratio_zero_loss"] = round(ratio, 3)
        figures["ratio_zero_loss_sender_bound"] = both_bound
        figures["ratio_zero_loss_ok"] = ratio >= 0.9
        print(f"  ratio receiver / drain, highest zero-loss rates: {ratio:.2f} (target >= 0.9: "
              f"{'met' if ratio >= 0.9 else 'MISSED'})"
              + ("; both sender-bound: see the backlog ratio for capacity" if both_bound
                 else ""))

    for kind in ("drain", "receiver"):
        runs = [s for s in backlog if s.kind == kind]
        if runs:
            hz = float(np.median([s.received_hz for s in runs]))
            cpu = float(np.median([s.cpu_us_per_frame for s in runs]))
            figures[f"{kind}_backlog_hz"] = round(hz, 1)
            figures[f"{kind}_backlog_gbps"] = round(gbps(hz), 3)
            figures[f"{kind}_backlog_cpu_us_per_frame"] = round(cpu, 1)
            figures[f"{kind}_backlog_lost_packets"] = sum(s.lost_packets for s in runs)
            print(f"  {kind:8s}: empties a backlog at {hz:7.1f} frames/s = {gbps(hz):.2f} GB/s "
                  f"(median of {len(runs)}; {cpu:.0f} us CPU per frame)")
    if figures.get("drain_backlog_hz") and figures.get("receiver_backlog_hz"):
        ratio = figures["receiver_backlog_hz"] / figures["drain_backlog_hz"]
        figures["ratio_backlog"] = round(ratio, 3)
        figures["ratio_backlog_ok"] = ratio >= 0.9
        print(f"  ratio receiver / drain, backlog (capacity): {ratio:.2f} (target >= 0.9: "
              f"{'met' if ratio >= 0.9 else 'MISSED'})")

    # CPU per frame at the highest paced rate both kept up with, the sender on time: the
    # cost while keeping up, when each receive call finds only the few packets in so far.
    common = [r for r in rates if r and all(
        any(s.kind == k and s.target_hz == r and s.zero_loss and not s.sender_limited
            for s in steps) for k in ("drain", "receiver"))]
    if common:
        rate = max(common)
        at = {s.kind: s for s in steps if s.target_hz == rate}
        figures["cpu_compare_rate_hz"] = rate
        for kind, s in at.items():
            figures[f"{kind}_cpu_us_per_frame"] = round(s.cpu_us_per_frame, 1)
            figures[f"{kind}_cpu_busy_fraction"] = round(s.cpu_seconds / s.send_seconds, 3)
        figures["sender_cpu_us_per_frame"] = round(at["receiver"].sender_cpu_us_per_frame, 1)
        print(f"  CPU per frame while keeping up at {rate:g} Hz: drain "
              f"{at['drain'].cpu_us_per_frame:.0f} us, receiver "
              f"{at['receiver'].cpu_us_per_frame:.0f} us, sender "
              f"{at['receiver'].sender_cpu_us_per_frame:.0f} us")

    if sessions:
        figures["receiver_stats_steps_session"] = sessions[0]
    if sustained is not None:
        stats = sessions[1] if len(sessions) > 1 else {}
        figures.update({
            "sustained_target_hz": args.sustained_rate,
            "sustained_seconds": round(sustained.send_seconds, 2),
            "sustained_sent_hz": round(sustained.sent_hz, 1),
            "sustained_gbps": round(gbps(sustained.sent_hz), 3),
            "sustained_frames_sent": sustained.frames_sent,
            "sustained_frames_received": sustained.frames_received,
            "sustained_lost_packets": sustained.lost_packets,
            "sustained_stats_lost_packets": stats.get("lost_packets"),
            "sustained_stats": stats,
            "sustained_incomplete_frames": sustained.incomplete_frames,
            "sustained_kernel_rcvbuf_errors": sustained.kernel_rcvbuf_errors,
            "sustained_receiver_cpu_us_per_frame": round(sustained.cpu_us_per_frame, 1),
            "sustained_zero_loss": sustained.zero_loss and not stats.get("lost_packets"),
            "sustained_sender_limited": sustained.sender_limited,
        })
        short = (f"; the sender reached only {sustained.sent_hz:.0f} of "
                 f"{args.sustained_rate:g} Hz" if sustained.sender_limited else "")
        print(f"  sustained: {sustained.frames_received}/{sustained.frames_sent} frames, "
              f"{sustained.lost_packets} packets lost (ReceiverStats of the session: "
              f"{stats.get('lost_packets')} lost, {stats.get('frames')} frames incl. warm-up) at "
              f"{sustained.sent_hz:.1f} Hz ({gbps(sustained.sent_hz):.2f} GB/s): goal 0 lost "
              f"{'met' if figures['sustained_zero_loss'] else 'MISSED'}{short}")
    if sustained is not None and sustained_drain is not None:
        within = sustained.lost_packets <= sustained_drain.lost_packets
        figures.update({
            "sustained_drain_sent_hz": round(sustained_drain.sent_hz, 1),
            "sustained_drain_lost_packets": sustained_drain.lost_packets,
            "sustained_drain_cpu_us_per_frame": round(sustained_drain.cpu_us_per_frame, 1),
            "sustained_receiver_within_drain": within,
        })
        print(f"  sustained, plain drain: {sustained_drain.lost_packets} packets lost at "
              f"{sustained_drain.sent_hz:.1f} Hz; the receiver loses no more than the drain: "
              f"{'met' if within else 'MISSED'}")
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
