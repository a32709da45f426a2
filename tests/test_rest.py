"""stddaq-rest against real std-daq services (writer agent, h5 writer, RabbitMQ, Redis) fed by
a free-running fake detector, driven by PSI's unmodified std_daq_client 1.3.5 and its
console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import redis
import requests
from std_daq_client import StdDaqAdminException, StdDaqClient

from tests.conftest import Proc, free_tcp_port, module_cmd, wait_until

pytestmark = pytest.mark.timeout(180)
SCRIPTS = Path(sys.executable).parent


@pytest.fixture
def rest(stddaq, ipc_dir, tmp_path):
    """(client, std-daq services, base url) with stddaq-rest running."""
    agent, _ = stddaq
    port = free_tcp_port()
    config_path = agent.out_dir.parent / f"{agent.config.detector_name}.json"
    server = Proc(module_cmd("services.rest.server", str(config_path), "--port", str(port),
                             "--writer-service", agent.service, "--ipc-dir", ipc_dir),
                  tmp_path / "rest.log")
    try:
        server.wait_for("ready:")
        url = f"http://127.0.0.1:{port}"
        client = StdDaqClient(url_base=url)
        wait_until(lambda: client.get_status()["state"] == "READY", "writer READY")
        yield client, agent, url
    finally:
        code = server.stop()
        store = redis.Redis("127.0.0.1", 6379)
        for key in [*store.scan_iter(f"stddaq.config.{agent.config.detector_name}*"),
                    f"stddaq.log.{agent.service}"]:
            store.delete(key)
    assert code == 0, server.output


def rows(path: str, detector: str) -> int:
    with h5py.File(path, "r") as f:
        return f[f"/{detector}/data"].shape[0]


def test_a_scan_as_a_bec_device_runs_it(rest):
    """stop_writer; get_config; poll READY; start_writer_async; WAITING/ACQUIRING_IMAGES;
    FINISHED with n_write_completed == n_images; stop_writer -> the file holds them."""
    client, agent, _ = rest
    client.stop_writer()
    config = client.get_config()
    assert config["detector_name"] == agent.config.detector_name
    out = agent.out("bec_scan.h5")
    status = client.start_writer_async({"output_file": out, "n_images": 40})
    assert status["state"] == "WRITING"
    assert status["acquisition"]["state"] in ("WAITING_IMAGES", "ACQUIRING_IMAGES")
    assert status["acquisition"]["info"]["output_file"] == out
    wait_until(lambda: client.get_status()["acquisition"]["state"] == "ACQUIRING_IMAGES",
               "ACQUIRING_IMAGES")
    done = wait_until(lambda: (s := client.get_status())["acquisition"]["state"] == "FINISHED"
                      and s, "FINISHED", timeout=30)
    stats = done["acquisition"]["stats"]
    assert stats["n_write_completed"] == stats["n_write_requested"] == 40
    assert stats["start_time"] <= stats["stop_time"]
    assert done["state"] == "READY" and done["acquisition"]["message"] == "Completed."
    assert client.stop_writer()["state"] == "READY"
    assert rows(out, agent.config.detector_name) == 40
    logs = client.get_logs(1)
    assert [entry["info"]["output_file"] for entry in logs] == [out]


def test_sync_write_stop_and_logs(rest):
    client, agent, _ = rest
    first = agent.out("sync.h5")
    status = client.start_writer_sync({"output_file": first, "n_images": 5,
                                       "run_id": "20230526_113713.793"})
    assert status["acquisition"]["state"] == "FINISHED"
    assert status["acquisition"]["stats"]["n_write_completed"] == 5
    with h5py.File(first, "r") as f:  # a run_id that is not a number is kept as metadata
        assert json.loads(f.attrs["request_metadata"]) == {"run_id": "20230526_113713.793"}
    second = agent.out("stopped.h5")
    client.start_writer_async({"output_file": second, "n_images": 100_000})
    wait_until(lambda: client.get_status()["acquisition"]["stats"]["n_write_completed"] > 3,
               "images written")
    stopped = client.stop_writer()
    assert stopped["state"] == "READY"
    assert stopped["acquisition"]["state"] == "FINISHED"
    assert stopped["acquisition"]["message"] == "Interrupted."
    n = stopped["acquisition"]["stats"]["n_write_completed"]
    assert 3 < n < 100_000 and rows(second, agent.config.detector_name) == n
    logs = client.get_logs(5)
    assert [entry["info"]["output_file"] for entry in logs][:2] == [second, first]


def test_stats_follow_the_detector_and_the_writer(rest):
    client, agent, _ = rest
    image_bytes = agent.config.image_shape[0] * agent.config.image_shape[1] * 2
    stats = wait_until(lambda: (s := client.get_stats())["detector"]["images_per_second"] > 10
                       and s, "detector rate")
    assert stats["detector"]["bytes_per_second"] == pytest.approx(
        stats["detector"]["images_per_second"] * image_bytes)
    client.start_writer_async({"output_file": agent.out("rate.h5"), "n_images": 200})
    wait_until(lambda: client.get_stats()["writer"]["images_per_second"] > 10, "writer rate")
    client.stop_writer()


@pytest.mark.parametrize("body, field", [
    ({"output_file": "/tmp/x.h5", "n_images": "ten"}, "n_images: expected an integer"),
    ({"output_file": "/tmp/x.h5", "n_images": 0}, "n_images: expected an integer >= 1"),
    ({"n_images": 3}, "output_file: missing"),
    ({"output_file": "relative.h5", "n_images": 3}, "output_file: expected an absolute"),
    ({"output_file": "/elsewhere/x.h5", "n_images": 3}, "is outside the output root"),
])
def test_bad_writes_name_the_field_and_the_service_keeps_serving(rest, body, field):
    client, _, _ = rest
    with pytest.raises(StdDaqAdminException, match=field):
        client.start_writer_async(body)
    assert client.get_status()["state"] == "READY"


def test_bad_bodies_and_config_changes_are_refused_naming_the_field(rest):
    client, _, url = rest
    answer = requests.post(f"{url}/writer/write_async", data=b"{not json", timeout=5).json()
    assert answer["status"] == "error" and "not valid JSON" in answer["message"]
    answer = requests.get(f"{url}/daq/logs/0", timeout=5).json()
    assert answer["status"] == "error" and "n_logs" in answer["message"]
    answer = requests.get(f"{url}/daq/live/image", params={"size": "big"}, timeout=5)
    assert answer.status_code == 200 and answer.json()["status"] == "error"
    assert answer.json()["message"].startswith("size: input should be a valid integer")
    answer = requests.get(f"{url}/daq/live/image", params={"size": 5}, timeout=5).json()
    assert "size: expected 16 to 2048 pixels, got 5" in answer["message"]
    with pytest.raises(StdDaqAdminException, match="bit_depth"):
        client.set_config({"bit_depth": 13})
    with pytest.raises(StdDaqAdminException, match="detector_name: cannot change"):
        client.set_config({"detector_name": "OTHER"})
    assert client.get_deployment_status()["status"] == "UNKNOWN"  # nothing published yet
    assert client.set_config({"writer_user_id": 0})["writer_user_id"] == 0
    waiting = client.get_deployment_status()  # no stddaq-run here to deploy it
    assert (waiting["status"], waiting["message"]) == ("UNKNOWN", "Waiting for servers...")


def test_console_scripts(rest):
    _, agent, url = rest
    env = {**os.environ, "STD_DAQ_API_URL": url}

    def cli(*args: str) -> dict | list:
        result = subprocess.run([str(SCRIPTS / args[0]), *args[1:]], capture_output=True,
                                text=True, env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    assert cli("std_cli_get_status")["state"] == "READY"
    assert cli("std_cli_get_config")["detector_name"] == agent.config.detector_name
    out = agent.out("cli.h5")
    finished = cli("std_cli_write_sync", out, "3")
    assert finished["acquisition"]["stats"]["n_write_completed"] == 3
    assert cli("std_cli_get_logs", "-n", "1")[0]["info"]["output_file"] == out
    assert set(cli("std_cli_get_stats")) == {"detector", "writer"}
    started = cli("std_cli_write_async", agent.out("cli_async.h5"), "100000")
    assert started["state"] == "WRITING"
    assert cli("std_cli_write_stop")["acquisition"]["message"] == "Interrupted."
    change = agent.out_dir.parent / "change.json"
    change.write_text(json.dumps({"writer_user_id": 0}))
    assert cli("std_cli_set_config", str(change))["writer_user_id"] == 0
    assert cli("std_cli_get_deploy_status")["status"] == "UNKNOWN"  # no stddaq-run here


def test_without_a_writer_agent_the_state_is_unknown_and_writes_fail_clearly(tmp_path):
    port = free_tcp_port()
    server = Proc(module_cmd("services.rest.server", "configs/jungfrau_1m.json", "--port",
                             str(port), "--writer-service", "t.absent.writer"),
                  tmp_path / "rest.log")
    try:
        server.wait_for("ready:")
        client = StdDaqClient(url_base=f"http://127.0.0.1:{port}")
        assert wait_until(lambda: client.get_status(), "status")["state"] == "UNKNOWN"
        began = time.monotonic()
        with pytest.raises(StdDaqAdminException,
                           match=r"writer agent t\.absent\.writer is not running"):
            client.start_writer_async({"output_file": str(tmp_path / "x.h5"), "n_images": 1})
        assert time.monotonic() - began < 3
        assert client.get_status()["acquisition"] is None
    finally:
        code = server.stop()
    assert code == 0, server.output
    assert "stopped" in server.output


def test_an_api_key_protects_every_change(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    port = free_tcp_port()
    server = Proc(module_cmd("services.rest.server", "configs/jungfrau_1m.json", "--port",
                             str(port), "--writer-service", "t.absent.writer",
                             "--api-key-file", str(key_file)), tmp_path / "rest.log")
    url = f"http://127.0.0.1:{port}"
    write = {"output_file": str(tmp_path / "x.h5"), "n_images": 1}
    try:
        server.wait_for("ready:")
        assert "changes need the API key" in server.output
        assert StdDaqClient(url).get_status()["state"] == "UNKNOWN"  # reading needs no key
        with pytest.raises(StdDaqAdminException, match="requires its key for changes"):
            StdDaqClient(url).start_writer_async(write)
        with pytest.raises(StdDaqAdminException, match="requires its key for changes"):
            StdDaqClient(url).set_config({"writer_user_id": 0})
        with pytest.raises(StdDaqAdminException, match="api key: wrong key"):
            StdDaqClient(f"{url}/key/guess").stop_writer()
        keyed = StdDaqClient(f"{url}/key/s3cret")
        assert keyed.get_status()["state"] == "UNKNOWN"
        with pytest.raises(StdDaqAdminException, match=r"writer agent t\.absent\.writer"):
            keyed.start_writer_async(write)  # past the key check: the agent is absent
        answer = requests.post(f"{url}/writer/stop", json={}, timeout=5,
                               headers={"X-API-Key": "s3cret"}).json()
        assert answer["status"] == "ok"
    finally:
        code = server.stop()
    assert code == 0, server.output
    open_bind = subprocess.run(module_cmd("services.rest.server", "configs/jungfrau_1m.json",
                                          "--host", "0.0.0.0", "--port", str(port)),
                               capture_output=True, text=True, timeout=60,
                               env={k: v for k, v in os.environ.items()
                                    if k != "STDDAQ_REST_API_KEY"})
    assert open_bind.returncode == 1
    assert "--host 0.0.0.0 is reachable from other machines: give an API key" in \
        open_bind.stderr


def test_live_image_follows_the_detector(rest):
    from io import BytesIO

    from PIL import Image

    _, _, url = rest
    first = requests.get(f"{url}/daq/live/image", params={"cmap": "hot", "size": 256},
                         timeout=10)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    picture = Image.open(BytesIO(first.content))
    assert picture.mode == "RGB" and max(picture.size) <= 256
    time.sleep(0.3)  # the free-running detector moved on
    second = requests.get(f"{url}/daq/live/image", timeout=10)
    assert int(second.headers["X-Image-Id"]) > int(first.headers["X-Image-Id"])
    bad = requests.get(f"{url}/daq/live/image", params={"cmap": "rainbow"}, timeout=10)
    assert bad.status_code == 400 and "cmap: expected one of gray, hot, viridis" in \
        bad.json()["message"]
    with requests.get(f"{url}/daq/live", stream=True, timeout=10) as stream:
        assert stream.headers["content-type"].startswith("multipart/x-mixed-replace")
        head = next(stream.iter_content(4096))
    assert b"Content-Type: image/jpeg" in head and b"\xff\xd8" in head
    refused = requests.post(f"{url}/simulation/start", json={"rate_hz": 10}, timeout=10)
    assert "images are already arriving" in refused.json()["message"]


def test_simulation_start_stop(make_config, tmp_path):
    import socket

    path, raw = make_config("jungfrau_1m.json")
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", raw["start_udp_port"]))
    receiver.settimeout(5)
    port = free_tcp_port()
    server = Proc(module_cmd("services.rest.server", str(path), "--port", str(port),
                             "--writer-service", "t.absent.writer"), tmp_path / "rest.log")
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_for("ready:")
        answer = requests.post(f"{url}/simulation/start", json={"rate_hz": 0}, timeout=10)
        assert "rate_hz: expected frames per second > 0" in answer.json()["message"]
        started = requests.post(f"{url}/simulation/start", json={"rate_hz": 20},
                                timeout=10).json()
        assert started["status"] == "ok", started
        assert started["simulation"]["running"] and started["simulation"]["rate_hz"] == 20
        assert len(receiver.recv(9000)) > 48  # the simulator's packets reach module 0
        again = requests.post(f"{url}/simulation/start", json={}, timeout=10).json()
        assert "the simulator already runs" in again["message"]
        stopped = requests.post(f"{url}/simulation/stop", timeout=10).json()
        assert stopped["simulation"]["running"] is False
        assert requests.get(f"{url}/simulation/status", timeout=10).json()[
            "simulation"]["running"] is False
    finally:
        receiver.close()
        code = server.stop()
    assert code == 0, server.output
    assert not list(Path(tempfile_dir()).glob("stddaq-sim-*")), "simulator files left"


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()
