"""stddaq-request and stddaq-monitor as real processes against the real RabbitMQ and Redis.

The services are small PrimaryServices in the test process (unique names, queues deleted
by tests.test_broker.Broker, which also checks that every thread ended); the tools run
with ``python -m`` as a user would run the console scripts.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from fastcore.status import StatusHeartbeat, redis_client
from services.broker.protocol import request_queue_name
from services.progress import WriteProgress
from tests.conftest import REPO, free_tcp_port
from tests.test_broker import Broker, unique, wait_until

pytestmark = pytest.mark.timeout(60)

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
REQUEST = "services.cli.request"
MONITOR = "services.cli.monitor"


def cli(module: str, *args: str, input: str | None = None,
        timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, input=input, timeout=timeout, cwd=REPO)


def short(request_id: str) -> str:
    return f"[{request_id[:4]}..{request_id[-4:]}]"


def assert_one_error_line(result: subprocess.CompletedProcess, prog: str) -> str:
    """The error is one ``prog: error: ...`` line (the last one), never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


class Handler:
    """``mode`` in the request: ok (default), fail, block (until killed or released),
    progress (publishes n_images progress messages on Redis first)."""

    def __init__(self, name: str, always_fail: bool = False):
        self.name = name
        self.always_fail = always_fail
        self.calls: list[tuple[str, dict]] = []
        self.kills: list[str] = []
        self.release = threading.Event()
        self.redis = redis.Redis("127.0.0.1", 6379)

    def on_request(self, request_id: str, request: dict) -> Any:
        self.calls.append((request_id, request))
        mode = request.get("mode", "ok")
        if self.always_fail or mode == "fail":
            raise ValueError("disk full on /data")
        if mode == "block":
            self.release.wait(20)
            return {"killed": request_id in self.kills}
        if mode == "progress":
            n = request["n_images"]
            for i in range(1, n + 1):
                time.sleep(0.05)
                self.redis.publish(f"stddaq.progress.{self.name}", json.dumps(WriteProgress(
                    request_id, 1, request["output_file"], n, n_rows=i, n_written=i,
                    done=i == n).to_dict()))
        return {"n_images": request.get("n_images"), "output_file": request.get("output_file")}

    def on_kill(self, request_id: str) -> None:
        self.kills.append(request_id)
        self.release.set()

    def close(self) -> None:
        self.release.set()
        self.redis.close()


@pytest.fixture
def broker():
    helper = Broker()
    handlers: list[Handler] = []

    def service(name: str | None = None, **kwargs: Any) -> tuple[str, Handler]:
        name = name or unique("cli")
        handler = Handler(name, always_fail=kwargs.pop("always_fail", False))
        handlers.append(handler)
        helper.primary(name, handler, **kwargs)
        return name, handler

    helper.service = service
    yield helper
    for handler in handlers:
        handler.close()
    helper.cleanup()


class Lines:
    """Collects a process's output lines in a thread; ``wait_for`` a matching line."""

    def __init__(self, stream: Any):
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float = 10) -> str:
        with self.changed:
            found = self.changed.wait_for(
                lambda: next((line for line in self.lines if match(line)), None), timeout)
        assert found, f"no matching line in {self.lines}"
        return found


class Running:
    """A tool running in the background; Ctrl-C (SIGINT) stops it."""

    def __init__(self, module: str, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.out = Lines(self.proc.stdout)
        self.err = Lines(self.proc.stderr)

    def interrupt(self, timeout: float = 10) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout)
        self.out.thread.join(5)
        self.err.thread.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.out.thread.join(5)
        self.err.thread.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()


# ---------------------------------------------------------------------------- stddaq-request


