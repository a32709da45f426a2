"""HDF5 writer: follows the ImageMetadata stream and copies a run's images into a file.

The writer agent starts and stops runs (``fastcore/writer_protocol.py``); the writer takes
the images itself from the detector's ImageMetadata stream (several records per message
are fine) and the ImageBuffer, and reports a heartbeat, progress and a summary.

Layout (DESIGN.md section 7): ``/<detector>/data`` (n, H, W), one image per chunk written
with direct chunk writes straight from the shared-memory view (optionally bitshuffle-lz4,
HDF5 filter 32008), and ``image_id``, ``status``, ``pulse_id``, ``frame_index`` (the
detector's frame index, ImageMetadata.frame_index), ``daq_rec`` (n,) uint64 beside it.
Datasets grow image by image, so a file closed early (stop, error, SIGTERM) holds exactly
the images written; the file is SWMR-readable while it is written. An image whose slot
was overwritten before or during the write is stored as zeros with status NOT_IN_BUFFER
and counted missing, never passed off as good data. Ids that never reached the writer
between two of a run's images are counted as absent.

A detector with ``n_writers`` > 1 runs one writer process per index (``--writer-index``):
each writes its share of a run (fastcore/writer_split.py) into its own file, keeping a row
(zeros, status ABSENT) for an image of its share that never came, and one of them lays out
the master file (fastcore/vds_master.py) when the writer agent asks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import bitshuffle
import h5py
import hdf5plugin
import numpy as np
import zmq

from fastcore import __version__
from fastcore.buffers import ImageBuffer, ShmBufferError, shm_name
from fastcore.config import DetectorConfig
from fastcore.direct_io import ALIGN, ChunkQueue, ChunkWriteError, DirectWriter, aligned_zeros
from fastcore.file_layout import FILL_VALUES, METADATA_FIELDS
from fastcore.formats import IMAGE_METADATA, INVALID_ID, ImageStatus, image_records
from fastcore.h5_recovery import RecoveryError, recover_file
from fastcore.names import Segment, Stream, writer_stream
from fastcore.output_file import OutputPathError, create_exclusive, fd_path, open_or_create
from fastcore.process import ipc_address, subscribe
from fastcore.runtime import add_common_arguments, announce_ready, run_service
from fastcore.vds_master import MasterError, add_run, read_runs, relative_names, write_master
from fastcore.writer_protocol import (
    COMMAND_TTL_S,
    COMPLETED,
    COMPRESSIONS,
    FAILED,
    HEARTBEAT_S,
    IMAGE_TIMEOUT,
    INTERRUPTED,
    REPLACED,
    STOPPED,
    BeginCommand,
    Heartbeat,
    MasterCommand,
    MasterWritten,
    ProtocolError,
    RunFirstImage,
    RunInfo,
    RunProgress,
    RunStarted,
    RunSummary,
    StartCommand,
    StopCommand,
    WriterEvent,
    WriterFailure,
    decode_command,
)
from fastcore.writer_split import Split

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 0.2  # rows become visible (and are reported written) at least this often
_MAX_LISTED = 1000  # missing ids and absent ranges listed in a summary
_RESERVE_BYTES = 2**20
MAX_BATCH = 64  # images taken per loop turn (the loop stays responsive to commands)
_FLAGS = [flag for flag in ImageStatus if flag and flag != ImageStatus.ABSENT]  # n_absent
BITSHUFFLE_FILTER = 32008  # HDF5's registered id of the bitshuffle filter


def journal_path(ipc_dir: str, detector_name: str, index: int = 0, n_writers: int = 1) -> str:
    """The writer's journal: which file it has open, for its successor to repair after a
    kill."""
    name = writer_stream(Stream.WRITER, index, n_writers)
    return os.path.join(ipc_dir, f"stddaq-{detector_name}-{name}.open")


class WriteError(RuntimeError):
    """A run's file cannot be opened or written; the message names the path."""


@contextlib.contextmanager
def effective_user(uid: int | None):
    """Act as ``uid`` (files created are owned by it) when running as root."""
    if not uid or uid < 1 or os.geteuid() != 0:
        yield
        return
    try:
        import pwd

        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = uid
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def file_attributes(config: DetectorConfig, run_id: int, metadata: dict) -> dict[str, str | int]:
    """The root attributes of every file stddaq writes (a run's file, a master)."""
    return {
        "software_version": f"stddaq {__version__}",
        "run_id": run_id,
        "detector_config": json.dumps(
            {k: v for k, v in vars(config).items() if k != "extra"}
            | {"module_positions": {str(k): v for k, v in config.module_positions.items()}}),
        "request_metadata": json.dumps(metadata),
    }


def bitshuffle_chunk(image: np.ndarray) -> np.ndarray:
    """One image as an HDF5 filter-32008 chunk: 12-byte header + bitshuffle-lz4 blocks."""
    compressed = bitshuffle.compress_lz4(image, 0)
    chunk = np.empty(12 + compressed.nbytes, np.uint8)
    chunk[:12] = np.frombuffer(struct.pack(">QI", image.nbytes, 8192), np.uint8)
    chunk[12:] = compressed
    return chunk


