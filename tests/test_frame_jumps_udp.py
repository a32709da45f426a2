"""Frame ids that jump or restart, end to end on loopback: simulator -> stddaq-udp-recv ->
stddaq-sync -> stddaq-assembler (real processes, real UDP on 127.0.0.1)."""

from __future__ import annotations

import re
import socket

import numpy as np

from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import load_config
from fastcore.formats import ImageStatus
from fastcore.names import Segment
from fastcore.simulator import DetectorSimulator
from tests.pipeline import Pipeline, expected_image

RATE = 50.0  # frames per second


def send_forged(config, module: int, frame: int, packet: int) -> None:
    """One packet of module ``module`` claiming frame number ``frame`` (a full-size packet
    with the headers and payload the simulator sends for frame 1)."""
    simulator = DetectorSimulator(config)
    headers, data = simulator.module_frame(1, module)
    header = headers[packet].copy()
    header["framenum"] = frame
    size = simulator.fmt.payload_bytes
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(header.tobytes() + data[packet * size : (packet + 1) * size].tobytes(),
                    ("127.0.0.1", config.udp_port(module)))


def stats_at_stop(log: str, module: int) -> dict[str, int]:
    """The ReceiverStats a module's receiver logged when it stopped."""
    match = re.search(rf"module {module} stopped: ReceiverStats\((.*?)\)", log)
    assert match, log
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


def test_a_forged_packet_far_ahead_skips_no_frame(make_config, ipc_dir, tmp_path):
    """Frames 1-10, then two forged packets for module 0 (frame 10+200 and 10+2**62), then
    frames 11-20: every image is whole and good, and module 0's receiver reports both
    strays (today's receiver followed the first one and dropped frames 11-20 of module 0)."""
    path, raw = make_config("jungfrau_1m.json")
    config = load_config(path)
    with Pipeline(path, raw, ipc_dir, tmp_path) as pipeline:
        sub = pipeline.subscribe()
        assert DetectorSimulator(config).run(10, RATE) == 10
        send_forged(config, 0, 10 + 200, 5)
        send_forged(config, 0, 10 + 2**62, 7)
        assert DetectorSimulator(config).run(10, RATE, start_frame=11) == 10
        records = pipeline.collect(sub, 20, timeout=60.0)
        assert [int(r["id"]) for r in records] == list(range(1, 21)), pipeline.recv.output
        assert [int(r["status"]) for r in records] == [ImageStatus.GOOD] * 20
        images = ImageBuffer.attach(shm_name(config.detector_name, Segment.IMAGE))
        try:
            for frame in (10, 11, 20):
                _, image = images.read(frame)
                np.testing.assert_array_equal(
                    image, expected_image(raw, frame, config.image_dtype), f"frame {frame}")
        finally:
            images.close()
    log = pipeline.recv.output
    stats = stats_at_stop(log, 0)
    assert stats["stray_packets"] == 2 and stats["resyncs"] == 0
    assert stats["frames"] == 20 and stats["lost_packets"] == stats["late_packets"] == 0
    assert "dropped a stray packet of frame 210 (current frame 10" in log
    assert stats_at_stop(log, 1)["stray_packets"] == 0


def test_frame_ids_restarting_at_1_are_followed_without_a_pause(make_config, ipc_dir,
                                                                tmp_path):
    """A re-armed detector: frames 1-10, then at once frames 1-10 again. The receivers
    re-synchronise and sync starts a new acquisition: 20 good images (today both
    stalled: the second acquisition was dropped as late)."""
    path, raw = make_config("jungfrau_1m.json")
    config = load_config(path)
    with Pipeline(path, raw, ipc_dir, tmp_path) as pipeline:
        sub = pipeline.subscribe()
        # 20 Hz: sync restarts 3 frames (150 ms) after the reset, time enough for the
        # other module's last old frame to come in even on a busy machine
        assert DetectorSimulator(config).run(10, 20.0) == 10
        assert DetectorSimulator(config).run(10, 20.0) == 10
        records = pipeline.collect(sub, 20, timeout=60.0)
        assert [int(r["id"]) for r in records] == [*range(1, 11), *range(1, 11)], (
            pipeline.recv.output + pipeline.sync.output)
        assert [int(r["status"]) for r in records] == [ImageStatus.GOOD] * 20
    for module in (0, 1):
        stats = stats_at_stop(pipeline.recv.output, module)
        assert stats["frames"] == 20 and stats["lost_packets"] == 0, stats
        assert stats["late_packets"] == stats["stray_packets"] == 0, stats
        assert stats["resyncs"] == 1, stats
    assert "new acquisition" in pipeline.sync.output
