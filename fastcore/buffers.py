"""FrameBuffer and ImageBuffer: slot rings on shared memory (/dev/shm or $STDDAQ_SHM_DIR).

A segment starts with a 4 KiB header (``formats.SHM_HEADER``) so consumers attach by name
alone; then ``n_slots`` slots, ``slot = id % n_slots``. Each slot holds a metadata record
followed by the data bytes. Producers mark a slot's id ``INVALID_ID`` before rewriting it
and store the new id last; a reader compares the id before and after using the data
(seqlock), so an image overwritten while it was read is reported, never returned as good.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import time

import numpy as np

from fastcore.formats import (
    IMAGE_METADATA,
    INVALID_ID,
    MODULE_FRAME,
    SHM_HEADER,
    SHM_HEADER_BYTES,
    SHM_MAGIC,
    code_dtype,
    dtype_code,
)
from fastcore.names import Segment

log = logging.getLogger(__name__)

SHM_DIR_ENV = "STDDAQ_SHM_DIR"
DEFAULT_SHM_DIR = "/dev/shm"


def shm_dir() -> str:
    """Directory of the buffers: ``$STDDAQ_SHM_DIR`` or /dev/shm. Every process of one
    detector must see the same one. A tmpfs mounted with ``huge=always`` there gives the
    buffers 2 MiB pages, which makes receiving straight into them much cheaper
    (docs/operations.md)."""
    return os.environ.get(SHM_DIR_ENV) or DEFAULT_SHM_DIR


def _segment_path(name: str) -> str:
    """Path of a segment; ShmBufferError when the buffers' directory does not exist."""
    directory = shm_dir()
    if not os.path.isdir(directory):
        raise ShmBufferError(f"the buffer directory {directory} ({SHM_DIR_ENV} or "
                             f"{DEFAULT_SHM_DIR}) does not exist")
    return os.path.join(directory, name)
_PAGE = 4096
SEGMENT_MODE = 0o640  # the creating user writes; its group (consumers run as it) reads
_IMAGE_META_BYTES = _PAGE  # ImageMetadata (80 B), then the image on a page boundary (O_DIRECT)


class ShmBufferError(RuntimeError):
    """Base of shared-memory buffer errors."""


class BufferMissingError(ShmBufferError):
    """The segment to attach does not exist (its producer is not running)."""


class BufferInUseError(ShmBufferError):
    """Another live process owns a segment of this name."""


class SlotOverwrittenError(ShmBufferError):
    """The slot was rewritten with another id while it was read."""


def shm_prefix(detector_name: str) -> str:
    """What the names of all of a detector's segments begin with, e.g. ``stddaq.JF1M.``."""
    return f"stddaq.{detector_name}."


