"""stddaq-writer-agent as a real process on real RabbitMQ and Redis, with stddaq-h5-writer.

The test plays the assembler (tests.test_writer_agent.FakeAssembler) and the user (DaqClient,
plain pika for the original's wire format).
"""

from __future__ import annotations

import json
import time
import uuid

import h5py
import pika
import pytest
import redis

from fastcore.config import load_config
from services.broker.protocol import request_queue_name
from services.daq_client import DaqClient, StdDaqError
from tests.conftest import Proc, module_cmd
from tests.netproxy import TcpProxy
from tests.test_broker import close_connection, declare_like_the_original
from tests.test_writer_agent import FakeAssembler

pytestmark = pytest.mark.timeout(120)


class AgentSetup:
    def __init__(self, make_config, ipc_dir, tmp_path, redis_port=6379, **overrides):
        self.out_dir = tmp_path / "data"
        self.out_dir.mkdir()
        path, _ = make_config("jungfrau_1m.json", output_root=str(self.out_dir), **overrides)
        self.config = load_config(path)
        self.service = f"t.{uuid.uuid4().hex[:8]}.writer"
        self.assembler = FakeAssembler(self.config, ipc_dir, n_slots=64)
        self.writers: list[Proc] = []
        self.agent = self.client = None
        try:
            self._start(path, ipc_dir, tmp_path, redis_port)
        except BaseException:
            self.close()
            raise
        self.next_id = 1

    def _start(self, path, ipc_dir, tmp_path, redis_port) -> None:
        for i in range(self.config.n_writers):
            self.writers.append(Proc(module_cmd(
                "fastcore.h5_writer", str(path), "--ipc-dir", ipc_dir, "--writer-index",
                str(i)), tmp_path / f"writer{i}.log"))
            self.writers[-1].wait_for("ready")
        self.agent = Proc(module_cmd(
            "services.writer_agent", "--service_name", self.service, "--json_config_file",
            str(path), "--ipc-dir", ipc_dir, "--image-timeout", "5",
            "--redis_port", str(redis_port)), tmp_path / "agent.log")
        self.agent.wait_for("ready")
        self.client = DaqClient(self.service, "127.0.0.1", redis.Redis("127.0.0.1", 6379))
        self.client.start()

    def emit(self, n: int, pause: float = 0.01) -> None:
        for _ in range(n):
            self.assembler.emit(self.next_id)
            self.next_id += 1
            time.sleep(pause)

    def out(self, name: str) -> str:
        return str(self.out_dir / name)

    def close(self) -> None:
        codes = {}
        if self.client is not None:
            self.client.close()
        for proc in (self.agent, *self.writers):
            if proc is not None:
                codes[proc.log_path.name] = proc.stop()
        self.assembler.close()
        channel = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1")).channel()
        channel.queue_delete(request_queue_name(self.service))
        channel.connection.close()
        redis.Redis("127.0.0.1", 6379).delete(f"status.{self.service}")
        assert set(codes.values()) <= {0}, codes


@pytest.fixture
def agent(make_config, ipc_dir, tmp_path):
    setup = AgentSetup(make_config, ipc_dir, tmp_path)
    yield setup
    setup.close()


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_request_life_cycle_to_a_file(agent):
    run = agent.client.start_write({"output_file": agent.out("a.h5"), "n_images": 6,
                                    "metadata": {"sample": "Si"}})
    progress = []
    run.add_progress_callback(progress.append)
    agent.emit(8)
    assert run.done.wait(15) and not run.failed, run.message
    assert run.result["n_images"] == 6 and run.result["output_file"] == agent.out("a.h5")
    assert run.n_written == 6 and progress and progress == sorted(progress)
    with h5py.File(agent.out("a.h5"), "r") as f:
        assert list(f[agent.config.detector_name]["image_id"]) == [1, 2, 3, 4, 5, 6]
    def counters():
        status = redis.Redis("127.0.0.1", 6379).hgetall(f"status.{agent.service}")
        return json.loads(status.get(b"counters", b"{}"))

    wait_for(lambda: counters().get("succeeded") == 1, timeout=5)  # heartbeat: every 1 s
    assert counters()["images_written"] == 6


def test_kill_mid_run_gives_a_valid_partial_file(agent):
    run = agent.client.start_write({"output_file": agent.out("k.h5"), "n_images": 1000})
    agent.emit(4)
    wait_for(lambda: run.n_written >= 4)
    agent.client.kill(run, timeout=15)
    assert not run.failed and run.result["killed"] is True
    assert run.result["n_images"] == 4
    with h5py.File(agent.out("k.h5"), "r") as f:
        assert f[agent.config.detector_name]["data"].shape[0] == 4


