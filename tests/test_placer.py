"""FramePlacer (fastcore.udp_recv) driven without sockets over a real FrameBuffer.

:class:`Link` does per batch what ModuleReceiver.run does around recvmmsg: ask the placer
where the next packets should land, "receive" packets by writing their payloads to those
addresses (as the kernel would through the iovecs), then hand the headers, lengths and flags
to :meth:`FramePlacer.accept`.
"""

from __future__ import annotations

import os
from uuid import uuid4

import numpy as np
import pytest

from fastcore.buffers import FrameBuffer, shm_name
from fastcore.config import parse_config
from fastcore.detectors import module_format
from fastcore.formats import INVALID_ID, MODULE_FRAME
from fastcore.names import Segment
from fastcore.udp import MSG_TRUNC
from fastcore.udp_recv import FramePlacer, module_origin

GARBAGE = 0xEE  # what the FrameBuffer holds before the receiver writes

JUNGFRAU = parse_config({
    "detector_name": "JF", "detector_type": "jungfrau", "n_modules": 2, "bit_depth": 16,
    "image_pixel_height": 1030, "image_pixel_width": 1030, "start_udp_port": 40000,
    "writer_user_id": 0,
    "module_positions": {"0": [0, 513, 1029, 0], "1": [0, 1029, 1029, 516]},
})
EIGER4 = parse_config({
    "detector_name": "EG", "detector_type": "eiger", "n_modules": 2, "bit_depth": 4,
    "image_pixel_height": 256, "image_pixel_width": 1030, "start_udp_port": 40000,
    "writer_user_id": 0,
    "module_positions": {"0": [0, 0, 513, 255], "1": [516, 0, 1029, 255]},
})
# 160 x 624: 312 x 40 pixel modules, 3 packets of 15 rows, the last one holds 10 rows only
GIGAFROST = parse_config({
    "detector_name": "GF", "detector_type": "gigafrost", "n_modules": 8, "bit_depth": 12,
    "image_pixel_height": 160, "image_pixel_width": 624, "start_udp_port": 40000,
    "writer_user_id": 0, "module_positions": {},
})
CONFIGS = {"jungfrau": JUNGFRAU, "eiger4": EIGER4, "gigafrost": GIGAFROST}


def test_gigafrost_test_geometry_has_a_short_last_packet():
    fmt = module_format("gigafrost", 12, GIGAFROST.image_shape)
    assert fmt.n_packets == 3
    assert fmt.last_payload_bytes < fmt.payload_bytes