def shm_name(detector_name: str, buffer: Segment) -> str:
    """Segment name of a detector's buffer, e.g. ``stddaq.JF1M.image``."""
    return f"{shm_prefix(detector_name)}{buffer}"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedSegment:
    """A named POSIX shared-memory file mapped into this process."""

    def __init__(self, name: str, fd: int, size: int, owner: bool, writable: bool):
        self.name = name
        self.path = os.path.join(shm_dir(), name)
        self.owner = owner
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self.inode = os.fstat(fd).st_ino
            # MAP_POPULATE maps every page now, so the hot path never page-faults (a first
            # pass over a fresh mapping otherwise runs at half speed).
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, prot)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)
        self.header = self.array[: SHM_HEADER.itemsize].view(SHM_HEADER)[0]
        self._closed = False

    @classmethod
    def create(cls, name: str, size: int, **header: int | bytes) -> SharedSegment:
        """Create the segment; a leftover of a dead creator is replaced (and logged)."""
        path = _segment_path(name)
        if os.path.exists(path):
            pid = _read_creator_pid(path)
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise BufferInUseError(
                    f"shared memory {path} is in use by running process {pid}; stop it first "
                    "or use another detector_name"
                )
            log.warning("replacing leftover shared memory %s (creator pid %s is gone)", path, pid)
            os.unlink(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, SEGMENT_MODE)
        try:
            os.fchmod(fd, SEGMENT_MODE)  # whatever the umask
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        began = time.monotonic()
        segment = cls(name, fd, size, owner=True, writable=True)
        took = time.monotonic() - began
        if took >= 1.0:
            log.info("shared memory %s: %.2f GB mapped and zeroed in %.1f s", path, size / 1e9,
                     took)
        segment.header["magic"] = SHM_MAGIC
        segment.header["creator_pid"] = os.getpid()
        for key, value in header.items():
            segment.header[key] = value
        return segment

    @classmethod
    def attach(cls, name: str, writable: bool = False) -> SharedSegment:
        path = _segment_path(name)
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except FileNotFoundError:
            raise BufferMissingError(
                f"shared memory {path} does not exist: start its producer first"
            ) from None
        size = os.fstat(fd).st_size
        if size < SHM_HEADER_BYTES:
            os.close(fd)
            raise BufferMissingError(f"shared memory {path} is not a stddaq buffer (too small)")
        segment = cls(name, fd, size, owner=False, writable=writable)
        if bytes(segment.header["magic"]) != SHM_MAGIC:
            segment.close()
            raise BufferMissingError(f"shared memory {path} is not a stddaq buffer (bad magic)")
        return segment

    def replaced(self) -> bool:
        """True when the name now refers to another segment (its producer restarted) or to
        none: this mapping only holds stale data."""
        try:
            return os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            return True

    def close(self) -> None:
        """Unmap; the owner also unlinks the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.header = None
        self.array = None
        # With numpy views still alive the mapping stays until they are collected.
        with contextlib.suppress(BufferError):
            self._mmap.close()


def _read_creator_pid(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(SHM_HEADER.itemsize)
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise BufferInUseError(f"shared memory {path} exists and is not readable") from None
        return None
    if len(raw) < SHM_HEADER.itemsize:
        return None
    header = np.frombuffer(raw, SHM_HEADER)[0]
    return int(header["creator_pid"]) if bytes(header["magic"]) == SHM_MAGIC else None


def segment_alive(name: str) -> bool:
    """True when the segment exists and the process that created it is still running."""
    pid = _read_creator_pid(os.path.join(shm_dir(), name))
    return pid is not None and _pid_alive(pid)


class _SlotRing:
    """Common part of both buffers: ``n_slots`` slots of ``slot_bytes`` after the header."""

    kind: bytes = b""

    def __init__(self, segment: SharedSegment):
        self.segment = segment
        header = segment.header
        if bytes(header["kind"]) != self.kind:
            kind = bytes(header["kind"]).decode(errors="replace")
            segment.close()
            raise BufferMissingError(
                f"shared memory {segment.path} holds a {kind!r} buffer, not {self.kind.decode()!r}"
            )
        self.n_slots = int(header["n_slots"])
        self.slot_bytes = int(header["slot_bytes"])
        self.meta_bytes = int(header["meta_bytes"])
        self.data_bytes = int(header["data_bytes"])
        self._slots = segment.array[SHM_HEADER_BYTES:].reshape(self.n_slots, self.slot_bytes)

    @property
    def name(self) -> str:
        return self.segment.name

    def pixel_rows(self, dtype) -> tuple[np.ndarray, int]:
        """The whole ring as one C-contiguous 2-D array of ``dtype``, one row per frame
        (``slot * n_modules + module``; images have one module), and the column where the
        pixels start: the batched assembler kernels reach any slot through it."""
        itemsize = np.dtype(dtype).itemsize
        n_frames = self.n_slots * int(self.segment.header["n_modules"])
        rows = self._slots.reshape(n_frames, -1).view(dtype)
        return rows, self.meta_bytes // itemsize

    def close(self) -> None:
        self._slots = None
        self.segment.close()

    def refreshed(self):
        """This buffer, or (after its producer restarted and recreated the segment) a new
        read-only attachment to the new segment, this one closed. Call it when a slot check
        fails; it costs one stat()."""
        if self.segment.owner or not self.segment.replaced():
            return self
        try:
            fresh = type(self).attach(self.name)
        except ShmBufferError:
            return self
        log.warning("shared memory %s was recreated by a restarted producer: re-attached",
                    self.name)
        self.close()
        return fresh

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ImageBuffer(_SlotRing):
    """Ring of assembled images, each slot = ImageMetadata + image bytes."""

    kind = b"image"

    def __init__(self, segment: SharedSegment):
        super().__init__(segment)
        header = segment.header
        self.shape = (int(header["height"]), int(header["width"]))
        self.dtype = code_dtype(int(header["dtype"]))
        meta = self._slots[:, : IMAGE_METADATA.itemsize]
        self._meta = meta.view(IMAGE_METADATA).reshape(self.n_slots)
        data = self._slots[:, self.meta_bytes : self.meta_bytes + self.data_bytes]
        self._images = data.view(self.dtype).reshape(self.n_slots, *self.shape)

    @staticmethod
    def slot_bytes_for(shape: tuple[int, int], dtype) -> int:
        """Bytes of one slot (metadata and image, page-aligned)."""
        return _round_up(_IMAGE_META_BYTES + shape[0] * shape[1] * np.dtype(dtype).itemsize,
                         _PAGE)

    @classmethod
    def create(cls, name: str, n_slots: int, shape: tuple[int, int], dtype) -> ImageBuffer:
        dtype = np.dtype(dtype)
        data_bytes = shape[0] * shape[1] * dtype.itemsize
        slot_bytes = cls.slot_bytes_for(shape, dtype)
        segment = SharedSegment.create(
            name, SHM_HEADER_BYTES + n_slots * slot_bytes, kind=cls.kind, n_slots=n_slots,
            slot_bytes=slot_bytes, meta_bytes=_IMAGE_META_BYTES, data_bytes=data_bytes,
            n_modules=1, height=shape[0], width=shape[1], dtype=dtype_code(dtype),
        )
        buffer = cls(segment)
        buffer._meta["id"] = INVALID_ID
        return buffer

    @classmethod
    def attach(cls, name: str, writable: bool = False) -> ImageBuffer:
        return cls(SharedSegment.attach(name, writable))

    def slot(self, image_id: int) -> int:
        return int(image_id) % self.n_slots

    def metadata(self, image_id: int) -> np.void:
        """The slot's live ImageMetadata record (a view: it changes when the slot is reused)."""
        return self._meta[self.slot(image_id)]

    def image(self, image_id: int) -> np.ndarray:
        """Zero-copy view of the slot's image; check :meth:`holds` after using it."""
        return self._images[self.slot(image_id)]

    def holds(self, image_id: int) -> bool:
        """True while the slot holds ``image_id`` (committed and not rewritten)."""
        return int(self._meta["id"][self.slot(image_id)]) == int(image_id)

    def newest(self) -> int | None:
        """The highest image id committed in the ring (None when it holds none)."""
        ids = self._meta["id"]
        committed = ids[ids != INVALID_ID]
        return int(committed.max()) if len(committed) else None

    def begin_write(self, image_id: int) -> np.ndarray:
        """Mark the slot as being rewritten and return its writable image view."""
        slot = self.slot(image_id)
        self._meta["id"][slot] = INVALID_ID
        return self._images[slot]

    def commit(self, metadata: np.void | np.ndarray) -> None:
        """Publish the slot's metadata; its id is stored last so readers see a whole image."""
        slot = self.slot(int(metadata["id"]))
        record = self._meta[slot : slot + 1]
        for name in IMAGE_METADATA.names[1:]:
            record[name] = metadata[name]
        record["id"] = metadata["id"]

    def read(self, image_id: int, out: np.ndarray | None = None) -> tuple[np.void, np.ndarray]:
        """Copy image ``image_id`` out of the ring; raises SlotOverwrittenError if the slot
        does not hold it (not yet written, or rewritten before or while it was copied)."""
        slot = self.slot(image_id)
        meta = self._meta[slot].copy()
        if int(meta["id"]) != int(image_id):
            raise SlotOverwrittenError(
                f"image {image_id} is no longer in slot {slot} of {self.name} (holds "
                f"{_id_text(meta['id'])}): the reader is more than {self.n_slots} images behind"
            )
        if out is None:
            out = np.empty(self.shape, self.dtype)
        np.copyto(out, self._images[slot])
        if not self.holds(image_id):
            raise SlotOverwrittenError(
                f"image {image_id} in slot {slot} of {self.name} was overwritten while it was "
                "read"
            )
        return meta, out


