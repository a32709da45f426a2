"""Names two processes must agree on: a detector's ZMQ ipc streams and its shared-memory
segments (``fastcore.process.ipc_address``, ``fastcore.buffers.shm_name``)."""

from __future__ import annotations

from enum import StrEnum


class Stream(StrEnum):
    """ZMQ ipc sockets ``<ipc-dir>/stddaq-<detector>-<stream>``."""

    FRAMES = "frames"  # receivers -> sync: ModuleFrame records
    RAW = "raw"  # sync -> assembler: RawMetadata records
    IMAGE = "image"  # assembler (or stream_recv) -> consumers: ImageMetadata records
    WRITER = "writer"  # writer agent -> h5 writer: commands
    WRITER_STATUS = "writer-status"  # h5 writer -> writer agent: events


def writer_stream(stream: Stream, index: int, n_writers: int) -> str:
    """The command or event stream of h5 writer ``index`` of ``n_writers`` (the plain name
    when the detector has one writer)."""
    return str(stream) if n_writers == 1 else f"{stream}-{index}"


class Segment(StrEnum):
    """Shared-memory segments ``stddaq.<detector>.<segment>``."""

    FRAMES = "frames"  # FrameBuffer, created by the receivers
    IMAGE = "image"  # ImageBuffer, created by the assembler (or stream_recv)
