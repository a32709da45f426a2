"""Buffer replication (stream_send -> TCP on 127.0.0.1 -> stream_recv) and live preview."""

from __future__ import annotations

import time

import h5py
import numpy as np
import zmq

from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import load_config
from fastcore.names import Segment
from fastcore.preview import parse_preview_message
from fastcore.simulator import DetectorSimulator
from fastcore.writer_protocol import RunInfo, RunSummary, StartCommand, WriterFailure
from services.writer_link import WriterLink
from tests.conftest import Proc, free_tcp_port, module_cmd
from tests.pipeline import Pipeline, expected_image


def start(module: str, config_path, ipc_dir: str, log_dir, *extra: str) -> Proc:
    proc = Proc(module_cmd(module, str(config_path), "--ipc-dir", ipc_dir, *extra),
                log_dir / f"{module.split('.')[-1]}-{config_path.stem}.log")
    proc.wait_for("ready")
    return proc


def write_file(ipc_dir: str, name: str, first_id: int, n: int, out: str) -> RunSummary:
    """Play the writer agent: have the writer of ``name`` write images ``first_id`` on
    (already in its buffer) to ``out``; its stop event."""
    link = WriterLink(ipc_dir, name)
    try:
        link.send(StartCommand(1, RunInfo(out, n), 30.0, first_id).to_json())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            event = link.receive(0.1)
            if isinstance(event, WriterFailure):
                raise AssertionError(f"the writer refused the run: {event.message}")
            if isinstance(event, RunSummary):
                return event
        raise AssertionError("no stop from the writer")
    finally:
        link.close()


def test_replicated_buffer_writes_an_identical_file(make_config, ipc_dir, tmp_path):
    path_a, raw_a = make_config("jungfrau_1m.json")
    path_b, raw_b = make_config(raw_a, detector_name=raw_a["detector_name"] + "b")
    config = load_config(path_a)
    port = free_tcp_port()
    n = 8
    procs = []
    with Pipeline(path_a, raw_a, ipc_dir, tmp_path) as pipeline:
        try:
            procs.append(start("fastcore.stream_recv", path_b, ipc_dir, tmp_path,
                               "--address", f"tcp://127.0.0.1:{port}"))
            procs.append(start("fastcore.stream_send", path_a, ipc_dir, tmp_path,
                               "--address", f"tcp://127.0.0.1:{port}"))
            procs.append(start("fastcore.h5_writer", path_a, ipc_dir, tmp_path))
            procs.append(start("fastcore.h5_writer", path_b, ipc_dir, tmp_path))
            sub_a = pipeline.subscribe()
            sub_b = Pipeline(path_b, raw_b, ipc_dir, tmp_path).subscribe()
            DetectorSimulator(config).run(n, 30)
            records_a = pipeline.collect(sub_a, n)
            records_b = pipeline.collect(sub_b, n)
            assert [r.tobytes() for r in records_b] == [r.tobytes() for r in records_a]
            file_a, file_b = str(tmp_path / "a.h5"), str(tmp_path / "b.h5")
            first_id = int(records_a[0]["id"])
            assert write_file(ipc_dir, raw_a["detector_name"], first_id, n,
                              file_a).outcome == "success"
            assert write_file(ipc_dir, raw_b["detector_name"], first_id, n,
                              file_b).outcome == "success"
        finally:
            for proc in reversed(procs):
                assert proc.stop() == 0, proc.output
    with h5py.File(file_a, "r") as fa, h5py.File(file_b, "r") as fb:
        data_a, data_b = fa[raw_a["detector_name"]]["data"], fb[raw_b["detector_name"]]["data"]
        assert data_b.shape == (n, *config.image_shape)
        for i in range(n):
            np.testing.assert_array_equal(data_b[i], data_a[i])
            np.testing.assert_array_equal(data_b[i], expected_image(raw_a, i + 1, data_b.dtype))
        for name in ("image_id", "status", "pulse_id", "daq_rec"):
            assert list(fb[raw_b["detector_name"]][name]) == list(fa[raw_a["detector_name"]][name])


