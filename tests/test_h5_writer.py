"""stddaq-h5-writer as a real process: files, statuses, faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
from fastcore.process import ipc_address
from fastcore.simulator import DetectorSimulator, daq_rec_of, pulse_id_of
from fastcore.writer_protocol import RunInfo, image_message, stop_message
from tests.conftest import REPO, Proc, module_cmd
from tests.pipeline import Pipeline


class WriterHarness:
    """A writer process fed by the test, which plays the assembler and the writer agent."""

    def __init__(self, config_path, raw, ipc_dir, log_dir, n_slots=16, start_buffer=True,
                 extra=()):
        self.raw, self.name = raw, raw["detector_name"]
        self.config = load_config(config_path)
        self.images = (ImageBuffer.create(shm_name(self.name, "image"), n_slots,
                                          self.config.image_shape, self.config.image_dtype)
                       if start_buffer else None)
        self.writer = Proc(module_cmd("fastcore.h5_writer", str(config_path), "--ipc-dir",
                                      ipc_dir, *extra), log_dir / "writer.log")
        self.writer.wait_for("ready")
        ctx = zmq.Context.instance()
        self.push = ctx.socket(zmq.PUSH)
        self.push.connect(ipc_address(ipc_dir, self.name, "writer"))
        self.status = ctx.socket(zmq.SUB)
        self.status.setsockopt(zmq.SUBSCRIBE, b"")
        self.status.connect(ipc_address(ipc_dir, self.name, "writer-status"))
        time.sleep(0.3)

    def put(self, image_id: int) -> np.void:
        """Produce image ``image_id`` (every pixel = id % 65000 + row) in the buffer."""
        image = self.images.begin_write(image_id)
        image[:] = (image_id % 65000 + np.arange(image.shape[0])[:, None]).astype(image.dtype)
        meta = np.zeros((), IMAGE_METADATA)
        meta["id"], meta["height"], meta["width"] = image_id, *image.shape
        meta["dtype"] = dtype_code(image.dtype)
        meta["user_1"], meta["user_2"] = pulse_id_of(image_id), daq_rec_of(image_id)
        self.images.commit(meta)
        return meta

    @staticmethod
    def expected(image_id: int, shape, dtype) -> np.ndarray:
        return np.broadcast_to((image_id % 65000 + np.arange(shape[0])[:, None]).astype(dtype),
                               shape)

    def send(self, meta, run_id, i_image, n_images, info=None):
        self.push.send_multipart(image_message(meta, run_id, i_image, n_images, info))

    def events(self, until: str = "stop", timeout: float = 15.0) -> list[dict]:
        events = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status.poll(100):
                events.append(json.loads(self.status.recv()))
                if events[-1]["event"] == until:
                    return events
        raise AssertionError(f"no {until!r} event in {timeout} s: {events}\n"
                             f"{self.writer.output}")

    def close(self) -> int:
        self.push.close(0)
        self.status.close(0)
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
    metas = [h.put(image_id) for image_id in range(100, 110)]
    info = RunInfo(out, 10, metadata={"user": "e12345", "sample": "lysozyme"},
                   compression=compression)
    for i, meta in enumerate(metas):
        h.send(meta, 7, i, 10, info if i == 0 else None)
    events = h.events()
    assert events[0] == {"event": "start", "run_id": 7, "output_file": out, "n_images": 10}
    assert [e["i_image"] for e in events if e["event"] == "image"] == list(range(10))
    assert events[-1] | {"missing_image_ids": []} == {
        "event": "stop", "run_id": 7, "output_file": out, "n_images": 10, "n_written": 10,
        "n_missing": 0, "missing_image_ids": [], "reason": "completed"}
    report = check_in_fresh_process(out, h.name, list(range(100, 110)), [0] * 10)
    assert ("32008" in report["filters"]) == (compression == "bitshuffle-lz4")
    assert json.loads(report["attrs"]["request_metadata"])["sample"] == "lysozyme"
    assert json.loads(report["attrs"]["detector_config"])["detector_name"] == h.name
    assert report["attrs"]["software_version"].startswith("stddaq ")


def test_overwritten_images_are_recorded_missing_not_written(harness, tmp_path):
    h = harness(n_slots=4)
    out = str(tmp_path / "slow.h5")
    metas = [h.put(image_id) for image_id in range(1, 9)]  # 1..4 overwritten by 5..8
    info = RunInfo(out, 8)
    for i, meta in enumerate(metas):
        h.send(meta, 1, i, 8, info if i == 0 else None)
    stop = h.events()[-1]
    assert stop["n_written"] == 4 and stop["n_missing"] == 4
    assert stop["missing_image_ids"] == [1, 2, 3, 4]
    with h5py.File(out, "r") as f:
        data, status = f[h.name]["data"], f[h.name]["status"][:]
        assert list(status) == [ImageStatus.NOT_IN_BUFFER] * 4 + [0] * 4
        assert not data[:4].any(), "an overwritten image must not be stored"
        for i in range(4, 8):
            np.testing.assert_array_equal(data[i], h.expected(i + 1, data.shape[1:],
                                                              data.dtype))


def test_stop_mid_run_leaves_a_valid_shorter_file(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "stopped.h5")
    info = RunInfo(out, 100)
    for i in range(5):
        h.send(h.put(50 + i), 3, i, 100, info if i == 0 else None)
    h.push.send_multipart(stop_message(3))
    stop = h.events()[-1]
    assert stop["reason"] == "stopped" and stop["n_written"] == 5
    check_in_fresh_process(out, h.name, list(range(50, 55)), [0] * 5)


def test_new_run_closes_the_open_one(harness, tmp_path):
    h = harness()
    first, second = str(tmp_path / "first.h5"), str(tmp_path / "second.h5")
    h.send(h.put(1), 1, 0, 10, RunInfo(first, 10))
    h.send(h.put(2), 1, 1, 10)
    h.send(h.put(3), 2, 0, 1, RunInfo(second, 1))
    events = h.events()
    assert events[-1]["reason"] == "replaced by run 2" and events[-1]["n_written"] == 2
    second_stop = h.events()[-1]
    assert (second_stop["run_id"], second_stop["reason"], second_stop["n_written"]) == (
        2, "completed", 1)
    check_in_fresh_process(first, h.name, [1, 2], [0, 0])
    check_in_fresh_process(second, h.name, [3], [0])


def test_sigterm_mid_run_closes_a_valid_file(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "sigterm.h5")
    info = RunInfo(out, 50)
    for i in range(6):
        h.send(h.put(10 + i), 4, i, 50, info if i == 0 else None)
    events = h.events(until="image")
    while len([e for e in events if e["event"] == "image"]) < 6:
        events += h.events(until="image")
    h.writer.popen.send_signal(signal.SIGTERM)
    stop = h.events()[-1]
    assert stop["reason"] == "interrupted" and stop["n_written"] == 6
    assert h.writer.popen.wait(10) == 0
    check_in_fresh_process(out, h.name, list(range(10, 16)), [0] * 6)


def test_bad_directory_is_reported_and_the_writer_keeps_serving(harness, tmp_path):
    h = harness()
    missing = str(tmp_path / "no" / "such" / "dir" / "x.h5")
    h.send(h.put(1), 1, 0, 1, RunInfo(missing, 1))
    error = h.events(until="error")[-1]
    assert error["run_id"] == 1
    assert error["message"] == (f"cannot write {missing}: directory "
                                f"{os.path.dirname(missing)} does not exist")
    h.send(h.put(2), 1, 1, 1)  # further images of the failed run: no new error, no crash
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"precious")
    h.send(h.put(3), 2, 0, 1, RunInfo(str(existing), 1))
    assert "the file exists" in h.events(until="error")[-1]["message"]
    assert existing.read_bytes() == b"precious"
    good = str(tmp_path / "good.h5")
    h.send(h.put(4), 3, 0, 1, RunInfo(good, 1))
    assert h.events()[-1]["reason"] == "completed"
    check_in_fresh_process(good, h.name, [4], [0])


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
        h.send(h.put(1), 1, 0, 1, RunInfo(out, 1))
        assert h.events()[-1]["reason"] == "completed"
        assert os.stat(out).st_uid == 65534
        denied = os.path.join(top, "denied.h5")  # top is root's, mode 755
        h.send(h.put(2), 2, 0, 1, RunInfo(denied, 1))
        assert h.events(until="error")[-1]["message"] == (
            f"cannot write {denied}: permission denied")
    finally:
        shutil.rmtree(top)


def test_full_disk_mid_run_gives_error_and_a_readable_partial_file(harness, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mount_point = tempfile.mkdtemp(prefix="sdq-full-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", mount_point],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(mount_point)
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.strip()}")
    try:
        h = harness()
        out = os.path.join(mount_point, "full.h5")
        info = RunInfo(out, 10)  # 10 x 2.1 MB images never fit in 6 MB
        for i in range(10):
            h.send(h.put(200 + i), 5, i, 10, info if i == 0 else None)
        events = h.events()
        errors = [e for e in events if e["event"] == "error"]
        assert errors and "failed" in errors[0]["message"] and out in errors[0]["message"]
        stop = events[-1]
        assert stop["reason"] == "error" and 0 < stop["n_written"] < 10
        written = stop["n_written"]
        check_in_fresh_process(out, h.name, list(range(200, 200 + written)), [0] * written)
        assert "ready" in h.writer.output and h.writer.popen.poll() is None
    finally:
        subprocess.run(["umount", "-l", mount_point], check=False)
        os.rmdir(mount_point)


def test_malformed_message_is_reported(harness):
    h = harness()
    h.push.send_multipart([b"not a store stream"])
    error = h.events(until="error")[-1]
    assert "expected [StoreStream (88 B)" in error["message"]
    h.push.send_multipart([image_message(h.put(1), 1, 0, 1)[0], b'{"output_file": "rel.h5"}'])
    assert "bad run info" in h.events(until="error")[-1]["message"]


def test_missing_image_buffer_is_reported(harness, tmp_path):
    h = harness(start_buffer=False)
    meta = np.zeros((), IMAGE_METADATA)
    meta["id"] = 1
    h.send(meta, 1, 0, 1, RunInfo(str(tmp_path / "x.h5"), 1))
    assert f"stddaq.{h.name}.image does not exist" in h.events(until="error")[-1]["message"]


def test_simulator_to_file_end_to_end(make_config, ipc_dir, tmp_path):
    """simulator -> udp_recv -> sync -> assembler -> writer; the file equals the images."""
    path, raw = make_config("jungfrau_1m.json")
    config = load_config(path)
    n = 8
    with Pipeline(path, raw, ipc_dir, tmp_path) as pipeline:
        writer = Proc(module_cmd("fastcore.h5_writer", str(path), "--ipc-dir", ipc_dir,
                                 "--compression", "bitshuffle-lz4"), tmp_path / "writer.log")
        try:
            writer.wait_for("ready")
            ctx = zmq.Context.instance()
            push = ctx.socket(zmq.PUSH)
            push.connect(ipc_address(ipc_dir, config.detector_name, "writer"))
            status = ctx.socket(zmq.SUB)
            status.setsockopt(zmq.SUBSCRIBE, b"")
            status.connect(ipc_address(ipc_dir, config.detector_name, "writer-status"))
            sub = pipeline.subscribe()
            DetectorSimulator(config).run(n, 30)
            records = pipeline.collect(sub, n)
            out = str(tmp_path / f"e2e_{uuid.uuid4().hex[:6]}.h5")
            info = RunInfo(out, n)
            for i, record in enumerate(records):
                push.send_multipart(image_message(record, 9, i, n, info if i == 0 else None))
            deadline = time.monotonic() + 20
            stop = None
            while stop is None and time.monotonic() < deadline:
                if status.poll(100):
                    event = json.loads(status.recv())
                    stop = event if event["event"] == "stop" else None
            assert stop and stop["n_written"] == n, writer.output
            push.close(0)
            status.close(0)
        finally:
            assert writer.stop() == 0
    from tests.pipeline import expected_image

    with h5py.File(out, "r") as f:
        data = f[config.detector_name]["data"]
        assert data.shape == (n, *config.image_shape)
        for i in range(n):
            np.testing.assert_array_equal(data[i], expected_image(raw, i + 1, data.dtype))
        assert list(f[config.detector_name]["image_id"][:]) == list(range(1, n + 1))


def test_file_is_swmr_readable_while_written(harness, tmp_path):
    h = harness()
    out = str(tmp_path / "live.h5")
    info = RunInfo(out, 20)
    for i in range(5):
        h.send(h.put(300 + i), 6, i, 20, info if i == 0 else None)
    seen = 0
    while seen < 5:
        seen += sum(e["event"] == "image" for e in h.events(until="image"))
    time.sleep(1.0)  # the writer flushes for SWMR readers when idle for 0.5 s
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
        h.send(h.put(300 + i), 6, i, 20)
    assert h.events()[-1]["n_written"] == 20
    check_in_fresh_process(out, h.name, list(range(300, 320)), [0] * 20)
