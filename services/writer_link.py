"""The writer agent's connection to one stddaq-h5-writer process: commands out, events in."""

from __future__ import annotations

import logging
import time

import zmq

from fastcore.names import Stream, writer_stream
from fastcore.process import ipc_address, subscribe
from fastcore.writer_protocol import ProtocolError, WriterEvent, decode_event

log = logging.getLogger(__name__)

SETTLE_S = 2.0  # a running writer greets a new subscriber at once; its heartbeat is 0.5 s


class BusyError(RuntimeError):
    """The detector is already writing another request."""


class WriterError(RuntimeError):
    """The HDF5 writer reported an error, or stopped answering."""


class WriterLink:
    """The agent's two sockets to stddaq-h5-writer: commands out, events in."""

    def __init__(self, ipc_dir: str, detector_name: str, index: int = 0, n_writers: int = 1):
        ctx = zmq.Context.instance()
        self.index = index
        self.address = ipc_address(ipc_dir, detector_name,
                                   writer_stream(Stream.WRITER, index, n_writers))
        self.commands = ctx.socket(zmq.PUSH)
        self.commands.setsockopt(zmq.IMMEDIATE, 1)  # never queue for an absent writer
        self.commands.setsockopt(zmq.LINGER, 0)
        self.commands.connect(self.address)
        self.events = subscribe(ctx, ipc_address(ipc_dir, detector_name, writer_stream(
            Stream.WRITER_STATUS, index, n_writers)))
        self.heard = False  # an event came: the writer's events reach this link

    def settle(self, timeout_s: float = SETTLE_S) -> None:
        """Wait (bounded) until the writer's greeting heartbeat shows its events reach this
        link, so the answer to a first command is not lost while the subscription is still
        on its way (:meth:`send` does this first)."""
        if not self.heard:
            self.receive(timeout_s)

    def send(self, message: bytes, timeout_s: float = 1.0) -> None:
        """Send a command; WriterError when no writer is connected within ``timeout_s``."""
        if not self.commands.poll(int(timeout_s * 1000), zmq.POLLOUT):
            raise WriterError(f"stddaq-h5-writer is not running (nothing listens on "
                              f"{self.address})")
        self.settle()
        self.commands.send(message, zmq.NOBLOCK)

    def receive(self, timeout_s: float) -> WriterEvent | None:
        """The next event, or None after ``timeout_s`` (a message that is not a writer
        event is logged and skipped)."""
        deadline = time.monotonic() + timeout_s
        while self.events.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            data = self.events.recv()
            self.heard = True
            try:
                return decode_event(data)
            except ProtocolError as exc:
                log.warning("ignored a message on %s: %s", self.address, exc)
        return None

    def drain(self) -> None:
        while self.events.poll(0):
            self.events.recv()
            self.heard = True

    def close(self) -> None:
        self.commands.close(0)
        self.events.close(0)