def test_request_from_set_pairs_follows_statuses_and_progress(broker):
    name, handler = broker.service()
    result = cli(REQUEST, name, "--set", "n_images=4", "--set", "output_file=/data/x.h5",
                 "--set", "mode=progress", "--set", "metadata.sample=Si",
                 "--set", "metadata.temperature=4.5", "--set", "flag=true",
                 "--set", 'label="10"', "--set", "empty=", "--timeout", "15")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    (request_id, request), = handler.calls
    assert request == {"n_images": 4, "output_file": "/data/x.h5", "mode": "progress",
                       "metadata": {"sample": "Si", "temperature": 4.5}, "flag": True,
                       "label": "10", "empty": ""}
    assert f"request {request_id} sent to {name}" in result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if f"{name}  start" in line)
    end = next(i for i, line in enumerate(lines) if f"{name}  success" in line)
    assert start < end and '"output_file": "/data/x.h5"' in lines[end]
    assert re.match(r"^\d\d:\d\d:\d\d\.\d{3}  ", lines[start])
    assert any("progress  written 1/4  /data/x.h5" in line for line in lines), lines
    assert any("progress  written 4/4" in line for line in lines), lines
    assert "\033[" not in result.stdout  # no colour when stdout is not a terminal


def test_request_from_stdin_with_override_as_json(broker):
    name, handler = broker.service()
    result = cli(REQUEST, name, "-", "--set", "n_images=5", "--json",
                 input='{"n_images": 3, "output_file": "/data/s.h5", "x": [1, 2]}')
    assert result.returncode == 0, result.stderr
    (request_id, request), = handler.calls
    assert request == {"n_images": 5, "output_file": "/data/s.h5", "x": [1, 2]}
    document = json.loads(result.stdout)
    assert document["request_id"] == request_id and document["tag"] == name
    assert document["status"] == "request_success"
    assert document["services"] == {name: [
        ["request_start", None],
        ["request_success", {"n_images": 5, "output_file": "/data/s.h5"}]]}


def test_failure_exits_1_with_the_service_message(broker):
    name, handler = broker.service()
    result = cli(REQUEST, name, "--set", "mode=fail")
    assert result.returncode == 1
    error = assert_one_error_line(result, "stddaq-request")
    request_id = handler.calls[0][0]
    assert error == (f"stddaq-request: error: request {request_id}: {name} failed: "
                     "disk full on /data")
    assert f"{name}  fail" in result.stdout


def test_timeout_exits_3_naming_the_services(broker):
    name, handler = broker.service()
    started = time.monotonic()
    result = cli(REQUEST, name, "--set", "mode=block", "--timeout", "1")
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 10
    error = assert_one_error_line(result, "stddaq-request")
    request_id = handler.calls[0][0]
    assert f"timeout after 1 s: request {request_id} did not finish: {name} (last status " \
           "request_start)" in error
    assert f"stddaq-request {name} --kill {request_id}" in error
    handler.release.set()

    ghost = unique("ghost")  # expected by name, never reports
    result = cli(REQUEST, name, "--set", "n_images=1", "--services", f"{name},{ghost}",
                 "--timeout", "1")
    assert result.returncode == 3, result.stderr
    error = assert_one_error_line(result, "stddaq-request")
    assert f"{ghost} (no status)" in error and f"{name} (" not in error
    assert f"{name}  success" in result.stdout


def test_no_wait_prints_the_request_id(broker):
    name, handler = broker.service()
    result = cli(REQUEST, name, "--set", "n_images=2", "--no-wait")
    assert result.returncode == 0, result.stderr
    request_id = result.stdout.strip()
    assert UUID.match(request_id), result.stdout
    wait_until(lambda: handler.calls, what="the request")
    assert handler.calls[0] == (request_id, {"n_images": 2})


def test_kill_reaches_on_kill(broker):
    name, handler = broker.service()
    sent = cli(REQUEST, name, "--set", "mode=block", "--no-wait")
    assert sent.returncode == 0, sent.stderr
    request_id = sent.stdout.strip()
    wait_until(lambda: handler.calls, what="the request")
    result = cli(REQUEST, name, "--kill", request_id)
    assert result.returncode == 0, result.stderr
    assert f"kill for request {request_id} sent to {name}" in result.stderr
    assert (f"request {request_id} ended at {name}: request_success {{\"killed\": true}}"
            in result.stderr)
    assert handler.kills == [request_id]


def test_kill_for_a_request_that_is_not_running_says_so(broker):
    name, handler = broker.service()
    unknown = "0b8f7c1e-0000-4000-8000-000000000000"
    started = time.monotonic()
    result = cli(REQUEST, name, "--kill", unknown, "--kill-wait", "1.5")
    assert result.returncode == 5, result.stderr
    assert assert_one_error_line(result, "stddaq-request") == (
        f"stddaq-request: error: kill for request {unknown} sent to {name}, but no service "
        "ended it within 1.5 s: no request with that id was running there (unknown id, or it "
        "had already finished)")
    assert time.monotonic() - started < 10
    assert handler.kills == [unknown]  # delivered; the service ignored it


