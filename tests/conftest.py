"""Shared test helpers: unique detector configs, real processes, clean-up checks."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from fastcore.buffers import shm_prefix
from fastcore.launch import ChildProcess

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def free_udp_ports(n: int) -> int:
    """First of ``n`` consecutive UDP ports free on 127.0.0.1."""
    for _ in range(200):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind(("127.0.0.1", 0))
        start = probe.getsockname()[1]
        probe.close()
        if start + n > 65535:
            continue
        sockets = []
        try:
            for port in range(start, start + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {n} consecutive free UDP ports")


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def shm_files(detector_name: str) -> list[str]:
    return glob.glob(f"/dev/shm/{shm_prefix(detector_name)}*")


class Proc(ChildProcess):
    """A ChildProcess that fails the test if it leaves processes behind."""

    def stop(self, timeout: float = 10.0) -> int:
        code = super().stop(timeout)
        assert not self.leftovers, f"{self.args}: left processes {self.leftovers}"
        return code


def wait_until(predicate, what: str, timeout: float = 15.0, interval: float = 0.1):
    """The first truthy value of ``predicate()``; AssertionError naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")


def module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@pytest.fixture
def ipc_dir():
    """A short private directory for ZMQ ipc sockets (their paths are length-limited)."""
    path = tempfile.mkdtemp(prefix="sdq")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_config(tmp_path):
    """Write a config for an example detector with a unique name and free UDP ports."""
    made = []

    def make(example: str | dict, **overrides) -> tuple[Path, dict]:
        """A config from an example file name, or a copy of another config dict."""
        if isinstance(example, dict):
            raw = dict(example)
        else:
            raw = json.loads((CONFIGS / example).read_text())
        raw["detector_name"] = f"t{uuid.uuid4().hex[:10]}"
        raw["start_udp_port"] = free_udp_ports(raw["n_modules"])
        raw["udp_host"] = "127.0.0.1"
        raw["n_image_slots"] = 64
        raw["n_frame_slots"] = 32
        raw.update(overrides)
        path = tmp_path / f"{raw['detector_name']}.json"
        path.write_text(json.dumps(raw))
        made.append(raw["detector_name"])
        return path, raw

    yield make
    for name in made:
        leftovers = shm_files(name)
        for path in leftovers:
            os.unlink(path)
        assert not leftovers, f"shared memory left behind: {leftovers}"


@pytest.fixture
def stddaq(request, make_config, ipc_dir, tmp_path):
    """(std-daq services: writer agent, h5 writer and a fake assembler, the free-running
    fake detector feeding them) for the front-end tests (Ophyd, ophyd-async, REST)."""
    from tests.test_ophyd import FreeRunning
    from tests.test_writer_agent_service import AgentSetup

    overrides = getattr(request, "param", {})  # e.g. {"n_writers": 2} (indirect)
    agent = AgentSetup(make_config, ipc_dir, tmp_path, **overrides)
    detector = FreeRunning(agent)
    yield agent, detector
    detector.stop()
    agent.close()


@pytest.fixture
def small_disk():
    """A 6 MiB tmpfs (root only; skipped otherwise): a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mount_point = tempfile.mkdtemp(prefix="sdq-full-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", mount_point],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(mount_point)
        pytest.skip(f"cannot mount tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", mount_point], check=False)
        os.rmdir(mount_point)
