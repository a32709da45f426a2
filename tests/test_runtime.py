"""The process runtime (fastcore.runtime): flag spellings, the ready line, the stop signal,
the heartbeat read back by the readers' parser."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis

from fastcore.launch import ChildProcess
from fastcore.runtime import (
    READY_LINE,
    SetupError,
    add_broker_arguments,
    add_common_arguments,
    add_redis_arguments,
    add_service_arguments,
    broker_address,
    ready_pattern,
    service_setup,
    spelling,
)
from fastcore.status import StatusHeartbeat, read_status, redis_client, status_key
from ioc.epics_buffer import HeartbeatReader
from services.cli.monitor import read_heartbeats


def parsed(adder, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    adder(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(("canonical", "aliases", "dest", "value", "expected"), [
    ("--broker-url", ["--broker_url", "--broker-host"], "broker_url", "rabbit:5673",
     "rabbit:5673"),
    ("--redis-host", ["--redis_host"], "redis_host", "kv", "kv"),
    ("--redis-port", ["--redis_port"], "redis_port", "6390", 6390),
    ("--service-name", ["--service_name"], "service_name", "bl.writer", "bl.writer"),
    ("--json-config-file", ["--json_config_file"], "json_config_file", "x.json", "x.json"),
    ("--log-level", ["--log_level"], "log_level", "debug", "DEBUG"),
])
def test_alias_spellings_parse_to_the_same_value(canonical, aliases, dest, value, expected):
    for option in [canonical, *aliases]:
        args = parsed(add_service_arguments, [option, value])
        assert getattr(args, dest) == expected
        assert spelling(args, dest) == option  # errors name the flag as it was typed
    assert spelling(parsed(add_service_arguments, []), dest) == canonical


def test_common_arguments_and_log_level_aliases():
    args = parsed(add_common_arguments, ["c.json", "--ipc-dir", "/x", "--log_level", "ERROR"])
    assert (args.config, args.ipc_dir, args.log_level) == ("c.json", "/x", "ERROR")
    with pytest.raises(SystemExit):
        parsed(add_common_arguments, ["c.json", "--log-level", "LOUD"])


def test_broker_address_errors_name_the_spelling_used():
    def add(parser):
        add_broker_arguments(parser)
        add_redis_arguments(parser)

    assert broker_address(parsed(add, ["--broker-host", "h:5690"])) == ("h", 5690)
    assert broker_address(parsed(add, [])) == ("127.0.0.1", 5672)
    for option in ("--broker-url", "--broker_url", "--broker-host"):
        with pytest.raises(ValueError, match=rf"^{option}: bad port in broker address 'h:x'"):
            broker_address(parsed(add, [option, "h:x"]))


def test_service_setup_takes_the_dashed_spellings(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_SKIP", "true")
    config = tmp_path / "c.json"
    config.write_text('{"a": 1}')
    name, raw, args = service_setup(argparse.ArgumentParser(), [
        "--service-name", "t.svc", "--json-config-file", str(config), "--broker-url",
        "b:5999", "--log-level", "WARNING"])
    assert (name, raw, args.broker_host, args.broker_port) == ("t.svc", {"a": 1}, "b", 5999)
    with pytest.raises(SetupError, match=r"^--broker-url: bad port"):
        service_setup(argparse.ArgumentParser(), ["--broker-url", "b:0"])


def test_ready_is_a_line_start_not_a_substring():
    assert READY_LINE.search("INFO x\nready: syncing 2 modules\n")
    assert not READY_LINE.search("error: port 5000 is already: in use\n")
    assert not READY_LINE.search("INFO 2024 sync ready: syncing\n")  # a log line's middle
    for text in ("ready", "ready:", "ready: std-daq"):
        assert ready_pattern(text).search("x\nready: std-daq for d running\n")
        assert not ready_pattern(text).search("stddaq: error: already: std-daq\n")
    # any other text: a word of its own, anywhere in a line, as before
    assert ready_pattern("Redis unreachable").search("WARNING x Redis unreachable (...)")


def test_the_waiter_is_not_satisfied_by_already(tmp_path):
    code = ("import sys, time; print('stddaq: error: port taken, already: in use', "
            "file=sys.stderr, flush=True); time.sleep(0.5); sys.exit(1)")
    child = ChildProcess([sys.executable, "-c", code], tmp_path / "child.log")
    try:
        with pytest.raises(RuntimeError, match="exited with code 1"):
            child.wait_for("ready:", 10)
        with pytest.raises(RuntimeError, match="exited with code 1"):
            child.wait_ready(10)
    finally:
        child.stop()


def test_announced_ready_satisfies_the_waiter_at_any_log_level(tmp_path):
    code = ("from fastcore.runtime import announce_ready, setup_logging, stop_on_signals\n"
            "setup_logging('ERROR')\n"
            "stop = stop_on_signals()\n"
            "announce_ready('waiting for %s', 'SIGTERM')\n"
            "stop.wait(30)\n"
            "raise SystemExit(0 if stop.is_set() else 3)\n")
    child = ChildProcess([sys.executable, "-c", code], tmp_path / "child.log")
    child.wait_ready(20)
    assert "ready: waiting for SIGTERM\n" in child.output
    assert child.stop() == 0


def test_a_process_stopped_by_sigterm_exits_0(make_config, ipc_dir, tmp_path):
    path, _ = make_config("jungfrau_1m.json")
    proc = subprocess.Popen([sys.executable, "-m", "fastcore.udp_recv", str(path),
                             "--ipc-dir", ipc_dir, "--log_level", "INFO"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        lines = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if line.startswith("ready: ") or not line:
                break
        assert lines[-1].startswith("ready: receiving modules"), lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "SIGTERM: stopping" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_heartbeat_is_read_back_by_every_reader():
    client = redis.Redis("127.0.0.1", 6379)
    name = f"test.runtime.{uuid.uuid4().hex[:8]}"
    heartbeat = StatusHeartbeat(name, {"pv_list": ["A"]}, redis_client("127.0.0.1", 6379),
                                lambda: {"events": 7, "channels": ["A"]})
    heartbeat.set_state("running")
    heartbeat.error("")
    try:
        assert heartbeat.beat()
        status = read_status(client, name)  # DaqClient, the REST interface
        assert status is not None and status.alive
        assert (status.service_name, status.state, status.config) == (
            name, "running", {"pv_list": ["A"]})
        assert status.counters == {"events": 7, "channels": ["A"]}
        row = next(r for r in read_heartbeats(client) if r["service"] == name)  # monitor
        assert (row["state"], row["counters"]["events"], row["stale"]) == ("running", 7, False)
        reader = HeartbeatReader(name, client)  # the IOC's EPB: records
        epb = reader.read_once()
        assert (epb.state, epb.events, epb.channels) == ("Running", 7, ("A",))
    finally:
        heartbeat.stop()
    assert not client.exists(status_key(name))
