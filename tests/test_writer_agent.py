"""WriterAgent request handling against a real stddaq-h5-writer process.

The test plays the assembler (an ImageBuffer and its ImageMetadata PUB socket); the
broker side is tested in test_writer_agent_service.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import zmq

from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import load_config
from fastcore.formats import IMAGE_METADATA, dtype_code
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address
from fastcore.writer_protocol import (
    Heartbeat,
    ProtocolError,
    RunProgress,
    RunStarted,
    RunSummary,
    WriterFailure,
    decode_event,
)
from services.writer_agent import RequestError, WriterAgent, validate_write_request
from services.writer_link import BusyError, WriterError, WriterLink
from tests.conftest import REPO, Proc, module_cmd


class FakeAssembler:
    """Produces images (every pixel = id) and publishes their ImageMetadata."""

    def __init__(self, config, ipc_dir, n_slots=32):
        self.images = ImageBuffer.create(shm_name(config.detector_name, Segment.IMAGE), n_slots,
                                         config.image_shape, config.image_dtype)
        self.pub = zmq.Context.instance().socket(zmq.PUB)
        self.pub.bind(ipc_address(ipc_dir, config.detector_name, Stream.IMAGE))

    def emit(self, image_id: int) -> None:
        self.images.begin_write(image_id)[:] = image_id % 60000
        meta = np.zeros((), IMAGE_METADATA)
        meta["id"], meta["height"], meta["width"] = image_id, *self.images.shape
        meta["dtype"] = dtype_code(self.images.dtype)
        self.images.commit(meta)
        self.pub.send(meta.tobytes())

    def close(self) -> None:
        self.pub.close(0)
        self.images.close()


@pytest.fixture
def setup(make_config, ipc_dir, tmp_path):
    path, _ = make_config("jungfrau_1m.json", output_root=str(tmp_path))
    config = load_config(path)
    assembler = FakeAssembler(config, ipc_dir)
    writer = Proc(module_cmd("fastcore.h5_writer", str(path), "--ipc-dir", ipc_dir),
                  tmp_path / "writer.log")
    writer.wait_for("ready")
    progress = []
    agent = WriterAgent(config, ipc_dir, image_timeout_s=3, writer_timeout_s=2,
                        progress=progress.append)
    yield config, assembler, agent, progress
    agent.close()
    assembler.close()
    assert writer.stop() == 0


def run_in_thread(agent, request_id, request):
    outcome = {}

    def target():
        try:
            outcome["result"] = agent.on_request(request_id, request)
        except Exception as exc:  # the test inspects it
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    time.sleep(0.4)  # on_request has the writer open the file (before_start) before images come
    return thread, outcome


def test_request_writes_the_next_n_images(setup, tmp_path):
    config, assembler, agent, progress = setup
    assembler.emit(1)  # before the request: not part of it
    out = str(tmp_path / "run.h5")
    thread, outcome = run_in_thread(agent, "r1", {"output_file": out, "n_images": 5,
                                                  "metadata": {"sample": "Si"}})
    for image_id in range(10, 18):
        assembler.emit(image_id)
        time.sleep(0.02)
    thread.join(15)
    result = outcome["result"]
    assert result["output_file"] == out and result["n_images"] == 5
    assert result["n_missing"] == 0 and result["killed"] is False
    assert result["outcome"] == "success" and result["n_good"] == 5
    assert progress[-1] | {"request_id": "r1", "n_written": 5, "done": True} == progress[-1]
    assert progress[-1]["output_file"] == out and progress[-1]["n_images"] == 5
    written = [p["n_written"] for p in progress]
    assert written == sorted(written) and written[0] == 0 and written[-1] == 5
    with h5py.File(out, "r") as f:
        assert list(f[config.detector_name]["image_id"]) == [10, 11, 12, 13, 14]
        assert f[config.detector_name]["data"][3].max() == 13
    assert agent.counters["succeeded"] == 1 and agent.counters["images_written"] == 5


def test_start_image_id_takes_buffered_images_first(setup, tmp_path):
    config, assembler, agent, _ = setup
    for image_id in range(20, 25):
        assembler.emit(image_id)
    out = str(tmp_path / "range.h5")
    thread, outcome = run_in_thread(agent, "r2", {"output_file": out, "n_images": 6,
                                                  "start_image_id": 22})
    for image_id in range(25, 30):
        assembler.emit(image_id)
    thread.join(15)
    assert outcome["result"]["n_images"] == 6
    assert outcome["result"]["outcome"] == "success"
    with h5py.File(out, "r") as f:
        assert list(f[config.detector_name]["image_id"]) == [22, 23, 24, 25, 26, 27]


def test_kill_ends_the_run_with_a_valid_shorter_file(setup, tmp_path):
    config, assembler, agent, _ = setup
    out = str(tmp_path / "killed.h5")
    thread, outcome = run_in_thread(agent, "r3", {"output_file": out, "n_images": 100})
    for image_id in range(1, 4):
        assembler.emit(image_id)
        time.sleep(0.02)
    time.sleep(0.2)
    agent.on_kill("another-request")  # not ours: ignored
    assembler.emit(4)
    time.sleep(0.2)
    killed_at = time.monotonic()
    agent.on_kill("r3")
    thread.join(15)
    assert time.monotonic() - killed_at < 2.0, "a kill ends the request within 2 s"
    result = outcome["result"]
    assert result["killed"] is True and result["n_images"] == 4
    assert result["outcome"] == "partial"
    with h5py.File(out, "r") as f:
        assert f[config.detector_name]["data"].shape[0] == 4


def test_second_request_while_busy_is_refused(setup, tmp_path):
    _, assembler, agent, _ = setup
    thread, outcome = run_in_thread(agent, "r4", {"output_file": str(tmp_path / "a.h5"),
                                                  "n_images": 2})
    with pytest.raises(BusyError, match=r"busy writing request r4 to .*a\.h5"):
        agent.on_request("r5", {"output_file": str(tmp_path / "b.h5"), "n_images": 1})
    assembler.emit(1)
    assembler.emit(2)
    thread.join(15)
    assert outcome["result"]["n_images"] == 2


def test_writer_error_fails_the_request_with_its_message(setup, tmp_path):
    _, assembler, agent, _ = setup
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"precious")
    thread, outcome = run_in_thread(agent, "r6", {"output_file": str(existing),
                                                  "n_images": 3})
    assembler.emit(1)
    thread.join(15)
    assert isinstance(outcome["error"], WriterError)
    assert f"cannot write {existing}: the file exists" in str(outcome["error"])
    assert existing.read_bytes() == b"precious"


def test_no_images_times_out_clearly(setup, tmp_path):
    config, _, agent, _ = setup
    out = tmp_path / "t.h5"
    thread, outcome = run_in_thread(agent, "r7", {"output_file": str(out), "n_images": 3})
    thread.join(15)
    assert str(outcome["error"]) == (
        f"no image from detector {config.detector_name} for 3 s: is the detector (or "
        f"simulator) running?; 0 of 3 images in {out} (0 good)")
    with h5py.File(out, "r") as f:  # the file is valid, with what was written
        assert f[config.detector_name]["data"].shape[0] == 0


def test_a_request_image_timeout_overrides_the_default(setup, tmp_path):
    _, assembler, agent, _ = setup
    out = tmp_path / "short.h5"
    started = time.monotonic()
    thread, outcome = run_in_thread(agent, "r7b", {"output_file": str(out), "n_images": 3,
                                                   "image_timeout": 1})
    assembler.emit(1)
    thread.join(15)
    assert time.monotonic() - started < 3.0
    assert "for 1 s: is the detector" in str(outcome["error"])
    assert f"1 of 3 images in {out}" in str(outcome["error"])


def test_a_pause_longer_than_the_writer_timeout_completes(setup, tmp_path):
    """A detector pause (motor move, re-arm) shorter than the image timeout is normal."""
    _, assembler, agent, _ = setup
    agent.image_timeout_s = 30
    out = str(tmp_path / "pause.h5")
    thread, outcome = run_in_thread(agent, "r9", {"output_file": out, "n_images": 4})
    assembler.emit(1)
    assembler.emit(2)
    time.sleep(3 * agent.writer_timeout_s)  # no image, no writer event but its heartbeat
    assert thread.is_alive()
    assembler.emit(3)
    assembler.emit(4)
    thread.join(15)
    assert outcome["result"]["outcome"] == "success", outcome


def test_lost_images_make_a_partial_result(setup, tmp_path):
    _, assembler, agent, _ = setup
    out = str(tmp_path / "gaps.h5")
    thread, outcome = run_in_thread(agent, "r10", {"output_file": out, "n_images": 4})
    for image_id in (1, 2, 6, 7):
        assembler.emit(image_id)
    thread.join(15)
    result = outcome["result"]
    assert (result["outcome"], result["n_absent"], result["absent_ranges"]) == (
        "partial", 3, [[3, 5]])
    assert result["summary"] == f"4 of 4 images in {out} (4 good, 3 ids never arrived (3-5))"
    assert agent.counters["partial"] == 1


@pytest.mark.parametrize("request_, message", [
    ([], "request: expected a JSON object"),
    ({"n_images": 1}, "output_file: missing"),
    ({"output_file": "rel/x.h5", "n_images": 1}, "output_file: expected an absolute"),
    ({"output_file": "/data/../etc/x.h5", "n_images": 1}, "'..' is not allowed"),
    ({"output_file": "/elsewhere/x.h5", "n_images": 1}, "is outside the output root"),
    ({"output_file": "{root}/x.h5"}, "n_images: missing"),
    ({"output_file": "{root}/x.h5", "n_images": None}, "n_images: missing"),
    ({"output_file": "{root}/x.h5", "n_images": 10**12}, "n_images: 1e.12 is too large"),
    ({"output_file": "{root}/x.h5", "n_images": 2**70}, "n_images: .* is too large"),
    ({"output_file": "{root}/x.h5", "n_images": 1, "run_id": 2**64 + 1}, "run_id: .* too"),
    ({"output_file": "{root}/x.h5", "n_images": 1, "start_image_id": 2**64 + 5},
     "start_image_id: .* is too large"),
    ({"output_file": "{root}/x.h5", "n_images": 1, "user_id": 2**40}, "user_id: .* too"),
    ({"output_file": "{root}/x.h5", "n_images": 1, "image_timeout": 0}, "image_timeout:"),
    ({"output_file": "{root}/x.h5", "n_images": 1, "image_timeout": "1"}, "image_timeout:"),
    ({"output_file": "{root}/x.h5", "n_images": "ten"}, "n_images: expected an integer >= 1"),
    ({"output_file": "{root}/x.h5", "n_images": 0}, "n_images: expected an integer >= 1"),
    ({"output_file": "{root}/x.h5", "n_images": 1, "user_id": "e1"}, "user_id: expected"),
    ({"output_file": "{root}/x.h5", "n_images": 1, "metadata": [1]}, "metadata: expected"),
    ({"output_file": "{root}/x.h5", "n_images": 1, "compression": "zip"}, "compression:"),
    ({"output_file": "{root}/x.h5", "n_images": 1, "append": "yes"},
     "append: expected true or false, got 'yes'"),
    ({"output_file": "{root}/missing/x.h5", "n_images": 1}, "directory .* does not exist"),
    ({"output_file": "{root}/x\0.h5", "n_images": 1}, "cannot hold a NUL character"),
    ({"output_file": "{root}/sub/", "n_images": 1}, "ends with '/': expected a file path"),
    ({"output_file": "{root}/" + "d/" * 2500 + "x.h5", "n_images": 1},
     "output_file: .* is too long .* bytes; at most 4095, and 255 per name"),
    ({"output_file": "{root}/" + "n" * 300 + ".h5", "n_images": 1}, "is too long"),
])
def test_bad_requests_name_the_field(request_, message, make_config, tmp_path):
    path, _ = make_config("jungfrau_1m.json", output_root=str(tmp_path))
    config = load_config(path)
    if isinstance(request_, dict) and "output_file" in request_:
        request_ = dict(request_, output_file=request_["output_file"].format(root=tmp_path))
    with pytest.raises(RequestError, match=message.replace("(", r"\(")):
        validate_write_request(request_, config)


def test_the_operator_decides_the_file_owner(make_config, tmp_path):
    path, _ = make_config("jungfrau_1m.json", writer_user_id=1000)
    config = load_config(path)
    out = str(tmp_path / "x.h5")
    for user_id in (None, 0, 1000):  # absent or 0 (the original's default): the config's
        request = {"output_file": out, "n_images": 1}
        if user_id is not None:
            request["user_id"] = user_id
        assert validate_write_request(request, config).user_id is None
    with pytest.raises(RequestError, match=r"user_id: 4242 is not allowed: files of .* are "
                       r"written as writer_user_id 1000 of the detector config"):
        validate_write_request({"output_file": out, "n_images": 1, "user_id": 4242}, config)
    allowed, _ = make_config("jungfrau_1m.json", writer_user_id=1000,
                             allow_request_user_id=True)
    assert validate_write_request({"output_file": out, "n_images": 1, "user_id": 4242},
                                  load_config(allowed)).user_id == 4242


def test_fields_of_other_services_are_ignored(make_config, tmp_path):
    path, _ = make_config("jungfrau_1m.json")
    out = str(tmp_path / "x.h5")
    request = validate_write_request({"output_file": out, "n_images": 3,
                                      "channels": ["X:PV"], "start_pulse_id": 5},
                                     load_config(path))
    assert (request.output_file, request.n_images) == (out, 3)


@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
def test_writer_going_away_mid_run_fails_the_request_at_once(how, make_config, ipc_dir,
                                                              tmp_path):
    path, _ = make_config("jungfrau_1m.json")
    config = load_config(path)
    assembler = FakeAssembler(config, ipc_dir)
    writer = Proc(module_cmd("fastcore.h5_writer", str(path), "--ipc-dir", ipc_dir),
                  tmp_path / "writer.log")
    agent = WriterAgent(config, ipc_dir, image_timeout_s=30, writer_timeout_s=2)
    out = tmp_path / "d.h5"
    try:
        writer.wait_for("ready")
        thread, outcome = run_in_thread(agent, "r8", {"output_file": str(out),
                                                      "n_images": 100})
        assembler.emit(1)
        time.sleep(0.5)
        gone_at = time.monotonic()
        if how == "sigterm":
            writer.popen.terminate()
        else:
            writer.popen.kill()
        for image_id in range(2, 40):  # images keep coming
            assembler.emit(image_id)
            time.sleep(0.1)
            if not thread.is_alive():
                break
        thread.join(15)
        noticed = time.monotonic() - gone_at
        error = str(outcome["error"])
        if how == "sigterm":
            assert noticed < 1.5, noticed
            found = re.match(r"stddaq-h5-writer was stopped \(SIGTERM\) during the run; "
                             rf"(\d+) of 100 images in {out} ", error)
            assert found, error
            with h5py.File(out, "r") as f:  # the file holds what the message says
                assert f[config.detector_name]["data"].shape[0] == int(found[1]) >= 1
        else:
            assert noticed < 3.5, noticed
            assert "stopped answering (no heartbeat for 2 s) after 1 of 100 images" in error
    finally:
        writer.stop()
        agent.close()
        assembler.close()


def test_no_writer_running_fails_at_once(make_config, ipc_dir, tmp_path):
    path, _ = make_config("jungfrau_1m.json")
    agent = WriterAgent(load_config(path), ipc_dir)
    started = time.monotonic()
    try:
        with pytest.raises(WriterError, match="stddaq-h5-writer is not running"):
            agent.on_request("r11", {"output_file": str(tmp_path / "x.h5"), "n_images": 1})
    finally:
        agent.close()
    assert time.monotonic() - started < 2.0
    assert not agent.busy and not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("flag", ["--image-timeout", "--writer-timeout"])
def test_timeouts_must_be_positive_seconds(flag):
    done = subprocess.run([sys.executable, "-m", "services.writer_agent", flag, "-3",
                           "--json_config_file", str(REPO / "configs" / "jungfrau_1m.json")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().endswith(
        f"error: argument {flag}: expected a positive number of seconds, got '-3'")


@pytest.mark.parametrize("event", [
    Heartbeat(pid=12, sent_at=1.5, run_id=None),
    RunStarted(run_id=3, output_file="/data/x.h5", n_images=10, first_row=4),
    RunProgress(run_id=3, n_rows=5, n_written=4, n_missing=1, n_absent=2),
    WriterFailure(run_id=None, message="command: expected 'start' or 'stop'"),
    RunSummary(run_id=3, output_file="/data/x.h5", n_images=10, reason="completed",
               n_written=10, n_good=10),
])
def test_writer_events_read_back_as_sent(event):
    """What stddaq-h5-writer sends (one JSON object, ``event`` names its kind) is what the
    agent reads back."""
    wire = json.loads(event.to_json())
    assert wire["event"] == event.EVENT and wire["run_id"] == event.run_id
    assert decode_event(event.to_json()) == event
    if isinstance(event, RunSummary):
        assert wire["outcome"] == "success"


@pytest.mark.parametrize(("data", "message"), [
    (b"not json", "a writer event must be a JSON object"),
    (b"[1]", "a writer event must be a JSON object"),
    (b'{"event": "finished", "run_id": 1}', "event: expected one of"),
    (b'{"event": "progress", "run_id": 1}', "bad progress event"),
])
def test_malformed_writer_events_are_named(data, message):
    with pytest.raises(ProtocolError, match=message):
        decode_event(data)


def test_a_new_link_hears_the_writer_at_once(setup, ipc_dir):
    """The writer greets each new subscriber with a heartbeat, so a link (an agent that
    just started) knows its events arrive before its first command: the start's answer
    is never lost to a subscription still on its way. Without the greeting the first
    event is the 0.5 s timer's heartbeat."""
    config = setup[0]
    for _ in range(8):
        link = WriterLink(ipc_dir, config.detector_name)
        try:
            started = time.monotonic()
            link.settle()
            assert link.heard and time.monotonic() - started < 0.2
        finally:
            link.close()