def test_ctrl_c_while_waiting_tells_how_to_kill(broker):
    name, handler = broker.service()
    tool = Running(REQUEST, name, "--set", "mode=block")
    try:
        wait_until(lambda: handler.calls, what="the request")
        request_id = handler.calls[0][0]
        tool.out.wait_for(lambda line: f"{name}  start" in line)
        assert tool.interrupt() == 130
    finally:
        tool.close()
    errors = [line for line in tool.err.lines if "error:" in line]
    assert errors == [f"stddaq-request: error: interrupted; request {request_id} keeps "
                      f"running. Stop it with: stddaq-request {name} --kill {request_id}"]
    assert not any("Traceback" in line for line in tool.err.lines)
    assert handler.kills == []


def test_bad_usage_and_bad_json_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_images": 10,\n "output_file": }\n')
    cases = [
        ((str(bad),), f"{bad}: not valid JSON at line 2 column 17"),
        (("-",), "stdin: the request must be a JSON object ({...}), got an array"),
        ((), "no request: give REQUEST.json"),
        (("--set", "n_images"), "--set 'n_images': expected KEY=VALUE"),
        ((str(tmp_path / "missing.json"),), "missing.json: No such file or directory"),
        (("--kill", "abc", "--set", "a=1"), "--kill sends only a kill"),
        (("--set", "a=1", "--broker_url", "host:port"), "bad port in broker address"),
    ]
    for args, message in cases:
        result = cli(REQUEST, "t.cli.nobody", *args, input="[1, 2]")
        assert result.returncode == 2, (args, result.stderr)
        assert message in assert_one_error_line(result, "stddaq-request"), result.stderr
    result = cli(REQUEST, "t.cli.nobody", "--set", "a=1", "--timeout", "soon")
    assert result.returncode == 2 and "--timeout: expected seconds" in result.stderr
    assert "usage: stddaq-request" in result.stderr


def test_help_has_examples_and_exit_codes():
    for module, prog in ((REQUEST, "stddaq-request"), (MONITOR, "stddaq-monitor")):
        result = cli(module, "--help")
        assert result.returncode == 0
        assert f"usage: {prog}" in result.stdout
        assert "examples:" in result.stdout and "exit codes:" in result.stdout


def test_broker_unreachable_exits_4():
    port = free_tcp_port()
    started = time.monotonic()
    result = cli(REQUEST, "t.cli.nobody", "--set", "a=1", "--broker_url", f"127.0.0.1:{port}")
    assert result.returncode == 4, result.stderr
    assert time.monotonic() - started < 8
    error = assert_one_error_line(result, "stddaq-request")
    assert f"no connection to RabbitMQ at 127.0.0.1:{port}" in error


def test_tag_without_service_exits_5():
    result = cli(REQUEST, unique("nobody"), "--set", "a=1", "--send_timeout", "0.5")
    assert result.returncode == 5, result.stderr
    assert "no service is bound to tag" in assert_one_error_line(result, "stddaq-request")


# ---------------------------------------------------------------------------- stddaq-monitor


def test_monitor_prints_one_line_per_status(broker):
    name, _ = broker.service()
    client = broker.client()
    tool = Running(MONITOR)
    try:
        tool.err.wait_for(lambda line: "watching statuses on RabbitMQ" in line)
        ok_id = client.send_request(name, {"n_images": 1, "output_file": "/data/m.h5"})
        client.wait_for(ok_id, [name], timeout=10)
        fail_id = client.send_request(name, {"mode": "fail"})
        client.wait_for(fail_id, [name], timeout=10)
        tool.out.wait_for(lambda line: line.startswith(short(fail_id)) and "fail" in line)
        assert tool.interrupt() == 0
    finally:
        tool.close()
    mine = [line for line in tool.out.lines
            if line.startswith((short(ok_id), short(fail_id)))]
    assert mine == [f"{short(ok_id)} {name} request_start /data/m.h5",
                    f"{short(ok_id)} {name} request_success /data/m.h5",
                    f"{short(fail_id)} {name} request_start",
                    f"{short(fail_id)} {name} request_fail disk full on /data"]
    assert not any("Traceback" in line for line in tool.err.lines)


