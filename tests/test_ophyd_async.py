"""StdDaqAsyncDetector (ophyd-async) in a real RunEngine against real std-daq services (writer
agent, h5 writer, RabbitMQ, Redis) fed by a free-running fake detector; documents validated,
files read back (plain h5py and Tiled); mock mode without any service."""

from __future__ import annotations

import time
import uuid

import h5py
import hdf5plugin  # noqa: F401 - bitshuffle for readers
import numpy as np
import pytest
from bluesky import RunEngine
from bluesky import plan_stubs as bps
from bluesky import plans as bp
from bluesky import preprocessors as bpp
from bluesky.utils import FailedStatus
from ophyd_async.core import (
    NotConnectedError,
    StaticPathProvider,
    TriggerInfo,
    UUIDFilenameProvider,
    init_devices,
)

from stddaq_ophyd import StdDaqAsyncDetector, StdDaqError
from tests.test_ophyd import file_of, validate
from tests.test_writer_agent_service import AgentSetup

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def RE():
    return RunEngine({})


def make_detector(agent: AgentSetup, directory=None, **kwargs) -> StdDaqAsyncDetector:
    config_path = agent.out_dir.parent / f"{agent.config.detector_name}.json"
    provider = StaticPathProvider(UUIDFilenameProvider(), directory or agent.out_dir)
    with init_devices():
        det = StdDaqAsyncDetector(str(config_path), provider, writer_service=agent.service,
                                  **kwargs)
    return det


def run(RE, plan) -> list[tuple[str, dict]]:
    docs: list[tuple[str, dict]] = []
    token = RE.subscribe(lambda name, doc: docs.append((name, doc)))
    try:
        RE(plan)
    finally:
        RE.unsubscribe(token)
    return docs


