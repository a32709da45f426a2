"""Replication between two "hosts": two network namespaces joined by a veth pair.

Host A (namespace 1) runs the detector side - simulator, udp-recv, sync, assembler and
stream-send; host B (namespace 2) runs stream-recv and the h5 writer, driven by a writer
agent. Only the veth link joins them (each namespace has its own loopback). The file on
B must equal A's images, image for image; a link cut and restored mid-run loses only the
images stream-send dropped while it was down, and the writer's summary counts exactly
those as absent. Needs root (ip netns); every namespace is removed, also on failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import h5py
import numpy as np
import pytest

from fastcore.buffers import ImageBuffer, SlotOverwrittenError, shm_name
from fastcore.config import load_config
from fastcore.detectors.simulated import pulse_id_of
from fastcore.names import Segment
from services.writer_agent import WriterAgent
from tests.conftest import Proc
from tests.pipeline import expected_image

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="two network namespaces and a veth pair need root and iproute2 (ip netns)")

RATE_HZ = 20


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class TwoHosts:
    """Namespaces ``a`` and ``b`` with their own loopback, joined by veth ``va``/``vb``
    (10.<x>.<y>.1/30 and .2/30)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.a, self.b = f"sdq-a-{tag}", f"sdq-b-{tag}"
        self.va, self.vb = f"sdqa{tag}", f"sdqb{tag}"
        octets = int(tag[:4], 16)
        net = f"10.{200 + octets % 50}.{octets // 50 % 250}"
        self.addr_a, self.addr_b = f"{net}.1", f"{net}.2"

    def __enter__(self) -> TwoHosts:
        try:
            _ip("netns", "add", self.a)
            _ip("netns", "add", self.b)
            _ip("link", "add", self.va, "type", "veth", "peer", "name", self.vb)
            _ip("link", "set", self.va, "netns", self.a)
            _ip("link", "set", self.vb, "netns", self.b)
            for ns, dev, addr in ((self.a, self.va, self.addr_a), (self.b, self.vb, self.addr_b)):
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.remove()
            raise
        return self

    def cut(self) -> None:
        _ip("-n", self.a, "link", "set", self.va, "down")

    def restore(self) -> None:
        _ip("-n", self.a, "link", "set", self.va, "up")

    def run(self, ns: str, module: str, *args: str, log: str) -> Proc:
        """``python -m module args`` inside namespace ``ns``."""
        return Proc(["ip", "netns", "exec", ns, sys.executable, "-m", module, *args], log)

    def remove(self) -> None:
        for ns in (self.a, self.b):  # deleting a namespace deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def __exit__(self, *_) -> None:
        self.remove()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                timeout=10).stdout
        assert self.a not in listed and self.b not in listed, listed


@pytest.fixture
def hosts():
    with TwoHosts() as two:
        yield two


def _sent_dropped(sender: Proc) -> int:
    """Images stream-send dropped for a slow or cut link (from its final stats line)."""
    found = re.findall(r"dropped_slow_link=(\d+)", sender.output)
    assert found, sender.output
    return int(found[-1])


def _write(agent: WriterAgent, request_id: str, out: str, n: int) -> dict:
    request = {"output_file": out, "n_images": n}
    agent.before_start(request_id, request)
    return agent.on_request(request_id, request)


def _check_file(out: str, raw_a: dict, name_b: str, images_a: ImageBuffer) -> list[int]:
    """Every image in the file equals host A's (its ImageBuffer while it holds it, and the
    simulator's documented content); returns the file's image ids."""
    with h5py.File(out, "r") as f:
        group = f[name_b]
        ids = [int(i) for i in group["image_id"][:]]
        assert [int(s) for s in group["status"][:]] == [0] * len(ids)
        assert [int(p) for p in group["pulse_id"][:]] == [pulse_id_of(i) for i in ids]
        data = group["data"]
        compared_with_a = 0
        for row, image_id in enumerate(ids):
            image = data[row]
            np.testing.assert_array_equal(image, expected_image(raw_a, image_id, image.dtype),
                                          err_msg=f"image {image_id}")
            try:
                _, on_a = images_a.read(image_id)
            except SlotOverwrittenError:
                continue
            np.testing.assert_array_equal(image, on_a, err_msg=f"image {image_id} on A")
            compared_with_a += 1
        assert compared_with_a > 0
    return ids


