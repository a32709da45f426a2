"""Each stage answers bad input with one clear line and exit code 1, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from fastcore.buffers import shm_name
from fastcore.names import Segment
from fastcore.udp import DEFAULT_RCVBUF
from tests.conftest import Proc, module_cmd, shm_files

STAGES = ["fastcore.udp_recv", "fastcore.sync", "fastcore.assembler", "fastcore.simulator"]


def run(module: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(module_cmd(module, *args), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("module", STAGES)
def test_bad_config_names_every_bad_field(module, tmp_path):
    bad = {"detector_name": "ok", "detector_type": "pilatus", "n_modules": "two",
           "bit_depth": 16, "image_pixel_height": 512, "image_pixel_width": 1024,
           "start_udp_port": 70000, "writer_user_id": 0}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    result = run(module, str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for expected in ("detector_type: expected one of jungfrau, eiger, gigafrost, got 'pilatus'",
                     "n_modules: expected an integer, got 'two'",
                     "start_udp_port: expected an integer in [1, 65535], got 70000",
                     "module_positions: missing"):
        assert expected in result.stderr, result.stderr


@pytest.mark.parametrize("module", ["fastcore.udp_recv", "fastcore.assembler"])
def test_missing_or_broken_config_file(module, tmp_path):
    result = run(module, str(tmp_path / "nope.json"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot read detector config" in result.stderr and "nope.json" in result.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"detector_name": "x",')
    result = run(module, str(broken))
    assert result.returncode == 1 and "not valid JSON at line 1" in result.stderr


def test_occupied_udp_port(make_config, tmp_path):
    path, raw = make_config("jungfrau_1m.json")
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", raw["start_udp_port"] + 1))
    try:
        result = run("fastcore.udp_recv", str(path), "--ipc-dir", str(tmp_path))
    finally:
        blocker.close()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"UDP port {raw['start_udp_port'] + 1} on 127.0.0.1 is already in use" in result.stderr
    assert not shm_files(raw["detector_name"])


def test_assembler_without_receivers_reports_missing_shared_memory(make_config, tmp_path):
    path, raw = make_config("jungfrau_1m.json")
    result = run("fastcore.assembler", str(path), "--ipc-dir", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    frames = shm_name(raw["detector_name"], Segment.FRAMES)
    assert f"/dev/shm/{frames} does not exist" in result.stderr
    assert "start its producer first" in result.stderr


def test_bad_modules_option(make_config, tmp_path):
    path, _ = make_config("jungfrau_1m.json")
    result = run("fastcore.udp_recv", str(path), "--modules", "0,7")
    assert result.returncode == 1 and "--modules: [7] not in 0..1" in result.stderr


def test_simulator_rejects_bad_fault_options(make_config):
    path, _ = make_config("jungfrau_1m.json")
    result = run("fastcore.simulator", str(path), "--drop-fraction", "1.5")
    assert result.returncode == 2 and "expected a fraction in [0, 1)" in result.stderr
    result = run("fastcore.simulator", str(path), "--drop", "3:1")
    assert result.returncode == 2 and "expected FRAME:MODULE:PACKET" in result.stderr


def test_receiver_killed_hard_leaves_no_children_and_restart_replaces_segment(
        make_config, tmp_path):
    """SIGKILL of the receiver parent: its module processes die with it; a restart replaces
    the leftover segment with a log line and runs normally; SIGTERM then removes it."""
    path, raw = make_config("jungfrau_1m.json")
    args = module_cmd("fastcore.udp_recv", str(path), "--ipc-dir", str(tmp_path))
    first = Proc(args, tmp_path / "first.log")
    first.wait_for("ready")
    time.sleep(0.3)
    os.kill(first.popen.pid, signal.SIGKILL)
    first.popen.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = subprocess.run(["pgrep", "-s", str(first.popen.pid)], capture_output=True,
                               text=True).stdout.split()
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, "module receivers outlived their parent"
    first.stop()
    assert shm_files(raw["detector_name"]), "SIGKILL should have left the segment"
    second = Proc(args, tmp_path / "second.log")
    try:
        second.wait_for("ready")
        assert "replacing leftover shared memory" in second.output
    finally:
        assert second.stop() == 0
    assert not shm_files(raw["detector_name"])


def test_demo_runs_end_to_end_and_checks_images(make_config):
    path, _ = make_config("jungfrau_1m.json")
    result = run("fastcore.demo", str(path), "-n", "40", "-r", "40", "--check-every", "4",
                 timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "images received   40 of 40 (lost 0)" in result.stdout
    assert "pixel check       10 of 10 sampled images identical" in result.stdout
    assert "result            OK" in result.stdout


def test_capped_receive_buffer_is_logged_with_the_fix(make_config, tmp_path):
    """Without CAP_NET_ADMIN the kernel caps SO_RCVBUF at net.core.rmem_max: the receiver
    says so, with the sysctl that lifts the cap, and keeps running."""
    path, raw = make_config("jungfrau_1m.json")
    args = ["setpriv", "--bounding-set=-net_admin",
            *module_cmd("fastcore.udp_recv", str(path), "--ipc-dir", str(tmp_path))]
    receiver = Proc(args, tmp_path / "recv.log")
    try:
        receiver.wait_for("ready")
        receiver.wait_for("receiving on udp")
        with open("/proc/sys/net/core/rmem_max") as f:
            rmem_max = int(f.read())
        asked = min(DEFAULT_RCVBUF, 2**30 - 1)  # the kernel keeps at most INT_MAX / 2
        if rmem_max >= asked:
            pytest.skip(f"net.core.rmem_max is already >= {asked} B: nothing is capped")
        assert (f"UDP port {raw['start_udp_port']}: receive buffer capped at "
                f"{rmem_max / 2**20:.1f} MiB") in receiver.output
        assert f"sysctl -w net.core.rmem_max={asked}" in receiver.output
    finally:
        assert receiver.stop() == 0


@pytest.mark.parametrize("module", ["fastcore.sync", "fastcore.assembler"])
def test_too_long_ipc_dir(module, make_config, tmp_path):
    path, _ = make_config("jungfrau_1m.json")
    long_dir = tmp_path / ("d" * 90)
    long_dir.mkdir()
    result = run(module, str(path), "--ipc-dir", str(long_dir))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "more than the 107 a Unix socket allows: use a shorter --ipc-dir" in result.stderr


def test_missing_buffer_directory(make_config, tmp_path, monkeypatch):
    path, _ = make_config("jungfrau_1m.json")
    monkeypatch.setenv("STDDAQ_SHM_DIR", str(tmp_path / "gone"))
    result = run("fastcore.udp_recv", str(path), "--ipc-dir", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"the buffer directory {tmp_path / 'gone'} (STDDAQ_SHM_DIR" in result.stderr
