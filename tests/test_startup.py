"""Service start-up and the Redis status heartbeat, against the real Redis."""

from __future__ import annotations

import argparse
import json
import logging
import time
import uuid

import pytest
import redis

from fastcore.runtime import SetupError, service_setup
from fastcore.status import STATUS_TTL_S, ServiceStatus, StatusHeartbeat, redis_client
from services.daq_client import DaqClient
from tests.netproxy import TcpProxy


@pytest.fixture
def rds():
    client = redis.Redis("127.0.0.1", 6379)
    keys = []
    yield client, keys
    for key in keys:
        client.delete(key)


def test_config_from_file_then_redis_then_empty(rds, tmp_path, monkeypatch):
    client, keys = rds
    monkeypatch.delenv("REDIS_SKIP", raising=False)
    name = f"test.{uuid.uuid4().hex[:8]}"
    keys.append(f"config.{name}")
    config_file = tmp_path / "config.json"
    config_file.write_text('{"from": "file"}')
    _, config, args = service_setup(argparse.ArgumentParser(), [
        "--service_name", name, "--json_config_file", str(config_file)])
    assert config == {"from": "file"} and args.broker_url == "127.0.0.1"
    client.set(f"config.{name}", json.dumps({"from": "redis"}))
    missing = str(tmp_path / "missing.json")
    _, config, _ = service_setup(argparse.ArgumentParser(), [
        "--service_name", name, "--json_config_file", missing])
    assert config == {"from": "redis"}
    client.delete(f"config.{name}")
    _, config, _ = service_setup(argparse.ArgumentParser(), [
        "--service_name", name, "--json_config_file", missing])
    assert config == {}


def test_service_name_is_required_unless_redis_skip(tmp_path, monkeypatch):
    monkeypatch.delenv("SERVICE_NAME", raising=False)
    monkeypatch.delenv("REDIS_SKIP", raising=False)
    argv = ["--json_config_file", str(tmp_path / "none.json")]
    with pytest.raises(SetupError, match="no service name: set SERVICE_NAME"):
        service_setup(argparse.ArgumentParser(), argv)
    monkeypatch.setenv("REDIS_SKIP", "true")
    name, config, args = service_setup(argparse.ArgumentParser(), argv)
    assert len(name) == 36 and config == {} and args.redis_skip


def test_broker_address_with_a_port(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_SKIP", "true")
    argv = ["--json_config_file", str(tmp_path / "none.json"), "--broker_url"]
    for given, address in (("127.0.0.1:5690", ("127.0.0.1", 5690)),
                           ("amqp://rabbit.psi.ch:5673/", ("rabbit.psi.ch", 5673)),
                           ("rabbit", ("rabbit", 5672))):
        _, _, args = service_setup(argparse.ArgumentParser(), [*argv, given])
        assert (args.broker_host, args.broker_port) == address
    with pytest.raises(SetupError, match=r"--broker_url: bad port in broker address "
                       r"'host:99999' \(expected host, host:port or amqp://host:port\)"):
        service_setup(argparse.ArgumentParser(), [*argv, "host:99999"])
    client = DaqClient("x.writer", "127.0.0.1:5690")
    assert (client.broker_host, client.broker_port) == ("127.0.0.1", 5690)


def test_bad_config_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_SKIP", "true")
    bad = tmp_path / "config.json"
    bad.write_text("{oops")
    with pytest.raises(SetupError, match=r"config.json: not valid JSON at line 1 column 2"):
        service_setup(argparse.ArgumentParser(), ["--json_config_file", str(bad)])


def test_heartbeat_writes_the_original_fields_and_expires(rds):
    client, keys = rds
    name = f"test.{uuid.uuid4().hex[:8]}"
    keys.append(f"status.{name}")
    counters = {"images": 0}
    heartbeat = StatusHeartbeat(name, {"a": 1}, redis_client("127.0.0.1", 6379),
                                lambda: dict(counters)).start()
    try:
        heartbeat.set_state("running")
        counters["images"] = 42
        heartbeat.error("disk full on /data")
        time.sleep(1.5)
        status = {k.decode(): v.decode() for k, v in client.hgetall(f"status.{name}").items()}
        assert json.loads(status["config"]) == {"a": 1}
        assert status["service_name"] == name
        assert abs(int(status["start_timestamp"]) - time.time()) < 10
        assert status["state"] == "running"
        assert json.loads(status["counters"]) == {"images": 42}
        assert status["last_error"] == "disk full on /data"
        assert time.time() - float(status["heartbeat"]) < 2
        assert 0 < client.ttl(f"status.{name}") <= STATUS_TTL_S
    finally:
        heartbeat.stop()
    assert not client.exists(f"status.{name}")


def test_redis_outage_is_survived_and_reported_when_back(rds, caplog):
    client, keys = rds
    name = f"test.{uuid.uuid4().hex[:8]}"
    keys.append(f"status.{name}")
    with TcpProxy(("127.0.0.1", 6379)) as proxy:
        heartbeat = StatusHeartbeat(name, {}, redis_client("127.0.0.1", proxy.port))
        with caplog.at_level(logging.INFO, logger="fastcore.status"):
            assert heartbeat.beat()
            proxy.down()
            assert not heartbeat.beat()
            assert not heartbeat.beat()  # logged once, not per second
            proxy.up()
            assert heartbeat.beat()
        messages = [r.getMessage() for r in caplog.records]
        assert sum("Redis unavailable" in m for m in messages) == 1
        assert any("Redis is back" in m for m in messages)
        assert client.exists(f"status.{name}")


def test_service_status_round_trips_and_reads_foreign_hashes():
    status = ServiceStatus("bl.writer", {"a": 1}, 1700000000, "running", 1700000001.5,
                           {"images": 3}, "")
    raw = {k.encode(): str(v).encode() for k, v in status.to_fields().items()}
    assert ServiceStatus.from_fields(b"status.bl.writer", raw) == status
    original = {b"config": b"{}", b"service_name": b"old", b"start_timestamp": b"12"}
    assert ServiceStatus.from_fields("status.old", original) == ServiceStatus(
        "old", {}, 12.0)
    broken = {"counters": "not json", "heartbeat": "soon"}
    assert ServiceStatus.from_fields("status.x", broken) == ServiceStatus("x")