def test_file_on_host_b_equals_host_a_images_and_a_cut_link_loses_only_counted_images(
        hosts, make_config, ipc_dir, tmp_path):
    path_a, raw_a = make_config("jungfrau_1m.json", n_image_slots=128)
    path_b, raw_b = make_config(dict(raw_a), n_image_slots=32, output_root=str(tmp_path))
    config_b = load_config(path_b)
    ipc_a, ipc_b = ipc_dir, tempfile.mkdtemp(prefix="sdqb")
    address = f"tcp://{hosts.addr_b}:{10000 + os.getpid() % 20000}"
    procs: list[Proc] = []

    def start(ns: str, module: str, *args: str, ipc: str, config: str) -> Proc:
        proc = hosts.run(ns, module, config, "--ipc-dir", ipc, *args,
                         log=tmp_path / f"{module.split('.')[-1]}.log")
        procs.append(proc)
        proc.wait_for("ready")
        return proc

    agent = WriterAgent(config_b, ipc_b, image_timeout_s=20)
    images_a = None
    try:
        start(hosts.b, "fastcore.stream_recv", "--address", address, ipc=ipc_b,
              config=str(path_b))
        start(hosts.b, "fastcore.h5_writer", ipc=ipc_b, config=str(path_b))
        for module in ("fastcore.udp_recv", "fastcore.sync", "fastcore.assembler"):
            start(hosts.a, module, ipc=ipc_a, config=str(path_a))
        sender = start(hosts.a, "fastcore.stream_send", "--address", address, ipc=ipc_a,
                       config=str(path_a))
        time.sleep(0.5)  # subscriptions and the TCP connection are up
        images_a = ImageBuffer.attach(shm_name(raw_a["detector_name"], Segment.IMAGE))
        simulator = hosts.run(hosts.a, "fastcore.simulator", str(path_a), "-n", "0", "-r",
                              str(RATE_HZ), log=tmp_path / "simulator.log")
        procs.append(simulator)

        # 1. a clean run: 20 images, all equal to A's
        clean = str(tmp_path / "clean.h5")
        result = _write(agent, "clean", clean, 20)
        assert result["outcome"] == "success" and result["n_images"] == 20, result
        ids = _check_file(clean, raw_a, raw_b["detector_name"], images_a)
        assert ids == list(range(ids[0], ids[0] + 20))

        # 2. the link is cut for 2 s in the middle of a run of 80 images
        cut = str(tmp_path / "cut.h5")
        outcome: dict = {}
        writing = threading.Thread(target=lambda: outcome.update(
            _write(agent, "cut", cut, 80)))
        writing.start()
        time.sleep(1.5)
        hosts.cut()
        time.sleep(2.0)
        hosts.restore()
        writing.join(60)
        assert not writing.is_alive(), "the run did not end within 60 s of the restore"
        simulator.stop()
        sender.stop()  # its final stats line counts what it dropped
        dropped = _sent_dropped(sender)
        assert dropped > 0, f"the 2 s cut dropped nothing:\n{sender.output}"
        ids = _check_file(cut, raw_a, raw_b["detector_name"], images_a)
        assert len(ids) == 80
        absent = sorted(set(range(ids[0], ids[-1] + 1)) - set(ids))
        assert outcome["outcome"] == "partial", outcome
        assert outcome["n_absent"] == len(absent) == dropped, (outcome, dropped)
        assert outcome["n_flagged"] == {}, outcome
        assert sum(hi - lo + 1 for lo, hi in outcome["absent_ranges"]) == len(absent)
    finally:
        agent.close()
        if images_a is not None:
            images_a.close()
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(ipc_b, ignore_errors=True)