class Link:
    """One module's stream into a FramePlacer, without a socket."""

    def __init__(self, config, module_id: int = 1, n_slots: int = 8, batch: int | None = None):
        self.config = config
        self.module_id = module_id
        self.fmt = fmt = module_format(config.detector_type, config.bit_depth,
                                       config.image_shape)
        self.batch = min(batch or 128, fmt.n_packets)
        self.name = f"t{uuid4().hex[:8]}"
        self.path = f"/dev/shm/{shm_name(self.name, Segment.FRAMES)}"
        self.buffer = FrameBuffer.create(shm_name(self.name, Segment.FRAMES), n_slots,
                                         config.n_modules, fmt.frame_bytes)
        for slot in range(n_slots):
            for module in range(config.n_modules):
                self.buffer.frame(slot, module)[:] = GARBAGE
        self.commits: list[int] = []
        self.committed: dict[int, tuple[np.void, np.ndarray]] = {}  # as seen in on_commit
        self.placer = FramePlacer(fmt, self.buffer, module_id,
                                  module_origin(config, module_id), self._on_commit)
        self.staged_batches = 0
        accept_staged = self.placer._accept_staged

        def count_staged(*args):
            self.staged_batches += 1
            return accept_staged(*args)

        self.placer._accept_staged = count_staged

    def _on_commit(self, frame: int) -> None:
        record = self.buffer.module_frame(frame, self.module_id).copy()
        assert int(record["id"]) == frame  # the id is written before on_commit
        self.commits.append(frame)
        self.committed[frame] = (record, self.buffer.frame(frame, self.module_id).copy())

    # --- what the detector sends ---------------------------------------------------------

    def payload_size(self, packet: int) -> int:
        fmt = self.fmt
        return fmt.last_payload_bytes if packet == fmt.n_packets - 1 else fmt.payload_bytes

    def payload(self, frame: int, packet: int) -> bytes:
        rng = np.random.default_rng([frame, packet, self.module_id])
        return rng.integers(0, 256, self.payload_size(packet), dtype=np.uint8).tobytes()

    def header(self, frame: int, packet: int) -> np.ndarray:
        header = np.zeros((), self.fmt.header)
        if self.fmt.detector_type == "gigafrost":
            header["protocol_id"] = 0xCB
            header["frame_index"] = frame
            header["packet_starting_row"] = packet * self.fmt.rows_per_packet
            header["image_status_flags"] = frame % 5
        else:
            header["framenum"] = frame
            header["packetnum"] = packet
            header["module_id"] = self.module_id
            if self.fmt.detector_type == "jungfrau":
                header["bunchid"] = 1000.0 + 10 * frame
                header["debug"] = frame % 7
            else:
                header["det_spec1"] = 1000 + 10 * frame
        return header

    def packet(self, frame: int, packet: int) -> tuple[np.ndarray, bytes, int]:
        return self.header(frame, packet), self.payload(frame, packet), 0

    def frame_packets(self, frame: int, packets=None) -> list:
        if packets is None:
            packets = range(self.fmt.n_packets)
        return [self.packet(frame, p) for p in packets]

    def expected_pulse_id(self, frame: int) -> int:
        return {"jungfrau": 1000 + 10 * frame, "eiger": 1000 + 10 * frame,
                "gigafrost": 0}[self.fmt.detector_type]

    def expected_daq_rec(self, frame: int) -> int:
        return {"jungfrau": frame % 7, "eiger": 0,
                "gigafrost": frame % 5}[self.fmt.detector_type]

    # --- what ModuleReceiver.run does ----------------------------------------------------

    def receive(self, packets: list, batch: int | None = None) -> None:
        """Deliver ``packets`` (header, payload, flags) in recvmmsg batches of ``batch``."""
        batch = batch or self.batch
        for start in range(0, len(packets), batch):
            self._receive_batch(packets[start : start + batch])

    def _receive_batch(self, packets: list) -> None:
        placer, fmt = self.placer, self.fmt
        addresses = placer.payload_addresses(self.batch)
        segment = self.buffer.segment.array
        n = len(packets)
        headers = np.zeros(n, fmt.header)
        lengths = np.zeros(n, np.uint32)
        flags = np.zeros(n, np.int32)
        for i, (header, payload, flag) in enumerate(packets):
            headers[i] = header
            landed = payload[: fmt.payload_bytes]  # the iovec holds one payload
            offset = int(addresses[i]) - segment.ctypes.data
            assert offset >= 0 and offset + fmt.payload_bytes <= segment.size
            np.frombuffer(segment, np.uint8)[offset : offset + len(landed)] = np.frombuffer(
                landed, np.uint8)
            lengths[i] = fmt.header.itemsize + len(landed)
            flags[i] = flag | (MSG_TRUNC if len(payload) > fmt.payload_bytes else 0)
        placer.accept(headers, lengths, flags)

    # --- checks --------------------------------------------------------------------------

    def check_frame(self, frame: int, missing=()) -> None:
        """The committed ModuleFrame and data of ``frame`` are right (``missing`` packets
        zeroed), both as seen in on_commit and as now in the buffer."""
        fmt = self.fmt
        record, data = self.committed[frame]
        assert int(record["id"]) == frame
        assert int(record["frame_index"]) == frame
        assert int(record["pulse_id"]) == self.expected_pulse_id(frame)
        assert int(record["daq_rec"]) == self.expected_daq_rec(frame)
        assert int(record["n_recv_packets"]) == fmt.n_packets - len(set(missing))
        assert int(record["module_id"]) == self.module_id
        origin = module_origin(self.config, self.module_id)
        assert (int(record["pos_y"]), int(record["pos_x"])) == origin
        assert record.tobytes() == self.buffer.module_frame(frame, self.module_id).tobytes()
        for data_now in (data, self.buffer.frame(frame, self.module_id)):
            rows = data_now.reshape(fmt.n_packets, fmt.payload_bytes)
            for p in range(fmt.n_packets):
                size = self.payload_size(p)
                if p in missing:
                    assert not rows[p].any(), f"missing packet {p} not zeroed"
                else:
                    got = rows[p, :size].tobytes()
                    assert got == self.payload(frame, p), f"frame {frame} packet {p} wrong"

    def stats(self) -> dict:
        return dict(self.placer.stats.__dict__)