def test_second_request_while_busy_is_refused(agent):
    run = agent.client.start_write({"output_file": agent.out("b1.h5"), "n_images": 3})
    with pytest.raises(StdDaqError, match=rf"busy: {agent.service} is running request "
                                       rf"{run.request_id}"):
        agent.client.start_write({"output_file": agent.out("b2.h5"), "n_images": 1})
    agent.emit(3)
    assert run.done.wait(15) and not run.failed


@pytest.mark.parametrize("request_, message", [
    ({"n_images": 3}, "output_file: missing"),
    ({"output_file": "/etc/passwd.h5", "n_images": 3}, "is outside the output root"),
    ({"output_file": "{out}/x.h5", "n_images": -1}, "n_images: expected an integer >= 1"),
])
def test_malformed_requests_fail_naming_the_field(agent, request_, message):
    if "output_file" in request_:
        request_ = dict(request_, output_file=request_["output_file"].format(
            out=agent.out_dir))
    with pytest.raises(StdDaqError, match=message):
        agent.client.start_write(request_)
    run = agent.client.start_write({"output_file": agent.out("after.h5"), "n_images": 1})
    agent.emit(1)
    assert run.done.wait(15) and not run.failed, "the service must keep serving"


def test_original_wire_format_with_plain_pika(agent):
    """A request in the original's format, sent and followed with plain pika only."""
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    channel = connection.channel()
    declare_like_the_original(channel)
    status_queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    channel.queue_bind(status_queue, "status")
    request_id = str(uuid.uuid4())
    body = json.dumps({"output_file": agent.out("orig.h5"), "n_images": 2, "user_id": 0})
    channel.basic_publish("request", agent.service, body.encode(), pika.BasicProperties(
        correlation_id=request_id))
    statuses = []
    deadline = time.monotonic() + 20
    emitted = False
    while time.monotonic() < deadline and len(statuses) < 2:
        method, properties, status_body = channel.basic_get(status_queue, auto_ack=True)
        if method is None:
            if statuses and not emitted:
                agent.emit(3)
                emitted = True
            time.sleep(0.05)
            continue
        if properties.correlation_id == request_id:
            statuses.append((properties.headers, status_body))
    connection.close()
    assert [h["action"] for h, _ in statuses] == ["request_start", "request_success"]
    assert all(h["source"] == agent.service for h, _ in statuses)
    assert statuses[0][0]["message"] is None
    assert statuses[1][0]["message"]["output_file"] == agent.out("orig.h5")
    assert all(b == body.encode() for _, b in statuses)  # the request body, verbatim


def test_broker_connection_loss_mid_run_still_finishes(agent):
    run = agent.client.start_write({"output_file": agent.out("loss.h5"), "n_images": 6})
    agent.emit(2)
    close_connection(f"stddaq primary {agent.service}")
    agent.emit(4, pause=0.05)
    assert run.done.wait(30) and not run.failed, run.message
    assert run.result["n_images"] == 6
    assert agent.agent.popen.poll() is None


def test_redis_down_the_agent_keeps_writing(make_config, ipc_dir, tmp_path):
    with TcpProxy(("127.0.0.1", 6379)) as proxy:
        setup = AgentSetup(make_config, ipc_dir, tmp_path, redis_port=proxy.port)
        try:
            proxy.down()
            run = setup.client.start_write({"output_file": setup.out("r.h5"),
                                            "n_images": 3})
            setup.emit(3)
            assert run.done.wait(15) and not run.failed, run.message
            assert run.result["n_images"] == 3
            wait_for(lambda: "Redis unavailable" in setup.agent.output, timeout=5)
            proxy.up()
            wait_for(lambda: redis.Redis("127.0.0.1", 6379).exists(
                f"status.{setup.service}"), timeout=10)
        finally:
            setup.close()


def test_a_request_the_agent_died_on_is_failed_not_run_again(agent, ipc_dir, tmp_path):
    """kill -9 of the agent mid-request: RabbitMQ delivers the request again to the restarted
    agent, which fails it (a request that killed a process would kill it again)."""
    run = agent.client.start_write({"output_file": agent.out("died.h5"), "n_images": 1000})
    agent.emit(3)
    wait_for(lambda: run.n_written >= 3)
    agent.agent.popen.kill()
    agent.agent.popen.wait(10)
    args = agent.agent.args
    agent.agent = Proc(args, tmp_path / "agent2.log")
    agent.agent.wait_for("ready:")
    assert run.done.wait(20) and run.failed
    assert run.message == (f"not run again: {agent.service} stopped while running request "
                           f"{run.request_id} (it crashed or was killed; see its log)")
    later = agent.client.start_write({"output_file": agent.out("later.h5"), "n_images": 2})
    agent.emit(3)
    assert later.done.wait(20) and not later.failed, later.message