def test_monitor_agg_shows_symbols_failures_first(broker):
    tag = unique("tag")
    good = f"{tag}.a"
    bad = f"{tag}.b"
    broker.service(good, tag=tag)
    broker.service(bad, tag=tag, always_fail=True)
    client = broker.client()
    tool = Running(MONITOR, "--agg")
    try:
        tool.err.wait_for(lambda line: "watching statuses on RabbitMQ" in line)
        request_id = client.send_request(tag, {"n_images": 1})
        client.wait_for(request_id, [good, bad], timeout=10)
        final = f"{short(request_id)} [-+] {bad} {good}"
        tool.out.wait_for(lambda line: line == final)
        assert tool.interrupt() == 0
    finally:
        tool.close()
    mine = [line for line in tool.out.lines if line.startswith(short(request_id))]
    assert mine[0] in (f"{short(request_id)} [*] {good}", f"{short(request_id)} [*] {bad}")
    assert mine[-1] == final and len(mine) == 4  # one line per status


def test_monitor_once_lists_heartbeats():
    client = redis_client("127.0.0.1", 6379)
    live = unique("hb")
    stale = unique("hb")
    heartbeat = StatusHeartbeat(live, {"x": 1}, client,
                                counters=lambda: {"requests": 3, "failed": 0}).start()
    heartbeat.set_state("running")
    try:
        client.hset(f"status.{stale}", mapping={
            "service_name": stale, "state": "writing", "heartbeat": time.time() - 60,
            "start_timestamp": int(time.time()) - 3600, "counters": "{}",
            "last_error": "writer crashed"})
        client.expire(f"status.{stale}", 30)
        wait_until(lambda: client.hget(f"status.{live}", "state") == b"running",
                   what="the heartbeat")
        result = cli(MONITOR, "--services", "--once")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split() == ["SERVICE", "STATE", "HEARTBEAT", "UP", "LAST", "ERROR",
                                    "COUNTERS"]
        row = next(line for line in lines if line.startswith(live + " "))
        assert re.search(r" running +\d\.\ds ago .* requests=3 failed=0$", row), row
        row = next(line for line in lines if line.startswith(stale + " "))
        assert re.search(r" writing +STALE 1m0\ds +1h00m +writer crashed", row), row

        result = cli(MONITOR, "--once", "--json")
        assert result.returncode == 0, result.stderr
        rows = {row["service"]: row for row in json.loads(result.stdout)}
        assert rows[live]["state"] == "running" and not rows[live]["stale"]
        assert rows[live]["counters"] == {"requests": 3, "failed": 0}
        assert rows[stale]["stale"] and rows[stale]["last_error"] == "writer crashed"
    finally:
        heartbeat.stop()
        client.delete(f"status.{stale}")
        client.close()
    result = cli(MONITOR, "--once", "--redis_port", str(free_tcp_port()))
    assert result.returncode == 4
    assert "cannot read the heartbeats from Redis" in assert_one_error_line(
        result, "stddaq-monitor")


def test_monitor_unreachable_broker_exits_4():
    port = free_tcp_port()
    result = cli(MONITOR, "--broker_url", f"127.0.0.1:{port}")
    assert result.returncode == 4
    assert f"127.0.0.1:{port}" in assert_one_error_line(result, "stddaq-monitor")



def test_a_request_no_service_takes_expires_and_never_runs_late(broker):
    name, handler = broker.service()
    broker.services[-1].stop()  # the request queue stays; nothing consumes it
    result = cli(REQUEST, name, "--set", "n_images=2", "--start-timeout", "1.5")
    assert result.returncode == 3, result.stderr
    assert re.fullmatch(
        rf"stddaq-request: error: no service started request [0-9a-f-]{{36}} within 1.5 s "
        rf"\(is {name}'s service running, and idle\?\); the request expired from its queue "
        "and will not run later", assert_one_error_line(result, "stddaq-request"))
    wait_until(lambda: broker.ready_count(request_queue_name(name)) == 0, 10,
               "the request to expire")
    broker.primary(name, handler)  # the service comes back: nothing to run
    time.sleep(1.0)
    assert handler.calls == []