def rows_of(path: str, detector: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, image ids) of a file, opened plainly (no SWMR): it was closed valid."""
    with h5py.File(path, "r") as f:
        return f[f"/{detector}/data"][:], f[f"/{detector}/image_id"][:].astype(np.int64)


def fly(det, n_events: int):
    """A fly scan as ophyd-async runs one: prepare, declare, kickoff, complete, collect."""

    @bpp.stage_decorator([det])
    @bpp.run_decorator()
    def inner():
        yield from bps.prepare(det, TriggerInfo(number_of_events=n_events), wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)
        yield from bps.kickoff(det, wait=True)
        yield from bps.complete(det, wait=True)
        yield from bps.collect(det, name="primary")

    return (yield from inner())


def test_count_writes_exactly_the_images_the_events_point_at(stddaq, RE):
    agent, _ = stddaq
    det = make_detector(agent)
    name = agent.config.detector_name
    docs = run(RE, bp.count([det], num=5))
    counts = validate(docs)
    assert counts["event"] == 5 and counts["stream_resource"] == 1
    datums = [doc for kind, doc in docs if kind == "stream_datum"]
    assert [(d["indices"]["start"], d["indices"]["stop"]) for d in datums] == [
        (i, i + 1) for i in range(5)]
    descriptor = next(doc for kind, doc in docs if kind == "descriptor")
    assert descriptor["data_keys"]["det"]["shape"] == [1, *agent.config.image_shape]
    first = file_of(docs)
    images, ids = rows_of(first, name)
    assert images.shape == (5, *agent.config.image_shape) and np.all(np.diff(ids) > 0)
    # stage/unstage again: a new file, again exactly its images
    second = file_of(run(RE, bp.count([det], num=3)))
    assert second != first and rows_of(second, name)[0].shape[0] == 3
    assert len(list(agent.out_dir.glob("*.h5"))) == 2
    det.acquisition.close()


@pytest.mark.parametrize("stddaq", [{}, {"n_writers": 2, "frames_per_block": 5}],
                         indirect=True, ids=["one writer", "two writers, master file"])
def test_fly_scan_and_tiled_read_back(stddaq, RE):
    from bluesky.callbacks.tiled_writer import TiledWriter
    from tiled.client import from_uri
    from tiled.server import SimpleTiledServer

    agent, _ = stddaq
    det = make_detector(agent)
    watched: list[float] = []
    with SimpleTiledServer(readable_storage=[str(agent.out_dir)]) as server:
        client = from_uri(server.uri)
        RE.subscribe(TiledWriter(client))
        RE.waiting_hook = lambda statuses: [
            s.watch(lambda *a, **kw: watched.append(kw.get("current", 0)))
            for s in statuses or () if hasattr(s, "watch")]
        docs = []
        RE.subscribe(lambda name, doc: docs.append((name, doc)))
        (uid,) = RE(fly(det, 12))
        array = np.asarray(client[uid]["primary"]["det"].read())
    validate(docs)
    stop = next(doc for kind, doc in docs if kind == "stop")
    assert stop["exit_status"] == "success"
    images, ids = rows_of(file_of(docs), agent.config.detector_name)
    assert images.shape[0] == 12 and np.all(np.diff(ids) == 1)  # one request: consecutive
    assert array.shape == (12, 1, *agent.config.image_shape)
    np.testing.assert_array_equal(array[:, 0], images)
    assert watched and max(watched) == 12  # complete() reported progress up to 12
    det.acquisition.close()


def test_two_kickoffs_of_one_prepare_write_their_events_into_one_file(stddaq, RE):
    agent, _ = stddaq
    det = make_detector(agent)

    @bpp.stage_decorator([det])
    @bpp.run_decorator()
    def plan():
        yield from bps.prepare(det, TriggerInfo(number_of_events=10, collections_per_event=2),
                               wait=True)
        yield from bps.declare_stream(det, name="primary", collect=True)
        for events in (4, 6):
            yield from bps.mv(det.events_to_kickoff, events)
            yield from bps.kickoff(det, wait=True)
            yield from bps.complete(det, wait=True)
            yield from bps.collect(det, name="primary")

    docs = run(RE, plan())
    validate(docs)
    datums = [doc for kind, doc in docs if kind == "stream_datum"]
    assert [(d["indices"]["start"], d["indices"]["stop"]) for d in datums] == [(0, 4), (4, 10)]
    images, ids = rows_of(file_of(docs), agent.config.detector_name)
    assert images.shape[0] == 20  # 10 events of 2 images
    assert np.all(np.diff(ids[:8]) == 1) and np.all(np.diff(ids[8:]) == 1)
    det.acquisition.close()


def test_a_refused_request_is_a_clear_exception(stddaq, RE, tmp_path):
    agent, _ = stddaq
    outside = tmp_path / "outside"  # exists, but not below the detector's output root
    outside.mkdir()
    det = make_detector(agent, directory=outside)
    with pytest.raises(FailedStatus) as failure:
        run(RE, bp.count([det], num=2))
    message = str(failure.value.__cause__)
    assert isinstance(failure.value.__cause__, StdDaqError)
    assert "is outside the output root" in message and str(outside) in message
    assert not list(outside.iterdir())
    det.acquisition.close()


def test_detector_stopping_mid_fly_scan_fails_with_std_daqs_message(stddaq, RE):
    agent, detector = stddaq
    det = make_detector(agent)
    docs = []
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    began = time.monotonic()

    def plan():
        @bpp.stage_decorator([det])
        @bpp.run_decorator()
        def inner():
            yield from bps.prepare(det, TriggerInfo(number_of_events=100_000), wait=True)
            yield from bps.declare_stream(det, name="primary", collect=True)
            yield from bps.kickoff(det, wait=True)
            yield from bps.sleep(0.5)
            detector.stop()  # the detector goes quiet: std-daq's image timeout is 5 s
            yield from bps.complete(det, wait=True)

        return (yield from inner())

    with pytest.raises(FailedStatus) as failure:
        RE(plan())
    assert time.monotonic() - began < 9  # std-daq's message, not the 10 s exposure timeout
    assert "no image from detector" in str(failure.value.__cause__)
    rows = rows_of(file_of(docs) if any(k == "stream_resource" for k, _ in docs)
                   else det.acquisition.output_file, agent.config.detector_name)[0].shape[0]
    assert 0 < rows < 100_000  # the images written are in a valid file
    det.acquisition.close()


def test_abort_mid_fly_scan_leaves_a_valid_file(stddaq, RE):
    agent, _ = stddaq
    det = make_detector(agent)

    def plan():
        @bpp.stage_decorator([det])
        @bpp.run_decorator()
        def inner():
            yield from bps.prepare(det, TriggerInfo(number_of_events=100_000), wait=True)
            yield from bps.kickoff(det, wait=True)
            yield from bps.sleep(1.0)
            raise RuntimeError("the user's plan failed")

        return (yield from inner())

    with pytest.raises(RuntimeError, match="the user's plan failed"):
        RE(plan())
    path = det.acquisition.output_file
    images, ids = rows_of(path, agent.config.detector_name)  # unstage closed it valid
    assert 10 <= images.shape[0] < 100_000 and np.all(np.diff(ids) == 1)
    assert not agent.client._runs and det.acquisition.run.done.is_set()
    det.acquisition.close()


def test_connect_names_a_writer_agent_that_is_not_running():
    with pytest.raises(NotConnectedError, match=r"writer agent t\.absent\.writer is not"), \
            init_devices():
        det = StdDaqAsyncDetector(  # noqa: F841 - init_devices names and connects it
            "configs/jungfrau_1m.json", StaticPathProvider(UUIDFilenameProvider(), "/tmp"),
            writer_service="t.absent.writer", stop_timeout=2)


def test_mock_mode_runs_plans_without_std_daq(RE):
    with init_devices(mock=True):
        det = StdDaqAsyncDetector("configs/jungfrau_1m.json",
                                  StaticPathProvider(UUIDFilenameProvider(), "/tmp"),
                                  writer_service=f"t.{uuid.uuid4().hex[:8]}.writer",
                                  broker_host="127.0.0.1:1")  # nothing listens there
    docs = run(RE, bp.count([det], num=4))
    counts = validate(docs)
    assert counts["event"] == 4 and counts["stream_datum"] == 4
    assert det.acquisition._client is None  # nothing was contacted
    docs = run(RE, fly(det, 7))
    datums = [doc for kind, doc in docs if kind == "stream_datum"]
    assert datums[-1]["indices"]["stop"] == 7
