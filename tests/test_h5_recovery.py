"""fastcore.h5_recovery: files of a stddaq-h5-writer killed with SIGKILL are made valid.

The writer is a real separate process using fastcore.h5_writer.RunFile (the writer's own
file code); it reports on stdout how many rows it has flushed, then is killed with
SIGKILL while the file is open.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the bitshuffle filter for reading
import numpy as np
import pytest

from fastcore.h5_recovery import (
    RecoveryError,
    Superblock,
    lookup3,
    main,
    read_superblock,
    recover_file,
)
from tests.conftest import REPO

SHAPE = (48, 64)
METADATA = ("image_id", "status", "pulse_id", "frame_index", "daq_rec")
WAIT_S = 60.0  # bounded waits, generous: 2 cores shared with other test runs

CHILD = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import fastcore.h5_writer as h5_writer
from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import DetectorConfig
from fastcore.formats import IMAGE_METADATA, dtype_code
from fastcore.names import Segment
from fastcore.writer_protocol import RunInfo

path, name, compression, plan = sys.argv[2:6]
shape = (48, 64)
config = DetectorConfig(
    detector_name=name, detector_type="eiger", n_modules=1, bit_depth=16,
    image_pixel_height=shape[0], image_pixel_width=shape[1], start_udp_port=50000,
    writer_user_id=0, module_positions={0: (0, 0, shape[1] - 1, shape[0] - 1)})
images = ImageBuffer.create(shm_name(name, Segment.IMAGE), 8, shape, np.uint16)
run = h5_writer.RunFile(path, 1, RunInfo(path, 10**6), config, images, compression)
image_id = 1000

def append(n):
    global image_id
    for _ in range(n):
        image_id += 1
        image = images.begin_write(image_id)
        image[:] = (image_id * 7 + np.arange(shape[0])[:, None] * shape[1]
                    + np.arange(shape[1])) % 65521
        meta = np.zeros((), IMAGE_METADATA)
        meta["id"], meta["height"], meta["width"] = image_id, *shape
        meta["dtype"] = dtype_code(np.uint16)
        meta["user_1"], meta["user_2"] = 10 * image_id, image_id % 7
        meta["frame_index"] = image_id  # the detector's frame index: here equal to the id
        images.commit(meta)
        run.append(meta)

def report(what, n):  # one write: a kill cannot cut the line
    os.write(1, f"{what} {n}\n".encode())

for step in plan.split(","):
    if step.startswith("w"):  # write n images (not flushed)
        append(int(step[1:]))
    elif step == "f":  # RunFile.flush: metadata datasets extended, visible to readers
        run.flush()
        report("flushed", run.n_rows)
    elif step == "h":  # HDF5-level flush only (as if killed in the middle of RunFile.flush)
        run.file.flush()
    elif step == "loop":  # write and flush until killed
        while True:
            append(3)
            run.flush()
            report("flushed", run.n_rows)
    elif step == "close":
        run.close()
        images.close()
        report("closed", run.n_rows)
        sys.exit(0)
report("ready", run.n_rows)
time.sleep(300)
"""


def expected_image(image_id: int) -> np.ndarray:
    rows = np.arange(SHAPE[0])[:, None] * SHAPE[1]
    return ((image_id * 7 + rows + np.arange(SHAPE[1])) % 65521).astype(np.uint16)


