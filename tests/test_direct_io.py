"""The h5 writer's O_DIRECT chunk writes (fastcore/direct_io.py): images go from the
ImageBuffer slot to the disk without a page-cache copy, the file is the same HDF5 file."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
import uuid

import h5py
import numpy as np
import pytest

from fastcore import direct_io
from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import DetectorConfig
from fastcore.direct_io import ALIGN, DirectWriter
from fastcore.formats import IMAGE_METADATA, ImageStatus, dtype_code
from fastcore.h5_writer import RunFile
from fastcore.names import Segment
from fastcore.writer_protocol import RunInfo

_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(path: str, offset: int, length: int) -> int:
    """Pages of ``path`` in [offset, offset + length) held in the page cache (mincore)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        start = offset - offset % mmap.PAGESIZE
        mapping = mmap.mmap(fd, offset + length - start, access=mmap.ACCESS_COPY,
                            offset=start)  # private: writable for ctypes, never touched
    finally:
        os.close(fd)
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        pages = (len(mapping) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)),
                         ctypes.c_size_t(len(mapping)), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec)
    finally:
        del anchor
        mapping.close()


def detector(shape: tuple[int, int]) -> DetectorConfig:
    return DetectorConfig(
        detector_name=f"d{uuid.uuid4().hex[:10]}", detector_type="eiger", n_modules=1,
        bit_depth=16, image_pixel_height=shape[0], image_pixel_width=shape[1],
        start_udp_port=50000, writer_user_id=0,
        module_positions={0: (0, 0, shape[1] - 1, shape[0] - 1)})


@pytest.fixture
def image_source():
    """(config, ImageBuffer, write(n, run) -> the images) for one shape; removed after."""
    made = []

    def make(shape: tuple[int, int]):
        config = detector(shape)
        images = ImageBuffer.create(shm_name(config.detector_name, Segment.IMAGE), 16, shape,
                                    np.uint16)
        made.append(images)
        written = []

        def write(n: int, run: RunFile) -> list[np.ndarray]:
            for _ in range(n):
                image_id = 1000 + len(written)
                image = images.begin_write(image_id)
                image[:] = (image_id * 7 + np.arange(image.size).reshape(shape)) % 65521
                meta = np.zeros((), IMAGE_METADATA)
                meta["id"], meta["height"], meta["width"] = image_id, *shape
                meta["dtype"] = dtype_code(np.uint16)
                images.commit(meta)
                written.append(image.copy())
                assert run.append(meta)
            return written

        return config, images, write

    yield make
    for images in made:
        images.close()


def chunk_offsets(path: str, name: str) -> list[int]:
    with h5py.File(path, "r") as f:
        data = f[f"{name}/data"]
        return [data.id.get_chunk_info(i).byte_offset for i in range(data.id.get_num_chunks())]


def test_uncompressed_images_bypass_the_page_cache(tmp_path, image_source):
    shape = (64, 512)  # 64 KiB images
    config, images, write = image_source(shape)
    path = str(tmp_path / "direct.h5")
    run = RunFile(path, 1, RunInfo(path, 12), config, images, "none")
    assert run._chunks is not None and run._chunks.writer.direct
    assert images.image(1000).ctypes.data % ALIGN == 0  # the slot's image on a page
    expected = write(12, run)
    run.close()
    offsets = chunk_offsets(path, config.detector_name)
    assert len(offsets) == 12 and all(offset % ALIGN == 0 for offset in offsets)
    nbytes = images.data_bytes
    # the images never went through the page cache (a buffered write leaves them there)
    assert sum(resident_pages(path, offset, nbytes) for offset in offsets) == 0
    with h5py.File(path, "r") as f:  # plain open: a valid file, every pixel right
        np.testing.assert_array_equal(f[f"{config.detector_name}/data"][:], expected)


def test_buffered_io_keeps_the_old_path(tmp_path, image_source):
    shape = (64, 512)
    config, images, write = image_source(shape)
    path = str(tmp_path / "buffered.h5")
    run = RunFile(path, 1, RunInfo(path, 4), config, images, "none", direct_io=False)
    assert run._chunks is None
    expected = write(4, run)
    run.close()
    offsets = chunk_offsets(path, config.detector_name)
    assert sum(resident_pages(path, o, images.data_bytes) for o in offsets) > 0
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f[f"{config.detector_name}/data"][:], expected)


@pytest.mark.parametrize("shape", [(48, 64), (1030, 515)])  # 6144 B; 1060900 B: tails
def test_image_sizes_off_the_block_size(tmp_path, image_source, shape):
    config, images, write = image_source(shape)
    path = str(tmp_path / "tail.h5")
    run = RunFile(path, 1, RunInfo(path, 5), config, images, "none")
    expected = write(5, run)
    run.close()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f[f"{config.detector_name}/data"][:], expected)