@pytest.fixture
def make_link():
    links: list[Link] = []

    def make(config, **kwargs) -> Link:
        link = Link(config, **kwargs)
        links.append(link)
        assert os.path.exists(link.path)
        return link

    yield make
    for link in links:
        link.buffer.close()
        assert not os.path.exists(link.path), f"{link.path} left behind"


detectors = pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))


@detectors
def test_in_order_frames_take_the_zero_copy_path(make_link, config):
    link = make_link(config)
    n = link.fmt.n_packets
    link.receive(link.frame_packets(1))
    assert link.commits == [1]
    staged_after_first = link.staged_batches
    assert staged_after_first >= 1  # the stream starts idle: the first batch is staged

    # the _stage copy must not run on the fast path
    def no_staging(addresses):
        raise AssertionError("in-order packets were staged")

    link.placer._stage = no_staging
    link.receive([p for f in (2, 3, 4) for p in link.frame_packets(f)])
    assert link.commits == [1, 2, 3, 4]
    assert link.staged_batches == staged_after_first
    for frame in (1, 2, 3, 4):
        link.check_frame(frame)
    assert link.stats() == dict(frames=4, incomplete_frames=0, packets=4 * n, lost_packets=0,
                                duplicate_packets=0, late_packets=0, invalid_packets=0,
                                stray_packets=0, resyncs=0)
    # the other module's records are untouched
    other = 1 - link.module_id
    assert all(int(link.buffer.module_frame(f, other)["id"]) == int(INVALID_ID)
               for f in range(1, 5))


@detectors
@pytest.mark.parametrize("batch", [1, 2, 5, 128])
def test_in_order_frames_any_batch_size(make_link, config, batch):
    """Batches that straddle frame boundaries still commit each frame once, in order."""
    link = make_link(config, batch=batch)
    link.receive([p for f in range(10, 15) for p in link.frame_packets(f)])
    assert link.commits == list(range(10, 15))
    for frame in range(10, 15):
        link.check_frame(frame)
    assert link.stats()["frames"] == 5
    assert link.stats()["lost_packets"] == 0


@detectors
def test_whole_frame_batches_take_the_table_path(make_link, config, monkeypatch):
    """Once running, a batch that is exactly the next frame is booked without the
    general in-order or staged paths, and lands where the general path would put it."""
    link = make_link(config, batch=link_packets(config))
    general = []
    for name in ("_accept_in_order", "_accept_staged"):
        method = getattr(link.placer, name)
        monkeypatch.setattr(link.placer, name,
                            lambda *a, method=method, name=name: (general.append(name),
                                                                  method(*a))[1])
    link.receive([p for f in range(20, 26) for p in link.frame_packets(f)])
    assert link.commits == list(range(20, 26))
    for frame in range(20, 26):
        link.check_frame(frame)
    assert general == ["_accept_staged"]  # only the first frame, from idle
    # and a wrong packet in a whole-frame batch falls back to the general path
    packets = link.frame_packets(26)
    packets[-2], packets[-1] = packets[-1], packets[-2]
    link.receive(packets)
    assert general[1:] and link.commits[-1] == 26
    link.check_frame(26)


def link_packets(config) -> int:
    return module_format(config.detector_type, config.bit_depth, config.image_shape).n_packets


