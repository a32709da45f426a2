"""Broker framework against the real RabbitMQ on 127.0.0.1:5672.

Every test uses its own service names (uuid), deletes the durable queues it created and
checks that every thread it started has ended. Connection-loss tests close one of our own
connections (rabbitmqctl) or cut a TCP proxy; the RabbitMQ server itself is never restarted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pytest

from services.broker import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_START,
    ACTION_REQUEST_SUCCESS,
    BrokerClient,
    BrokerError,
    PostprocessingService,
    PrimaryService,
)
from services.broker.protocol import request_queue_name, status_queue_name
from tests.broker_client import WatchingClient
from tests.netproxy import TcpProxy

pytestmark = pytest.mark.timeout(60)

HOST, PORT = "127.0.0.1", 5672
START = [ACTION_REQUEST_START, None]


def unique(kind: str) -> str:
    return f"t.{kind}.{uuid.uuid4().hex[:10]}"


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


class Recorder:
    """A handler recording its calls; ``work(request_id, request)`` does the request."""

    def __init__(self, work: Callable[[str, dict], Any] | None = None):
        self.work = work or (lambda request_id, request: {"done": request_id})
        self.calls: list[tuple[str, dict]] = []
        self.kills: list[str] = []
        self.killed: set[str] = set()
        self.threads: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self.finished = 0
        self.lock = threading.Lock()

    def on_request(self, request_id: str, request: dict) -> Any:
        with self.lock:
            self.calls.append((request_id, request))
            self.threads["request"] = threading.get_ident()
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return self.work(request_id, request)
        finally:
            with self.lock:
                self.active -= 1
                self.finished += 1

    def on_kill(self, request_id: str) -> None:
        with self.lock:
            self.kills.append(request_id)
            self.killed.add(request_id)
            self.threads["kill"] = threading.get_ident()


class Broker:
    """Starts services and clients for one test and cleans up after it."""

    def __init__(self) -> None:
        self.threads_before = set(threading.enumerate())
        self.services: list[Any] = []
        self.clients: list[BrokerClient] = []
        self.queues: set[str] = set()
        self.plain: list[pika.BlockingConnection] = []

    def primary(self, name: str, handler: Any, **kwargs: Any) -> PrimaryService:
        service = PrimaryService(name, handler, HOST, min_backoff=0.1, max_backoff=0.5,
                                 **kwargs)
        self.queues.add(request_queue_name(name))
        return self._start(service)

    def postprocessing(self, name: str, primary: str, handler: Any,
                       **kwargs: Any) -> PostprocessingService:
        service = PostprocessingService(name, primary, handler, HOST, min_backoff=0.1,
                                        **kwargs)
        self.queues.add(status_queue_name(name))
        return self._start(service)

    def _start(self, service: Any) -> Any:
        self.services.append(service)
        service.start()
        service.wait_ready(10)
        return service

    def client(self, **kwargs: Any) -> WatchingClient:
        client = WatchingClient(HOST, **kwargs)
        self.clients.append(client)
        client.wait_ready(10)
        return client

    def channel(self) -> pika.adapters.blocking_connection.BlockingChannel:
        """A plain pika channel (no stddaq code), closed after the test."""
        connection = pika.BlockingConnection(pika.ConnectionParameters(HOST, PORT))
        self.plain.append(connection)
        return connection.channel()

    def ready_count(self, queue: str) -> int:
        channel = self.channel()
        count = channel.queue_declare(queue, passive=True).method.message_count
        channel.close()
        return count

    def cleanup(self) -> None:
        for service in self.services:
            service.stop(timeout=5)
        for client in self.clients:
            client.close()
        channel = self.channel()
        for queue in self.queues:
            channel.queue_delete(queue)
        for connection in self.plain:
            if connection.is_open:
                connection.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            left = [t for t in threading.enumerate()
                    if t not in self.threads_before and t.is_alive()]
            if not left:
                return
            time.sleep(0.05)
        raise AssertionError(f"threads left running: {[t.name for t in left]}")


@pytest.fixture
def broker():
    helper = Broker()
    yield helper
    helper.cleanup()


def rabbitmqctl(*args: str) -> str:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not available")
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"rabbitmqctl {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def close_connection(connection_name: str) -> None:
    """Make RabbitMQ close the connection with this client-provided name."""
    listing = rabbitmqctl("list_connections", "pid", "client_properties", "-q")
    pids = [line.split("\t")[0] for line in listing.splitlines()
            if f'"{connection_name}"' in line or f"{connection_name}" in line]
    assert len(pids) == 1, f"connection {connection_name!r} not found once in:\n{listing}"
    rabbitmqctl("close_connection", pids[0], "stddaq test: connection loss")


# ---------------------------------------------------------------------------- life cycle


def test_success_and_failure_statuses(broker):
    name = unique("primary")

    def work(request_id: str, request: dict) -> Any:
        if request.get("fail"):
            raise ValueError("n_images must be positive")
        return {"written": request["n_images"], "file": "/tmp/x.h5"}

    handler = Recorder(work)
    broker.primary(name, handler)
    client = broker.client()

    ok_id = client.send_request(name, {"n_images": 5})
    result = client.wait_for(ok_id, [name], timeout=10)
    assert result["status"] == ACTION_REQUEST_SUCCESS
    assert result["request"] == {"n_images": 5}
    assert result["services"] == {
        name: [START, [ACTION_REQUEST_SUCCESS, {"written": 5, "file": "/tmp/x.h5"}]]}

    fail_id = client.send_request(name, {"n_images": 0, "fail": True})
    result = client.wait_for(fail_id, timeout=10)
    assert result["status"] == ACTION_REQUEST_FAIL
    assert result["services"] == {
        name: [START, [ACTION_REQUEST_FAIL, "n_images must be positive"]]}
    assert [c[0] for c in handler.calls] == [ok_id, fail_id]
    wait_until(lambda: broker.ready_count(request_queue_name(name)) == 0, 5, "empty queue")


def test_bad_requests_fail_and_the_service_keeps_serving(broker):
    name = unique("primary")
    handler = Recorder()
    broker.primary(name, handler)
    client = broker.client()
    channel = broker.channel()
    expected = {
        b"not json {": "request body is not valid JSON",
        b"[1, 2]": "request body must be a JSON object, got an array",
        b"null": "request body must be a JSON object, got null",
        b"\xff\xfe": "request body is not valid UTF-8",
    }
    ids = {}
    for body in expected:
        request_id = str(uuid.uuid4())
        channel.basic_publish("request", name, body,
                              pika.BasicProperties(correlation_id=request_id))
        ids[body] = request_id
    for body, text in expected.items():
        result = client.wait_for(ids[body], [name], timeout=10)
        ((action, message),) = result["services"][name]  # refused: no request_start
        assert action == ACTION_REQUEST_FAIL and message.startswith(text), message
    assert handler.calls == []

    good = client.send_request(name, {"n_images": 1})
    assert client.wait_for(good, [name], timeout=10)["status"] == ACTION_REQUEST_SUCCESS
    assert [c[0] for c in handler.calls] == [good]


def test_kill_reaches_the_running_request_and_old_ids_are_ignored(broker):
    name = unique("primary")
    handler: Recorder

    def work(request_id: str, request: dict) -> dict:
        deadline = time.monotonic() + 10
        while request_id not in handler.killed and time.monotonic() < deadline:
            time.sleep(0.01)
        return {"killed": request_id in handler.killed}

    handler = Recorder(work)
    broker.primary(name, handler)
    client = broker.client()
    request_id = client.send_request(name, {"n_images": 1000})
    client.wait_for_start(request_id, [name], timeout=10)
    wait_until(lambda: handler.active == 1, 5, "on_request running")

    client.kill_request(name, "an-old-request-id")
    wait_until(lambda: "an-old-request-id" in handler.kills, 5, "the old kill")
    time.sleep(0.2)
    assert handler.active == 1  # still running
    assert client.statuses(request_id)["services"][name] == [START]

    client.kill_request(name, request_id)
    result = client.wait_for(request_id, [name], timeout=10)
    assert result["services"][name] == [START, [ACTION_REQUEST_SUCCESS, {"killed": True}]]
    assert handler.kills == ["an-old-request-id", request_id]
    assert handler.threads["kill"] != handler.threads["request"]


def test_one_request_at_a_time(broker):
    name = unique("primary")
    release = threading.Event()

    def work(request_id: str, request: dict) -> int:
        if request["i"] == 0:
            assert release.wait(10)
        return request["i"]

    handler = Recorder(work)
    broker.primary(name, handler)
    client = broker.client()
    first = client.send_request(name, {"i": 0})
    second = client.send_request(name, {"i": 1})
    client.wait_for_start(first, [name], timeout=10)
    time.sleep(0.3)
    assert [c[0] for c in handler.calls] == [first]
    assert client.statuses(second)["services"] == {}
    assert broker.ready_count(request_queue_name(name)) == 1  # waits in RabbitMQ (prefetch 1)
    release.set()
    assert client.wait_for(second, [name], timeout=10)["services"][name][-1] == [
        ACTION_REQUEST_SUCCESS, 1]
    assert client.wait_for(first, [name], timeout=1)["status"] == ACTION_REQUEST_SUCCESS
    assert [c[0] for c in handler.calls] == [first, second]
    assert handler.max_active == 1


def test_request_sent_while_the_service_is_down_runs_when_it_is_back(broker):
    name = unique("primary")
    first = broker.primary(name, Recorder())
    first.stop()
    client = broker.client()
    request_id = client.send_request(name, {"n_images": 2})
    with pytest.raises(TimeoutError, match=name):
        client.wait_for_start(request_id, [name], timeout=0.5)
    assert broker.ready_count(request_queue_name(name)) == 1

    handler = Recorder()
    broker.primary(name, handler)
    result = client.wait_for(request_id, [name], timeout=10)
    assert result["services"][name] == [START, [ACTION_REQUEST_SUCCESS, {"done": request_id}]]
    assert [c[0] for c in handler.calls] == [request_id]


def test_stop_can_kill_the_running_request_and_still_reports_it(broker):
    name = unique("primary")
    handler: Recorder

    def work(request_id: str, request: dict) -> str:
        wait_until(lambda: request_id in handler.killed, 10, "kill")
        return "stopped early"

    handler = Recorder(work)
    service = broker.primary(name, handler)
    client = broker.client()
    request_id = client.send_request(name, {})
    wait_until(lambda: handler.active == 1, 5, "on_request running")
    service.stop(timeout=5, kill_running=True)
    result = client.wait_for(request_id, [name], timeout=5)
    assert result["services"][name] == [START, [ACTION_REQUEST_SUCCESS, "stopped early"]]
    assert broker.ready_count(request_queue_name(name)) == 0  # acked, not requeued


def test_services_sharing_a_tag_each_get_the_request(broker):
    tag = unique("beamline")
    writer, epics = unique("writer"), unique("epics")
    writer_handler, epics_handler = Recorder(), Recorder()
    broker.primary(writer, writer_handler, tag=tag)
    broker.primary(epics, epics_handler, tag=tag)
    client = broker.client()
    request_id = client.send_request(tag, {"output_file": "/tmp/b.h5"})
    result = client.wait_for(request_id, [writer, epics], timeout=10)
    assert result["status"] == ACTION_REQUEST_SUCCESS
    assert writer_handler.calls == epics_handler.calls == [
        (request_id, {"output_file": "/tmp/b.h5"})]


def test_kill_without_on_kill_is_ignored(broker):
    name = unique("primary")

    class NoKill:
        def on_request(self, request_id: str, request: dict) -> str:
            time.sleep(0.3)
            return "ok"

    broker.primary(name, NoKill())
    client = broker.client()
    request_id = client.send_request(name, {})
    client.kill_request(name, request_id)
    assert client.wait_for(request_id, [name], timeout=10)["status"] == ACTION_REQUEST_SUCCESS
    again = client.send_request(name, {})
    assert client.wait_for(again, [name], timeout=10)["status"] == ACTION_REQUEST_SUCCESS


# ---------------------------------------------------------------------------- post-processing


def test_postprocessing_rules(broker):
    primary, other, post = unique("primary"), unique("other"), unique("post")
    order: list[tuple[str, str, str]] = []

    def primary_work(request_id: str, request: dict) -> str:
        if request.get("fail"):
            raise RuntimeError("disk full")
        return "written"

    def post_work(request_id: str, request: dict) -> dict:
        if request.get("post_fail"):
            raise RuntimeError("cannot copy")
        return {"copied": request_id}

    post_handler = Recorder(post_work)
    broker.primary(primary, Recorder(primary_work))
    broker.primary(other, Recorder())
    broker.postprocessing(post, primary, post_handler)
    client = broker.client(
        status_callback=lambda rid, req, headers: order.append(
            (rid, headers["source"], headers["action"])))

    ok_id = client.send_request(primary, {"n": 1})
    result = client.wait_for(ok_id, [primary, post], timeout=10)
    assert result["services"][post] == [START, [ACTION_REQUEST_SUCCESS, {"copied": ok_id}]]
    assert result["request"] == {"n": 1}
    mine = [(s, a) for rid, s, a in order if rid == ok_id]
    assert mine.index((post, ACTION_REQUEST_START)) > mine.index(
        (primary, ACTION_REQUEST_SUCCESS))

    fail_id = client.send_request(primary, {"fail": True})
    result = client.wait_for(fail_id, [primary, post], timeout=10)
    assert result["services"][primary][-1] == [ACTION_REQUEST_FAIL, "disk full"]
    assert result["services"][post] == [
        [ACTION_REQUEST_FAIL, f"Primary service {primary} failure. "]]
    assert result["status"] == ACTION_REQUEST_FAIL

    post_fail_id = client.send_request(primary, {"post_fail": True})
    result = client.wait_for(post_fail_id, [primary, post], timeout=10)
    assert result["services"][post] == [START, [ACTION_REQUEST_FAIL, "cannot copy"]]

    other_id = client.send_request(other, {"n": 2})
    client.wait_for(other_id, [other], timeout=10)
    last_id = client.send_request(primary, {"n": 3})  # the post queue is FIFO: other's
    client.wait_for(last_id, [primary, post], timeout=10)  # statuses were handled before
    assert post not in client.statuses(other_id)["services"]
    assert [c[0] for c in post_handler.calls] == [ok_id, post_fail_id, last_id]


# ---------------------------------------------------------------------------- interop


def declare_like_the_original(channel) -> None:
    channel.exchange_declare("request", "topic")
    channel.exchange_declare("status", "fanout")
    channel.exchange_declare("kill", "topic")


def test_interop_original_style_client_with_stddaq_service(broker):
    name = unique("primary")
    handler = Recorder(lambda request_id, request: {"written": request["n_images"]})
    broker.primary(name, handler)
    channel = broker.channel()
    declare_like_the_original(channel)
    status_queue = channel.queue_declare(str(uuid.uuid4()), exclusive=True,
                                         auto_delete=True).method.queue
    channel.queue_bind(status_queue, "status")

    request_id = str(uuid.uuid4())
    body = json.dumps({"output_file": "/tmp/a.h5", "n_images": 3}).encode()
    channel.basic_publish("request", name, body,
                          pika.BasicProperties(correlation_id=request_id, headers={}))
    seen = []
    for method, properties, status_body in channel.consume(status_queue, auto_ack=True,
                                                            inactivity_timeout=10):
        assert method is not None, f"statuses missing, got {seen}"
        if properties.correlation_id == request_id:
            seen.append((properties.headers, status_body))
        if len(seen) == 2:
            break
    channel.cancel()
    assert seen == [
        ({"action": "request_start", "source": name, "message": None}, body),
        ({"action": "request_success", "source": name, "message": {"written": 3}}, body),
    ]
    assert handler.calls == [(request_id, {"output_file": "/tmp/a.h5", "n_images": 3})]


def test_interop_stddaq_client_with_original_style_service(broker):
    name = unique("original")
    channel = broker.channel()
    declare_like_the_original(channel)
    channel.basic_qos(prefetch_count=1)
    request_queue = channel.queue_declare(str(uuid.uuid4()), exclusive=True,
                                          auto_delete=True).method.queue
    channel.queue_bind(request_queue, "request", routing_key=name)
    client = broker.client()

    request_id = client.send_request(name, {"n_images": 7}, headers={"user": "e12345"})
    method = None
    deadline = time.monotonic() + 10
    while method is None and time.monotonic() < deadline:
        method, properties, body = channel.basic_get(request_queue)
    assert method is not None
    assert properties.correlation_id == request_id and properties.headers == {"user": "e12345"}
    assert json.loads(body) == {"n_images": 7}
    for action, message in ((ACTION_REQUEST_START, None), (ACTION_REQUEST_SUCCESS, "done")):
        channel.basic_publish("status", name, body, pika.BasicProperties(
            correlation_id=request_id,
            headers={"action": action, "source": name, "message": message}))
    channel.basic_ack(method.delivery_tag)
    result = client.wait_for(request_id, timeout=10)
    assert result["services"] == {name: [START, [ACTION_REQUEST_SUCCESS, "done"]]}


# ---------------------------------------------------------------------------- connection loss


def blocking_handler() -> tuple[Recorder, threading.Event]:
    release = threading.Event()

    def work(request_id: str, request: dict) -> dict:
        assert release.wait(20)
        return {"written": request["n_images"]}

    return Recorder(work), release


def test_connection_closed_by_rabbitmq_while_a_request_runs(broker):
    name = unique("primary")
    handler, release = blocking_handler()
    service = broker.primary(name, handler)
    client = broker.client()
    request_id = client.send_request(name, {"n_images": 4})
    client.wait_for_start(request_id, [name], timeout=10)
    wait_until(lambda: handler.active == 1, 5, "on_request running")
    wait_until(lambda: service._conn.pending() == 0, 5, "start status confirmed")

    close_connection(service.connection_name)
    wait_until(lambda: service._conn.n_connects >= 2, 10, "reconnect")
    # RabbitMQ requeued the unacked request and delivers it again: recognised, not rerun
    wait_until(lambda: service.counters["redelivered"] == 1, 10, "redelivery")
    assert len(handler.calls) == 1
    assert client.statuses(request_id)["services"][name] == [START]

    release.set()
    result = client.wait_for(request_id, [name], timeout=10)
    time.sleep(0.3)  # a duplicate status would arrive by now
    assert client.statuses(request_id)["services"][name] == [
        START, [ACTION_REQUEST_SUCCESS, {"written": 4}]], result
    assert len(handler.calls) == 1
    assert broker.ready_count(request_queue_name(name)) == 0

    after = client.send_request(name, {"n_images": 1})  # still serving
    assert client.wait_for(after, [name], timeout=10)["status"] == ACTION_REQUEST_SUCCESS


def test_broker_outage_the_final_status_is_published_after_reconnecting(broker):
    name = unique("primary")
    handler, release = blocking_handler()
    with TcpProxy((HOST, PORT)) as proxy:
        service = broker.primary(name, handler, port=proxy.port)
        client = broker.client()
        request_id = client.send_request(name, {"n_images": 9})
        client.wait_for_start(request_id, [name], timeout=10)
        wait_until(lambda: handler.active == 1, 5, "on_request running")
        wait_until(lambda: service._conn.pending() == 0, 5, "start status confirmed")

        proxy.down()  # connections cut, new ones refused: RabbitMQ "gone"
        wait_until(lambda: not service.connected, 10, "connection loss noticed")
        release.set()  # the request ends while RabbitMQ is unreachable
        wait_until(lambda: handler.finished == 1, 5, "request finished")
        time.sleep(0.5)
        assert client.statuses(request_id)["services"][name] == [START]

        proxy.up()
        result = client.wait_for(request_id, [name], timeout=15)
        assert result["services"][name] == [START, [ACTION_REQUEST_SUCCESS, {"written": 9}]]
        wait_until(lambda: service.counters["redelivered"] == 1, 10, "redelivery acked")
        time.sleep(0.3)
        # sent just after a reconnect, the final status goes out once more for late
        # subscribers; the client drops the copy (same message_id)
        wait_until(lambda: client.duplicates >= 1, 8, "the re-sent copy")
        assert client.statuses(request_id)["services"][name] == [
            START, [ACTION_REQUEST_SUCCESS, {"written": 9}]]
        assert len(handler.calls) == 1
        assert broker.ready_count(request_queue_name(name)) == 0
        after = client.send_request(name, {"n_images": 1})
        assert client.wait_for(after, [name], timeout=10)["status"] == ACTION_REQUEST_SUCCESS
        service.stop(timeout=5)


# ---------------------------------------------------------------------------- client errors


def test_wait_for_timeout_names_the_missing_services(broker):
    name = unique("primary")
    broker.primary(name, Recorder())
    client = broker.client()
    request_id = client.send_request(name, {})
    assert client.wait_for(request_id, 1, timeout=10)["status"] == ACTION_REQUEST_SUCCESS
    with pytest.raises(TimeoutError, match=r"not finished: t\.ghost\.x \(no status yet\)$"):
        client.wait_for(request_id, [name, "t.ghost.x"], timeout=0.3)
    with pytest.raises(TimeoutError, match="1 of 2 services finished"):
        client.wait_for(request_id, 2, timeout=0.3)


def test_client_without_broker_fails_clearly():
    with TcpProxy((HOST, PORT)) as proxy:
        port = proxy.port
    client = BrokerClient(HOST, port, publish_timeout=0.5)  # nothing listens there
    try:
        with pytest.raises(TimeoutError, match=r"no connection to RabbitMQ.*last error"):
            client.wait_ready(0.5)
        with pytest.raises(BrokerError, match=r"not sent within 0\.5 s"):
            client.send_request("t.nobody", {"n": 1})
    finally:
        client.close()


def test_request_to_a_tag_no_service_is_bound_to_fails(broker):
    client = broker.client()
    with pytest.raises(BrokerError, match=r"no service queue is bound to tag 't\.nobody\."):
        client.send_request(unique("nobody"), {"n": 1}, timeout=0.6)


def test_broker_credentials_come_from_the_environment(monkeypatch):
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed: cannot add a RabbitMQ user")
    user, password = f"stddaq-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex

    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)

    ctl("add_user", user, password)
    try:
        ctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        monkeypatch.setenv("BROKER_USER", user)
        monkeypatch.setenv("BROKER_PASSWORD", password)
        client = BrokerClient("127.0.0.1", status_callback=None)
        try:
            client.wait_ready(10)
            assert client.connected
        finally:
            client.close()
        monkeypatch.setenv("BROKER_PASSWORD", "wrong")
        refused = BrokerClient("127.0.0.1", status_callback=None)
        try:
            with pytest.raises(TimeoutError, match="ACCESS_REFUSED"):
                refused.wait_ready(3)
        finally:
            refused.close()
    finally:
        ctl("delete_user", user)
