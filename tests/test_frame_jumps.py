"""Frame ids that jump or restart (FramePlacer without sockets, FrameSynchronizer).

A packet far ahead of its stream (forged, corrupted) is a stray: counted, dropped, the
stream goes on. The stream moves to another frame id range only when packets agree on it
(a re-armed detector counting from 1 again, a detector resuming after a gap), and then
loses nothing; every stray and re-sync is counted in ReceiverStats.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from fastcore.formats import MODULE_FRAME, ImageStatus
from fastcore.sync import RESTART_FRAMES, FrameSynchronizer
from fastcore.udp_recv import RESTART_AFTER_QUIET_FLUSHES, RESYNC_PACKETS
from tests.test_placer import CONFIGS, JUNGFRAU, Link

detectors = pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))


@pytest.fixture
def link_of():
    links: list[Link] = []

    def make(config, **kwargs) -> Link:
        link = Link(config, **kwargs)
        links.append(link)
        return link

    yield make
    for link in links:
        link.buffer.close()
        assert not os.path.exists(link.path), f"{link.path} left behind"


def far_offsets(config) -> list[int]:
    """current+200 and a huge jump (Gigafrost frame indices are 32-bit)."""
    return [200, 2**31 if config.detector_type == "gigafrost" else 2**62]


def forged(link: Link, frame: int, packet: int) -> tuple:
    """A packet claiming frame number ``frame`` (payload and other fields of frame 1)."""
    header, payload, flags = link.packet(1, packet)
    header[()]["frame_index" if link.fmt.detector_type == "gigafrost" else "framenum"] = frame
    return header, payload, flags


def stream(link: Link, frames) -> list:
    return [p for f in frames for p in link.frame_packets(f)]


def check_all(link: Link, frames) -> None:
    for frame in frames:
        link.check_frame(frame)


# --- a stray packet far ahead ----------------------------------------------------------


@detectors
@pytest.mark.parametrize("where", ["between_frames", "mid_frame"])
def test_a_forged_packet_far_ahead_does_not_move_the_stream(link_of, config, where):
    for offset in far_offsets(config):
        link = link_of(config, n_slots=32)
        n = link.fmt.n_packets
        link.receive(stream(link, range(1, 4)))
        stray = forged(link, 3 + offset, n // 2)
        frame4 = link.frame_packets(4)
        if where == "mid_frame":
            frame4.insert(n // 2, stray)
        else:
            frame4.insert(0, stray)
        link.receive(frame4 + stream(link, range(5, 9)))
        assert link.commits == list(range(1, 9)), f"offset {offset}"
        check_all(link, range(1, 9))  # every frame whole, the stray nowhere
        stats = link.stats()
        assert stats["stray_packets"] == 1
        assert stats["resyncs"] == stats["late_packets"] == stats["lost_packets"] == 0
        assert stats["frames"] == 8 and stats["incomplete_frames"] == 0
        assert int(link.buffer.module_frame(3 + offset, link.module_id)["id"]) != 3 + offset


@detectors
def test_stray_packets_of_many_far_frames_never_move_the_stream(link_of, config):
    """A stray in every frame, each far from the others: none is followed, all counted."""
    link = link_of(config, n_slots=32, batch=5)
    n = link.fmt.n_packets
    rng = np.random.default_rng(5)
    packets = []
    for frame in range(1, 21):
        packets += link.frame_packets(frame)
        packets.insert(len(packets) - n // 2,
                       forged(link, frame + 1000 * int(rng.integers(1, 100_000)),
                              int(rng.integers(0, n))))
    link.receive(packets)
    assert link.commits == list(range(1, 21))
    check_all(link, range(1, 21))
    assert link.stats()["stray_packets"] == 20 and link.stats()["resyncs"] == 0


@detectors
def test_a_stray_as_first_packet_after_a_pause_is_dropped(link_of, config):
    link = link_of(config)
    link.receive(stream(link, (1, 2)))
    link.placer.flush()
    link.receive([forged(link, 1_000_000, 0), *stream(link, (3, 4))])
    link.placer.flush()
    assert link.commits == [1, 2, 3, 4]
    check_all(link, range(1, 5))
    assert link.stats()["stray_packets"] == 1 and link.stats()["resyncs"] == 0


def test_stray_packets_are_logged_at_a_bounded_rate(link_of, caplog):
    link = link_of(JUNGFRAU, n_slots=16)
    packets = []
    for frame in range(1, 51):
        packets += [*link.frame_packets(frame), forged(link, frame + 10**9, 0)]
    with caplog.at_level(logging.WARNING, logger="fastcore.udp_recv"):
        link.receive(packets)
    assert link.commits == list(range(1, 51))
    assert link.stats()["stray_packets"] == 50
    strays = [r for r in caplog.records if "stray" in r.getMessage()]
    assert 1 <= len(strays) <= 2  # one per WARNING_INTERVAL (1 s)
    assert "frame 1000000001 (current frame 1," in strays[0].getMessage()


# --- resets and resumes: followed after a bounded number of packets, nothing lost -------


def feed_until_resync(link: Link, packets: list) -> int:
    """Deliver packets one by one; how many went in when the stream re-synchronised."""
    for count, packet in enumerate(packets, 1):
        link.receive([packet], batch=1)
        if link.stats()["resyncs"]:
            return count
    raise AssertionError(f"no re-sync after {len(packets)} packets: {link.stats()}")


@detectors
def test_a_reset_to_frame_1_without_pause_is_followed_within_a_frame(link_of, config):
    """A re-armed detector counting from 1 again, straight after its last frame: followed
    once the new stream reached its second frame (a frame's packets + 1), none lost."""
    link = link_of(config, n_slots=64)
    n = link.fmt.n_packets
    link.receive(stream(link, range(100, 104)))
    new = stream(link, range(1, 6))
    fed = feed_until_resync(link, new)
    assert fed == n + 1
    link.receive(new[fed:])
    assert link.commits == [100, 101, 102, 103, 1, 2, 3, 4, 5]
    check_all(link, [100, 101, 102, 103, 1, 2, 3, 4, 5])
    stats = link.stats()
    assert stats["resyncs"] == 1
    assert stats["late_packets"] == stats["lost_packets"] == stats["stray_packets"] == 0


@detectors
def test_a_reset_after_a_pause_is_followed_within_a_few_packets(link_of, config):
    link = link_of(config, n_slots=64)
    link.receive(stream(link, range(100, 104)))
    link.placer.flush()
    new = stream(link, range(1, 6))
    fed = feed_until_resync(link, new)
    assert fed == link.placer.resync_packets <= RESYNC_PACKETS
    link.receive(new[fed:])
    assert link.commits == [100, 101, 102, 103, 1, 2, 3, 4, 5]
    check_all(link, [1, 2, 3, 4, 5])
    assert link.stats()["resyncs"] == 1 and link.stats()["late_packets"] == 0


@detectors
@pytest.mark.parametrize("pause", [False, True])
def test_a_detector_resuming_far_ahead_is_followed(link_of, config, pause):
    """Frames continued while the link was down: the stream resumes far ahead."""
    link = link_of(config, n_slots=8)
    n = link.fmt.n_packets
    link.receive(stream(link, (1, 2, 3)))
    if pause:
        link.placer.flush()
    new = stream(link, range(5000, 5004))
    fed = feed_until_resync(link, new)
    assert fed == (link.placer.resync_packets if pause else n + 1)
    link.receive(new[fed:])
    assert link.commits == [1, 2, 3, 5000, 5001, 5002, 5003]
    check_all(link, range(5000, 5004))
    assert link.stats()["stray_packets"] == 0 and link.stats()["resyncs"] == 1


@detectors
def test_a_stray_just_before_a_reset_does_not_delay_it(link_of, config):
    link = link_of(config, n_slots=64)
    n = link.fmt.n_packets
    link.receive(stream(link, range(100, 104)))
    new = [forged(link, 10**6, 0), *stream(link, range(1, 5))]
    fed = feed_until_resync(link, new)
    assert fed == 1 + n + 1
    link.receive(new[fed:])
    assert link.commits == [100, 101, 102, 103, 1, 2, 3, 4]
    check_all(link, [1, 2, 3, 4])
    assert link.stats()["stray_packets"] == 1 and link.stats()["late_packets"] == 0


@detectors
def test_a_jump_is_followed_with_late_packets_between_its_frames(link_of, config):
    """Late packets between the packets of the new range do not hold the re-sync back."""
    link = link_of(config, n_slots=8)
    n = link.fmt.n_packets
    link.receive(stream(link, (1, 2, 3)))
    packets = []
    for frame in range(5000, 5006):
        frame_packets = link.frame_packets(frame)
        frame_packets.insert(n // 2, link.packet(2, frame % n))
        packets += frame_packets
    link.receive(packets)
    assert link.commits == [1, 2, 3, 5000, 5001, 5002, 5003, 5004, 5005]
    check_all(link, range(5000, 5006))
    stats = link.stats()
    assert stats["resyncs"] == 1 and stats["stray_packets"] == 0
    assert stats["late_packets"] + stats["duplicate_packets"] == 6


@detectors
def test_a_lost_first_packet_of_the_new_range_still_resyncs(link_of, config):
    link = link_of(config, n_slots=64)
    n = link.fmt.n_packets
    link.receive(stream(link, range(100, 104)))
    link.receive(link.frame_packets(1, range(1, n)) + stream(link, range(2, 5)))
    assert link.commits == [100, 101, 102, 103, 1, 2, 3, 4]
    link.check_frame(1, missing=[0])
    check_all(link, (2, 3, 4))
    assert link.stats()["resyncs"] == 1 and link.stats()["lost_packets"] == 1


# --- late packets stay dropped ----------------------------------------------------------


@detectors
def test_a_late_burst_of_one_old_frame_does_not_move_a_running_stream(link_of, config):
    """A whole old frame arriving again while the stream runs: late, the stream goes on
    and the old frame's data is not touched."""
    link = link_of(config, n_slots=16)
    n = link.fmt.n_packets
    link.receive(stream(link, range(1, 6)))
    frame2 = link.buffer.frame(2, link.module_id).copy()
    link.receive(stream(link, [2]) + stream(link, range(6, 9)))
    assert link.commits == list(range(1, 9))
    check_all(link, range(1, 9))
    np.testing.assert_array_equal(link.buffer.frame(2, link.module_id), frame2)
    assert link.stats()["late_packets"] == n and link.stats()["resyncs"] == 0


@detectors
def test_late_packets_mixed_into_the_stream_are_dropped(link_of, config):
    link = link_of(config, n_slots=16, batch=7)
    n = link.fmt.n_packets
    rng = np.random.default_rng(2)
    link.receive(stream(link, range(1, 6)))
    packets, late = [], 0
    for frame in range(6, 16):
        packets += link.frame_packets(frame)
        for _ in range(3):
            old = frame - int(rng.integers(1, 5))
            packets.insert(int(rng.integers(len(packets) - n, len(packets) + 1)),
                           link.packet(old, int(rng.integers(0, n))))
            late += 1
    link.receive(packets)
    assert link.commits == list(range(1, 16))
    check_all(link, range(1, 16))
    stats = link.stats()
    # a late packet twice in a row (possible with 3-packet frames) counts as a duplicate
    assert stats["late_packets"] + stats["duplicate_packets"] == late
    assert stats["late_packets"] >= late - 3
    assert stats["resyncs"] == stats["lost_packets"] == 0


@detectors
def test_stragglers_of_the_last_frame_after_a_pause_do_not_reopen_it(link_of, config):
    """Even a burst of them (more than resync_packets): the frame was committed."""
    link = link_of(config)
    n = link.fmt.n_packets
    half = n // 2
    link.receive(link.frame_packets(4) + link.frame_packets(5, range(half)))
    link.placer.flush()
    assert link.commits == [4, 5]
    link.receive(link.frame_packets(5, range(half, n)))
    link.placer.flush()
    assert link.commits == [4, 5]
    link.check_frame(5, missing=range(half, n))
    assert link.stats()["late_packets"] == n - half and link.stats()["resyncs"] == 0
    for _ in range(RESTART_AFTER_QUIET_FLUSHES):  # a long pause: the same id may restart
        link.placer.flush()
    link.receive(link.frame_packets(5))
    assert link.commits == [4, 5, 5] and link.stats()["resyncs"] == 1
    link.check_frame(5)


@detectors
def test_a_short_acquisition_after_a_quick_rearm_is_committed_when_it_ends(link_of, config):
    """One frame of a new acquisition straight after the last one, then quiet: it never
    reaches a second frame, so it is followed when the stream goes quiet."""
    link = link_of(config, n_slots=64)
    link.receive(stream(link, range(100, 103)) + stream(link, [1]))
    assert link.commits == [100, 101, 102]
    link.placer.flush()
    assert link.commits == [100, 101, 102, 1]
    link.check_frame(1)
    assert link.stats()["resyncs"] == 1 and link.stats()["late_packets"] == 0


def test_frame_numbers_of_2_63_and_more_are_strays(link_of):
    link = link_of(JUNGFRAU)
    link.receive(stream(link, [1]))
    link.receive([forged(link, 2**64 - 1, 0)] * 20 + stream(link, [2]))
    link.placer.flush()
    assert link.commits == [1, 2]
    assert link.stats()["stray_packets"] == 20 and link.stats()["resyncs"] == 0


# --- sync follows a restart of the frame ids -------------------------------------------


def module_frame(frame: int, module: int, n_recv: int = 128) -> np.void:
    record = np.zeros((), MODULE_FRAME)
    record["id"] = frame
    record["frame_index"] = frame
    record["n_recv_packets"] = n_recv
    record["module_id"] = module
    return record[()]


def test_sync_takes_ids_that_restart_at_1_without_a_pause():
    """The receivers re-synchronised to frame 1 straight after frame 105: sync starts a
    new acquisition after RESTART_FRAMES frames of a module, stragglers of the old one
    are late, and the new frames leave whole and in order."""
    sync = FrameSynchronizer(n_modules=2, n_packets=128, timeout_s=0.5)
    out = []
    t = 0.0
    for frame in range(100, 105):
        for module in (0, 1):
            t += 0.001
            out += sync.add(module_frame(frame, module), t)
    out += sync.add(module_frame(105, 0), t)  # module 1's 105 still on its way
    for frame in range(1, RESTART_FRAMES + 1):
        t += 0.001
        out += sync.add(module_frame(frame, 0), t)
    assert sync.stats.restarts == 1
    t += 0.001
    out += sync.add(module_frame(105, 1), t)  # a straggler of the old acquisition
    for frame in range(1, 6):
        t += 0.001
        out += sync.add(module_frame(frame, 1), t)
        if frame > RESTART_FRAMES:
            out += sync.add(module_frame(frame, 0), t)
    ids = [int(r["id"]) for r in out]
    assert ids == [100, 101, 102, 103, 104, 105, 1, 2, 3, 4, 5]
    statuses = [int(r["status"]) for r in out]
    assert statuses == [0] * 5 + [ImageStatus.MISSING_MODULES] + [0] * 5
    assert sync.stats.late_module_frames == 1
    assert sync.pending == {}


def test_sync_a_module_going_back_once_is_late_not_a_restart():
    """One module frame of an old id (a receiver that briefly followed late packets),
    then the stream goes on: late, no restart."""
    sync = FrameSynchronizer(n_modules=2, n_packets=128, timeout_s=0.5)
    out = []
    for frame in range(10, 13):
        for module in (0, 1):
            out += sync.add(module_frame(frame, module), 0.0)
    out += sync.add(module_frame(11, 0), 0.01)
    out += sync.add(module_frame(11, 1), 0.01)
    for frame in (13, 14):
        for module in (0, 1):
            out += sync.add(module_frame(frame, module), 0.02)
    assert [int(r["id"]) for r in out] == [10, 11, 12, 13, 14]
    assert sync.stats.restarts == 0 and sync.stats.late_module_frames == 2
    assert sync.ready(5.0) == [] and sync.stats.late_module_frames == 2


def test_sync_a_short_new_acquisition_followed_by_a_pause_is_taken():
    sync = FrameSynchronizer(n_modules=1, n_packets=128, timeout_s=0.5)
    out = []
    for frame in range(50, 53):
        out += sync.add(module_frame(frame, 0), 0.0)
    out += sync.add(module_frame(1, 0), 0.01)  # one frame only, then nothing
    assert sync.stats.late_module_frames == 1
    out += sync.ready(1.0)
    assert [int(r["id"]) for r in out] == [50, 51, 52, 1]
    assert sync.stats.restarts == 1 and sync.stats.late_module_frames == 0
