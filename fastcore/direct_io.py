"""Image chunks written with O_DIRECT: from the shared-memory slot to the disk, no copy
into the page cache.

Copying each image into the page cache is most of a buffered writer's CPU: measured on a
2-core VM, a buffered 1 MiB write cost 0.7-3 ms of CPU and an O_DIRECT write of the same
slot 0.2-0.3 ms (docs/benchmarks.md). The HDF5 writer lets HDF5 allocate each chunk (early
allocation, no fill) and writes the chunk's bytes here, at the offset HDF5 gives.

O_DIRECT needs the file offset, the length and the memory address aligned to the device's
block size; :data:`ALIGN` (4096) covers every common device. The writer aligns large file
objects to it, and the ImageBuffer's image data starts on a page. A chunk whose length is
not a multiple goes direct up to the last whole block and its tail buffered. A file system
that refuses O_DIRECT (at open or at the first write) gets buffered writes, logged once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

ALIGN = 4096
"""File offsets, lengths and memory addresses of direct writes are multiples of this."""


def aligned_zeros(nbytes: int) -> np.ndarray:
    """``nbytes`` zero bytes at a page-aligned address (an anonymous mapping)."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), np.uint8)[:nbytes]


class DirectWriter:
    """Writes byte ranges of one file with O_DIRECT where aligned, buffered otherwise.

    ``path`` opens the file (``/proc/self/fd/N`` of an open descriptor keeps the caller's
    checks on which file it is). :attr:`direct` says whether O_DIRECT is in use.
    """

    def __init__(self, path: str):
        self._plain = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self._direct = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                os.close(self._plain)
                raise
            self._direct = -1
            log.warning("the file system of %s refuses O_DIRECT: images are written "
                        "through the page cache (more CPU per image)", path)
        self._use_direct = self._direct >= 0

    @property
    def direct(self) -> bool:
        return self._use_direct

    def write_run(self, offset: int, arrays: list[np.ndarray]) -> None:
        """Write ``arrays`` (C-contiguous) one after the other from ``offset``: one
        vectored O_DIRECT write when all are aligned, else one by one."""
        views = [memoryview(a.reshape(-1).view(np.uint8)) for a in arrays]
        aligned = offset % ALIGN == 0 and all(
            a.ctypes.data % ALIGN == 0 and v.nbytes % ALIGN == 0
            for a, v in zip(arrays, views, strict=True))
        if self._use_direct and aligned and self._direct_write(list(views), offset):
            return
        for array, view in zip(arrays, views, strict=True):
            head = 0
            if self._use_direct and offset % ALIGN == 0 and array.ctypes.data % ALIGN == 0:
                head = view.nbytes - view.nbytes % ALIGN
                if head and not self._direct_write([view[:head]], offset):
                    head = 0
            if head < view.nbytes:
                _write_all(self._plain, [view[head:]], offset + head)
            offset += view.nbytes

    def _direct_write(self, views: list[memoryview], offset: int) -> bool:
        """False when the file system refuses O_DIRECT (then it is not used again)."""
        try:
            _write_all(self._direct, views, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            if self._use_direct:
                self._use_direct = False
                log.warning("O_DIRECT writes fail with EINVAL on this file system: "
                            "writing through the page cache from now on")
            return False
        return True

    def close(self) -> None:
        for fd in (self._direct, self._plain):
            if fd >= 0:
                os.close(fd)
        self._direct = self._plain = -1


def _write_all(fd: int, views: list[memoryview], offset: int) -> None:
    """pwritev until every byte is written (a short write goes on where it stopped)."""
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= views[0].nbytes:
            n -= views.pop(0).nbytes
        if views and n:
            views[0] = views[0][n:]


MAX_RUN_BYTES = 16 * 2**20
"""A background write takes consecutive chunks up to this many bytes."""
MAX_PENDING = 4
"""Background writes submitted and not yet reaped; the next one waits for the oldest."""


@dataclass
class _Run:
    offset: int
    end: int
    arrays: list[np.ndarray] = field(default_factory=list)
    tokens: list[Hashable] = field(default_factory=list)


class ChunkWriteError(OSError):
    """A background write failed; ``token`` is the first chunk it did not write."""

    def __init__(self, token: Hashable, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.token = token


class ChunkQueue:
    """Chunks written on one background thread, in order, consecutive ones in one call,
    so the disk works while the caller prepares the next images.

    :meth:`add` queues a chunk with a token; ``check(token)`` runs on the I/O thread right
    after the chunk is written (the writer asks whether the ImageBuffer slot still holds
    the image). :meth:`reap` returns ``(token, check result)`` of the written chunks, in
    order; a failed write raises :class:`ChunkWriteError` naming its first token (nothing
    after it is written). Every wait is for a disk write in progress.
    """

    def __init__(self, writer: DirectWriter, check: Callable[[Hashable], bool]):
        self.writer = writer
        self.check = check
        self._io = ThreadPoolExecutor(1, thread_name_prefix="chunk-io")
        self._open: _Run | None = None
        self._pending: deque[tuple[_Run, Future]] = deque()
        self._done: list[tuple[Hashable, bool]] = []

    @property
    def idle(self) -> bool:
        return self._open is None and not self._pending

    def add(self, offset: int, data: np.ndarray, token: Hashable) -> None:
        run = self._open
        if run is not None and (offset != run.end or run.end - run.offset >= MAX_RUN_BYTES):
            self.submit()
            run = None
        if run is None:
            run = self._open = _Run(offset, offset)
        run.arrays.append(data)
        run.tokens.append(token)
        run.end += data.nbytes

    def submit(self) -> None:
        """Start writing what :meth:`add` collected."""
        run, self._open = self._open, None
        if run is None:
            return
        while len(self._pending) >= MAX_PENDING:
            self._collect(self._pending.popleft())
        self._pending.append((run, self._io.submit(self._write, run)))

    def _write(self, run: _Run) -> list[bool]:
        self.writer.write_run(run.offset, run.arrays)
        return [self.check(token) for token in run.tokens]

    def reap(self, wait: bool = False) -> list[tuple[Hashable, bool]]:
        """Results of the finished writes (with ``wait``: of every write queued)."""
        if wait:
            self.submit()
        while self._pending and (wait or self._pending[0][1].done()):
            self._collect(self._pending.popleft())
        done, self._done = self._done, []
        return done

    def _collect(self, pending: tuple[_Run, Future]) -> None:
        run, future = pending
        try:
            results = future.result()
        except OSError as exc:
            self.discard()
            raise ChunkWriteError(run.tokens[0], exc) from exc
        self._done.extend(zip(run.tokens, results, strict=True))

    def discard(self) -> None:
        """Drop what is not written yet (after a failure): wait for the write in progress."""
        self._open = None
        for _, future in self._pending:
            future.cancel()
        for _, future in self._pending:
            if not future.cancelled():
                with contextlib.suppress(OSError):
                    future.result()
        self._pending.clear()

    def close(self) -> None:
        """Stop the I/O thread (queued writes are dropped: reap them first) and close the
        file descriptors."""
        self.discard()
        self._io.shutdown(wait=True)
        self.writer.close()