@detectors
@pytest.mark.parametrize("lost", ["first", "middle", "last"])
def test_lost_packet(make_link, config, lost):
    link = make_link(config)
    n = link.fmt.n_packets
    missing = {"first": 0, "middle": n // 2, "last": n - 1}[lost]
    link.receive(link.frame_packets(1))
    link.receive(link.frame_packets(2, [p for p in range(n) if p != missing]))
    assert link.commits == [1]  # frame 2 still waits for its packet
    link.receive(link.frame_packets(3, [0]))
    assert link.commits == [1, 2]  # committed when frame 3 started
    link.check_frame(2, missing=[missing])
    link.receive(link.frame_packets(3, range(1, n)))
    assert link.commits == [1, 2, 3]
    link.check_frame(3)
    stats = link.stats()
    assert stats["lost_packets"] == 1
    assert stats["incomplete_frames"] == 1
    assert stats["frames"] == 3


@detectors
def test_lost_frames_and_packets_in_one_batch(make_link, config):
    """A whole frame lost and packets of the next frame lost, all within batches."""
    link = make_link(config, batch=128)
    n = link.fmt.n_packets
    stream = link.frame_packets(1) + link.frame_packets(3, range(1, n)) + link.frame_packets(4)
    link.receive(stream)
    assert link.commits == [1, 3, 4]
    link.check_frame(1)
    link.check_frame(3, missing=[0])
    link.check_frame(4)
    assert link.stats()["lost_packets"] == 1  # a wholly lost frame is sync's business


@detectors
def test_reordered_packets(make_link, config):
    link = make_link(config, batch=7)
    n = link.fmt.n_packets
    rng = np.random.default_rng(1)
    link.receive(link.frame_packets(1))
    order = rng.permutation(n)
    link.receive(link.frame_packets(2, order))
    assert link.commits == [1, 2]  # complete: committed without waiting for frame 3
    link.receive(link.frame_packets(3, order[::-1]))
    assert link.commits == [1, 2, 3]
    for frame in (1, 2, 3):
        link.check_frame(frame)
    stats = link.stats()
    assert stats["lost_packets"] == stats["duplicate_packets"] == stats["late_packets"] == 0


@detectors
def test_duplicated_packets(make_link, config):
    link = make_link(config, batch=4)
    n = link.fmt.n_packets
    # packet 0 twice in a row, packet 1 three times, the middle one again after others
    order = [0, 0, 1, *range(1, n - 1), n // 2, 1, n - 1]
    assert len(order) - n == 4
    link.receive(link.frame_packets(5, order))
    assert link.commits == [5]
    link.check_frame(5)
    stats = link.stats()
    assert stats["duplicate_packets"] == 4
    assert stats["packets"] == len(order)
    assert stats["lost_packets"] == 0


@detectors
def test_late_packet_of_committed_frame(make_link, config):
    link = make_link(config, batch=3)
    n = link.fmt.n_packets
    link.receive(link.frame_packets(1))
    link.receive(link.frame_packets(2, [p for p in range(n) if p != 1]))
    link.receive(link.frame_packets(3, range(n - 1)))  # commits 2 without packet 1
    assert link.commits == [1, 2]
    frame2_before = link.buffer.frame(2, link.module_id).copy()
    # packet 1 of frame 2 and a repeat of frame 1 arrive late, while frame 3 is open
    link.receive([link.packet(2, 1), link.packet(1, 0), *link.frame_packets(3, [n - 1])])
    assert link.commits == [1, 2, 3]
    assert link.stats()["late_packets"] == 2
    np.testing.assert_array_equal(link.buffer.frame(2, link.module_id), frame2_before)
    link.check_frame(1)
    link.check_frame(2, missing=[1])
    link.check_frame(3)
    # late again after frame 3 completed (no frame open)
    link.receive([link.packet(3, 0)])
    assert link.stats()["late_packets"] == 3
    link.check_frame(3)
    assert link.commits == [1, 2, 3]


@detectors
def test_invalid_packets(make_link, config):
    link = make_link(config, batch=4)
    fmt = link.fmt
    n = fmt.n_packets
    header, payload, _ = link.packet(1, 0)
    bad_number = link.header(1, 0)
    if fmt.detector_type == "gigafrost":
        bad_number["packet_starting_row"] = n * fmt.rows_per_packet
    else:
        bad_number["packetnum"] = n
    packets = [
        (header, payload[:100], 0),  # too short
        (header, payload + b"\x00" * 8, 0),  # too long: truncated by the iovec
        (header, payload, MSG_TRUNC),  # the kernel says truncated
        (bad_number, payload, 0),  # packet number out of the frame
        *link.frame_packets(1, range(1, n)),
    ]
    link.receive(packets)
    assert link.stats()["invalid_packets"] == 4
    assert link.commits == []
    link.placer.flush()
    assert link.commits == [1]
    link.check_frame(1, missing=[0])


def test_gigafrost_payload_check_uses_last_payload_bytes(make_link):
    link = make_link(GIGAFROST, batch=2)
    fmt = link.fmt
    n = fmt.n_packets
    full = link.payload(1, 0)  # payload_bytes long
    last_header = link.header(1, n - 1)
    middle_header = link.header(1, 1)
    link.receive([
        link.packet(1, 0),
        (middle_header, full[: fmt.last_payload_bytes], 0),  # a middle packet that is short
        (last_header, full, 0),  # a last packet of full size
    ])
    assert link.stats()["invalid_packets"] == 2
    link.receive([link.packet(1, 1), link.packet(1, n - 1)])  # the right sizes
    assert link.commits == [1]
    link.check_frame(1)
    record = link.committed[1][0]
    assert int(record["n_recv_packets"]) == n


@detectors
def test_flush_commits_incomplete_frame(make_link, config):
    link = make_link(config, batch=2)
    n = link.fmt.n_packets
    received = list(range(0, n, 2))
    link.receive(link.frame_packets(7, received))
    assert link.commits == []
    assert int(link.buffer.module_frame(7, link.module_id)["id"]) == int(INVALID_ID)
    link.placer.flush()
    assert link.commits == [7]
    missing = [p for p in range(n) if p not in received]
    link.check_frame(7, missing=missing)
    assert link.stats()["lost_packets"] == len(missing)
    assert link.stats()["incomplete_frames"] == 1
    link.placer.flush()  # nothing open: nothing committed again
    assert link.commits == [7]


@detectors
def test_frame_ids_restart_after_flush(make_link, config):
    link = make_link(config, n_slots=16)
    link.receive(link.frame_packets(10) + link.frame_packets(11))
    link.placer.flush()
    link.receive(link.frame_packets(1) + link.frame_packets(2))
    assert link.commits == [10, 11, 1, 2]
    for frame in (10, 11, 1, 2):
        link.check_frame(frame)
    assert link.stats()["late_packets"] == 0


@detectors
def test_frame_ids_going_back_without_pause_are_late(make_link, config):
    link = make_link(config)
    n = link.fmt.n_packets
    link.receive(link.frame_packets(10) + link.frame_packets(11))
    link.receive(link.frame_packets(1))
    assert link.commits == [10, 11]
    assert link.stats()["late_packets"] == n
    link.check_frame(10)
    link.check_frame(11)


@detectors
def test_first_packet_of_stream_may_be_any_frame(make_link, config):
    """The receiver started mid-frame: the stream begins at the first packet, whatever its
    frame id, once a few packets agree on it (a lone packet is no stream: see below)."""
    link = make_link(config)
    n = link.fmt.n_packets
    skipped = range(min(3, n - 1))
    link.receive(link.frame_packets(123456, range(len(skipped), n))  # started mid-frame
                 + link.frame_packets(123457))
    link.placer.flush()
    assert link.commits == [123456, 123457]
    link.check_frame(123456, missing=skipped)
    link.check_frame(123457)
    assert link.stats()["stray_packets"] == 0 and link.stats()["resyncs"] == 0


@detectors
def test_a_lone_packet_does_not_start_the_stream(make_link, config):
    link = make_link(config)
    link.receive([link.packet(1_000_000, 0)])
    link.placer.flush()
    assert link.commits == []
    assert link.stats()["stray_packets"] == 1
    link.receive(link.frame_packets(7))
    assert link.commits == [7]
    link.check_frame(7)
    assert link.stats()["stray_packets"] == 1 and link.stats()["resyncs"] == 0


def test_slot_marked_invalid_before_rewrite(make_link):
    """A slot that held an older frame is marked INVALID_ID before its bytes change, and
    gets its new id only when the new frame is committed."""
    link = make_link(JUNGFRAU, n_slots=4, batch=16)
    n = link.fmt.n_packets
    link.receive(link.frame_packets(1))
    assert int(link.buffer.module_frame(1, link.module_id)["id"]) == 1
    # frame 5 uses frame 1's slot
    link.receive(link.frame_packets(5, range(n // 2)))
    assert int(link.buffer.module_frame(5, link.module_id)["id"]) == int(INVALID_ID)
    link.receive(link.frame_packets(5, range(n // 2, n)))
    assert int(link.buffer.module_frame(5, link.module_id)["id"]) == 5
    link.check_frame(5)


def test_module_frame_record_layout(make_link):
    link = make_link(JUNGFRAU, module_id=0)
    link.receive(link.frame_packets(3))
    raw = link.buffer.module_frame(3, 0).tobytes()
    assert len(raw) == MODULE_FRAME.itemsize
    values = np.frombuffer(raw, "<u8")
    # id, pulse_id, frame_index, daq_rec, n_recv_packets, module_id, pos_y, pos_x
    assert values.tolist() == [3, 1030, 3, 3, 128, 0, 0, 0]


@detectors
def test_straggler_after_flush_does_not_reopen_the_committed_frame(make_link, config):
    from fastcore.udp_recv import RESTART_AFTER_QUIET_FLUSHES

    link = make_link(config)
    n = link.fmt.n_packets
    link.receive(link.frame_packets(5))
    link.placer.flush()
    link.receive(link.frame_packets(5, [n - 1]))  # a duplicate arriving after the timeout
    link.placer.flush()
    assert link.commits == [5]
    assert link.stats()["late_packets"] == 1
    link.check_frame(5)
    assert int(link.committed[5][0]["n_recv_packets"]) == n
    for _ in range(RESTART_AFTER_QUIET_FLUSHES):  # a long pause: a new acquisition
        link.placer.flush()
    link.receive(link.frame_packets(5))
    assert link.commits == [5, 5]
    link.check_frame(5)


def test_batch_size_stops_at_the_end_of_the_frame(make_link):
    """The receiver waits for whole batches, so a batch never asks past the open frame."""
    link = make_link(JUNGFRAU, batch=128)
    placer = link.placer
    assert placer.batch_size(128) == 128  # idle: a whole frame
    link.receive(link.frame_packets(3, range(50)), batch=50)
    assert placer.is_open and placer.batch_size(128) == 78 and placer.batch_size(16) == 16
    link.receive(link.frame_packets(3, range(50, 128)), batch=78)
    assert link.commits == [3]
    assert placer.batch_size(128) == 128  # committed: the next frame, whole


def test_dormant_after_a_long_quiet_until_a_packet_comes(make_link):
    """The receiver lengthens its receive timeout only while the placer is dormant:
    quiet for RESTART_AFTER_QUIET_FLUSHES timeouts, nothing open, nothing held."""
    from fastcore.udp_recv import RESTART_AFTER_QUIET_FLUSHES

    link = make_link(JUNGFRAU)
    placer = link.placer
    link.receive(link.frame_packets(4, range(60)))  # an open frame
    assert not placer.dormant
    for _ in range(RESTART_AFTER_QUIET_FLUSHES - 1):
        placer.flush()
    assert link.commits == [4] and not placer.dormant  # committed at the first flush
    placer.flush()
    assert placer.dormant
    link.receive([link.packet(900, 0)])  # a stray packet: held, so not dormant
    assert not placer.dormant and link.commits == [4]
    link.receive(link.frame_packets(5))  # the stream resumes where it was
    assert link.commits == [4, 5] and not placer.dormant
    link.check_frame(5)
