"""stddaq-h5-writer as a real process: files, statuses, faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import h5py
import hdf5plugin  # noqa: F401 - registers the bitshuffle filter for reading
import numpy as np
import pytest
import zmq

from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import load_config
from fastcore.formats import IMAGE_METADATA, ImageStatus, dtype_code
from fastcore.h5_writer import H5Writer, journal_path
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address
from fastcore.simulator import DetectorSimulator, daq_rec_of, pulse_id_of
from fastcore.writer_protocol import (
    RunInfo,
    RunStarted,
    RunSummary,
    StartCommand,
    StopCommand,
    WriterEvent,
)
from services.writer_agent import WriterAgent
from tests.conftest import REPO, Proc, module_cmd
from tests.pipeline import Pipeline


class WriterHarness:
    """A writer process fed by the test, which plays the assembler (ImageBuffer and its
    ImageMetadata stream) and the writer agent (commands, events)."""

    def __init__(self, config_path, raw, ipc_dir, log_dir, n_slots=16, start_buffer=True,
                 extra=()):
        self.raw, self.name = raw, raw["detector_name"]
        self.config_path, self.ipc_dir, self.log_dir, self.extra = (config_path, ipc_dir,
                                                                    log_dir, extra)
        self.config = load_config(config_path)
        self.images = (ImageBuffer.create(shm_name(self.name, Segment.IMAGE), n_slots,
                                          self.config.image_shape, self.config.image_dtype)
                       if start_buffer else None)
        ctx = zmq.Context.instance()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind(ipc_address(ipc_dir, self.name, Stream.IMAGE))
        self.push = ctx.socket(zmq.PUSH)
        self.push.connect(ipc_address(ipc_dir, self.name, Stream.WRITER))
        self.status = ctx.socket(zmq.SUB)
        self.status.setsockopt(zmq.SUBSCRIBE, b"")
        self.status.connect(ipc_address(ipc_dir, self.name, Stream.WRITER_STATUS))
        self.start_writer()

    def start_writer(self) -> None:
        self.writer = Proc(module_cmd("fastcore.h5_writer", str(self.config_path),
                                      "--ipc-dir", self.ipc_dir, *self.extra),
                           self.log_dir / "writer.log")
        self.writer.wait_for("ready")
        time.sleep(0.3)  # the writer's and our subscriptions reach their publishers

    def put(self, image_id: int, status: int = 0, publish: bool = True) -> np.void:
        """Produce image ``image_id`` (every pixel = id % 65000 + row) in the buffer and
        announce it (as the assembler does; the detector's frame index equals the id, as
        the simulator's)."""
        image = self.images.begin_write(image_id)
        image[:] = (image_id % 65000 + np.arange(image.shape[0])[:, None]).astype(image.dtype)
        meta = np.zeros((), IMAGE_METADATA)
        meta["id"], meta["height"], meta["width"] = image_id, *image.shape
        meta["dtype"], meta["status"] = dtype_code(image.dtype), status
        meta["user_1"], meta["user_2"] = pulse_id_of(image_id), daq_rec_of(image_id)
        meta["frame_index"] = image_id
        self.images.commit(meta)
        if publish:
            self.pub.send(meta.tobytes())
        return meta

    @staticmethod
    def expected(image_id: int, shape, dtype) -> np.ndarray:
        return np.broadcast_to((image_id % 65000 + np.arange(shape[0])[:, None]).astype(dtype),
                               shape)

    def start(self, out: str, n_images: int, run_id: int = 1, until: str = "start",
              start_image_id: int | None = None, image_timeout: float = 30.0,
              **info) -> dict:
        """Start a run and return the writer's answer (``until``: start or error)."""
        command = StartCommand(run_id, RunInfo(out, n_images, **info), image_timeout,
                               start_image_id)
        self.push.send(command.to_json())
        return self.events(until=until)[-1]

    def stop(self, run_id: int) -> None:
        self.push.send(StopCommand(run_id).to_json())

    def events(self, until: str = "stop", timeout: float = 15.0,
               skip=("heartbeat", "progress")) -> list[dict]:
        events = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status.poll(100):
                event = json.loads(self.status.recv())
                if event["event"] == until:
                    return [*events, event]
                if event["event"] not in skip:
                    events.append(event)
        raise AssertionError(f"no {until!r} event in {timeout} s: {events}\n"
                             f"{self.writer.output}")

    def written(self, n_rows: int) -> None:
        """Wait until the writer reported ``n_rows`` rows."""
        while self.events(until="progress")[-1]["n_rows"] < n_rows:
            pass

    def close(self) -> int:
        for sock in (self.pub, self.push, self.status):
            sock.close(0)
        code = self.writer.stop()
        if self.images is not None:
            self.images.close()
        return code


@pytest.fixture
def harness(make_config, ipc_dir, tmp_path):
    made = []

    def make(n_slots=16, start_buffer=True, extra=(), **overrides):
        path, raw = make_config("jungfrau_1m.json", **overrides)
        h = WriterHarness(path, raw, ipc_dir, tmp_path, n_slots, start_buffer, extra)
        made.append(h)
        return h

    yield make
    for h in made:
        assert h.close() == 0, h.writer.output


def check_in_fresh_process(path: str, detector: str, ids: list[int], statuses=None) -> None:
    """Reopen the file in a new interpreter and compare every image and metadata row."""
    script = f"""
import json, sys, h5py, hdf5plugin, numpy as np
sys.path.insert(0, {str(REPO)!r})
from tests.test_h5_writer import WriterHarness
ids = {ids!r}
with h5py.File({path!r}, "r") as f:
    g = f[{detector!r}]
    data = g["data"]
    assert data.shape[0] == len(ids), (data.shape, len(ids))
    assert data.chunks == (1, *data.shape[1:])
    for i, image_id in enumerate(ids):
        want = WriterHarness.expected(image_id, data.shape[1:], data.dtype)
        assert np.array_equal(data[i], want), i
    assert list(g["image_id"][:]) == ids
    assert list(g["frame_index"][:]) == ids
    assert list(g["pulse_id"][:]) == [1_000_000 + 10 * i for i in ids]
    assert list(g["daq_rec"][:]) == [i % 7 for i in ids]
    print(json.dumps({{"status": [int(s) for s in g["status"][:]],
                      "filters": list(data._filters), "attrs": dict(f.attrs)}}, default=str))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    if statuses is not None:
        assert report["status"] == statuses
    return report



@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_writes_images_and_metadata(compression, harness, tmp_path):
    h = harness()
    out = str(tmp_path / f"run_{compression}.h5")
    start = h.start(out, 10, run_id=7, metadata={"user": "e12345", "sample": "lysozyme"},
                    compression=compression)
    assert start == {"event": "start", "run_id": 7, "output_file": out, "n_images": 10,
                     "first_row": 0}
    for image_id in range(100, 112):  # two more than asked for: not written
        h.put(image_id)
    stop = h.events()[-1]
    assert stop | {"absent_ranges": [], "missing_image_ids": [], "n_flagged": {}} == {
        "event": "stop", "run_id": 7, "output_file": out, "n_images": 10, "n_written": 10,
        "n_missing": 0, "n_good": 10, "n_flagged": {}, "n_absent": 0, "absent_ranges": [],
        "missing_image_ids": [], "n_id_resets": 0, "reason": "completed", "message": "",
        "outcome": "success", "first_row": 0}
    report = check_in_fresh_process(out, h.name, list(range(100, 110)), [0] * 10)
    assert ("32008" in report["filters"]) == (compression == "bitshuffle-lz4")
    assert json.loads(report["attrs"]["request_metadata"])["sample"] == "lysozyme"
    assert json.loads(report["attrs"]["detector_config"])["detector_name"] == h.name
    assert report["attrs"]["software_version"].startswith("stddaq ")


def test_images_before_the_start_are_not_written(harness, tmp_path):
    h = harness()
    h.put(1)
    h.put(2)
    time.sleep(0.3)
    out = str(tmp_path / "after.h5")
    h.start(out, 2)
    h.put(3)
    h.put(4)
    assert h.events()[-1]["outcome"] == "success"
    check_in_fresh_process(out, h.name, [3, 4], [0, 0])


@pytest.mark.parametrize("compression", ["none", "bitshuffle-lz4"])
def test_append_runs_add_exactly_their_images_to_one_file(compression, harness, tmp_path):
    """A step scan's requests: each appends the next images after its start, nothing
    between two runs is written, and the file's compression is kept."""
    h = harness()
    out = str(tmp_path / f"steps_{compression}.h5")
    ids, next_id = [], 0
    for run_id, n in enumerate((2, 3, 1), start=1):
        h.put(next_id)  # before the run: not its image
        time.sleep(0.2)
        start = h.start(out, n, run_id=run_id, append=True,
                        compression=compression if run_id == 1 else None)
        assert start["first_row"] == len(ids)
        for image_id in range(next_id + 1, next_id + 1 + n):
            h.put(image_id)
            ids.append(image_id)
        stop = h.events()[-1]
        assert (stop["outcome"], stop["first_row"], stop["n_written"]) == (
            "success", len(ids) - n, n)
        next_id += n + 1
    report = check_in_fresh_process(out, h.name, ids, [0] * len(ids))
    assert ("32008" in report["filters"]) == (compression == "bitshuffle-lz4")
    other = "none" if compression != "none" else "bitshuffle-lz4"
    error = h.start(out, 1, run_id=9, until="error", append=True, compression=other)
    assert f"its images are stored with {compression}" in error["message"]


def test_append_refuses_a_file_that_is_not_this_detectors(harness, tmp_path):
    h = harness()
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset(f"{h.name}/data", shape=(3, 4, 4), dtype="<u2")
    error = h.start(str(foreign), 1, until="error", append=True)
    assert f"cannot append to {foreign}: it holds no extendible /{h.name}/data" in \
        error["message"]
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    error = h.start(str(text), 1, run_id=2, until="error", append=True)
    assert f"cannot append to {text}" in error["message"]
    assert text.read_text() == "not hdf5" and foreign.exists()
    link = tmp_path / "link.h5"
    link.symlink_to(foreign)
    error = h.start(str(link), 1, run_id=3, until="error", append=True)
    assert "symbolic link" in error["message"]


def test_several_records_in_one_message_are_all_written(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "batch.h5")
    h.start(out, 6)
    metas = [h.put(image_id, publish=False) for image_id in range(10, 16)]
    h.pub.send(b"".join(m.tobytes() for m in metas[:4]))
    h.pub.send(b"".join(m.tobytes() for m in metas[4:]))
    assert h.events()[-1]["n_written"] == 6
    check_in_fresh_process(out, h.name, list(range(10, 16)), [0] * 6)


def test_overwritten_images_are_recorded_missing_not_written(harness, tmp_path):
    h = harness(n_slots=4)
    out = str(tmp_path / "slow.h5")
    h.start(out, 8)
    metas = [h.put(image_id, publish=False) for image_id in range(1, 9)]  # 1..4 overwritten
    for meta in metas:
        h.pub.send(meta.tobytes())
    stop = h.events()[-1]
    assert (stop["n_written"], stop["n_missing"], stop["n_good"]) == (4, 4, 4)
    assert stop["missing_image_ids"] == [1, 2, 3, 4]
    assert stop["n_flagged"] == {"NOT_IN_BUFFER": 4} and stop["outcome"] == "partial"
    with h5py.File(out, "r") as f:
        data, status = f[h.name]["data"], f[h.name]["status"][:]
        assert list(status) == [ImageStatus.NOT_IN_BUFFER] * 4 + [0] * 4
        assert not data[:4].any(), "an overwritten image must not be stored"
        for i in range(4, 8):
            np.testing.assert_array_equal(data[i], h.expected(i + 1, data.shape[1:],
                                                              data.dtype))


def test_flagged_and_absent_images_are_counted(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "flags.h5")
    h.start(out, 6)
    h.put(1)
    h.put(2, status=ImageStatus.MISSING_PACKETS)
    h.put(5, status=ImageStatus.MISSING_PACKETS | ImageStatus.MISSING_MODULES)
    h.put(6)
    h.put(10)
    h.put(11, status=ImageStatus.ID_MISMATCH)
    stop = h.events()[-1]
    assert stop["outcome"] == "partial" and stop["reason"] == "completed"
    assert (stop["n_written"], stop["n_good"]) == (6, 3)
    assert stop["n_flagged"] == {"MISSING_PACKETS": 2, "MISSING_MODULES": 1,
                                 "ID_MISMATCH": 1}
    assert (stop["n_absent"], stop["absent_ranges"]) == (5, [[3, 4], [7, 9]])
    check_in_fresh_process(out, h.name, [1, 2, 5, 6, 10, 11], [0, 1, 3, 0, 0, 4])


def test_frame_ids_that_restart_are_written_and_counted(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "reset.h5")
    h.start(out, 4)
    for image_id in (100, 101, 1, 2):  # the detector was re-armed
        h.put(image_id)
    stop = h.events()[-1]
    assert (stop["outcome"], stop["n_id_resets"], stop["n_absent"]) == ("success", 1, 0)
    check_in_fresh_process(out, h.name, [100, 101, 1, 2], [0] * 4)


def test_start_image_id_takes_buffered_images_first(harness, tmp_path):
    h = harness()
    for image_id in range(20, 25):
        h.put(image_id)
    out = str(tmp_path / "range.h5")
    h.start(out, 6, start_image_id=22)
    for image_id in range(25, 30):
        h.put(image_id)
    stop = h.events()[-1]
    assert stop["outcome"] == "success"
    check_in_fresh_process(out, h.name, list(range(22, 28)), [0] * 6)


def test_start_image_id_no_longer_in_the_buffer_is_reported_absent(harness, tmp_path):
    h = harness(n_slots=20)
    for image_id in range(1, 31):  # 1..10 were overwritten
        h.put(image_id)
    out = str(tmp_path / "gone.h5")
    h.start(out, 20, start_image_id=2)
    h.written(18)  # 13..30 from the buffer: the oldest kept, past the tenth rewritten next
    h.put(31)
    h.put(32)
    stop = h.events()[-1]
    assert (stop["n_absent"], stop["absent_ranges"]) == (11, [[2, 12]])
    assert stop["outcome"] == "partial"
    check_in_fresh_process(out, h.name, list(range(13, 33)), [0] * 20)


def test_a_pause_shorter_than_the_image_timeout_completes(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "pause.h5")
    h.start(out, 4, image_timeout=3.0)
    h.put(1)
    h.put(2)
    beats = h.events(until="heartbeat", skip=("progress",))
    beats += h.events(until="heartbeat", skip=("progress",), timeout=2.5)
    assert len(beats) == 2, "the writer sends a heartbeat every 0.5 s while it waits"
    time.sleep(1.0)
    h.put(3)
    h.put(4)
    assert h.events()[-1]["outcome"] == "success"


def test_no_image_for_the_image_timeout_ends_the_run_with_a_valid_file(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "timeout.h5")
    h.start(out, 10, image_timeout=1.0)
    h.put(1)
    h.put(2)
    started = time.monotonic()
    stop = h.events()[-1]
    assert time.monotonic() - started < 3.0
    assert (stop["reason"], stop["outcome"], stop["n_written"]) == ("image timeout", "fail", 2)
    assert stop["message"] == (f"no image from detector {h.name} for 1 s: is the detector "
                               "(or simulator) running?")
    check_in_fresh_process(out, h.name, [1, 2], [0, 0])


def test_stop_mid_run_leaves_a_valid_shorter_file(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "stopped.h5")
    h.start(out, 100, run_id=3)
    for i in range(5):
        h.put(50 + i)
    h.written(5)
    h.stop(2)  # not the open run: ignored
    h.stop(3)
    stop = h.events()[-1]
    assert (stop["reason"], stop["outcome"], stop["n_written"]) == ("stopped", "partial", 5)
    check_in_fresh_process(out, h.name, list(range(50, 55)), [0] * 5)
    assert not os.path.exists(os.path.join(tmp_path, ".stopped.h5.reserve"))


def test_a_run_of_4e9_images_costs_no_memory_up_front(harness, tmp_path):
    """n_images 4e9 (allowed: < 2**32) once made the writer allocate 40 B per requested
    image and die of MemoryError; its metadata rows now grow with the images written."""
    h = harness()
    out = str(tmp_path / "huge.h5")
    assert h.start(out, 4_000_000_000, run_id=4)["n_images"] == 4_000_000_000
    for i in range(3):
        h.put(70 + i)
    h.written(3)
    h.stop(4)
    stop = h.events()[-1]
    assert (stop["reason"], stop["n_written"]) == ("stopped", 3)
    check_in_fresh_process(out, h.name, [70, 71, 72], [0] * 3)
    assert h.start(str(tmp_path / "after.h5"), 1, run_id=5)["event"] == "start"  # serving


def test_new_run_closes_the_open_one(harness, tmp_path):
    h = harness()
    first, second = str(tmp_path / "first.h5"), str(tmp_path / "second.h5")
    h.start(first, 10, run_id=1)
    h.put(1)
    h.put(2)
    h.written(2)
    h.push.send(StartCommand(2, RunInfo(second, 1), 30.0).to_json())
    replaced = h.events()[-1]
    assert (replaced["run_id"], replaced["reason"], replaced["n_written"]) == (
        1, "replaced", 2)
    assert replaced["message"] == "replaced by run 2" and replaced["outcome"] == "fail"
    h.events(until="start")
    h.put(3)
    second_stop = h.events()[-1]
    assert (second_stop["run_id"], second_stop["reason"], second_stop["n_written"]) == (
        2, "completed", 1)
    check_in_fresh_process(first, h.name, [1, 2], [0, 0])
    check_in_fresh_process(second, h.name, [3], [0])


def test_sigterm_mid_run_closes_a_valid_file(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "sigterm.h5")
    h.start(out, 50, run_id=4)
    for i in range(6):
        h.put(10 + i)
    h.written(6)
    h.writer.popen.send_signal(signal.SIGTERM)
    stop = h.events()[-1]
    assert (stop["reason"], stop["outcome"], stop["n_written"]) == ("interrupted", "fail", 6)
    assert "SIGTERM" in stop["message"]
    assert h.writer.popen.wait(10) == 0
    check_in_fresh_process(out, h.name, list(range(10, 16)), [0] * 6)


def test_bad_directory_is_reported_and_the_writer_keeps_serving(harness, tmp_path):
    h = harness()
    missing = str(tmp_path / "no" / "such" / "dir" / "x.h5")
    error = h.start(missing, 1, until="error")
    assert error["run_id"] == 1
    assert error["message"] == (f"cannot write {missing}: directory "
                                f"{os.path.dirname(missing)} does not exist")
    h.put(1)  # images while no run is open: dropped, no error, no crash
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"precious")
    assert "the file exists" in h.start(str(existing), 1, 2, until="error")["message"]
    assert existing.read_bytes() == b"precious"
    good = str(tmp_path / "good.h5")
    h.start(good, 1, 3)
    h.put(4)
    assert h.events()[-1]["reason"] == "completed"
    check_in_fresh_process(good, h.name, [4], [0])


