"""Batched UDP I/O: recvmmsg/sendmmsg through ctypes with numpy-built message vectors.

One system call moves up to a whole module frame of datagrams. Each message has two
iovecs, so the kernel scatters the header into a header array and the payload straight
to its place in shared memory (no intermediate bytes objects, no per-packet Python).
The C structs are numpy structured dtypes (LP64 Linux: x86_64, aarch64).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket

import numpy as np

log = logging.getLogger(__name__)

IOVEC = np.dtype([("base", "<u8"), ("len", "<u8")])
MMSGHDR = np.dtype(
    [
        ("name", "<u8"),
        ("namelen", "<u4"),
        ("_pad0", "<u4"),
        ("iov", "<u8"),
        ("iovlen", "<u8"),
        ("control", "<u8"),
        ("controllen", "<u8"),
        ("flags", "<i4"),
        ("_pad1", "<u4"),
        ("len", "<u4"),
        ("_pad2", "<u4"),
    ]
)
assert MMSGHDR.itemsize == 64 and IOVEC.itemsize == 16

MSG_WAITFORONE = 0x10000
MSG_TRUNC = 0x20
SO_RCVBUFFORCE = 33
DEFAULT_RCVBUF = 2**30  # 1 GiB: about 0.5 s of one Jungfrau module at 2 kHz (the kernel
# charges about 8.3 kB per 8240 B packet)
_MAX_RCVBUF = 2**31 // 2 - 1  # the kernel keeps at most INT_MAX / 2 (and doubles it)

_libc = ctypes.CDLL(None, use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int


class MessageVector:
    """``n`` messages of two iovecs each (header, payload) for recvmmsg/sendmmsg."""

    def __init__(self, n: int, header_bytes: int):
        self.n = n
        self.msgs = np.zeros(n, MMSGHDR)
        self.iovs = np.zeros((n, 2), IOVEC)
        self.headers = np.zeros((n, header_bytes), np.uint8)
        self.msgs["iov"] = self.iovs.ctypes.data + np.arange(n, dtype=np.uint64) * 32
        self.msgs["iovlen"] = 2
        self.iovs["base"][:, 0] = self.headers.ctypes.data + np.arange(n, dtype=np.uint64) * (
            header_bytes
        )
        self.iovs["len"][:, 0] = header_bytes
        self._msgs_ptr = self.msgs.ctypes.data

    def set_payloads(self, addresses: np.ndarray, lengths: np.ndarray | int) -> None:
        """Point the payload iovecs of the first ``len(addresses)`` messages."""
        k = len(addresses)
        self.iovs["base"][:k, 1] = addresses
        self.iovs["len"][:k, 1] = lengths

    def set_payload_addresses(self, addresses: np.ndarray) -> None:
        """Point the payload iovecs of the first ``len(addresses)`` messages, lengths as
        set before."""
        self.iovs["base"][: len(addresses), 1] = addresses

    def recv(self, fd: int, count: int, wait_all: bool = False) -> int:
        """Receive up to ``count`` datagrams; blocks for the first (SO_RCVTIMEO bounds it).
        With ``wait_all`` it blocks for each of the ``count`` datagrams instead, so a call
        returns fewer only when the socket stayed empty for SO_RCVTIMEO: a receiver that is
        faster than its stream then gets whole batches instead of paying its per-call
        cost for a few datagrams. Returns the number received, 0 on timeout."""
        n = _recvmmsg(fd, self._msgs_ptr, count, 0 if wait_all else MSG_WAITFORONE, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return 0
            raise OSError(err, os.strerror(err))
        return n

    def send(self, fd: int, count: int) -> int:
        """Send the first ``count`` messages; returns how many the kernel took."""
        sent = 0
        while sent < count:
            n = _sendmmsg(fd, self._msgs_ptr + sent * MMSGHDR.itemsize, count - sent, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err in (errno.EAGAIN, errno.EINTR, errno.ENOBUFS):
                    continue
                raise OSError(err, os.strerror(err))
            sent += n
        return sent


def set_receive_timeout(sock: socket.socket, timeout_s: float) -> None:
    """SO_RCVTIMEO: how long a blocking receive on ``sock`` waits for a datagram."""
    seconds = int(timeout_s)
    micros = int((timeout_s - seconds) * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    np.array([seconds, micros], np.int64).tobytes())


def open_receive_socket(host: str, port: int, rcvbuf: int = DEFAULT_RCVBUF,
                        timeout_s: float = 0.1) -> socket.socket:
    """Bind a UDP socket with a large receive buffer and a kernel receive timeout.

    As root SO_RCVBUFFORCE passes net.core.rmem_max; otherwise a capped buffer is logged
    with the sysctl that lifts the cap. An occupied port raises OSError naming it.
    """
    rcvbuf = min(rcvbuf, _MAX_RCVBUF)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        set_receive_timeout(sock, timeout_s)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"UDP port {port} on {host} is already in use "
                              "(is another receiver running?)") from None
            raise OSError(exc.errno, f"cannot bind UDP {host}:{port}: {exc.strerror}") from None
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # kernel doubles
        if granted < rcvbuf:
            log.warning(
                "UDP port %d: receive buffer capped at %.1f MiB (asked %.0f MiB) by "
                "net.core.rmem_max; packets may be lost at high rates. Fix: sysctl -w "
                "net.core.rmem_max=%d",
                sock.getsockname()[1], granted / 2**20, rcvbuf / 2**20, rcvbuf,
            )
    except BaseException:
        sock.close()
        raise
    return sock