class Writer:
    """The writer child; ``lines`` gets its stdout, read by a thread (waits stay bounded)."""

    def __init__(self, tmp_path, plan: str, compression: str = "none"):
        self.name = f"trec{uuid.uuid4().hex[:10]}"
        self.path = str(tmp_path / f"{self.name}.h5")
        self.shm = tmp_path / "shm"
        self.shm.mkdir(exist_ok=True)
        script = tmp_path / "writer_child.py"
        script.write_text(CHILD)
        env = dict(os.environ, STDDAQ_SHM_DIR=str(self.shm))
        self.popen = subprocess.Popen(
            [sys.executable, str(script), str(REPO), self.path, self.name, compression, plan],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[tuple[str, int]] = queue.Queue()
        self.flushed = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            if line.endswith("\n"):  # whole lines only
                what, count = line.split()
                self.lines.put((what, int(count)))

    def wait_for(self, word: str, at_least: int = 0) -> int:
        """The count of the first ``word`` line with a count >= at_least."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    break
                continue
            what, count = line
            if what == "flushed":
                self.flushed = count
            if what == word and count >= at_least:
                return count
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        code = self.popen.wait(timeout=WAIT_S)
        raise AssertionError(f"writer child (exit code {code}): no {word!r} line in "
                             f"{WAIT_S} s; stderr:\n{self.popen.stderr.read()}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
        assert self.popen.wait(timeout=WAIT_S) in (-signal.SIGKILL, 0)
        self.reader.join(timeout=WAIT_S)  # the lines printed just before the kill
        while not self.lines.empty():
            what, count = self.lines.get()
            if what == "flushed":
                self.flushed = count

    def cleanup(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=WAIT_S)
        self.popen.stdout.close()
        self.popen.stderr.close()
        for segment in glob.glob(str(self.shm / f"stddaq.{self.name}.*")):
            os.unlink(segment)


@pytest.fixture
def writer(tmp_path):
    made: list[Writer] = []

    def start(plan: str, compression: str = "none") -> Writer:
        made.append(Writer(tmp_path, plan, compression))
        return made[-1]

    yield start
    for w in made:
        w.cleanup()


def read_bytes(path) -> bytes:
    return Path(path).read_bytes()


def plain_open_fails(path: str) -> bool:
    try:
        h5py.File(path, "r").close()
    except OSError as exc:
        assert "already open for write" in str(exc)
        return True
    return False


def check_rows(path: str, group: str, n: int) -> None:
    """Plain (non-SWMR) read: every dataset has n rows, equal to what the writer wrote."""
    ids = np.arange(1001, 1001 + n, dtype=np.uint64)
    with h5py.File(path, "r") as f:
        g = f[group]
        assert {name: g[name].shape[0] for name in g} == {name: n for name in
                                                           ("data", *METADATA)}
        np.testing.assert_array_equal(g["image_id"][:], ids)
        np.testing.assert_array_equal(g["frame_index"][:], ids)
        np.testing.assert_array_equal(g["pulse_id"][:], 10 * ids)
        np.testing.assert_array_equal(g["daq_rec"][:], ids % 7)
        assert not g["status"][:].any()
        data = g["data"][:]
        for i, image_id in enumerate(ids):
            np.testing.assert_array_equal(data[i], expected_image(int(image_id)), str(i))


@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_file_of_a_killed_writer_is_recovered(compression, writer):
    w = writer("w4,f,w4,f,w4,f,w5", compression)  # 12 rows flushed, 5 more written
    assert w.wait_for("ready") == 17
    w.kill()
    assert w.flushed == 12
    assert plain_open_fails(w.path)
    assert read_superblock(w.path).flags & 0x05 == 0x05  # open for write + SWMR write

    report = recover_file(w.path)

    assert (report.group, report.flags_found, report.flags_cleared) == (w.name, 0x05, True)
    assert report.rows_kept == 12 and report.changed
    assert report.eoa_after == report.file_size >= report.eoa_before
    assert report.missing_data_chunks == 0
    check_rows(w.path, w.name, 12)
    superblock = read_superblock(w.path)
    assert (superblock.version, superblock.flags) == (3, 0)
    with h5py.File(w.path, "r", swmr=True) as f:  # still a SWMR-readable file
        assert f[w.name]["data"].shape[0] == 12
    before = read_bytes(w.path)
    again = recover_file(w.path)
    assert not again.changed and again.rows_kept == 12
    assert "nothing to recover" in again.describe()
    assert read_bytes(w.path) == before
    with h5py.File(w.path, "r+") as f:  # HDF5 can write to it again without harm
        data = f[w.name]["data"]
        data.resize(14, axis=0)
        data[12:] = 7
    with h5py.File(w.path, "r") as f:
        data = f[w.name]["data"]
        assert data.shape[0] == 14 and (data[12:] == 7).all()
        np.testing.assert_array_equal(data[11], expected_image(1012))


def test_rows_beyond_the_metadata_are_dropped(writer):
    """Killed in the middle of a flush: ``data`` reached the file longer than image_id."""
    w = writer("w6,f,w4,h")
    assert w.wait_for("ready") == 10
    w.kill()
    assert w.flushed == 6
    with h5py.File(w.path, "r", swmr=True) as f:
        g = f[w.name]
        assert (g["data"].shape[0], g["image_id"].shape[0]) == (10, 6)

    report = recover_file(w.path, w.name)

    assert report.flags_cleared and (report.rows_kept, report.rows_dropped) == (6, 4)
    assert report.lengths_before == {"data": 10} | {name: 6 for name in METADATA}
    assert "dropped 4" in report.describe()
    check_rows(w.path, w.name, 6)


def test_killed_at_an_arbitrary_moment(writer):
    """Writing and flushing as fast as it can: whatever the moment of the kill, the file
    keeps at least the rows reported flushed, and every kept row is right."""
    w = writer("loop")
    w.wait_for("flushed", at_least=30)
    time.sleep(0.05)
    w.kill()
    report = recover_file(w.path)
    assert report.flags_cleared and report.rows_kept >= w.flushed >= 30
    assert report.rows_kept <= w.flushed + 3  # at most one more flush reached the file
    check_rows(w.path, w.name, report.rows_kept)


def test_cleanly_closed_file_is_left_unchanged(writer):
    w = writer("w5,f,w3,close")
    assert w.wait_for("closed") == 8
    assert w.popen.wait(timeout=WAIT_S) == 0
    before, stat = read_bytes(w.path), os.stat(w.path)

    report = recover_file(w.path)

    assert not report.changed and not report.flags_cleared and report.rows_dropped == 0
    assert report.rows_kept == 8 and report.group == w.name
    assert read_bytes(w.path) == before
    assert os.stat(w.path).st_mtime_ns == stat.st_mtime_ns
    check_rows(w.path, w.name, 8)


def test_file_of_a_running_writer_is_refused(writer):
    w = writer("w3,f")
    w.wait_for("ready")
    before = read_bytes(w.path)
    with pytest.raises(RecoveryError) as error:
        recover_file(w.path)
    assert str(error.value) == (f"{w.path} is open for writing by process(es) "
                                f"{w.popen.pid}: stop them first")
    assert read_bytes(w.path) == before
    w.kill()
    assert recover_file(w.path).rows_kept == 3


def test_bad_group_is_refused_before_anything_changes(writer):
    w = writer("w2,f")
    w.wait_for("ready")
    w.kill()
    before = read_bytes(w.path)
    with pytest.raises(RecoveryError,
                       match=f"^{re.escape(w.path)}: there is no group /nosuch$"):
        recover_file(w.path, "nosuch")
    assert read_bytes(w.path) == before
    assert recover_file(w.path, f"/{w.name}").rows_kept == 2


def make_clean_file(path, **kwargs) -> None:
    with h5py.File(path, "w", libver=kwargs.pop("libver", "latest"), **kwargs) as f:
        f.create_dataset("det/data", data=np.ones((3, 4, 5), np.uint16), maxshape=(None, 4, 5),
                         chunks=(1, 4, 5))
        f.create_dataset("det/image_id", data=np.arange(3, dtype="<u8"), maxshape=(None,),
                         chunks=(4096,))


@pytest.mark.parametrize("case", ["text", "empty", "short", "truncated", "checksum",
                                  "version0", "missing"])
def test_files_it_does_not_understand_give_a_clear_error(case, tmp_path):
    path = str(tmp_path / f"{case}.h5")
    if case == "text":
        with open(path, "w") as f:
            f.write("not an HDF5 file\n" * 100)
    elif case == "empty":
        open(path, "wb").close()
    elif case == "version0":
        make_clean_file(path, libver="earliest")
    elif case != "missing":
        make_clean_file(path)
        content = read_bytes(path)
        if case == "short":
            content = content[:30]
        elif case == "truncated":
            content = content[: len(content) // 2]
        else:  # corrupt the stored end-of-file address
            content = content[:28] + b"\x7f" + content[29:]
        with open(path, "wb") as f:
            f.write(content)
    before = read_bytes(path) if case != "missing" else None
    messages = {
        "text": "is not an HDF5 file: no HDF5 signature at byte 0, 512, 1024, 2048, ...",
        "empty": "is not an HDF5 file",
        "short": "truncated superblock at byte 0",
        "truncated": "is truncated: it has",
        "checksum": "superblock checksum mismatch at byte 0",
        "version0": "superblock version 0 at byte 0 is not supported",
        "missing": "No such file or directory",
    }
    with pytest.raises(RecoveryError) as error:
        recover_file(path)
    assert path in str(error.value) and messages[case] in str(error.value)
    if before is not None:
        assert read_bytes(path) == before


def test_crashed_file_truncated_by_a_copy_is_refused(writer, tmp_path):
    w = writer("w3,f,w2")
    w.wait_for("ready")
    w.kill()
    copy = tmp_path / "copy.h5"
    copy.write_bytes(read_bytes(w.path)[: read_superblock(w.path).eoa - 1])
    with pytest.raises(RecoveryError, match=r"copy\.h5 is truncated: it has"):
        recover_file(copy)


def test_lookup3_matches_reference_values_and_hdf5(tmp_path):
    # values printed by the driver of Bob Jenkins' lookup3.c
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"Four score and seven years ago") == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161
    path = tmp_path / "clean.h5"
    make_clean_file(path)
    raw = read_bytes(path)[:48]
    assert lookup3(raw[:44]) == struct.unpack("<I", raw[44:48])[0]


def set_flags(path, flags: int) -> Superblock:
    """What a writer that died does to the superblock (checksum recomputed)."""
    superblock = read_superblock(path)
    with open(path, "r+b") as f:
        f.seek(superblock.offset)
        f.write(superblock.encode(flags, superblock.eoa))
    return read_superblock(path)


def test_version_2_superblock_and_userblock(tmp_path, capsys):
    v2 = str(tmp_path / "v2.h5")
    make_clean_file(v2, libver=("v108", "v108"))
    assert set_flags(v2, 0x01).version == 2
    report = recover_file(v2)
    assert report.flags_cleared and report.rows_kept == 3
    assert read_superblock(v2).flags == 0

    user = str(tmp_path / "userblock.h5")
    make_clean_file(user, userblock_size=1024)
    assert set_flags(user, 0x05).offset == 1024
    assert plain_open_fails(user)
    assert main([user]) == 0
    assert "cleared superblock status flags 0x05" in capsys.readouterr().out
    with h5py.File(user, "r") as f:
        assert f["det/data"].shape == (3, 4, 5) and f.userblock_size == 1024


def test_file_without_the_datasets_only_gets_its_flags_cleared(tmp_path):
    path = str(tmp_path / "other.h5")
    with h5py.File(path, "w", libver="latest") as f:
        f["x"] = np.arange(4)
    set_flags(path, 0x05)
    report = recover_file(path)
    assert report.flags_cleared and report.group is None and report.rows_kept is None
    with h5py.File(path, "r") as f:
        assert list(f["x"][:]) == [0, 1, 2, 3]
