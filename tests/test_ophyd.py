"""StdDaqDetector in a real RunEngine against real std-daq services (writer agent, h5 writer,
RabbitMQ, Redis) fed by a free-running fake detector; documents validated; Tiled read-back."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time

import h5py
import hdf5plugin  # noqa: F401 - bitshuffle for readers
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky import plans as bp
from bluesky import preprocessors as bpp
from bluesky.utils import FailedStatus, RunEngineInterrupted
from event_model import DocumentNames, schema_validators
from ophyd.device import Staged
from ophyd.sim import motor

from stddaq_ophyd.device import StdDaqDetector, StdDaqError
from tests.test_writer_agent_service import AgentSetup

pytestmark = pytest.mark.timeout(180)


class FreeRunning:
    """The fake detector produces images continuously, like a real free-running one."""

    def __init__(self, agent: AgentSetup, rate_hz: float = 40.0):
        self.agent = agent
        self.rate_hz = rate_hz
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0 / self.rate_hz):
            self.agent.emit(1, pause=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class CountingDetector(StdDaqDetector):
    unstage_calls = 0

    def unstage(self):
        self.unstage_calls += 1
        return super().unstage()


@pytest.fixture
def daq(stddaq):
    return stddaq[0]


def make_device(agent, output_dir=None, **kwargs) -> CountingDetector:
    config_path = agent.out_dir.parent / f"{agent.config.detector_name}.json"
    return CountingDetector("jf", detector_config=str(config_path),
                            output_dir=str(output_dir or agent.out_dir),
                            writer_service=agent.service, **kwargs)


def run_with_docs(plan_factory, device):
    RE = RunEngine({})
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    uids = RE(plan_factory(device))
    return RE, docs, uids


def validate(docs) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, doc in docs:
        schema_validators[DocumentNames(name)].validate(doc)
        counts[name] = counts.get(name, 0) + 1
    return counts


def no_request_running(agent) -> bool:
    return agent.agent.popen.poll() is None and not agent.client._runs


def file_of(docs) -> str:
    resource = next(doc for name, doc in docs if name == "stream_resource")
    return resource["uri"].removeprefix("file://localhost")


def test_count_documents_and_file(daq):
    device = make_device(daq)
    _, docs, _ = run_with_docs(lambda d: bp.count([d], num=5), device)
    counts = validate(docs)
    assert counts["event"] == 5 and counts["stream_resource"] == 1
    assert counts["stream_datum"] == 5
    stop = next(doc for name, doc in docs if name == "stop")
    assert stop["exit_status"] == "success"
    descriptor = next(doc for name, doc in docs if name == "descriptor")
    image = descriptor["data_keys"]["jf_image"]
    height, width = daq.config.image_shape
    assert image["external"] == "STREAM:" and image["shape"] == [height, width]
    assert image["dtype_numpy"] == "<u2"
    events = [doc for name, doc in docs if name == "event"]
    assert all("jf_image" not in e["data"] for e in events)
    assert [e["data"]["jf_frames_written"] >= i + 1 for i, e in enumerate(events)]
    datums = [doc for name, doc in docs if name == "stream_datum"]
    assert [(d["indices"]["start"], d["indices"]["stop"]) for d in datums] == [
        (i, i + 1) for i in range(5)]
    with h5py.File(file_of(docs), "r") as f:  # exactly the images the events point at
        group = f[f"/{daq.config.detector_name}"]
        assert group["data"].shape[0] == 5
        assert np.all(np.diff(group["image_id"][:].astype(np.int64)) > 0)
    assert events[-1]["data"]["jf_frames_written"] == 5
    assert device._staged == Staged.no and device.unstage_calls == 1
    assert no_request_running(daq)


def test_scan_with_a_motor(daq):
    device = make_device(daq)
    _, docs, _ = run_with_docs(lambda d: bp.scan([d], motor, -1, 1, 3), device)
    counts = validate(docs)
    assert counts["event"] == 3 and counts["stream_datum"] == 3
    events = [doc for name, doc in docs if name == "event"]
    assert [round(e["data"]["motor"], 3) for e in events] == [-1.0, 0.0, 1.0]
    with h5py.File(file_of(docs), "r") as f:
        assert f[f"/{daq.config.detector_name}/data"].shape[0] == 3


def test_count_with_several_images_per_trigger_writes_them_all(daq):
    device = make_device(daq, images_per_trigger=3)
    _, docs, _ = run_with_docs(lambda d: bp.count([d], num=4), device)
    validate(docs)
    descriptor = next(doc for name, doc in docs if name == "descriptor")
    assert descriptor["data_keys"]["jf_image"]["shape"] == [3, *daq.config.image_shape]
    datums = [doc for name, doc in docs if name == "stream_datum"]
    assert [(d["indices"]["start"], d["indices"]["stop"]) for d in datums] == [
        (i, i + 1) for i in range(4)]
    with h5py.File(file_of(docs), "r") as f:
        ids = f[f"/{daq.config.detector_name}/image_id"][:].astype(np.int64)
    assert len(ids) == 12
    steps = np.diff(ids).reshape(-1)
    # within a trigger the images are consecutive; between triggers the detector went on
    assert all(steps[i] == 1 for i in range(11) if i % 3 != 2)


@pytest.mark.parametrize("per_trigger", [1, 2])
def test_tiled_reads_back_the_images(daq, per_trigger):
    from bluesky.callbacks.tiled_writer import TiledWriter
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    device = make_device(daq, images_per_trigger=per_trigger)
    with SimpleTiledServer(readable_storage=[str(daq.out_dir)]) as server:
        client = from_uri(server.uri)
        RE = RunEngine({})
        docs = []
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        RE.subscribe(TiledWriter(client))
        (uid,) = RE(bp.count([device], num=4))
        array = client[uid]["primary"]["jf_image"].read()
        with h5py.File(file_of(docs), "r") as f:
            written = f[f"/{daq.config.detector_name}/data"][:]
    assert written.shape[0] == 4 * per_trigger
    if per_trigger > 1:
        written = written.reshape(4, per_trigger, *daq.config.image_shape)
    assert array.shape == written.shape
    np.testing.assert_array_equal(np.asarray(array), written)


def test_writer_error_mid_scan_fails_with_the_std_daq_message(daq):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mount_point = tempfile.mkdtemp(prefix="full-", dir=daq.out_dir)  # inside output_root
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", mount_point],
                             capture_output=True, text=True)
    if mounted.returncode:
        os.rmdir(mount_point)
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr.strip()}")
    try:
        device = make_device(daq, output_dir=mount_point, trigger_timeout=20)
        RE = RunEngine({})
        docs = []
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        with pytest.raises(FailedStatus) as failure:
            RE(bp.count([device], num=20))
        message = str(failure.value.__cause__)
        assert "No space left on device" in message and mount_point in message
        stop = next(doc for name, doc in docs if name == "stop")
        assert stop["exit_status"] == "fail"
        assert device.unstage_calls == 1 and device._staged == Staged.no
        assert no_request_running(daq)
    finally:
        subprocess.run(["umount", "-l", mount_point], check=False)
        os.rmdir(mount_point)


@pytest.mark.parametrize("ending", ["abort", "stop", "halt"])
def test_pause_then_end_unstages_once_and_leaves_a_valid_file(daq, ending):
    device = make_device(daq)
    RE = RunEngine({})
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))

    def pause_after_events(name, doc):
        if name == "event" and doc["seq_num"] == 3:  # as if Ctrl-C twice, from outside
            threading.Thread(target=RE.request_pause, kwargs={"defer": False}).start()

    RE.subscribe(pause_after_events)
    with pytest.raises(RunEngineInterrupted):
        RE(bp.count([device], num=50, delay=0.05))
    assert RE.state == "paused"
    events = sum(name == "event" for name, _ in docs)
    getattr(RE, ending)()
    assert device.unstage_calls == 1 and device._staged == Staged.no
    assert no_request_running(daq)
    path = file_of(docs)
    with h5py.File(path, "r") as f:
        n = f[f"/{daq.config.detector_name}/data"].shape[0]
    assert events <= n <= events + 1  # a trigger in flight may have completed


def test_construction_is_lazy_and_failed_stage_leaves_nothing(daq):
    threads = set(threading.enumerate())
    device = make_device(daq, stage_timeout=3)
    device.writer_service = "no.such.writer"
    assert device.acquisition._client is None
    # threads a connection would start (ophyd Status timeouts of earlier tests run as
    # threading.Timer and may start at any moment: not ours)
    new_threads = {t for t in set(threading.enumerate()) - threads
                   if not isinstance(t, threading.Timer)}
    assert not new_threads and device.acquisition._client is None, \
        "constructing must not connect"
    for _ in range(2):  # the second stage fails the same way, never RedundantStaging
        with pytest.raises(StdDaqError, match=r"writer agent no\.such\.writer is not running"):
            device.stage()
        assert device._staged == Staged.no
    device.unstage()  # safe after a failed stage
    device.unstage()
    device.acquisition.close()


def test_unstage_bounds_and_stop_fails_pending_trigger(daq):
    device = make_device(daq, images_per_trigger=10_000, trigger_timeout=30)
    device.stage()
    status = device.trigger()
    time.sleep(0.3)
    device.stop()
    with pytest.raises(Exception, match="stopped"):
        status.wait(10)
    began = time.monotonic()
    device.unstage()
    assert time.monotonic() - began < 5
    assert no_request_running(daq)
    device.client.close()


def fly(device):
    """A fly scan as bluesky's stream plans run one: declare, kickoff, complete, collect."""

    @bpp.run_decorator()
    def inner():
        yield from bps.declare_stream(device, name="primary", collect=True)
        yield from bps.kickoff(device, wait=True)
        yield from bps.complete(device, wait=True)
        yield from bps.collect(device, name="primary")

    return (yield from inner())