def test_nothing_below_the_output_root_leads_elsewhere(harness, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "sub").mkdir()
    (root / "sub" / "final.h5").symlink_to(outside / "target.h5")
    h = harness(output_root=str(root))
    through = str(root / "link" / "x.h5")
    assert h.start(through, 1, 1, until="error")["message"] == (
        f"cannot write {through}: {root}/link is a symbolic link or not a directory "
        f"(nothing below the output root {root} may lead elsewhere)")
    final = str(root / "sub" / "final.h5")
    assert h.start(final, 1, 2, until="error")["message"] == (
        f"cannot write {final}: the file exists (stddaq never overwrites data)")
    assert list(outside.iterdir()) == []  # nothing created through either link
    good = str(root / "sub" / "good.h5")
    h.start(good, 1, 3)
    h.put(5)
    assert h.events()[-1]["reason"] == "completed"
    check_in_fresh_process(good, h.name, [5], [0])


def test_writes_as_writer_user_id(harness, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    h = harness(writer_user_id=65534)
    top = tempfile.mkdtemp(prefix="sdq-uid-")  # pytest's tmp_path is private to root
    try:
        os.chmod(top, 0o755)
        shared = os.path.join(top, "shared")
        os.mkdir(shared)
        os.chmod(shared, 0o777)
        out = os.path.join(shared, "owned.h5")
        h.start(out, 1)
        h.put(1)
        assert h.events()[-1]["reason"] == "completed"
        assert os.stat(out).st_uid == 65534
        denied = os.path.join(top, "denied.h5")  # top is root's, mode 755
        assert h.start(denied, 1, 2, until="error")["message"] == (
            f"cannot write {denied}: permission denied")
    finally:
        shutil.rmtree(top)


def test_full_disk_mid_run_gives_error_and_a_readable_partial_file(harness, small_disk):
    h = harness()
    out = os.path.join(small_disk, "full.h5")
    h.start(out, 10, run_id=5)  # 10 x 2.1 MB images never fit in 6 MB
    for i in range(10):
        h.put(200 + i)
    stop = h.events()[-1]
    assert (stop["reason"], stop["outcome"]) == ("error", "fail")
    assert "failed" in stop["message"] and out in stop["message"]
    written = stop["n_written"]
    assert 0 < written < 10
    check_in_fresh_process(out, h.name, list(range(200, 200 + written)), [0] * written)
    assert "ready" in h.writer.output and h.writer.popen.poll() is None


def test_malformed_and_stale_commands_are_reported(harness, tmp_path):
    h = harness()
    h.push.send(b"not a command")
    assert "a writer command must be a JSON object" in h.events(until="error")[-1]["message"]
    h.push.send(b'{"command": "start", "run_id": 1, "image_timeout_s": 1, '
                b'"run_info": {"output_file": "rel.h5", "n_images": 1}}')
    assert "output_file: expected an absolute file path" in h.events(until="error")[-1][
        "message"]
    h.push.send(StartCommand(1, RunInfo(str(tmp_path / "nul\0.h5"), 1), 1.0).to_json())
    assert "output_file: expected an absolute file path" in h.events(until="error")[-1][
        "message"]
    h.push.send(b'{"command": "start", "run_id": 1, "image_timeout_s": 1, '
                b'"run_info": {"output_file": "/x.h5", "n_images": 4000000000000}}')
    assert "n_images: expected an integer from 1 to" in h.events(until="error")[-1]["message"]
    stale = StartCommand(9, RunInfo(str(tmp_path / "late.h5"), 1), 30.0,
                         sent_at=time.time() - 60)
    h.push.send(stale.to_json())
    message = h.events(until="error")[-1]["message"]
    assert "was sent 60 s ago (queued while the writer was down?): ignored" in message
    assert not os.path.exists(tmp_path / "late.h5")


def test_missing_image_buffer_is_reported(harness, tmp_path):
    h = harness(start_buffer=False)
    message = h.start(str(tmp_path / "x.h5"), 1, until="error")["message"]
    assert f"{shm_name(h.name, Segment.IMAGE)} does not exist" in message


def test_simulator_to_file_end_to_end(make_config, ipc_dir, tmp_path):
    """simulator -> udp_recv -> sync -> assembler -> writer (run by the writer agent); the
    file equals the images."""
    path, raw = make_config("jungfrau_1m.json")
    config = load_config(path)
    n = 8
    out = str(tmp_path / f"e2e_{uuid.uuid4().hex[:6]}.h5")
    with Pipeline(path, raw, ipc_dir, tmp_path):
        writer = Proc(module_cmd("fastcore.h5_writer", str(path), "--ipc-dir", ipc_dir,
                                 "--compression", "bitshuffle-lz4"), tmp_path / "writer.log")
        agent = WriterAgent(config, ipc_dir, image_timeout_s=30)
        try:
            writer.wait_for("ready")
            request = {"output_file": out, "n_images": n}
            agent.before_start("e2e", request)  # the file is open: the next n images are its
            sending = threading.Thread(target=DetectorSimulator(config).run, args=(n, 30))
            sending.start()
            result = agent.on_request("e2e", request)
            sending.join(30)
            assert result["outcome"] == "success" and result["n_images"] == n, result
        finally:
            agent.close()
            assert writer.stop() == 0
    from tests.pipeline import expected_image

    with h5py.File(out, "r") as f:
        data = f[config.detector_name]["data"]
        assert data.shape == (n, *config.image_shape)
        for i in range(n):
            np.testing.assert_array_equal(data[i], expected_image(raw, i + 1, data.dtype))
        assert list(f[config.detector_name]["image_id"][:]) == list(range(1, n + 1))
        # the simulator's frame numbers, carried by ImageMetadata.frame_index
        assert list(f[config.detector_name]["frame_index"][:]) == list(range(1, n + 1))


def test_frame_index_dataset_holds_the_detectors_frame_index(make_config, tmp_path):
    """In-process writer: ``frame_index`` is ImageMetadata.frame_index (the detector's
    frame index), not the image id."""
    path, _ = make_config("jungfrau_1m.json")
    config = load_config(path)
    name = config.detector_name
    images = ImageBuffer.create(shm_name(name, Segment.IMAGE), 8, config.image_shape,
                                config.image_dtype)
    events: list[WriterEvent] = []
    writer = H5Writer(config, events.append)
    out = str(tmp_path / "frame_index.h5")
    ids, frame_indices = [10, 11, 12, 13], [5000, 5001, 5003, 7]
    try:
        writer.command(StartCommand(3, RunInfo(out, len(ids)), 30.0).to_json())
        assert isinstance(events[-1], RunStarted), events
        records = np.zeros(len(ids), IMAGE_METADATA)
        records["id"], records["frame_index"] = ids, frame_indices
        records["height"], records["width"] = config.image_shape
        records["dtype"] = dtype_code(config.image_dtype)
        for record in records:
            images.begin_write(int(record["id"]))[:] = int(record["id"])
            images.commit(record)
        writer.take(records)
    finally:
        writer.close()
        images.close()
    assert isinstance(events[-1], RunSummary) and events[-1].outcome == "success", events
    with h5py.File(out, "r") as f:
        group = f[name]
        assert list(group["image_id"][:]) == ids
        assert list(group["frame_index"][:]) == frame_indices
        assert [int(image.max()) for image in group["data"]] == ids


def test_file_is_swmr_readable_while_written(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "live.h5")
    h.start(out, 20, run_id=6)
    for i in range(5):
        h.put(300 + i)
    h.written(5)
    time.sleep(1.0)  # the writer flushes for SWMR readers at least every 0.5 s
    script = f"""
import json, h5py, hdf5plugin
with h5py.File({out!r}, "r", swmr=True) as f:
    g = f[{h.name!r}]
    print(json.dumps([g["data"].shape[0], [int(i) for i in g["image_id"]],
                      int(g["data"][4].max())]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    rows, ids, pixel_max = json.loads(result.stdout)
    assert rows == 5 and ids == list(range(300, 305))
    assert pixel_max == int(h.expected(304, h.images.shape, h.images.dtype).max())
    for i in range(5, 20):
        h.put(300 + i)
    assert h.events()[-1]["n_written"] == 20
    check_in_fresh_process(out, h.name, list(range(300, 320)), [0] * 20)


def test_kill_9_leaves_a_file_the_restarted_writer_repairs(harness, tmp_path):
    h = harness()
    out = tmp_path / "killed.h5"
    h.start(str(out), 100)
    for image_id in range(1, 13):
        h.put(image_id)
    h.written(12)  # reported written = flushed: a kill cannot take them back
    reserve = tmp_path / ".killed.h5.reserve"
    journal = journal_path(h.ipc_dir, h.name)
    assert reserve.exists() and os.path.exists(journal)
    h.writer.popen.kill()
    h.writer.popen.wait(10)
    with pytest.raises(OSError):
        h5py.File(out, "r")  # still marked open for write by the dead writer
    h.start_writer()
    assert "repaired the file left open by a killed writer" in h.writer.output
    assert not reserve.exists() and not os.path.exists(journal)
    check_in_fresh_process(str(out), h.name, list(range(1, 13)), [0] * 12)
    h.start(str(tmp_path / "next.h5"), 1, run_id=2)  # and it serves the next run
    h.put(13)
    assert h.events()[-1]["outcome"] == "success"


def test_an_idle_writer_keeps_the_image_buffer_mapped_and_follows_it(make_config):
    """Between runs the writer maps the ImageBuffer (a run's start then does not wait for
    it), re-maps one the assembler recreated and lets go of one that is gone."""
    path, _ = make_config("jungfrau_1m.json")
    config = load_config(path)
    name = shm_name(config.detector_name, Segment.IMAGE)
    events: list = []
    writer = H5Writer(config, events.append)
    try:
        writer.tick()
        assert writer.images is None  # no assembler yet: nothing to map, no error
        first = ImageBuffer.create(name, 4, config.image_shape, config.image_dtype)
        writer._beat_at = 0.0
        writer.tick()
        assert writer.images is not None and not writer.images.segment.replaced()
        mapped = writer.images
        first.close()  # the assembler stops: its buffer is removed
        second = ImageBuffer.create(name, 4, config.image_shape, config.image_dtype)
        writer._beat_at = 0.0
        writer.tick()
        assert writer.images is not mapped and not writer.images.segment.replaced()
        second.close()
        writer._beat_at = 0.0
        writer.tick()
        assert writer.images is None  # gone: its memory is not held
        assert all(type(e).__name__ == "Heartbeat" for e in events) and len(events) == 4
    finally:
        writer.close()
