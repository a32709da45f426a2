"""Faults on the real data plane while a write request runs: the request always ends, with
a message that names the cause, and the file holds what was reported."""

from __future__ import annotations

import os
import re
import threading
import time

import h5py
import pytest

from fastcore.buffers import shm_name
from fastcore.config import load_config
from fastcore.names import Segment
from fastcore.simulator import DetectorSimulator
from services.writer_agent import WriterAgent
from services.writer_link import WriterError
from tests.conftest import Proc, module_cmd, shm_files
from tests.pipeline import Pipeline

pytestmark = pytest.mark.timeout(120)


def test_receiver_killed_mid_write_ends_the_request_after_the_image_timeout(
        make_config, ipc_dir, tmp_path):
    path, raw = make_config("jungfrau_1m.json")
    config = load_config(path)
    out = tmp_path / "cut.h5"
    progress: list[dict] = []
    agent = WriterAgent(config, ipc_dir, image_timeout_s=3.0, progress=progress.append)
    simulator = DetectorSimulator(config)
    with Pipeline(path, raw, ipc_dir, tmp_path) as pipeline:
        writer = Proc(module_cmd("fastcore.h5_writer", str(path), "--ipc-dir", ipc_dir),
                      tmp_path / "writer.log")
        sending = threading.Thread(target=simulator.run, args=(0, 50), daemon=True)
        outcome: dict = {}
        try:
            writer.wait_for("ready")
            agent.before_start("r1", {"output_file": str(out), "n_images": 1000})
            sending.start()

            def request() -> None:
                try:
                    outcome["result"] = agent.on_request("r1", {})
                except WriterError as exc:
                    outcome["error"] = str(exc)

            worker = threading.Thread(target=request)
            worker.start()
            deadline = time.monotonic() + 30
            while not (progress and progress[-1]["n_rows"] >= 20):
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.05)
            pipeline.recv.popen.kill()  # kill -9: no more frames, the detector keeps sending
            killed_at = time.monotonic()
            worker.join(30)
            ended_after = time.monotonic() - killed_at
        finally:
            simulator.stop_event.set()
            if sending.is_alive():
                sending.join(10)
            assert writer.stop() == 0, writer.output
            agent.close()
            codes = pipeline.stop()
        assert codes[-1] == -9 and codes[:-1] == [0, 0], codes  # assembler, sync, udp-recv
    # kill -9 left the receiver's FrameBuffer (a new receiver replaces it: test_cli_errors)
    assert shm_files(config.detector_name) == [
        f"/dev/shm/{shm_name(config.detector_name, Segment.FRAMES)}"]
    os.unlink(shm_files(config.detector_name)[0])
    assert not worker.is_alive(), "the request hangs"
    # the image timeout (3 s) runs from the last image, which reached the writer up to a
    # progress interval before the kill
    assert 2.7 <= ended_after < 8.0, ended_after
    error = outcome["error"]
    assert error.startswith(f"no image from detector {config.detector_name} for 3 s: is the "
                            "detector (or simulator) running?; "), error
    with h5py.File(out, "r") as f:  # plain open: closed valid, with what was reported
        rows = f[config.detector_name]["data"].shape[0]
    assert rows == progress[-1]["n_rows"] >= 20 and progress[-1]["done"]
    found = re.search(rf"; {rows} of 1000 images in {re.escape(str(out))} \((\d+) good", error)
    assert found and int(found[1]) >= rows - 2, error  # frames cut by the kill may be flagged