def test_slow_link_drops_whole_images_never_torn(make_config, ipc_dir, tmp_path):
    """No receiver yet: stream_send queues two images, drops and counts the rest; a
    receiver started later gets exactly the queued images, intact."""
    path_a, raw_a = make_config("jungfrau_1m.json")
    path_b, raw_b = make_config(raw_a, detector_name=raw_a["detector_name"] + "b")
    config = load_config(path_a)
    port = free_tcp_port()
    n = 10
    with Pipeline(path_a, raw_a, ipc_dir, tmp_path) as pipeline:
        sender = start("fastcore.stream_send", path_a, ipc_dir, tmp_path,
                       "--address", f"tcp://127.0.0.1:{port}", "--queue", "2")
        receiver = None
        try:
            sub = pipeline.subscribe()
            DetectorSimulator(config).run(n, 30)
            assert len(pipeline.collect(sub, n)) == n
            time.sleep(0.5)
            receiver = Proc(module_cmd("fastcore.stream_recv", str(path_b), "--ipc-dir",
                                       ipc_dir, "--address", f"tcp://127.0.0.1:{port}"),
                            tmp_path / "recv.log")
            receiver.wait_for("ready")
            sub_b = Pipeline(path_b, raw_b, ipc_dir, tmp_path).subscribe()
            # the queued images arrive once the link is up (they may precede the SUB)
            deadline = time.monotonic() + 10
            images = ImageBuffer.attach(shm_name(raw_b["detector_name"], Segment.IMAGE))
            try:
                got = []
                while time.monotonic() < deadline and len(got) < 2:
                    got = [i for i in range(1, n + 1) if images.holds(i)]
                    time.sleep(0.1)
                assert 1 <= len(got) <= 2, got
                for image_id in got:
                    np.testing.assert_array_equal(images.read(image_id)[1], expected_image(
                        raw_a, image_id, images.dtype))
            finally:
                images.close()
                sub_b.close(0)
        finally:
            assert sender.stop() == 0
            if receiver is not None:
                assert receiver.stop() == 0
    stats = sender.output.splitlines()
    final = [line for line in stats if "stopped: SendStats" in line][-1]
    sent = int(final.split("images=")[1].split(",")[0])
    dropped = int(final.split("dropped_slow_link=")[1].split(",")[0])
    assert sent + dropped == n and dropped >= n - 3, final


def test_preview_is_rate_limited_and_whole(make_config, ipc_dir, tmp_path):
    path, raw = make_config("jungfrau_1m.json")
    config = load_config(path)
    port = free_tcp_port()
    with Pipeline(path, raw, ipc_dir, tmp_path):
        preview = start("fastcore.preview", path, ipc_dir, tmp_path,
                        "--address", f"tcp://127.0.0.1:{port}", "--rate", "4")
        try:
            viewer = zmq.Context.instance().socket(zmq.SUB)
            viewer.setsockopt(zmq.SUBSCRIBE, b"")
            viewer.connect(f"tcp://127.0.0.1:{port}")
            time.sleep(0.3)
            began = time.monotonic()
            DetectorSimulator(config).run(60, 30)  # 2 s of images at 30 Hz
            elapsed = time.monotonic() - began
            previews = []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if viewer.poll(100):
                    previews.append(parse_preview_message(viewer.recv_multipart()))
            viewer.close(0)
        finally:
            assert preview.stop() == 0
    assert 3 <= len(previews) <= 4 * (elapsed + 1) + 1, len(previews)
    frames = [h["frame"] for h, _ in previews]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)
    assert frames[-1] == 60, "the newest image is previewed when the stream stops"
    for header, image in previews:
        assert set(header) == {"type", "shape", "frame", "status"}  # std-daq's live stream
        assert header["type"] == "uint16" and header["shape"] == list(config.image_shape)
        assert image.dtype == np.uint16 and image.shape == config.image_shape
        np.testing.assert_array_equal(image, expected_image(raw, header["frame"], np.uint16))
