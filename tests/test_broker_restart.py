"""A real RabbitMQ restart, on a private RabbitMQ node started for this test.

The node (own name, ports, data and log directories under /tmp) is stopped and started
again (``stop_app`` / ``start_app``: the transient exchanges and bindings are gone
afterwards, durable queues and persistent messages stay) while a request runs. The shared
RabbitMQ on 5672 is not touched. Skipped where a private node cannot be started (not root,
no rabbitmq-server).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import pytest

from services.broker import ACTION_REQUEST_SUCCESS, PrimaryService
from tests.broker_client import WatchingClient
from tests.test_broker import Recorder, unique, wait_until

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PrivateRabbit:
    """A throw-away RabbitMQ node on 127.0.0.1:<port>."""

    def __init__(self) -> None:
        self.node = f"sdq{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sdqrmq")
        self.process: subprocess.Popen | None = None

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["rabbitmqctl", "-n", self.node, *args], capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> None:
        for sub in ("mnesia", "log"):
            os.mkdir(os.path.join(self.dir, sub))
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as conf:
            conf.write(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as plugins:
            plugins.write("[].\n")
        user = pwd.getpwnam("rabbitmq")
        for root, dirs, files in os.walk(self.dir):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, user.pw_uid, user.pw_gid)
        env = dict(os.environ,
                   RABBITMQ_NODENAME=self.node, RABBITMQ_NODE_PORT=str(self.port),
                   RABBITMQ_DIST_PORT=str(free_port()),
                   RABBITMQ_MNESIA_BASE=f"{self.dir}/mnesia",
                   RABBITMQ_LOG_BASE=f"{self.dir}/log",
                   RABBITMQ_CONFIG_FILE=f"{self.dir}/rabbitmq",
                   RABBITMQ_ENABLED_PLUGINS_FILE=f"{self.dir}/enabled_plugins",
                   RABBITMQ_PID_FILE=f"{self.dir}/pid")
        self.process = subprocess.Popen(["rabbitmq-server"], env=env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = self.ctl("wait", f"{self.dir}/pid", "--timeout", "40", timeout=45)
        if done.returncode != 0:
            self.stop()
            pytest.skip(f"private RabbitMQ node did not start: {done.stderr.strip()[:300]}")

    def restart_app(self, down_s: float, while_down=None) -> None:
        assert self.ctl("stop_app").returncode == 0
        if while_down is not None:
            while_down()
        time.sleep(down_s)
        assert self.ctl("start_app").returncode == 0

    def stop(self) -> None:
        if self.process is not None:
            self.ctl("stop")
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def rabbit():
    if os.geteuid() != 0 or not shutil.which("rabbitmq-server") or not shutil.which(
            "rabbitmqctl"):
        pytest.skip("needs root and rabbitmq-server to run a private RabbitMQ node")
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        pytest.skip("no rabbitmq user")
    node = PrivateRabbit()
    node.start()
    yield node
    node.stop()


def test_rabbitmq_restart_while_a_request_runs(rabbit):
    name = unique("primary")
    release = threading.Event()

    def work(request_id: str, request: dict) -> dict:
        if request["n"] == 1:
            assert release.wait(30)
        return {"written": request["n"]}

    handler = Recorder(work)
    threads_before = set(threading.enumerate())
    service = PrimaryService(name, handler, port=rabbit.port, min_backoff=0.1,
                             max_backoff=0.5)
    service.start()
    client = WatchingClient(port=rabbit.port)
    try:
        service.wait_ready(10)
        client.wait_ready(10)
        first = client.send_request(name, {"n": 1})
        client.wait_for_start(first, [name], timeout=10)
        wait_until(lambda: handler.active == 1, 5, "on_request running")
        second = client.send_request(name, {"n": 2})  # waits in the durable queue

        def end_first_request() -> None:
            wait_until(lambda: not service.connected, 10, "connection loss noticed")
            release.set()  # the running request ends while RabbitMQ is down
            wait_until(lambda: handler.finished == 1, 5, "first request finished")

        rabbit.restart_app(down_s=0.5, while_down=end_first_request)

        for request_id, n in ((first, 1), (second, 2)):
            result = client.wait_for(request_id, [name], timeout=20)
            assert result["services"][name] == [
                ["request_start", None], [ACTION_REQUEST_SUCCESS, {"written": n}]]
        assert [c[0] for c in handler.calls] == [first, second]  # the first ran once
        third = client.send_request(name, {"n": 3})
        assert client.wait_for(third, [name], timeout=10)["status"] == ACTION_REQUEST_SUCCESS
    finally:
        service.stop(timeout=5)
        client.close()
    wait_until(lambda: not [t for t in threading.enumerate()
                            if t not in threads_before and t.is_alive()], 5, "threads end")
