"""stddaq-run: a whole single-machine std-daq started, supervised and stopped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import h5py
import pika
import pytest
import redis
from std_daq_client import StdDaqAdminException, StdDaqClient

from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import load_config
from fastcore.formats import ImageStatus
from fastcore.names import Segment
from services.broker.protocol import request_queue_name
from services.daq_client import DaqClient
from tests.conftest import Proc, free_tcp_port, module_cmd, wait_until
from tests.test_cli_tools import REQUEST, assert_one_error_line, cli

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def launched(make_config, ipc_dir, tmp_path):
    # below /tmp, not pytest's 0700 tree: a writer_user_id other than root must reach it
    out_dir = Path(tempfile.mkdtemp(prefix="stddaq-launched-", dir="/tmp"))
    os.chmod(out_dir, 0o755)
    # 160 frame slots = 4 s at 40 Hz: enough for a restarted Python service (about 1 s on
    # an idle machine, 2-3 s under the test suite's load) to find its frames still there
    path, raw = make_config("jungfrau_1m.json", output_root=str(out_dir),
                            n_image_slots=200, n_frame_slots=160)
    rest_port = free_tcp_port()
    launcher = Proc(module_cmd("services.cli.run", str(path), "--simulate", "40",
                               "--ioc-prefix", f"T{uuid.uuid4().hex[:6]}:", "--ioc-port",
                               str(free_tcp_port()), "--rest-port", str(rest_port),
                               "--ipc-dir", ipc_dir, "--log-dir", str(tmp_path / "logs")),
                    tmp_path / "launcher.log")
    launcher.rest_url = f"http://127.0.0.1:{rest_port}"
    client = None
    try:
        launcher.wait_for("ready: std-daq", 90)
        config = load_config(path)
        client = DaqClient(f"{config.detector_name}.writer", "127.0.0.1",
                           redis.Redis("127.0.0.1", 6379))
        yield launcher, client, config, out_dir, tmp_path / "logs"
    finally:
        if client is not None:
            client.close()
        code = launcher.stop(timeout=30)
        channel = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1")).channel()
        channel.queue_delete(request_queue_name(f"{raw['detector_name']}.writer"))
        channel.connection.close()
        store = redis.Redis("127.0.0.1", 6379)
        for key in [*store.scan_iter(f"stddaq.config.{raw['detector_name']}*"),
                    f"stddaq.log.{raw['detector_name']}.writer"]:
            store.delete(key)
        shutil.rmtree(out_dir, ignore_errors=True)
    assert code == 0, launcher.output[-3000:]
    assert "stopped" in launcher.output


def pid_of(launcher: Proc, service: str) -> int:
    pids = re.findall(rf"{service} running \(pid (\d+)\)", launcher.output)
    return int(pids[-1])


def test_launcher_runs_a_whole_daq_and_stops_cleanly(launched):
    launcher, client, config, out_dir, logs = launched
    for service in ("udp-recv", "sync", "assembler", "h5-writer", "writer-agent", "ioc",
                    "rest", "simulator"):
        assert (logs / f"{service}.log").exists(), service
        os.kill(pid_of(launcher, service), 0)  # running
    run = client.start_write({"output_file": str(out_dir / "run.h5"), "n_images": 20},
                             timeout=20)
    assert run.done.wait(60) and not run.failed, run.message
    assert run.result["n_images"] == 20 and run.result["n_missing"] == 0
    with h5py.File(out_dir / "run.h5", "r") as f:
        assert f[config.detector_name]["data"].shape == (20, *config.image_shape)
        assert list(f[config.detector_name]["status"]) == [0] * 20
    # the same through the REST interface, with PSI's client, from simulated UDP to file
    rest = StdDaqClient(url_base=launcher.rest_url)
    finished = rest.start_writer_sync({"output_file": str(out_dir / "rest.h5"),
                                       "n_images": 15})
    assert finished["acquisition"]["stats"]["n_write_completed"] == 15
    assert finished["acquisition"]["message"] == "Completed."
    assert rest.get_stats()["detector"]["images_per_second"] > 0
    with h5py.File(out_dir / "rest.h5", "r") as f:
        assert list(f[config.detector_name]["status"]) == [0] * 15


def test_a_bec_scan_with_a_config_change_through_rest(launched):
    """The sequence a BEC std-daq device runs around a scan, with PSI's client: stop_writer;
    get_config; set_config with a writer_user_id (stddaq-run restarts the services with
    it); poll READY; start_writer_async; WAITING/ACQUIRING_IMAGES; FINISHED with every
    image; stop_writer -> the file holds them, owned by that user id."""
    launcher, _, config, out_dir, _ = launched
    rest = StdDaqClient(url_base=launcher.rest_url)
    rest.stop_writer()
    assert rest.get_config()["detector_name"] == config.detector_name
    before = rest.get_deployment_status()  # stddaq-run published the config it runs
    assert before["status"] == "SUCCESS", before
    applied = rest.set_config({"writer_user_id": 4242})
    assert applied["writer_user_id"] == 4242
    deployment = wait_until(lambda: (d := rest.get_deployment_status())["config_id"]
                            != before["config_id"] and d["status"] in ("SUCCESS", "ERROR")
                            and d, "the deployment", 90)
    assert deployment["status"] == "SUCCESS", deployment
    assert set(deployment["servers"].values()) == {"Done"}
    assert "deploying a new config" in launcher.output
    assert rest.get_config()["writer_user_id"] == 4242
    wait_until(lambda: rest.get_status()["state"] == "READY", "writer READY", 60)
    os.chmod(out_dir, 0o777)  # the new owner writes there
    out = str(out_dir / "bec.h5")
    status = rest.start_writer_async({"output_file": out, "n_images": 10})
    assert status["acquisition"]["state"] in ("WAITING_IMAGES", "ACQUIRING_IMAGES")
    done = wait_until(lambda: (s := rest.get_status())["acquisition"]["state"] == "FINISHED"
                      and s, "FINISHED", 60)
    assert done["acquisition"]["stats"]["n_write_completed"] == 10
    rest.stop_writer()
    with h5py.File(out, "r") as f:
        assert f[config.detector_name]["data"].shape[0] == 10
    if os.geteuid() == 0:
        assert os.stat(out).st_uid == 4242
    with pytest.raises(StdDaqAdminException, match="bit_depth"):
        rest.set_config({"bit_depth": 13})
    with pytest.raises(StdDaqAdminException, match="output_root: set by the operator"):
        rest.set_config({"output_root": "/"})


def test_a_udp_port_in_use_is_named_as_the_cause(make_config, ipc_dir, tmp_path):
    path, raw = make_config("jungfrau_1m.json")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", raw["start_udp_port"]))
        result = subprocess.run(module_cmd("services.cli.run", str(path), "--ipc-dir", ipc_dir,
                                           "--log-dir", str(tmp_path / "logs")),
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "stddaq-run: error: a service did not start: " in result.stderr
    assert (f"UDP port {raw['start_udp_port']} on 127.0.0.1 is already in use (is another "
            "receiver running?)") in result.stderr
    assert "does not exist" not in result.stderr


def test_an_unreachable_broker_is_named_before_anything_starts(make_config, ipc_dir,
                                                               tmp_path):
    path, _ = make_config("jungfrau_1m.json")
    port = free_tcp_port()  # nothing listens there
    result = subprocess.run(module_cmd("services.cli.run", str(path), "--ipc-dir", ipc_dir,
                                       "--broker-host", f"127.0.0.1:{port}",
                                       "--log-dir", str(tmp_path / "logs")),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert (f"stddaq-run: error: RabbitMQ at 127.0.0.1:{port} does not answer (Connection "
            "refused): start it, or name it with --broker-host HOST[:PORT]") in result.stderr
    assert not (tmp_path / "logs" / "udp-recv.log").exists()
    bad = subprocess.run(module_cmd("services.cli.run", str(path), "--broker-host", "h:x"),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--broker-host: bad port in broker address 'h:x'" in \
        bad.stderr


def test_a_second_instance_is_refused_and_leaves_the_first_running(launched, ipc_dir,
                                                                   tmp_path):
    _, client, config, out_dir, _ = launched
    second = subprocess.run(
        module_cmd("services.cli.run", str(tmp_path / f"{config.detector_name}.json"),
                   "--ipc-dir", ipc_dir, "--log-dir", str(tmp_path / "logs2")),
        capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert (f"stddaq-run: error: std-daq for {config.detector_name} is already running here"
            ) in second.stderr
    assert not (tmp_path / "logs2" / "udp-recv.log").exists()  # nothing was started
    run = client.start_write({"output_file": str(out_dir / "after.h5"), "n_images": 5},
                             timeout=20)
    assert run.done.wait(60) and not run.failed, run.message


@pytest.mark.parametrize("service", ["assembler", "udp-recv"])
def test_a_killed_service_is_restarted_and_the_acquisition_still_ends_in_a_file(
        launched, service):
    launcher, client, config, out_dir, logs = launched
    run = client.start_write({"output_file": str(out_dir / "restart.h5"), "n_images": 80},
                             timeout=20)
    deadline = time.monotonic() + 20
    while run.n_written < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    old_pid = pid_of(launcher, service)
    os.kill(old_pid, signal.SIGKILL)
    launcher.wait_for(f"{service} exited with code -9: restarting", 20)
    deadline = time.monotonic() + 30
    while pid_of(launcher, service) == old_pid and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_of(launcher, service) != old_pid
    log = (logs / f"{service}.log").read_text()  # the killed run's output is kept
    assert log.count(" started: ") == 2 and log.index("ready:") < log.rindex(" started: ")
    assert run.done.wait(90) and not run.failed, run.message
    result = run.result
    assert result["n_images"] + result["n_missing"] == 80
    with h5py.File(out_dir / "restart.h5", "r") as f:
        assert f[config.detector_name]["data"].shape[0] == 80
        statuses = [int(s) for s in f[config.detector_name]["status"]]
    # images lost from the buffer are recorded as such; frames cut by the kill are flagged
    assert sum(bool(s & ImageStatus.NOT_IN_BUFFER) for s in statuses) == result["n_missing"]
    assert statuses.count(0) >= 60, str(statuses)  # a restart costs a few images, not the run


def test_request_cli_exit_code_tells_success_from_partial(launched):
    """stddaq-request against the whole std-daq: 0 only when every image is there."""
    _, _, config, out_dir, _ = launched
    tag = f"{config.detector_name}.writer"
    ok = cli(REQUEST, tag, "--set", f"output_file={out_dir / 'ok.h5'}", "--set",
             "n_images=5", "--timeout", "60", timeout=90)
    assert ok.returncode == 0, ok.stderr
    with ImageBuffer.attach(shm_name(config.detector_name, Segment.IMAGE)) as images:
        deadline = time.monotonic() + 30  # until the ring wrapped: image 1 is gone
        while time.monotonic() < deadline and not (
                int(images.metadata(1)["id"]) > images.n_slots + 5):
            time.sleep(0.2)
    out = out_dir / "old.h5"
    partial = cli(REQUEST, tag, "--set", f"output_file={out}", "--set", "n_images=5",
                  "--set", "start_image_id=1", "--timeout", "60", timeout=90)
    assert partial.returncode == 6, partial.stderr
    error = assert_one_error_line(partial, "stddaq-request")
    found = re.search(rf"{tag} partial: 5 of 5 images in {out} \(5 good, (\d+) ids never "
                      r"arrived \(1-(\d+)\)\)$", error)
    assert found and int(found[1]) == int(found[2]) > 5 + 200 // 10, error
    with h5py.File(out, "r") as f:  # from the oldest image kept, past the tenth rewritten next
        assert f[config.detector_name]["image_id"][0] == int(found[2]) + 1