def test_fly_scan_kickoff_complete_collect(daq):
    device = make_device(daq, images_per_fly=6)
    _, docs, _ = run_with_docs(fly, device)
    counts = validate(docs)
    stop = next(doc for name, doc in docs if name == "stop")
    assert stop["exit_status"] == "success"
    datums = [doc for name, doc in docs if name == "stream_datum"]
    assert counts["stream_resource"] == 1
    assert sum(d["indices"]["stop"] - d["indices"]["start"] for d in datums) == 6
    with h5py.File(file_of(docs), "r") as f:
        assert f[f"/{daq.config.detector_name}/data"].shape[0] == 6
    assert no_request_running(daq)


@pytest.mark.parametrize("stddaq", [{"n_writers": 2, "frames_per_block": 2}], indirect=True)
def test_two_writers_the_documents_point_at_the_master_and_tiled_reads_it(stddaq):
    """With the detector's images spread over two writers (blocks of 2), a count with 3
    images per trigger writes one appending split run per trigger; the stream documents
    name the master, and Tiled reads it back equal to the images in order."""
    from bluesky.callbacks.tiled_writer import TiledWriter
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    daq = stddaq[0]
    device = make_device(daq, images_per_trigger=3)
    with SimpleTiledServer(readable_storage=[str(daq.out_dir)]) as server:
        client = from_uri(server.uri)
        RE = RunEngine({})
        docs = []
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        RE.subscribe(TiledWriter(client))
        (uid,) = RE(bp.count([device], num=4))
        array = np.asarray(client[uid]["primary"]["jf_image"].read())
    master = file_of(docs)
    assert validate(docs)["stream_datum"] == 4
    with h5py.File(master, "r") as f:
        group = f[f"/{daq.config.detector_name}"]
        assert group["data"].is_virtual
        written, ids = group["data"][:], group["image_id"][:].astype(np.int64)
        assert list(group["status"][:]) == [0] * 12
    stem = master.removesuffix(".h5")
    for index in (0, 1):  # each trigger's blocks: images 0-1 to writer 0, 2 to writer 1
        with h5py.File(f"{stem}_w{index}.h5", "r") as f:
            assert f[f"/{daq.config.detector_name}/data"].shape[0] == 4 * (2 - index)
    assert len(ids) == 12 and all(np.diff(ids.reshape(4, 3), axis=1).ravel() == 1)
    assert [int(image.max()) for image in written] == [int(i) % 60000 for i in ids]
    np.testing.assert_array_equal(array, written.reshape(4, 3, *daq.config.image_shape))
