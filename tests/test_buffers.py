"""FrameBuffer/ImageBuffer on real POSIX shared memory, across processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest

from fastcore.buffers import (
    BufferInUseError,
    BufferMissingError,
    FrameBuffer,
    ImageBuffer,
    ShmBufferError,
    SlotOverwrittenError,
    shm_name,
)
from fastcore.formats import IMAGE_METADATA
from fastcore.names import Segment
from tests.conftest import shm_files


@pytest.fixture
def name():
    detector = f"t{uuid.uuid4().hex[:10]}"
    yield detector
    leftovers = shm_files(detector)
    for path in leftovers:
        os.unlink(path)
    assert not leftovers, f"shared memory left behind: {leftovers}"


def _writer(buffer_name: str, n_images: int, started) -> None:
    """Write images whose every pixel equals the image id, as fast as possible."""
    images = ImageBuffer.attach(buffer_name, writable=True)
    meta = np.zeros((), IMAGE_METADATA)
    started.set()
    for image_id in range(1, n_images + 1):
        image = images.begin_write(image_id)
        image.fill(image_id)
        meta["id"] = image_id
        images.commit(meta)
    images.close()


def test_reader_racing_a_fast_writer_detects_overwritten_slots(name):
    buffer_name = shm_name(name, Segment.IMAGE)
    owner = ImageBuffer.create(buffer_name, 2, (1024, 1024), np.uint32)
    reader = ImageBuffer.attach(buffer_name)
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    writer = ctx.Process(target=_writer, args=(buffer_name, 3000, started))
    writer.start()
    started.wait(10)
    good = overwritten = 0
    out = np.empty((1024, 1024), np.uint32)
    while writer.is_alive() or good + overwritten == 0:
        latest = int(max(reader.metadata(0)["id"], reader.metadata(1)["id"]) % 2**63)
        if latest == 0:
            continue
        try:
            meta, image = reader.read(latest, out)
        except SlotOverwrittenError as exc:
            assert str(latest) in str(exc)
            overwritten += 1
            continue
        # A read that passed the id check must be one whole image, never a torn one.
        assert int(meta["id"]) == latest
        assert image.min() == image.max() == latest
        good += 1
    writer.join(10)
    assert writer.exitcode == 0
    assert overwritten > 0, "the race never happened: the test proves nothing"
    assert good > 0
    print(f"race: {good} whole reads, {overwritten} overwritten slots detected")
    reader.close()
    owner.close()
    assert not shm_files(name)


def test_image_buffer_views_are_zero_copy_across_processes(name):
    buffer_name = shm_name(name, Segment.IMAGE)
    with ImageBuffer.create(buffer_name, 4, (8, 16), np.uint16) as owner:
        view = owner.begin_write(6)
        view[:] = np.arange(128, dtype=np.uint16).reshape(8, 16)
        meta = np.zeros((), IMAGE_METADATA)
        meta["id"], meta["height"], meta["width"] = 6, 8, 16
        owner.commit(meta)
        with ImageBuffer.attach(buffer_name) as reader:
            assert reader.shape == (8, 16) and reader.dtype == np.uint16
            image = reader.image(6)
            assert not image.flags.writeable
            assert np.shares_memory(image, reader.segment.array)
            np.testing.assert_array_equal(image, view)
            view[0, 0] = 999  # the reader's view sees the producer's write at once
            assert image[0, 0] == 999
            assert reader.holds(6) and not reader.holds(2)  # slot 2 % 4 == 6 % 4
            with pytest.raises(SlotOverwrittenError, match="image 2 is no longer"):
                reader.read(2)


def test_missing_buffer_is_a_clear_error(name):
    with pytest.raises(BufferMissingError, match=rf"/dev/shm/stddaq.{name}.image does not exist"):
        ImageBuffer.attach(shm_name(name, Segment.IMAGE))


def test_wrong_kind_of_buffer_is_refused(name):
    with FrameBuffer.create(shm_name(name, Segment.FRAMES), 2, 1, 1024), pytest.raises(
            BufferMissingError, match="holds a 'frames' buffer"):
        ImageBuffer.attach(shm_name(name, Segment.FRAMES))


def _try_create(name: str, queue) -> None:
    try:
        ImageBuffer.create(shm_name(name, Segment.IMAGE), 2, (4, 4), np.uint8)
        queue.put("created")
    except BufferInUseError as exc:
        queue.put(str(exc))


def test_buffer_of_a_live_process_is_not_replaced(name):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with ImageBuffer.create(shm_name(name, Segment.IMAGE), 2, (4, 4), np.uint8):
        other = ctx.Process(target=_try_create, args=(name, queue))
        other.start()
        other.join(10)
        message = queue.get(timeout=5)
    assert f"in use by running process {os.getpid()}" in message


def _crash_holding_buffer(buffer_name: str) -> None:
    FrameBuffer.create(buffer_name, 2, 2, 4096)
    os.kill(os.getpid(), signal.SIGKILL)


def test_leftover_of_a_crashed_creator_is_replaced_with_a_log_line(name, caplog):
    buffer_name = shm_name(name, Segment.FRAMES)
    process = multiprocessing.get_context("fork").Process(
        target=_crash_holding_buffer, args=(buffer_name,))
    process.start()
    process.join(10)
    assert process.exitcode == -signal.SIGKILL
    assert shm_files(name), "the crashed process should have left its segment"
    with caplog.at_level("WARNING"), FrameBuffer.create(buffer_name, 4, 1, 1024) as buffer:
        assert buffer.n_slots == 4 and buffer.n_modules == 1
    assert any("replacing leftover shared memory" in r.message for r in caplog.records)
    assert not shm_files(name)


def test_buffers_follow_stddaq_shm_dir(tmp_path, monkeypatch):
    """$STDDAQ_SHM_DIR moves every buffer (e.g. onto a huge-page tmpfs); another process
    with the same setting attaches by name."""
    monkeypatch.setenv("STDDAQ_SHM_DIR", str(tmp_path))
    buffer_name = f"stddaq.t{uuid.uuid4().hex[:8]}.image"
    with ImageBuffer.create(buffer_name, 4, (8, 16), np.uint16) as images:
        assert os.path.exists(tmp_path / buffer_name)
        assert not os.path.exists(f"/dev/shm/{buffer_name}")
        view = images.begin_write(7)
        view[:] = np.arange(128, dtype=np.uint16).reshape(8, 16)
        meta = np.zeros((), IMAGE_METADATA)
        meta["id"] = 7
        images.commit(meta)
        code = ("import sys; from fastcore.buffers import ImageBuffer\n"
                f"with ImageBuffer.attach({buffer_name!r}) as b:\n"
                "    print(int(b.read(7)[1].sum()))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, check=True, env=os.environ.copy())
        assert out.stdout.strip() == str(sum(range(128)))
        monkeypatch.delenv("STDDAQ_SHM_DIR")
        with pytest.raises(BufferMissingError):
            ImageBuffer.attach(buffer_name)  # not in /dev/shm
        monkeypatch.setenv("STDDAQ_SHM_DIR", str(tmp_path))
    assert not os.path.exists(tmp_path / buffer_name)  # the creator removed it


def test_a_missing_stddaq_shm_dir_is_named(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-dir"
    monkeypatch.setenv("STDDAQ_SHM_DIR", str(missing))
    for make in (lambda: ImageBuffer.create("stddaq.tmissing.image", 2, (4, 4), np.uint16),
                 lambda: ImageBuffer.attach("stddaq.tmissing.image")):
        with pytest.raises(ShmBufferError) as info:
            make()
        assert str(info.value) == (f"the buffer directory {missing} (STDDAQ_SHM_DIR or "
                                   "/dev/shm) does not exist")


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_segments_are_readable_by_the_group_only_whatever_the_umask(name, umask):
    old = os.umask(umask)
    try:
        images = ImageBuffer.create(shm_name(name, Segment.IMAGE), 2, (4, 4), np.uint16)
    finally:
        os.umask(old)
    try:
        assert os.stat(images.segment.path).st_mode & 0o777 == 0o640
    finally:
        images.close()