def _id_text(value) -> str:
    return "an image being written" if value == INVALID_ID else f"image {int(value)}"


class FrameBuffer(_SlotRing):
    """Ring of raw module frames: slot x module -> ModuleFrame + frame bytes."""

    kind = b"frames"

    def __init__(self, segment: SharedSegment):
        super().__init__(segment)
        self.n_modules = int(segment.header["n_modules"])
        self.module_bytes = self.slot_bytes // self.n_modules
        per_module = self._slots.reshape(self.n_slots, self.n_modules, self.module_bytes)
        self._meta = per_module[:, :, : MODULE_FRAME.itemsize].view(MODULE_FRAME)[..., 0]
        self._frames = per_module[:, :, self.meta_bytes : self.meta_bytes + self.data_bytes]

    @staticmethod
    def slot_bytes_for(n_modules: int, frame_bytes: int) -> int:
        """Bytes of one slot (every module's metadata and frame, each page-aligned)."""
        return n_modules * _round_up(MODULE_FRAME.itemsize + frame_bytes, _PAGE)

    @classmethod
    def create(cls, name: str, n_slots: int, n_modules: int, frame_bytes: int) -> FrameBuffer:
        module_bytes = cls.slot_bytes_for(1, frame_bytes)
        segment = SharedSegment.create(
            name, SHM_HEADER_BYTES + n_slots * n_modules * module_bytes, kind=cls.kind,
            n_slots=n_slots, slot_bytes=n_modules * module_bytes,
            meta_bytes=MODULE_FRAME.itemsize, data_bytes=frame_bytes, n_modules=n_modules,
        )
        buffer = cls(segment)
        buffer._meta["id"] = INVALID_ID
        return buffer

    @classmethod
    def attach(cls, name: str, writable: bool = False) -> FrameBuffer:
        return cls(SharedSegment.attach(name, writable))

    def slot(self, frame_id: int) -> int:
        return int(frame_id) % self.n_slots

    def module_frame(self, frame_id: int, module: int) -> np.void:
        """The ModuleFrame record of (slot of frame_id, module): a live view."""
        return self._meta[self.slot(frame_id), module]

    def frame(self, frame_id: int, module: int) -> np.ndarray:
        """Zero-copy uint8 view of the module's frame bytes in the slot of ``frame_id``."""
        return self._frames[self.slot(frame_id), module]

    def record_words(self, module: int) -> np.ndarray:
        """(n_slots, 8) uint64 view of one module's ModuleFrame records (fields in
        MODULE_FRAME order, ``id`` first): the receiver writes a record with two stores."""
        assert all(MODULE_FRAME[name] == np.dtype("<u8") for name in MODULE_FRAME.names)
        per_module = self._slots.reshape(self.n_slots, self.n_modules, self.module_bytes)
        return per_module[:, module, : MODULE_FRAME.itemsize].view(np.uint64)

    def held_ids(self, frame_ids: np.ndarray) -> np.ndarray:
        """(len(frame_ids), n_modules) ids held in the slots of ``frame_ids`` (a copy)."""
        return self._meta["id"][frame_ids % np.uint64(self.n_slots)]

    def received_packets(self, frame_ids: np.ndarray) -> np.ndarray:
        """(len(frame_ids), n_modules) n_recv_packets in the slots of ``frame_ids``."""
        return self._meta["n_recv_packets"][frame_ids % np.uint64(self.n_slots)]

    def data_address(self, slot: int, module: int) -> int:
        """Virtual address of the frame bytes of (slot, module), for recvmmsg iovecs."""
        return self._frames[slot, module].ctypes.data