def test_appending_to_a_file_from_elsewhere_writes_buffered(tmp_path, image_source):
    """A file whose chunks HDF5 allocates only when written (not laid out by this writer)
    takes appended images through HDF5 as before."""
    shape = (64, 512)
    config, images, write = image_source(shape)
    path = str(tmp_path / "old.h5")
    first = RunFile(path, 1, RunInfo(path, 3), config, images, "none", direct_io=False)
    expected = write(3, first)
    first.close()
    # rebuild data with HDF5's default (late) allocation
    with h5py.File(path, "r+", libver="latest") as f:
        group = f[config.detector_name]
        rows = group["data"][:]
        del group["data"]
        group.create_dataset("data", data=rows, maxshape=(None, *shape), chunks=(1, *shape))
    run = RunFile(path, 2, RunInfo(path, 2, append=True), config, images, "none")
    assert run._chunks is None
    expected = write(2, run)
    run.close()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f[f"{config.detector_name}/data"][:], expected)


def test_compressed_runs_write_through_hdf5(tmp_path, image_source):
    shape = (64, 512)
    config, images, write = image_source(shape)
    path = str(tmp_path / "lz4.h5")
    run = RunFile(path, 1, RunInfo(path, 3), config, images, "bitshuffle-lz4")
    assert run._chunks is None
    expected = write(3, run)
    run.close()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f[f"{config.detector_name}/data"][:], expected)


def test_a_file_system_refusing_o_direct_gets_buffered_writes(tmp_path, monkeypatch, caplog):
    """EINVAL from O_DIRECT (at open, or at the first write) -> buffered, logged once."""
    path = str(tmp_path / "plain.bin")
    data = direct_io.aligned_zeros(3 * ALIGN)
    data[:] = np.arange(len(data)) % 251
    real_open = os.open

    def refusing_open(file, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args, **kwargs)

    with open(path, "wb"):
        pass
    monkeypatch.setattr(direct_io.os, "open", refusing_open)
    writer = DirectWriter(path)
    monkeypatch.undo()
    assert not writer.direct and "refuses O_DIRECT" in caplog.text
    writer.write_run(ALIGN, [data])
    writer.close()

    writer = DirectWriter(path)  # O_DIRECT opens, its first write fails with EINVAL
    assert writer.direct
    real_pwritev = os.pwritev
    direct_fd = writer._direct

    def refusing_pwritev(fd, views, offset):
        if fd == direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, views, offset)

    monkeypatch.setattr(direct_io.os, "pwritev", refusing_pwritev)
    writer.write_run(4 * ALIGN, [data])
    assert not writer.direct and "fail with EINVAL" in caplog.text
    writer.close()
    with open(path, "rb") as f:
        content = f.read()
    assert content[ALIGN:4 * ALIGN] == data.tobytes() == content[4 * ALIGN:7 * ALIGN]


def test_an_image_rewritten_while_it_is_written_becomes_a_zero_row(tmp_path, image_source,
                                                                   monkeypatch):
    """The assembler reuses the slot while the disk still writes the image: the row is
    rewritten as zeros and flagged NOT_IN_BUFFER, never kept as good data."""
    shape = (64, 512)
    config, images, write = image_source(shape)
    path = str(tmp_path / "race.h5")
    run = RunFile(path, 1, RunInfo(path, 3), config, images, "none")
    writer = run._chunks.writer
    real_write, gate, calls = writer.write_run, threading.Event(), []

    def slow_disk(offset, arrays):
        calls.append(offset)
        if len(calls) == 1:
            assert gate.wait(10)
        real_write(offset, arrays)

    monkeypatch.setattr(writer, "write_run", slow_disk)
    expected = write(1, run)  # image 1000 queued; its write waits for the gate
    run.settle()  # submitted, not finished: nothing booked yet
    assert (run.n_written, run.n_missing) == (0, 0)
    images.begin_write(1000 + images.n_slots)  # the slot is being rewritten
    gate.set()
    expected = write(2, run)[1:]
    run.close()
    assert (run.n_written, run.n_missing, run.missing_ids) == (2, 1, [1000])
    with h5py.File(path, "r") as f:
        group = f[config.detector_name]
        assert not group["data"][0].any()
        assert int(group["status"][0]) & ImageStatus.NOT_IN_BUFFER
        np.testing.assert_array_equal(group["data"][1:], expected)


def test_a_full_disk_keeps_the_rows_written_before_it(image_source, small_disk):
    shape = (512, 1024)  # 1 MiB images: 10 never fit in 6 MiB
    config, images, write = image_source(shape)
    path = os.path.join(small_disk, "full.h5")
    run = RunFile(path, 1, RunInfo(path, 10), config, images, "none")
    assert run._chunks.writer.direct  # tmpfs takes O_DIRECT
    with pytest.raises(OSError) as failure:
        for _ in range(10):
            expected = write(1, run)
            run.settle()
        run.flush()
    assert failure.value.errno == errno.ENOSPC
    with contextlib.suppress(OSError):
        run.close(failed=True)
    kept = run.n_rows
    assert 0 < kept < 10 and run.n_written == kept
    with h5py.File(path, "r") as f:  # a valid file: the rows before the failure
        data = f[f"{config.detector_name}/data"]
        assert data.shape[0] == kept
        np.testing.assert_array_equal(data[:], expected[:kept])