@dataclass
class RunFile:
    """The open file of one run; images are appended as rows."""

    path: str
    run_id: int
    info: RunInfo
    config: DetectorConfig
    images: ImageBuffer
    compression: str
    split: Split | None = None  # this writer's share of a run spread over several
    direct_io: bool = True  # uncompressed chunks written with O_DIRECT where possible
    n_rows: int = 0
    n_written: int = 0
    missing_ids: list[int] = field(default_factory=list)
    n_missing: int = 0

    def __post_init__(self) -> None:
        config = self.config
        self.n_target = (self.split.rows_before(self.info.n_images) if self.split
                         else self.info.n_images)  # rows this file gets of the run
        directory = os.path.dirname(self.path)
        self.reserve = os.path.join(directory, f".{os.path.basename(self.path)}.reserve")
        verb = "append to" if self.info.append else "write"
        try:
            with effective_user(self.info.user_id or config.writer_user_id):
                if self.info.append:
                    dir_fd, fd, created = open_or_create(self.path, config.output_root)
                else:
                    (dir_fd, fd), created = create_exclusive(self.path, config.output_root), True
                try:
                    # large objects (the chunks) on ALIGN boundaries: direct writes
                    self.file = h5py.File(fd_path(fd), "w" if created else "r+",
                                          libver="latest", alignment_threshold=ALIGN,
                                          alignment_interval=ALIGN)
                    self._reserve_space(dir_fd, created)
                    self._chunks = self._open_chunks(fd) if self.direct_io else None
                finally:
                    os.close(fd)
                    os.close(dir_fd)
        except OutputPathError as exc:
            raise WriteError(str(exc)) from None
        except OSError as exc:
            reason = "permission denied" if isinstance(exc, PermissionError) else str(exc)
            raise WriteError(f"cannot {verb} {self.path}: {reason}") from None
        try:
            if created:
                self._create_layout()
            else:
                self._open_layout()
            self.file.swmr_mode = True
        except BaseException:
            self._close_chunks()
            self.file.close()
            raise
        if self._chunks is not None and (not self._allocates_early()
                                         or self.images.data_bytes < ALIGN):
            self._close_chunks()  # chunks HDF5 allocates only as it writes them; tiny ones
        self.meta = np.zeros((len(METADATA_FIELDS), min(self.n_target, 4096)), np.uint64)
        self.flushed = 0  # rows visible to readers, and kept if the writer is killed
        self._zero_chunk: np.ndarray | None = None

    def _create_layout(self) -> None:
        config, shape = self.config, self.images.shape
        self.base = 0  # rows of earlier runs (appends)
        group = self.file.create_group(config.detector_name)
        chunks = (1, *shape)
        if self.compression != "none":
            options = hdf5plugin.Bitshuffle(cname="lz4")
        else:  # every chunk allocated as the dataset grows, written by DirectWriter
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_chunk(chunks)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
            dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
            options = {"dcpl": dcpl}
        self.data = group.create_dataset(
            "data", shape=(0, *shape), maxshape=(None, *shape), chunks=chunks,
            dtype=self.images.dtype, **options)
        self.meta_sets = {
            name: group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(4096,),
                                       dtype="<u8", fillvalue=FILL_VALUES.get(name, 0))
            for name in METADATA_FIELDS
        }
        for key, value in file_attributes(config, self.run_id, self.info.metadata).items():
            self.file.attrs[key] = value
        for key, value in self.info.metadata.items():
            if isinstance(value, str | int | float | bool):
                group.attrs[key] = value

    def _open_layout(self) -> None:
        """An existing file to append to: it must be this detector's, same geometry, its
        datasets of equal length; the file's compression is kept."""
        name, shape, dtype = self.config.detector_name, self.images.shape, self.images.dtype
        group = self.file.get(name)
        data = group.get("data") if isinstance(group, h5py.Group) else None
        if not isinstance(data, h5py.Dataset) or data.shape[1:] != shape \
                or data.dtype != dtype or data.maxshape[0] is not None:
            raise WriteError(f"cannot append to {self.path}: it holds no extendible "
                             f"/{name}/data of {shape[0]} x {shape[1]} {dtype} images (not "
                             "a file of this detector as it is configured now)")
        self.data, self.base = data, data.shape[0]
        self.meta_sets = {}
        for field_name in METADATA_FIELDS:
            dataset = group.get(field_name)
            if not isinstance(dataset, h5py.Dataset) or dataset.shape != (self.base,):
                found = getattr(dataset, "shape", "none")
                raise WriteError(f"cannot append to {self.path}: /{name}/{field_name} has "
                                 f"shape {found}, /{name}/data {self.base} rows (repair it "
                                 "with stddaq-h5-recover)")
            self.meta_sets[field_name] = dataset
        plist = data.id.get_create_plist()
        filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
        compression = "bitshuffle-lz4" if BITSHUFFLE_FILTER in filters else "none"
        if self.info.compression is not None and self.info.compression != compression:
            raise WriteError(f"cannot append to {self.path} with compression "
                             f"{self.info.compression}: its images are stored with "
                             f"{compression}")
        self.compression = compression

    def _reserve_space(self, dir_fd: int, created: bool) -> None:
        """Hold back some disk space, released before closing, so the file can always be
        closed valid even when the disk fills up during the run."""
        reserve = os.path.basename(self.reserve)
        try:
            fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                         0o600, dir_fd=dir_fd)
            try:
                os.posix_fallocate(fd, 0, _RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(reserve, dir_fd=dir_fd)
            if created:
                os.unlink(os.path.basename(self.path), dir_fd=dir_fd)
            raise

    def _open_chunks(self, fd: int) -> ChunkQueue:
        try:
            writer = DirectWriter(fd_path(fd))
        except OSError:
            self.file.close()
            raise
        return ChunkQueue(writer, self._still_held)

    def _still_held(self, token: tuple[int, int, int]) -> bool:
        """On the I/O thread, right after a chunk was written: was the image's slot still
        holding it (else the assembler rewrote it meanwhile)?"""
        _, image_id, _ = token
        return image_id < 0 or self.images.holds(image_id)

    def _allocates_early(self) -> bool:
        """True when HDF5 allocates the uncompressed chunks of ``data`` as it grows (files
        this writer created; not a compressed file or one from elsewhere appended to)."""
        plist = self.data.id.get_create_plist()
        return (self.compression == "none" and plist.get_nfilters() == 0
                and plist.get_alloc_time() == h5py.h5d.ALLOC_TIME_EARLY)

    def _close_chunks(self) -> None:
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None

    @property
    def complete(self) -> bool:
        return self.n_rows >= self.n_target

    def _grow_meta(self, rows: int) -> None:
        """Room for ``rows`` rows of metadata (up to the run's rows)."""
        if rows > self.meta.shape[1]:
            grown = np.zeros((len(METADATA_FIELDS), min(max(2 * self.meta.shape[1], rows),
                                                         self.n_target)), np.uint64)
            grown[:, :self.n_rows] = self.meta[:, :self.n_rows]
            self.meta = grown

    def add_absent(self, image_ids: np.ndarray) -> None:
        """Rows for images of this file's share that never came: zeros (no chunk is
        written), status ABSENT, so later rows stay where the master expects them."""
        row, n = self.n_rows, len(image_ids)
        self._grow_meta(row + n)
        self.meta[:, row:row + n] = 0
        self.meta[0, row:row + n] = image_ids
        self.meta[1, row:row + n] = ImageStatus.ABSENT
        self.n_rows = row + n
        self.data.id.set_extent((self.base + self.n_rows, *self.images.shape))

    def append(self, image_metadata: np.void) -> bool:
        """Write the next image from the ImageBuffer; False if it was no longer there (a
        row of zeros flagged NOT_IN_BUFFER). With direct I/O the image is queued: whether
        it was written good is known at :meth:`settle`."""
        row, image_id = self.n_rows, int(image_metadata["id"])
        file_row = self.base + row
        self._grow_meta(row + 1)
        offset = None
        if self._chunks is not None:
            offset = self._add_row(file_row)
        else:
            self.data.id.set_extent((file_row + 1, *self.images.shape))  # low level: ~5x cheaper
        if not self.images.holds(image_id):
            self._reattach()
        self.meta[:, row] = (image_id, image_metadata["status"], image_metadata["user_1"],
                             image_metadata["frame_index"], image_metadata["user_2"])
        self.n_rows = row + 1
        if offset is not None and self.images.holds(image_id):
            self._queue(offset, self.images.image(image_id), (row, image_id, offset))
            return True
        good = offset is None and self.images.holds(image_id) and self._write_chunk(
            file_row, image_id)
        if good:
            self.n_written += 1
        else:
            self._lost(row, image_id, offset)
        return good

    def _lost(self, row: int, image_id: int, offset: int | None) -> None:
        """The image of ``row`` was no longer in the ImageBuffer: zeros, NOT_IN_BUFFER
        (``offset``: its chunk's, with direct I/O)."""
        self._write_zeros(row, offset)
        self.meta[1, row] |= np.uint64(ImageStatus.NOT_IN_BUFFER)
        self.n_missing += 1
        if len(self.missing_ids) < _MAX_LISTED:
            self.missing_ids.append(image_id)

    def settle(self, wait: bool = False) -> None:
        """Book the queued images written so far (with ``wait``: all of them). A failed
        write (OSError) keeps only the rows before it."""
        chunks = self._chunks
        if chunks is None:
            return
        try:
            chunks.submit()
            while True:
                for (row, image_id, offset), held in chunks.reap(wait):
                    if image_id < 0:
                        continue  # zeros of an image lost before
                    if held:
                        self.n_written += 1
                    else:  # rewritten while it was written: its row becomes zeros
                        self._lost(row, image_id, offset)
                if not wait or chunks.idle:
                    break
        except ChunkWriteError as exc:
            self._cut(exc.token[0])
            raise

    def _queue(self, offset: int, data: np.ndarray, token: tuple[int, int, int]) -> None:
        try:
            self._chunks.add(offset, data, token)
        except ChunkWriteError as exc:  # an earlier write failed
            self._cut(exc.token[0])
            raise

    def _cut(self, row: int) -> None:
        """Rows from ``row`` on were not written (a failed write): drop them."""
        self.n_rows = min(self.n_rows, row)
        status = self.meta[1, : self.n_rows]
        self.n_missing = int(np.count_nonzero(status & np.uint64(ImageStatus.NOT_IN_BUFFER)))
        kept = set(self.meta[0, : self.n_rows].tolist())
        self.missing_ids = [i for i in self.missing_ids if i in kept]

    def _reattach(self) -> None:
        """The producer restarted with a new ImageBuffer: follow it (same geometry only)."""
        images = self.images.refreshed()
        if (images.shape, images.dtype) != (self.images.shape, self.images.dtype):
            raise WriteError(f"the ImageBuffer {images.name} was recreated with another "
                             "image geometry")
        self.images = images

    def _write_chunk(self, row: int, image_id: int) -> bool:
        view = self.images.image(image_id)
        if self.compression == "none":
            self.data.id.write_direct_chunk((row, 0, 0), view)
            return self.images.holds(image_id)
        chunk = bitshuffle_chunk(view)
        if not self.images.holds(image_id):  # compressed a slot being rewritten
            return False
        self.data.id.write_direct_chunk((row, 0, 0), chunk)
        return True

    def _add_row(self, file_row: int) -> int:
        """Grow ``data`` to ``file_row`` + 1 rows (HDF5 allocates the chunk: early
        allocation) and return the new chunk's file offset.

        HDF5 finds a chunk's offset only by walking the chunk index (its cost grows with the
        rows), so the offset is derived: a chunk this large never fits in the file's free
        space (only fragments below ALIGN are freed while a run is written), so HDF5 places
        it at the end of allocated space, aligned. When the end of allocated space then
        moved by exactly that chunk, that is where it is; otherwise (HDF5 also allocated
        index blocks, in about 1 of 300 rows) the index is asked.
        """
        nbytes = self.images.data_bytes
        before = self.file.id.get_filesize()  # end of allocated space (or of the file)
        self.data.id.set_extent((file_row + 1, *self.images.shape))
        first = -(-before // ALIGN) * ALIGN
        if self.file.id.get_filesize() == first + nbytes:
            return first
        offset = self.data.id.get_chunk_info_by_coord((file_row, 0, 0)).byte_offset
        if offset is None:
            raise WriteError(f"HDF5 allocated no chunk for row {file_row} of {self.path}")
        return offset

    def _write_zeros(self, row: int, offset: int | None) -> None:
        if self._zero_chunk is None:
            zeros = aligned_zeros(self.images.data_bytes)
            self._zero_chunk = zeros if self.compression == "none" else bitshuffle_chunk(
                zeros.view(self.images.dtype).reshape(self.images.shape))
        if offset is not None:
            self._queue(offset, self._zero_chunk, (row, -1, offset))
        else:
            self.data.id.write_direct_chunk((self.base + row, 0, 0), self._zero_chunk)

    def flag_counts(self) -> tuple[int, dict[str, int]]:
        """(good rows, rows per status flag name)."""
        status = self.meta[1, : self.n_rows]
        counts = {flag.name: int(np.count_nonzero(status & np.uint64(flag))) for flag in _FLAGS}
        return int(np.count_nonzero(status == 0)), {k: n for k, n in counts.items() if n}

    def flush(self) -> None:
        """Make the written images and their metadata visible to SWMR readers (and safe
        from a kill: a restarted writer keeps the rows flushed)."""
        self.settle(wait=True)
        rows, base = self.n_rows, self.base
        if rows > self.flushed:
            for i, name in enumerate(METADATA_FIELDS):
                dataset = self.meta_sets[name]
                dataset.resize(base + rows, axis=0)
                dataset[base + self.flushed : base + rows] = self.meta[i, self.flushed : rows]
        self.file.flush()
        self.flushed = rows

    def close(self, failed: bool = False) -> None:
        """Flush and close; after a failed write, the rows written whole are kept."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.reserve)
        error = None
        try:
            self.settle(wait=True)
        except OSError as exc:  # the rows before the failed write are kept
            error, failed = exc, True
        try:
            if failed:  # the failed image's row may have been added
                self.data.resize(self.base + self.n_rows, axis=0)
            self.flush()
        finally:
            self._close_chunks()
            self.file.close()
        if error is not None:
            raise error


class AbsentIds:
    """Ids that never reached the writer between a run's consecutive images."""

    def __init__(self) -> None:
        self.last: int | None = None
        self.count = 0
        self.ranges: list[list[int]] = []
        self.resets = 0

    def expect(self, first: int) -> None:
        """The run asked for images from ``first`` on: a later first image leaves a gap."""
        self.last = first - 1

    def add(self, image_id: int) -> None:
        last = self.last
        if last is not None:
            if image_id > last + 1:
                self.count += image_id - last - 1
                if len(self.ranges) < _MAX_LISTED:
                    self.ranges.append([last + 1, image_id - 1])
            elif image_id <= last:  # the detector started counting again
                self.resets += 1
        self.last = image_id

    def add_missing(self, image_ids: np.ndarray) -> None:
        """Ids of a split run's share that never came (ascending): counted, ranges kept."""
        if not len(image_ids):
            return
        self.count += len(image_ids)
        breaks = np.flatnonzero(np.diff(image_ids) != 1)
        starts = np.concatenate(([0], breaks + 1))
        ends = np.concatenate((breaks, [len(image_ids) - 1]))
        for start, end in zip(starts, ends, strict=True):
            if len(self.ranges) >= _MAX_LISTED:
                break
            self.ranges.append([int(image_ids[start]), int(image_ids[end])])


class Run:
    """One run: which images belong to it, its file, its accounting and timing."""

    def __init__(self, command: StartCommand, file: RunFile):
        self.command, self.file = command, file
        self.split = command.split
        self.absent = AbsentIds()
        self.next_id = command.start_image_id  # until the first live image: skip older ids
        self.catching_up = self.next_id is not None  # take buffered images first
        if self.next_id is not None and self.split is None:
            self.absent.expect(self.next_id)
        # a split run: its first image id; writer 0 takes the first that comes and
        # announces it (first_pending), the others wait for it (waiting)
        self.first_id = command.start_image_id
        self.first_pending = False
        self.waiting = (self.split is not None and self.split.index != 0
                        and self.first_id is None)
        if self.split is not None and self.next_id is not None:
            self.next_id = self.first_id + self.split.next_owned(0)
        self.last_image_at = time.monotonic()
        self.flushed_at = time.monotonic()

    def begin(self, first_image_id: int) -> None:
        """A split run's writer (not writer 0) starts at ``first_image_id``: it takes its
        share from there, those images still in the ImageBuffer first."""
        if not self.waiting:
            return
        self.waiting = False
        self.first_id = first_image_id
        self.next_id = first_image_id + self.split.next_owned(0)
        self.catching_up = True
        self.last_image_at = time.monotonic()

    @property
    def run_id(self) -> int:
        return self.command.run_id

    def take(self, records: np.ndarray) -> None:
        """Write the live images of ``records`` that belong to the run."""
        if self.split is not None:
            self._take_share(records)
            return
        for record in records:
            if self.file.complete:
                return
            image_id = int(record["id"])
            if self.next_id is not None:
                if image_id < self.next_id:
                    continue  # older than asked for, or already taken from the buffer
                self.next_id = None
            self._append(record)

    def catch_up(self, limit: int) -> None:
        """Write up to ``limit`` images from ``next_id`` on that are in the ImageBuffer."""
        images = self.file.images
        for _ in range(limit):
            if self.file.complete:
                break
            held = int(images.metadata(self.next_id)["id"])
            if held == self.next_id:
                record = images.metadata(held).copy()
                if self.split is None:
                    self._append(record)
                else:
                    self._place(record, held)
                self._advance(self.next_id + 1)
            elif self.next_id < held < INVALID_ID:
                # overwritten: go to the oldest images kept, past the tenth of the ring
                # that the producer rewrites next
                oldest = images.newest() - images.n_slots + 1
                self._advance(max(self.next_id + 1, oldest + images.n_slots // 10))
            elif (images.newest() or 0) > self.next_id:
                # never produced (images come in id order, a later one is there)
                self._advance(self.next_id + 1)
            else:  # not produced yet (or being written): the live stream brings it
                break
        else:
            return
        self.catching_up = False

    def _advance(self, image_id: int) -> None:
        """The next image to take from the buffer: ``image_id``, or a split run's next
        image of this writer's share from there."""
        if self.split is not None:
            image_id = self.first_id + self.split.next_owned(image_id - self.first_id)
        self.next_id = image_id

    def _take_share(self, records: np.ndarray) -> None:
        """A split run: write this writer's share of the live images."""
        for record in records:
            if self.file.complete or self.waiting:
                return
            image_id = int(record["id"])
            if self.first_id is None:  # writer 0: the run starts with this image
                self.first_id, self.first_pending = image_id, True
            if self.next_id is not None:
                if image_id < self.next_id:
                    continue  # taken from the buffer already
                self.next_id = None
            self._place(record, image_id)

    def _place(self, record: np.void, image_id: int) -> None:
        """Image ``image_id`` of a split run reached this writer: its row if it is of this
        writer's share; rows of its share that were skipped become ABSENT rows."""
        split, file = self.split, self.file
        k = image_id - self.first_id
        if k < 0:
            return  # older than the run (or the detector counts again: its rows stay)
        self.last_image_at = time.monotonic()
        if k >= file.info.n_images:
            self._skip_to(file.n_target)  # the run's images are over
            return
        row = split.rows_before(k)
        if split.owns(k) and row >= file.n_rows:
            self._skip_to(row)
            file.append(record)
        elif split.rows_before(k + 1) >= file.n_target:
            self._skip_to(file.n_target)  # past this writer's last image of the run

    def _skip_to(self, row: int) -> None:
        """Rows up to ``row`` whose images never came: ABSENT rows, counted."""
        file = self.file
        if row > file.n_rows:
            rows = np.arange(file.n_rows, row, dtype=np.int64)
            ids = self.first_id + self.split.image_of_row(rows)
            file.add_absent(ids)
            self.absent.add_missing(ids)

    def _append(self, record: np.void) -> None:
        self.absent.add(int(record["id"]))
        self.file.append(record)
        self.last_image_at = time.monotonic()

    def summary(self, reason: str, message: str = "") -> RunSummary:
        file = self.file
        n_good, flagged = file.flag_counts()
        return RunSummary(
            run_id=self.run_id, output_file=file.path, n_images=file.n_target,
            reason=reason, message=message, n_written=file.n_written,
            n_missing=file.n_missing, n_good=n_good, n_flagged=flagged,
            n_absent=self.absent.count, absent_ranges=self.absent.ranges,
            missing_image_ids=file.missing_ids, n_id_resets=self.absent.resets,
            first_row=file.base)


class H5Writer:
    """The writer's logic, socket-free: ``command`` and ``take`` feed it, ``tick`` runs its
    timers; ``publish(event)`` reports every event (a ``writer_protocol`` event)."""

    def __init__(self, config: DetectorConfig, publish: Callable[[WriterEvent], None],
                 compression: str = "none", journal: str | None = None,
                 direct_io: bool = True):
        self.config = config
        self.publish = publish
        self.compression = compression
        self.direct_io = direct_io
        self.journal = journal
        self.run: Run | None = None
        self.images: ImageBuffer | None = None
        self._beat_at = 0.0

    @property
    def catching_up(self) -> bool:
        return self.run is not None and self.run.catching_up

    def wait_ms(self) -> int:
        """How long the loop may wait for a message: not at all while catching up, a
        tenth of a second in a run (flush and timeout timers), else until the heartbeat."""
        if self.run is not None:
            return 0 if self.run.catching_up else 100
        return max(1, math.ceil((self._beat_at + HEARTBEAT_S - time.monotonic()) * 1000))

    def command(self, data: bytes) -> None:
        try:
            command = decode_command(data)
        except ProtocolError as exc:
            self.publish(WriterFailure(None, str(exc)))
            return
        if isinstance(command, StopCommand):
            if self.run is not None and self.run.run_id == command.run_id:
                self.finish(STOPPED)
            return
        if isinstance(command, BeginCommand):
            if self.run is not None and self.run.run_id == command.run_id:
                self.run.begin(command.first_image_id)
            return
        if isinstance(command, MasterCommand):
            self.write_master(command)
            return
        age = time.time() - command.sent_at
        if age > COMMAND_TTL_S:
            self._fail_open(command.run_id, f"the start of run {command.run_id} was sent "
                            f"{age:.0f} s ago (queued while the writer was down?): ignored")
            return
        if self.run is not None:
            self.finish(REPLACED, f"replaced by run {command.run_id}")
        self.open(command)

    def _below_root(self, output_file: str) -> str:
        """The normalised path; WriteError if it is outside the config's output root."""
        root = self.config.output_root
        path = os.path.normpath(output_file)
        if root and os.path.commonpath([os.path.abspath(root), path]) != os.path.abspath(root):
            raise WriteError(f"output_file {path} is outside the output root {root}")
        return path

    def open(self, command: StartCommand) -> None:
        info, run_id, split = command.run_info, command.run_id, command.split
        try:
            path = self._below_root(info.output_file)
            images = self._image_buffer()
            file = RunFile(path, run_id, info, self.config, images,
                           info.compression or self.compression, split, self.direct_io)
        except (WriteError, ShmBufferError, OSError) as exc:
            self._fail_open(run_id, str(exc))
            return
        self.run = Run(command, file)
        self._write_journal(file)
        share = (f" (writer {split.index} of {split.n_writers}: {file.n_target} of "
                 f"{info.n_images} images)" if split else "")
        log.info("run %d: writing %d images to %s%s%s", run_id, file.n_target, path, share,
                 f" after its {file.base} rows" if info.append else "")
        self.publish(RunStarted(run_id, path, file.n_target, file.base))

    def write_master(self, command: MasterCommand) -> None:
        """Lay out the master file of a split run (a new file; an appending run rebuilds
        it under a temporary name and renames it over the old one)."""
        run_id = command.run_id
        try:
            path = self._below_root(command.output_file)
            names = relative_names(path, command.writer_files)
            master_start = self._write_master(command, path, names)
        except (WriteError, MasterError, OutputPathError, OSError) as exc:
            self._fail_open(run_id, f"master file {command.output_file}: {exc}")
            return
        log.info("run %d: master %s joins %s", run_id, path, ", ".join(names))
        self.publish(MasterWritten(run_id, path, master_start))

    def _write_master(self, command: MasterCommand, path: str, names: list[str]) -> int:
        config, root = self.config, self.config.output_root
        with effective_user(command.user_id or config.writer_user_id):
            runs = []
            if command.append:
                dir_fd, fd, created = open_or_create(path, root)
                try:
                    if not created:
                        with h5py.File(fd_path(fd), "r") as old:
                            runs = read_runs(old, names, command.frames_per_block)
                finally:
                    os.close(fd)
                    os.close(dir_fd)
            runs = add_run(runs, command.run_id, command.bases, command.frames_per_block)
            target = path if not command.append else os.path.join(
                os.path.dirname(path), f".{os.path.basename(path)}.{command.run_id}.tmp")
            dir_fd, fd = create_exclusive(target, root)
            try:
                with h5py.File(fd_path(fd), "w", libver="latest") as master:
                    write_master(master, config.detector_name, config.image_shape,
                                 config.image_dtype, names, command.frames_per_block, runs,
                                 file_attributes(config, command.run_id, command.metadata))
                if target != path:
                    os.rename(os.path.basename(target), os.path.basename(path),
                              src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.basename(target), dir_fd=dir_fd)
                raise
            finally:
                os.close(fd)
                os.close(dir_fd)
        return runs[-1].master_start

    def _image_buffer(self) -> ImageBuffer:
        """The ImageBuffer, attached once and kept (a fresh mapping would page-fault through
        its first pass); re-attached when the assembler recreated it."""
        if self.images is None:
            self.images = ImageBuffer.attach(shm_name(self.config.detector_name, Segment.IMAGE))
        else:
            self.images = self.images.refreshed()
        return self.images

    def _fail_open(self, run_id: int, message: str) -> None:
        log.error("run %d: %s", run_id, message)
        self.publish(WriterFailure(run_id, message))

    def take(self, records: np.ndarray) -> None:
        """Live ImageMetadata records, in arrival order (dropped when no run is open)."""
        run = self.run
        if run is None or not len(records):
            return
        self._guard(run.take, records)
        if run.first_pending:
            run.first_pending = False
            self.publish(RunFirstImage(run.run_id, run.first_id))

    def _guard(self, write: Callable, *args) -> None:
        run = self.run
        try:
            write(*args)
            run.file.settle()  # book the images the disk has taken meanwhile
        except (OSError, WriteError) as exc:
            message = f"writing image {run.file.n_rows} to {run.file.path} failed: {exc}"
            self.finish(FAILED, message, failed=True)
            return
        if run.file.complete:
            self.finish(COMPLETED)

    def tick(self) -> None:
        """Timers: catch-up from the buffer, image timeout, flush + progress, heartbeat."""
        now = time.monotonic()
        run = self.run
        if run is not None and run.catching_up:
            self._guard(run.catch_up, MAX_BATCH)
        run = self.run
        if run is not None:
            timeout = run.command.image_timeout_s
            if now - run.last_image_at > timeout:
                self.finish(IMAGE_TIMEOUT, f"no image from detector "
                            f"{self.config.detector_name} for {timeout:g} s: is the detector "
                            "(or simulator) running?")
            elif now - run.flushed_at > FLUSH_EVERY_S and run.file.n_rows > run.file.flushed:
                self._flush(run)
        if now - self._beat_at >= HEARTBEAT_S:
            self.beat()
            if self.run is None:
                self.follow_buffer()

    def beat(self) -> None:
        """Publish a heartbeat now (the timer's, and a new subscriber's first event)."""
        self._beat_at = time.monotonic()
        self.publish(Heartbeat(os.getpid(), time.time(), self.run.run_id if self.run else None))

    def follow_buffer(self) -> None:
        """Between runs: keep the ImageBuffer mapped, so a run's start does not wait for
        mapping it (MAP_POPULATE of a large buffer takes a good fraction of a second);
        follow one its producer recreated, and let go of one that is gone."""
        images = self.images
        if images is not None and images.segment.replaced():
            images.close()
            self.images = images = None
        if images is None:
            with contextlib.suppress(ShmBufferError):
                self.images = ImageBuffer.attach(shm_name(self.config.detector_name,
                                                          Segment.IMAGE))

    def _flush(self, run: Run) -> None:
        """Flush, then report the rows flushed as written (a kill cannot take them back)."""
        file = run.file
        run.flushed_at = time.monotonic()
        try:
            file.flush()
        except OSError as exc:  # h5py reports a full disk this way
            self.finish(FAILED, f"flushing {file.path} failed: {exc}", failed=True)
            return
        self.publish(RunProgress(run.run_id, file.n_rows, file.n_written, file.n_missing,
                                 run.absent.count))

    def finish(self, reason: str, message: str = "", failed: bool = False) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.file.close(failed)
        except (OSError, RuntimeError) as exc:  # h5py raises both for a full disk
            reason, message = FAILED, f"closing {run.file.path} failed: {exc}"
        self._clear_journal()
        self.images = run.file.images  # the run may have re-attached a recreated buffer
        summary = run.summary(reason, message)
        log.info("run %d %s: %s%s", run.run_id, reason, summary.describe(),
                 f": {message}" if message else "")
        self.publish(summary)

    def close(self) -> None:
        """The process ends (SIGTERM): close the open run's file valid."""
        self.finish(INTERRUPTED, "stddaq-h5-writer was stopped (SIGTERM) during the run")
        if self.images is not None:
            self.images.close()
            self.images = None

    # --- the journal: which file is open, so a killed writer's file is repaired -------

    def recover(self) -> None:
        """Repair the file a killed predecessor left open (its journal names it): clear
        its open-for-write flags, keep the rows it had flushed, remove its reserve file."""
        if not self.journal or not os.path.exists(self.journal):
            return
        try:
            with open(self.journal) as journal:
                left = json.load(journal)
            path, reserve = left["output_file"], left["reserve"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("cannot read the writer journal %s (%s): a file left open by a killed "
                      "writer may need stddaq-h5-recover", self.journal, exc)
            self._clear_journal()
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(reserve)
        if os.path.exists(path):
            try:
                report = recover_file(path, self.config.detector_name)
            except RecoveryError as exc:
                log.error("the file left open by a killed writer is not repaired: %s", exc)
            else:
                log.warning("repaired the file left open by a killed writer: %s",
                            report.describe())
        self._clear_journal()

    def _write_journal(self, file: RunFile) -> None:
        if not self.journal:
            return
        try:
            with open(self.journal, "w") as out:
                json.dump({"output_file": file.path, "reserve": file.reserve,
                           "run_id": file.run_id}, out)
        except OSError as exc:  # the run goes on; only a kill -9 repair is lost
            log.warning("cannot write the writer journal %s (%s): if this writer is killed, "
                        "repair %s with stddaq-h5-recover", self.journal, exc, file.path)

    def _clear_journal(self) -> None:
        if self.journal:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.journal)


def decode_records(messages: list[bytes]) -> np.ndarray:
    """The ImageMetadata records of several image-stream messages; a malformed message is
    logged and skipped (the writer goes on)."""
    records = []
    for message in messages:
        try:
            records.append(image_records(message))
        except ValueError as exc:
            log.warning("ignored a message of the image stream: %s", exc)
    return np.concatenate(records) if records else np.empty(0, IMAGE_METADATA)


def _new_subscriber(status: zmq.Socket) -> bool:
    """Drain the XPUB's subscription messages; whether one was a new subscription."""
    joined = False
    with contextlib.suppress(zmq.Again):
        while True:
            joined |= status.recv(zmq.NOBLOCK)[:1] == b"\x01"
    return joined


def serve(config: DetectorConfig, ipc_dir: str, stop: threading.Event,
          compression: str, index: int = 0, direct_io: bool = True) -> None:
    name, n_writers = config.detector_name, config.n_writers
    if not 0 <= index < n_writers:
        raise ValueError(f"--writer-index: {index} is not one of the config's n_writers "
                         f"{n_writers} (0 .. {n_writers - 1})")
    ctx = zmq.Context.instance()
    commands = ctx.socket(zmq.PULL)
    commands.bind(ipc_address(ipc_dir, name, writer_stream(Stream.WRITER, index, n_writers)))
    status = ctx.socket(zmq.XPUB)  # a new subscriber is greeted with a heartbeat at once
    status.setsockopt(zmq.XPUB_VERBOSE, 1)
    status.bind(ipc_address(ipc_dir, name, writer_stream(Stream.WRITER_STATUS, index,
                                                          n_writers)))
    images = subscribe(ctx, ipc_address(ipc_dir, name, Stream.IMAGE))
    journal = journal_path(ipc_dir, name, index, n_writers)
    writer = H5Writer(config, lambda event: status.send(event.to_json()), compression, journal,
                      direct_io)
    writer.recover()
    writer.follow_buffer()  # mapped before ready: the first run does not wait for it
    poller = zmq.Poller()
    poller.register(commands, zmq.POLLIN)
    poller.register(images, zmq.POLLIN)
    poller.register(status, zmq.POLLIN)
    announce_ready("writing %s images on request (compression %s%s)", name, compression,
                   f"; writer {index} of {n_writers}" if n_writers > 1 else "")
    try:
        while not stop.is_set():
            ready = dict(poller.poll(writer.wait_ms()))
            # images first: those already here when a start arrives are not the run's
            if images in ready and not writer.catching_up:
                batch = []
                with contextlib.suppress(zmq.Again):
                    while len(batch) < MAX_BATCH:
                        batch.append(images.recv(zmq.NOBLOCK))
                writer.take(decode_records(batch))
            if commands in ready:
                for _ in range(16):
                    try:
                        writer.command(commands.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if status in ready and _new_subscriber(status):
                writer.beat()
            writer.tick()
    finally:
        writer.close()
        commands.close(0)
        images.close(0)
        status.close(linger=500)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-h5-writer",
        description="Write a detector's images from its ImageBuffer to HDF5 files, one run "
        "at a time as stddaq-writer-agent asks.",
    )
    add_common_arguments(parser)
    parser.add_argument("--compression", choices=COMPRESSIONS, default="none",
                        help="chunk compression when a request does not say (default: none)")
    parser.add_argument("--writer-index", type=int, default=0, metavar="I",
                        help="which of the config's n_writers this process is (default: 0)")
    parser.add_argument("--buffered-io", action="store_true",
                        help="write uncompressed images through the page cache (default: "
                        "O_DIRECT where the file system allows, far less CPU per image)")
    args = parser.parse_args(argv)
    return run_service("stddaq-h5-writer", args, lambda config, stop: serve(
        config, args.ipc_dir, stop, args.compression, args.writer_index,
        not args.buffered_io))


if __name__ == "__main__":
    raise SystemExit(main())
