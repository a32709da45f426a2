"""FrameSynchronizer (fastcore.sync): grouping module frames by id; and the process loop."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq

from fastcore.config import parse_config
from fastcore.formats import MODULE_FRAME, RAW_METADATA, ImageStatus
from fastcore.names import Stream
from fastcore.process import ipc_address
from fastcore.sync import FrameSynchronizer, run

N_PACKETS = 128


def module_frame(frame: int, module: int, n_recv: int = N_PACKETS) -> np.void:
    record = np.zeros((), MODULE_FRAME)
    record["id"] = frame
    record["pulse_id"] = 1000 + 10 * frame
    record["frame_index"] = frame
    record["daq_rec"] = frame % 7
    record["n_recv_packets"] = n_recv
    record["module_id"] = module
    return record[()]


def ids(out) -> list[int]:
    return [int(raw["id"]) for raw in out]


def statuses(out) -> list[int]:
    return [int(raw["status"]) for raw in out]


def test_complete_frame_leaves_at_once_with_first_module_fields():
    sync = FrameSynchronizer(n_modules=3, n_packets=N_PACKETS)
    assert sync.add(module_frame(7, 2), now=0.0) == []
    assert sync.add(module_frame(7, 0), now=0.0) == []
    out = sync.add(module_frame(7, 1), now=0.0)
    assert len(out) == 1
    raw = out[0]
    assert raw.dtype == RAW_METADATA
    assert raw.tobytes() == np.array((7, 1070, 7, 0, 0), RAW_METADATA).tobytes()
    assert sync.stats.frames == 1
    assert sync.pending == {}


def test_frames_leave_in_id_order():
    sync = FrameSynchronizer(n_modules=2, n_packets=N_PACKETS, timeout_s=1.0)
    out = []
    # module 0 runs ahead; frame 1 of module 1 comes last
    for frame in (1, 2, 3):
        out += sync.add(module_frame(frame, 0), now=0.0)
    out += sync.add(module_frame(3, 1), now=0.1)
    out += sync.add(module_frame(2, 1), now=0.1)
    assert out == []  # frames 2 and 3 are complete but wait for frame 1
    out += sync.add(module_frame(1, 1), now=0.2)
    assert ids(out) == [1, 2, 3]
    assert statuses(out) == [ImageStatus.GOOD] * 3


def test_missing_module_emitted_after_timeout():
    sync = FrameSynchronizer(n_modules=2, n_packets=N_PACKETS, timeout_s=0.5)
    assert sync.add(module_frame(1, 0), now=10.0) == []
    assert sync.ready(now=10.4) == []  # not yet
    out = sync.ready(now=10.6)
    assert ids(out) == [1]
    assert statuses(out) == [ImageStatus.MISSING_MODULES]
    assert sync.stats.missing_modules == 1
    assert sync.stats.incomplete == 0


def test_expired_frame_releases_the_complete_ones_behind_it():
    sync = FrameSynchronizer(n_modules=2, n_packets=N_PACKETS, timeout_s=0.5)
    sync.add(module_frame(1, 0), now=0.0)
    assert sync.add(module_frame(2, 0), now=0.3) == []
    assert sync.add(module_frame(2, 1), now=0.4) == []
    out = sync.add(module_frame(3, 1), now=0.6)  # frame 1 expires, then 2 is complete
    assert ids(out) == [1, 2]
    assert statuses(out) == [ImageStatus.MISSING_MODULES, ImageStatus.GOOD]
    assert list(sync.pending) == [3]


def test_missing_module_frame_uses_a_present_module_fields():
    sync = FrameSynchronizer(n_modules=3, n_packets=N_PACKETS, timeout_s=0.1)
    sync.add(module_frame(4, 2), now=0.0)
    (raw,) = sync.ready(now=1.0)
    assert int(raw["pulse_id"]) == 1040
    assert int(raw["frame_index"]) == 4
    assert int(raw["daq_rec"]) == 4


@pytest.mark.parametrize("max_pending", [1, 3, 10])
def test_max_pending_bounds_the_waiting_frames(max_pending):
    sync = FrameSynchronizer(n_modules=2, n_packets=N_PACKETS, timeout_s=100.0,
                             max_pending=max_pending)
    out = []
    for frame in range(1, max_pending + 1):
        out += sync.add(module_frame(frame, 0), now=0.0)
    assert out == []
    assert len(sync.pending) == max_pending
    for frame in range(max_pending + 1, max_pending + 6):
        out += sync.add(module_frame(frame, 0), now=0.0)
        assert len(sync.pending) == max_pending
    assert ids(out) == list(range(1, 6))
    assert set(statuses(out)) == {ImageStatus.MISSING_MODULES}


def test_incomplete_module_frame_flags_missing_packets():
    sync = FrameSynchronizer(n_modules=2, n_packets=N_PACKETS)
    sync.add(module_frame(1, 0), now=0.0)
    (raw,) = sync.add(module_frame(1, 1, n_recv=N_PACKETS - 3), now=0.0)
    assert int(raw["status"]) == ImageStatus.MISSING_PACKETS
    assert sync.stats.incomplete == 1
    assert sync.stats.missing_modules == 0


def test_missing_module_and_packets_together():
    sync = FrameSynchronizer(n_modules=2, n_packets=N_PACKETS, timeout_s=0.1)
    sync.add(module_frame(1, 1, n_recv=0), now=0.0)
    (raw,) = sync.ready(now=0.2)
    assert int(raw["status"]) == ImageStatus.MISSING_PACKETS | ImageStatus.MISSING_MODULES


def test_late_module_frame_is_counted_not_sent():
    sync = FrameSynchronizer(n_modules=2, n_packets=N_PACKETS, timeout_s=0.5)
    sync.add(module_frame(1, 0), now=0.0)
    sync.add(module_frame(2, 0), now=0.0)
    sync.add(module_frame(2, 1), now=0.0)
    assert ids(sync.ready(now=0.6)) == [1, 2]
    sync.add(module_frame(3, 0), now=0.65)
    out = sync.add(module_frame(1, 1), now=0.7)  # frame 1 already left
    assert out == []
    assert sync.stats.late_module_frames == 1
    assert list(sync.pending) == [3]
    (raw,) = sync.add(module_frame(3, 1), now=0.8)
    assert int(raw["id"]) == 3 and int(raw["status"]) == ImageStatus.GOOD
    assert sync.stats.frames == 3


def test_late_module_frame_soon_after_the_last_frame_left():
    """Nothing pending, but not quiet for long: a module frame of an old id is late."""
    sync = FrameSynchronizer(n_modules=2, n_packets=N_PACKETS, timeout_s=0.5)
    sync.add(module_frame(5, 0), now=0.0)
    sync.add(module_frame(5, 1), now=0.0)
    assert sync.add(module_frame(5, 1), now=0.1) == []
    assert sync.add(module_frame(2, 0), now=0.2) == []
    assert sync.stats.late_module_frames == 2
    assert sync.pending == {}


@pytest.mark.parametrize("n_modules", [1, 2, 4])
def test_id_restart_after_quiet_period(n_modules):
    sync = FrameSynchronizer(n_modules=n_modules, n_packets=N_PACKETS, timeout_s=0.5)
    out = []
    for frame in (100, 101):
        for m in range(n_modules):
            out += sync.add(module_frame(frame, m), now=1.0)
    assert ids(out) == [100, 101]
    # a new acquisition, ids from 1 again, after the stream was quiet for > timeout
    out = []
    for frame in (1, 2, 3):
        for m in range(n_modules):
            out += sync.add(module_frame(frame, m), now=5.0 + 0.001 * frame)
    assert ids(out) == [1, 2, 3]
    assert statuses(out) == [ImageStatus.GOOD] * 3
    assert sync.stats.late_module_frames == 0


def test_id_restart_while_a_frame_waits_is_late():
    """Not quiet (a frame still pending): an old id is a late module frame, not a restart."""
    sync = FrameSynchronizer(n_modules=2, n_packets=N_PACKETS, timeout_s=0.5)
    sync.add(module_frame(10, 0), now=0.0)
    sync.add(module_frame(10, 1), now=0.0)
    sync.add(module_frame(11, 0), now=0.0)
    out = sync.add(module_frame(1, 0), now=5.0)
    assert sync.stats.late_module_frames == 1
    assert ids(out) == [11]  # frame 11 expired meanwhile
    assert statuses(out) == [ImageStatus.MISSING_MODULES]
    assert sync.pending == {}


def test_the_sync_process_loop_takes_several_module_frames_per_message(tmp_path):
    """Receivers batch their ModuleFrames when frames come fast: one ZMQ message may hold
    several records, and sync releases every frame of it, in order (the frames completed
    in one loop turn go out as one message)."""
    config = parse_config({
        "detector_name": "SYNCMSG", "detector_type": "jungfrau", "n_modules": 2,
        "bit_depth": 16, "image_pixel_height": 1024, "image_pixel_width": 1024,
        "start_udp_port": 40000, "writer_user_id": 0,
        "module_positions": {"0": [0, 0, 1023, 511], "1": [0, 512, 1023, 1023]}})
    ctx = zmq.Context.instance()
    raw_pull = ctx.socket(zmq.PULL)
    raw_pull.bind(ipc_address(str(tmp_path), "SYNCMSG", Stream.RAW))
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(config, str(tmp_path), stop), daemon=True)
    thread.start()
    push = ctx.socket(zmq.PUSH)
    push.connect(ipc_address(str(tmp_path), "SYNCMSG", Stream.FRAMES))
    try:
        module0 = np.array([module_frame(f, 0) for f in (5, 6, 7)], MODULE_FRAME)
        module1 = np.array([module_frame(f, 1) for f in (5, 6, 7)], MODULE_FRAME)
        push.send(module0.tobytes())  # three frames of module 0 in one message
        for record in module1:
            push.send(record.tobytes())
        out = []
        while len(out) < 3 and raw_pull.poll(5000):  # a message holds one or more
            out.extend(np.frombuffer(raw_pull.recv(), RAW_METADATA))
        assert ids(out) == [5, 6, 7] and statuses(out) == [0, 0, 0]
        assert [int(r["pulse_id"]) for r in out] == [1050, 1060, 1070]
    finally:
        stop.set()
        thread.join(5)
        push.close(0)
        raw_pull.close(0)
    assert not thread.is_alive()
