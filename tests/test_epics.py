"""EPICS buffer and EPICS writer: unit tests, then a real caproto IOC -> stddaq-epics-buffer
(pyepics) -> Redis -> EpicsWriter -> HDF5, with a PV that disconnects and a Redis outage."""

from __future__ import annotations

import ast
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services import epics_buffer
from services.epics_buffer import BufferConfig, StreamSink
from services.epics_common import (
    EpicsConfigError,
    Point,
    StreamKeys,
    connected_record,
    decode_shape,
    disconnected_record,
    encode_value,
)
from services.epics_writer import EpicsWriter, map_pulse_ids, validate_request
from tests.conftest import REPO, Proc, module_cmd
from tests.netproxy import TcpProxy

REDIS = ("127.0.0.1", 6379)


def wait_until(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def delete_keys(client: redis.Redis, *patterns: str) -> None:
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


def points(client: redis.Redis, key: str) -> list[Point]:
    return [Point.from_fields(i, f) for i, f in client.xrange(key)]


@pytest.fixture
def rds():
    client = redis.Redis(*REDIS)
    prefix = f"test.epics.{uuid.uuid4().hex[:10]}."
    yield client, prefix
    delete_keys(client, prefix.replace("[", "\\[") + "*")


# ---------------------------------------------------------------- unit: layout and config

def test_pulse_id_mapping_test_vector():
    timeline = [(5, 5000), (10, 10000), (15, 15000), (20, 20000), (25, 25000), (30, 30000)]
    assert map_pulse_ids([1, 4, 7, 8, 10, 11, 33], timeline) == [
        0, 0, 5000, 5000, 5000, 10000, 30000]
    assert map_pulse_ids([5, 12], []) == [0, 0]


def test_record_encoding_matches_the_original_layout():
    assert encode_value(1.5, 6) == ("f8", b"\x01\x00\x00\x00", np.float64(1.5).tobytes())
    assert encode_value(7, 5) == ("i4", b"\x01\x00\x00\x00", b"\x07\x00\x00\x00")
    assert encode_value(2, 3)[0] == "u2" and encode_value(-2, 1)[0] == "i2"
    assert encode_value(1.5, 2)[0] == "f4" and encode_value(65, 4)[0] == "u1"
    assert encode_value("héllo", 0) == ("string", b"\x01\x00\x00\x00", "héllo".encode())
    kind, shape, raw = encode_value(np.arange(6, dtype=">i4").reshape(2, 3), 5)
    assert (kind, decode_shape(shape)) == ("i4", (2, 3))
    assert np.frombuffer(raw, "<i4").tolist() == list(range(6))
    for value, native in [(3.25, 6), ("text", 0), (np.arange(10.0), 6),
                          (np.array([1, 2, 3], np.uint8), 4), (["a", "bc"], 0)]:
        kind, shape, raw = encode_value(value, native)
        fields = {k.encode(): str(v).encode() if isinstance(v, int) else
                  (v.encode() if isinstance(v, str) else v)
                  for k, v in connected_record(123, kind, shape, raw, "NO_ALARM").items()}
        point = Point.from_fields(b"1-0", fields)
        expected = np.atleast_1d(np.array(value, dtype=object if kind == "string" else None))
        assert point.connected and point.timestamp_us == 123 and point.status == "NO_ALARM"
        assert point.value().tolist() == expected.tolist()
    gone = disconnected_record(99)
    assert gone["connected"] == 0 and None not in gone.values()
    assert StreamKeys().pv("X:Y") == "X:Y" and StreamKeys().pulse_id == "pulse_id"
    assert StreamKeys("p.").pulse_id_reverse == "p.pulse_id_reverse"


@pytest.mark.parametrize("config, message", [
    ({}, "pv_list: missing"),
    ({"pv_list": []}, "pv_list: expected a non-empty list"),
    ({"pv_list": "A:B"}, "pv_list: expected a non-empty list"),
    ({"pv_list": ["A:B", ""]}, "pv_list: expected a non-empty list"),
    ({"pv_list": ["A:B", "A:B"]}, "pv_list: duplicate PV names"),
    ({"pv_list": ["A"], "pulse_id_pv": 3}, "pulse_id_pv: expected a PV name"),
    ({"pv_list": ["A"], "stream_maxlen": 0}, "stream_maxlen: expected an integer >= 1"),
    ({"pv_list": ["A"], "use_archiver_precision": "yes"}, "use_archiver_precision"),
])
def test_buffer_config_errors_name_the_field(config, message):
    with pytest.raises(EpicsConfigError, match=message):
        BufferConfig.from_dict(config)


def test_buffer_without_pv_list_exits_1_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REDIS_SKIP", "true")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"pulse_id_pv": "X:PID"}))
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        assert epics_buffer.main(["--json_config_file", str(config)]) == 1
    finally:  # service_setup points the root logger at the captured stderr
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["stddaq-epics-buffer: pv_list: missing (expected a non-empty list of PV "
                   "names); a buffer without PVs records nothing"]


def test_stream_sink_backlog_survives_an_outage_in_order_and_drops_the_oldest(rds):
    client, prefix = rds
    key = prefix + "SINK:PV"
    with TcpProxy(REDIS) as proxy:
        sink_client = redis.Redis("127.0.0.1", proxy.port, socket_timeout=1,
                                  socket_connect_timeout=1,
                                  retry=Retry(NoBackoff(), 0))
        sink = StreamSink(sink_client, max_events=5).start()
        try:
            sink.submit(key, {"n": 0})
            wait_until(lambda: client.xlen(key) == 1, 5, "the first entry")
            proxy.down()
            for n in range(1, 4):
                sink.submit(key, {"n": n})
            wait_until(lambda: not sink.redis_ok, 5, "the sink to notice the outage")
            assert client.xlen(key) == 1 and sink.backlog == 3
            proxy.up()
            wait_until(lambda: client.xlen(key) == 4, 5, "the backlog to be flushed")
            proxy.down()
            for n in range(4, 12):
                sink.submit(key, {"n": n})
            assert sink.dropped == 3 and sink.backlog == 5
            proxy.up()
            wait_until(lambda: sink.backlog == 0 and sink.redis_ok, 5, "the second flush")
        finally:
            assert sink.close() == 0
    values = [int(f[b"n"]) for _, f in client.xrange(key)]
    assert values == [0, 1, 2, 3, 7, 8, 9, 10, 11]


def test_stream_sink_id_fallback_and_rejected_pulse_ids(rds):
    client, prefix = rds
    key, pulse_key = prefix + "PV", prefix + "pulse_id"
    later_ms = time.time_ns() // 1_000_000 + 60_000  # the stream already holds a later ID
    client.xadd(key, {"n": 0}, id=f"{later_ms}-0")
    client.xadd(pulse_key, {"n": 0}, id="100-0")
    sink = StreamSink(client).start()
    try:
        sink.submit(key, {"n": 1})
        sink.submit(pulse_key, {"n": 1}, entry_id="50-0", kind="pulse_id")   # not increasing
        sink.submit(pulse_key, {"n": 2}, entry_id="101-0", kind="pulse_id")
        wait_until(lambda: sink.backlog == 0, 5, "the writes")
    finally:
        assert sink.close() == 0
    assert [int(f[b"n"]) for _, f in client.xrange(key)] == [0, 1]
    assert [i for i, _ in client.xrange(pulse_key)] == [b"100-0", b"101-0"]
    assert (sink.rejected_pulse_ids, sink.dropped, sink.written) == (1, 0, 2)


# ---------------------------------------------------------------- unit: writer requests

@pytest.mark.parametrize("patch, message", [
    ({"output_file": None}, "output_file: missing"),
    ({"output_file": "relative.h5"}, "output_file: expected an absolute file path"),
    ({"output_file": "/data/../etc/x.h5"}, "output_file: '..' is not allowed"),
    ({"output_file": "/elsewhere/x.h5"}, "output_file: .* is outside the output root"),
    ({"channels": None}, "channels: missing"),
    ({"channels": []}, "channels: expected a non-empty list"),
    ({"channels": ["A:B", 3]}, "channels: expected a non-empty list"),
    ({"channels": ["A", "A"]}, "channels: duplicate names"),
    ({"start_pulse_id": None}, "start_pulse_id: missing"),
    ({"stop_pulse_id": "12"}, "stop_pulse_id: expected an integer"),
    ({"start_pulse_id": True}, "start_pulse_id: expected an integer"),
    ({"start_pulse_id": 20, "stop_pulse_id": 10}, "stop_pulse_id: 10 is below"),
    ({"start_time": 1.0}, "start_time: give either"),
    ({"start_pulse_id": None, "stop_pulse_id": None, "start_time": 5.0}, "stop_time: missing"),
    ({"start_pulse_id": None, "stop_pulse_id": None, "start_time": "now", "stop_time": 5.0},
     "start_time: expected unix time"),
    ({"metadata": [1]}, "metadata: expected an object"),
    ({"metadata": {"a/../b": "x"}}, "metadata: 'a/../b' is not a valid HDF5 path"),
    ({"metadata": {"data/x": "x"}}, "metadata: 'data/x' collides"),
    ({"metadata": {"a": "1", "a/b": "2"}}, "metadata: 'a' is both a value and the group"),
    ({"run_log_file": "log.txt"}, "run_log_file: expected an absolute file path"),
])
def test_bad_writer_requests_name_the_field(tmp_path, patch, message):
    request = {"start_pulse_id": 10, "stop_pulse_id": 20, "channels": ["A:B"],
               "output_file": str(tmp_path / "out.h5"), "n_images": 5}
    request.update(patch)
    request = {k: v for k, v in request.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        validate_request(request, output_root=str(tmp_path))


def test_good_writer_requests(tmp_path):
    base = {"channels": ["A:B", "C:D.VAL"], "output_file": str(tmp_path / "o.h5"),
            "n_images": 10, "metadata": {"a/b": "x", "c": 1}}
    by_pulse = validate_request({**base, "start_pulse_id": 5, "stop_pulse_id": 5},
                                output_root=str(tmp_path))
    assert by_pulse.by_pulse_id and by_pulse.channels == ("A:B", "C:D.VAL")
    by_time = validate_request({**base, "start_time": 1.7e9, "stop_time": 1.7e9 + 2})
    assert not by_time.by_pulse_id and by_time.stop_time == 1.7e9 + 2


def test_writer_refuses_to_overwrite(tmp_path):
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"")
    with pytest.raises(ValueError, match=r"output_file: .* already exists"):
        validate_request({"start_pulse_id": 1, "stop_pulse_id": 2, "channels": ["A"],
                          "output_file": str(existing)})


# ---------------------------------------------------------------- writer on synthetic streams

BASE_MS = 1_600_000_000_000  # synthetic arrival clock (ms); EPICS time = arrival - 1 ms


def _add(client, key, ms, record):
    client.xadd(key, record, id=f"{ms}-*")


def _value(client, key, ms, value, native, status="NO_ALARM"):
    kind, shape, raw = encode_value(value, native)
    _add(client, key, ms, connected_record((ms - 1) * 1000, kind, shape, raw, status))


@pytest.fixture
def synthetic(rds):
    """Pulses 100..200 every 10 ms from BASE_MS; channels:
    F (f8, every 20 ms from BASE_MS+3, value = index), S (string; disconnects),
    MIX (i4 then f8), DEAD (never connected), ARR (3 x u1)."""
    client, prefix = rds
    for pid in range(100, 201):
        ms = BASE_MS + 10 * (pid - 100)
        client.xadd(prefix + "pulse_id", {"buffer_timestamp": ms * 1_000_000,
                                          "epics_timestamp": ms * 1000}, id=f"{pid}-0")
        client.xadd(prefix + "pulse_id_reverse", {"pulse_id": pid, "epics_timestamp": ms * 1000},
                    id=f"{ms}-*")
    for key in ("F", "S", "MIX", "DEAD", "ARR"):
        _add(client, prefix + key, BASE_MS - 500, disconnected_record((BASE_MS - 500) * 1000))
    for i in range(51):
        _value(client, prefix + "F", BASE_MS + 3 + 20 * i, float(i), 6)
    _value(client, prefix + "S", BASE_MS - 50, "before", 0)
    _value(client, prefix + "S", BASE_MS + 250, "inside", 0, status="HIHI")
    _add(client, prefix + "S", BASE_MS + 300, disconnected_record((BASE_MS + 300) * 1000))
    _value(client, prefix + "S", BASE_MS + 450, "back", 0)
    _value(client, prefix + "MIX", BASE_MS + 250, 3, 5)
    _value(client, prefix + "MIX", BASE_MS + 260, 3.5, 6)
    _value(client, prefix + "ARR", BASE_MS + 100, np.array([1, 2, 3], np.uint8), 4)
    return client, prefix


def test_writer_layout_on_synthetic_streams(synthetic, tmp_path):
    client, prefix = synthetic
    writer = EpicsWriter(client, "test.epics_writer", {"stream_prefix": prefix,
                                                        "output_root": str(tmp_path)})
    out = tmp_path / "sub" / "pulses.h5"
    result = writer.on_request("r1", {
        "start_pulse_id": 120, "stop_pulse_id": 140,       # arrival window BASE+200..BASE+400
        "channels": ["F", "S", "MIX", "DEAD", "ARR", "MISSING"], "output_file": str(out),
        "metadata": {"general/user": "17502", "/general/instrument": "alvra", "scan/n": 3}})
    assert result == {"output_file": str(out), "n_channels": 6,
                      "channels_with_data": ["F", "S", "MIX", "DEAD", "ARR"],
                      "channels_without_data": ["MISSING"], "n_points": 12 + 4 + 1}
    with h5py.File(out, "r") as f:
        assert f["general/user"].asstr()[()] == "17502"
        assert f["general/instrument"].asstr()[()] == "alvra"
        assert f["scan/n"].asstr()[()] == "3"
        for pv in ("F", "S", "MIX", "DEAD", "ARR"):
            assert isinstance(f[pv], h5py.Group) and len(f[pv]) == 0
        assert "MISSING" not in f and "MISSING" not in f["data"]
        assert "MIX" not in f["data"] and "DEAD" not in f["data"]
        g = f["data/F"]
        # Last point at or before BASE+200 (index 9 at +183), 10..19 inside, +403 after.
        assert g["data"][:, 0].tolist() == [float(i) for i in range(9, 21)]
        assert g["data"].dtype == "<f8" and g["data"].shape == (12, 1)
        stamps = [(BASE_MS + 2 + 20 * i) * 1000 for i in range(9, 21)]
        assert g["timestamp"][:, 0].tolist() == stamps and g["timestamp"].dtype == "<u8"
        assert g["connected"][:].tolist() == [[1]] * 12 and g["connected"].dtype == "<u1"
        assert g["status"].asstr()[:, 0].tolist() == ["NO_ALARM"] * 12
        timeline = [((BASE_MS + 10 * k) * 1000, 100 + k) for k in range(20, 41)]
        assert g["pulse_id"][:, 0].tolist() == map_pulse_ids(stamps, timeline)
        assert g["pulse_id"][:, 0].tolist()[:3] == [0, 120, 122] and g["pulse_id"][-1, 0] == 140
        s = f["data/S"]
        assert s["data"].asstr()[:, 0].tolist() == ["before", "inside", "", "back"]
        assert s["connected"][:, 0].tolist() == [1, 1, 0, 1]
        assert s["status"].asstr()[:, 0].tolist() == ["NO_ALARM", "HIHI", "unknown", "NO_ALARM"]
        assert s["pulse_id"][:, 0].tolist() == [0, 124, 0, 140]
        a = f["data/ARR"]
        assert a["data"].dtype == "<u1" and a["data"][:].tolist() == [[1, 2, 3]]
        assert a["pulse_id"][:].tolist() == [[0]]


def test_writer_time_range_without_pulse_ids_maps_to_zero(synthetic, tmp_path):
    client, prefix = synthetic
    writer = EpicsWriter(client, "w", {"stream_prefix": prefix})
    out = tmp_path / "time.h5"
    start = (BASE_MS + 2000) / 1000  # after the last pulse: an empty timeline
    result = writer.on_request("r2", {"start_time": start, "stop_time": start + 1,
                                      "channels": ["F", "S"], "output_file": str(out)})
    assert result["n_points"] == 2
    with h5py.File(out, "r") as f:
        assert f["data/F/data"][:, 0].tolist() == [50.0]
        assert f["data/S/data"].asstr()[:, 0].tolist() == ["back"]
        assert f["data/F/pulse_id"][:, 0].tolist() == [0]


def test_writer_pulse_id_errors_are_clear(synthetic, tmp_path):
    client, prefix = synthetic
    writer = EpicsWriter(client, "w", {"stream_prefix": prefix})
    request = {"channels": ["F"], "output_file": str(tmp_path / "x.h5")}
    with pytest.raises(RuntimeError, match=r"start_pulse_id 50: cannot map it to a time, no "
                       r"pulse id at or before it .*buffered pulse ids 100 to 200"):
        writer.on_request("r", {**request, "start_pulse_id": 50, "stop_pulse_id": 150})
    with pytest.raises(RuntimeError, match=r"start_pulse_id 1300: the nearest buffered pulse "
                       r"id at or before it is 200, more than 1000 pulses away"):
        writer.on_request("r", {**request, "start_pulse_id": 1300, "stop_pulse_id": 1300})
    with pytest.raises(RuntimeError, match="stop_pulse_id 250: cannot map"):
        writer.on_request("r", {**request, "start_pulse_id": 150, "stop_pulse_id": 250})
    assert not (tmp_path / "x.h5").exists()
    assert writer.counters()["failed"] == 3


def test_kill_leaves_a_valid_partial_file(synthetic, tmp_path):
    client, prefix = synthetic
    writer = EpicsWriter(client, "w", {"stream_prefix": prefix},
                         on_channel=lambda request_id, channel: writer.on_kill(request_id))
    out = tmp_path / "killed.h5"
    with pytest.raises(RuntimeError, match=r"^User requested interruption\.$"):
        writer.on_request("r-kill", {"start_pulse_id": 120, "stop_pulse_id": 140,
                                     "channels": ["F", "S", "ARR"], "output_file": str(out)})
    with h5py.File(out, "r") as f:
        assert "F" in f and "S" not in f and f["data/F/data"].shape == (12, 1)
    writer.on_kill("not-running")  # a kill for no running request is ignored


def test_run_log_file_lines(synthetic, tmp_path):
    client, prefix = synthetic
    writer = EpicsWriter(client, "sls.epics_writer", {"stream_prefix": prefix})
    run_log = tmp_path / "logs" / "run.log"
    out = tmp_path / "log.h5"
    writer.on_request("r-ok", {"start_pulse_id": 120, "stop_pulse_id": 140,
                               "channels": ["F", "MIX", "MISSING"], "output_file": str(out),
                               "run_log_file": str(run_log)})
    with pytest.raises(ValueError):
        writer.on_request("r-bad", {"start_pulse_id": 120, "channels": ["F"],
                                    "output_file": str(tmp_path / "bad.h5"),
                                    "run_log_file": str(run_log)})
    lines = run_log.read_text().splitlines()
    src = "[sls.epics_writer]"
    assert lines[0] == f"{src} Processing of r-ok started in service sls.epics_writer."
    assert lines[1] == (f"{src} Requesting file {out} for pulse_id range 120 to 140 with 3 "
                        f"channels.")
    assert lines[2].startswith(f"{src} Request r-ok completed in ")
    assert lines[2].endswith(" seconds.")
    assert lines[3:7] == [f"{src} Output file analysis:",
                          "\t[F] Point count 12 (1[10)1)",
                          "\t[MIX] Missing pulse_id mapping",
                          "\t[MISSING] No data"]
    assert lines[7:] == [f"{src} Processing of r-bad started in service sls.epics_writer.",
                         f"{src} Request r-bad failed. Error:",
                         "stop_pulse_id: missing (expected an integer >= 0; or give "
                         "start_time/stop_time)"]


def test_writer_service_over_the_broker(synthetic, tmp_path):
    """stddaq-epics-writer as a process: requests through RabbitMQ, results as statuses."""
    import pika

    from services.broker.protocol import request_queue_name
    from tests.broker_client import WatchingClient

    client, prefix = synthetic
    name = f"test.epics_writer.{uuid.uuid4().hex[:8]}"
    config = tmp_path / "writer.json"
    config.write_text(json.dumps({"stream_prefix": prefix, "output_root": str(tmp_path)}))
    env = dict(os.environ, PYTHONPATH=str(REPO), REDIS_SKIP="false")
    proc = Proc(module_cmd("services.epics_writer", "--service_name", name,
                           "--json_config_file", str(config)), tmp_path / "writer.log", env=env)
    broker = None
    try:
        proc.wait_for("ready:", 20)
        broker = WatchingClient("127.0.0.1")
        broker.wait_ready(10)
        out = tmp_path / "broker.h5"
        request = {"start_pulse_id": 120, "stop_pulse_id": 140, "channels": ["F", "NONE"],
                   "output_file": str(out), "metadata": {"general/user": "u"},
                   "n_images": 100}  # a detector writer's field: ignored
        ok = broker.send_request(name, request)
        result = broker.wait_for(ok, [name], timeout=20)
        assert result["status"] == "request_success", result
        assert result["services"][name][-1][1] == {
            "output_file": str(out), "n_channels": 2, "channels_with_data": ["F"],
            "channels_without_data": ["NONE"], "n_points": 12}
        with h5py.File(out, "r") as f:
            assert f["data/F/data"].shape == (12, 1)
        bad = broker.send_request(name, {**request, "output_file": "/etc/x.h5"})
        result = broker.wait_for(bad, [name], timeout=20)
        assert result["status"] == "request_fail"
        assert result["services"][name][-1][1].startswith("output_file: '/etc/x.h5' is outside")
        status = client.hgetall(f"status.{name}")
        assert status[b"service_name"] == name.encode()
    finally:
        if broker is not None:
            broker.close()
        assert proc.stop() == 0, proc.output
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
        connection.channel().queue_delete(request_queue_name(name))
        connection.close()
        client.delete(f"status.{name}")


# ---------------------------------------------------------------- real IOC + buffer process

def free_ca_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 (CA uses both)."""
    for _ in range(100):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port for Channel Access")


@dataclass
class Epics:
    tmp: Path
    prefix: str            # PV name prefix
    streams: str           # Redis key prefix of the main buffer
    port: int
    flaky_port: int
    ioc: Proc
    flaky: Proc
    env: dict
    buffer: Proc | None = None
    service: str = ""
    procs: list = field(default_factory=list)

    def pv(self, name: str) -> str:
        return self.prefix + name

    def key(self, name: str) -> str:
        return self.streams + self.prefix + name

    def served(self, name: str) -> list[tuple[object, int]]:
        """(value, EPICS time us) of every update the IOC printed for a PV."""
        out = []
        for log in (self.ioc.output, self.flaky.output):
            for line in log.splitlines():
                if line.startswith(f"update {self.pv(name)} "):
                    value, stamp = line.split(" ", 2)[2].rsplit(" ", 1)
                    out.append((ast.literal_eval(value), int(stamp)))
        return out

    def start_flaky(self) -> Proc:
        proc = Proc(module_cmd("tests.epics_ioc", "--prefix", self.prefix, "--port",
                               str(self.flaky_port), "--flaky"),
                    self.tmp / f"flaky{len(self.procs)}.log", env=self.env)
        self.procs.append(proc)
        proc.wait_for(f"Listening on 127.0.0.1:{self.flaky_port}", 20)
        proc.wait_for("ready", 10)
        return proc


def caput(pv: str, value) -> None:
    from caproto.sync.client import write

    write(pv, value, notify=True, timeout=5, repeater=False)


def start_buffer(env: Epics, name: str, config: dict, redis_port: int = 6379) -> Proc:
    path = env.tmp / f"{name}.json"
    path.write_text(json.dumps(config))
    proc = Proc(module_cmd("services.epics_buffer", "--service_name", name,
                           "--json_config_file", str(path), "--redis_port", str(redis_port)),
                env.tmp / f"{name}.log", env=env.env)
    env.procs.append(proc)
    proc.wait_for("ready:", 20)
    return proc


@pytest.fixture(scope="module")
def epics(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("epics")
    port, flaky_port = free_ca_port(), free_ca_port()
    ca_env = {"EPICS_CA_AUTO_ADDR_LIST": "NO",
              "EPICS_CA_ADDR_LIST": f"127.0.0.1:{port} 127.0.0.1:{flaky_port}"}
    env = dict(os.environ, PYTHONPATH=str(REPO), REDIS_SKIP="false", **ca_env)
    env.pop("SERVICE_NAME", None)
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    client = redis.Redis(*REDIS)
    ioc = Proc(module_cmd("tests.epics_ioc", "--prefix", prefix, "--port", str(port)),
               tmp / "ioc.log", env=env)
    procs = [ioc]
    state = Epics(tmp, prefix, f"test.epics.{uuid.uuid4().hex[:8]}.", port, flaky_port, ioc,
                  ioc, env, procs=procs)
    try:
        state.flaky = state.start_flaky()
        ioc.wait_for(f"Listening on 127.0.0.1:{port}", 20)
        ioc.wait_for("ready", 10)
        state.service = f"test.epics_buffer.{uuid.uuid4().hex[:8]}"
        state.buffer = start_buffer(state, state.service, {
            "pv_list": [state.pv(n) for n in ("float", "string", "array", "flaky", "never")],
            "pulse_id_pv": state.pv("pulse_id"), "stream_prefix": state.streams})
        with mock.patch.dict(os.environ, ca_env):
            yield state
    finally:
        errors = []
        for proc in reversed(procs):
            try:
                proc.stop()  # asserts that no process of its session is left
            except AssertionError as exc:
                errors.append(str(exc))
        delete_keys(client, state.streams + "*", prefix + "*", f"status.{state.service}")
        assert not errors, errors
        if state.buffer is not None:
            assert "Traceback" not in state.buffer.output, state.buffer.output


def test_buffer_records_every_pv_with_the_original_layout(epics):
    client = redis.Redis(*REDIS)
    wait_until(lambda: len(points(client, epics.key("float"))) >= 3, 10, "float updates")
    for name in ("float", "string", "array", "flaky", "never"):
        first = points(client, epics.key(name))[0]
        assert not first.connected and first.type_code == "" and first.raw_value == b""
    never = points(client, epics.key("never"))
    assert len(never) == 1
    floats = [p for p in points(client, epics.key("float")) if p.connected]
    served = dict(epics.served("float"))
    for p in floats:
        assert (p.type_code, p.shape, p.status) == ("f8", (1,), "NO_ALARM")
        value = float(p.value()[0])
        assert served[value] == p.timestamp_us
    values = [float(p.value()[0]) for p in floats]
    assert np.all(np.diff(values) == 5.0)  # no update missed
    string = points(client, epics.key("string"))[1]
    assert (string.type_code, string.shape, string.value().tolist()) == ("string", (1,),
                                                                         ["initial"])
    array = points(client, epics.key("array"))[1]
    assert (array.type_code, array.shape) == ("f8", (10,))
    assert array.value().tolist() == [float(i) for i in range(10)]
    raw = client.xrange(epics.key("array"))[1][1]
    assert raw[b"shape"] == b"\x0a\x00\x00\x00" and raw[b"connected"] == b"1"
    flaky = [p for p in points(client, epics.key("flaky")) if p.connected]
    assert flaky[0].type_code == "i4"


def test_puts_are_recorded_in_order(epics):
    client = redis.Redis(*REDIS)
    before = time.time_ns() // 1000
    texts = ["first", "second", "third"]
    arrays = [[float(i * k) for i in range(10)] for k in (2, 3)]
    for text in texts:
        caput(epics.pv("string"), text)
    for array in arrays:
        caput(epics.pv("array"), array)
    after = time.time_ns() // 1000
    wait_until(lambda: len(points(client, epics.key("array"))) >= 4, 5, "the array puts")
    wait_until(lambda: len(points(client, epics.key("string"))) >= 5, 5, "the string puts")
    strings = points(client, epics.key("string"))[-3:]
    assert [p.value()[0] for p in strings] == texts
    assert all(before <= p.timestamp_us <= after for p in strings)
    assert [p.value().tolist() for p in points(client, epics.key("array"))[-2:]] == arrays


def wait_for_pulse_ids(epics: Epics, client: redis.Redis, n: int) -> None:
    """Wait for ``n`` pulse ids (10 Hz); on a timeout, say what the buffer saw."""
    try:
        wait_until(lambda: client.xlen(epics.streams + "pulse_id") >= n, n / 10 + 10,
                   f"{n} pulse ids")
    except AssertionError as exc:
        counters = client.hget(f"status.{epics.service}", "counters")
        raise AssertionError(f"{exc}; buffer counters {counters!r}; buffer log:\n"
                             f"{epics.buffer.output[-3000:]}") from None


def test_pulse_id_streams(epics):
    client = redis.Redis(*REDIS)
    wait_for_pulse_ids(epics, client, 10)
    wait_until(lambda: json.loads(client.hget(f"status.{epics.service}", "counters") or "{}")
               .get("pulse_id_pv_connected"), 5, "the pulse id PV's connection in the status")
    entries = client.xrange(epics.streams + "pulse_id")
    ids = [int(i.split(b"-")[0]) for i, _ in entries]
    assert all(i.endswith(b"-0") for i, _ in entries)
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    served = dict(epics.served("pulse_id"))
    now_ns = time.time_ns()
    for pid, (_, fields) in zip(ids, entries, strict=True):
        assert int(fields[b"epics_timestamp"]) == served[pid]
        assert 0 < now_ns - int(fields[b"buffer_timestamp"]) < 120e9
    reverse = client.xrange(epics.streams + "pulse_id_reverse")
    assert [int(f[b"pulse_id"]) for _, f in reverse][:len(ids)] == ids
    for (entry_id, fields), (_, forward) in zip(reverse, entries, strict=False):
        assert fields[b"epics_timestamp"] == forward[b"epics_timestamp"]
        assert int(entry_id.split(b"-")[0]) == int(forward[b"buffer_timestamp"]) // 1_000_000


def test_disconnect_and_reconnect(epics):
    client = redis.Redis(*REDIS)
    key = epics.key("flaky")
    wait_until(lambda: points(client, key)[-1].connected, 5, "flaky values")
    epics.flaky.stop()
    wait_until(lambda: not points(client, key)[-1].connected, 5, "the disconnect record")
    n_before = len(points(client, key))
    epics.flaky = epics.start_flaky()
    wait_until(lambda: len(points(client, key)) >= n_before + 2, 20, "values after reconnect")
    states = [p.connected for p in points(client, key)]
    assert states[0] is False and states[1] is True
    assert states[n_before - 1] is False and states.count(False) == 2
    assert all(states[n_before:])
    restarted = [p for p in points(client, key)[n_before:]]
    served = dict((v, t) for v, t in epics.served("flaky") if t >= restarted[0].timestamp_us)
    assert all(served.get(int(p.value()[0])) == p.timestamp_us for p in restarted)

    def counters():
        return json.loads(client.hget(f"status.{epics.service}", "counters") or "{}")

    wait_until(lambda: counters().get("pvs_connected") == 4, 5, "4 PVs connected")
    counters = counters()
    assert counters["pvs"] == 5
    assert counters["events"] > 0 and counters["dropped"] == 0 and counters["redis_ok"]


def test_writer_pulse_id_range_from_the_buffer(epics, tmp_path):
    client = redis.Redis(*REDIS)
    wait_for_pulse_ids(epics, client, 40)
    latest = int(client.xrevrange(epics.streams + "pulse_id", count=1)[0][0].split(b"-")[0])
    start, stop = latest - 30, latest - 10
    writer = EpicsWriter(client, "test.epics_writer", {"stream_prefix": epics.streams})
    out = tmp_path / "range.h5"
    result = writer.on_request("req-range", {
        "start_pulse_id": start, "stop_pulse_id": stop, "output_file": str(out),
        "channels": [epics.pv("float"), epics.pv("array"), epics.pv("never"),
                     epics.pv("absent")],
        "metadata": {"general/user": "e12345"}})
    assert result["channels_without_data"] == [epics.pv("absent")]
    served = dict(epics.served("float"))
    with h5py.File(out, "r") as f:
        assert f["general/user"].asstr()[()] == "e12345"
        assert epics.pv("absent") not in f and epics.pv("never") in f
        g = f[f"data/{epics.pv('float')}"]
        values = g["data"][:, 0]
        assert int(values[0]) <= start and int(values[-1]) >= stop
        assert np.all(np.diff(values) == 5.0)
        assert g["timestamp"][:, 0].tolist() == [served[v] for v in values]
        for value, pulse_id in zip(values, g["pulse_id"][:, 0], strict=True):
            # The float of pulse f is stamped 1 ms after pulse f: inside the range it maps
            # to f; before the first pulse of the timeline to 0; after it to the last.
            own = int(value)
            if start <= own <= stop:
                assert pulse_id == own
            elif own < start:
                assert pulse_id in (0, own)
            else:
                assert stop <= pulse_id <= own
        assert g["connected"][:, 0].tolist() == [1] * len(values)
        a = f[f"data/{epics.pv('array')}"]
        assert a["data"].shape[1:] == (10,) and a["data"].dtype == "<f8"


def test_writer_time_range_from_the_buffer(epics, tmp_path):
    client = redis.Redis(*REDIS)
    wait_for_pulse_ids(epics, client, 3)
    start = time.time()
    time.sleep(0.25)  # a few pulses before the first put: every put maps to a pulse id
    values = [1.25, 2.5, 3.75]
    for value in values:
        caput(epics.pv("setpoint"), value)   # not buffered: the writer finds no data
        caput(epics.pv("string"), f"run {value}")
    time.sleep(0.05)
    stop = time.time()
    wait_until(lambda: points(client, epics.key("string"))[-1].value()[0] == "run 3.75", 5,
               "the last put")
    writer = EpicsWriter(client, "w", {"stream_prefix": epics.streams})
    out = tmp_path / "time.h5"
    result = writer.on_request("req-time", {
        "start_time": start, "stop_time": stop, "output_file": str(out),
        "channels": [epics.pv("string"), epics.pv("setpoint"), epics.pv("float")]})
    assert result["channels_without_data"] == [epics.pv("setpoint")]
    with h5py.File(out, "r") as f:
        s = f[f"data/{epics.pv('string')}"]
        assert s["data"].asstr()[1:, 0].tolist() == [f"run {v}" for v in values]
        stamps = s["timestamp"][:, 0]
        assert stamps[1] >= start * 1e6 and stamps[-1] <= stop * 1e6
        pulse_ids = s["pulse_id"][1:, 0]
        assert np.all(pulse_ids > 0) and np.all(np.diff(pulse_ids.astype(int)) >= 0)
        fl = f[f"data/{epics.pv('float')}/data"][:, 0]
        assert len(fl) >= 1 and np.all(np.diff(fl) == 5.0)


def test_buffer_survives_a_redis_outage(epics):
    client = redis.Redis(*REDIS)
    name = f"test.epics_buffer.{uuid.uuid4().hex[:8]}"
    setpoint, never = epics.pv("setpoint"), epics.pv(f"never{uuid.uuid4().hex[:6]}")

    def counters():
        return json.loads(client.hget(f"status.{name}", "counters") or "{}")

    with TcpProxy(REDIS) as proxy:
        buffer = start_buffer(epics, name, {"pv_list": [setpoint, never],
                                            "backlog_max_events": 5}, proxy.port)
        try:
            # No stream_prefix: the keys are exactly the PV names.
            wait_until(lambda: len(points(client, setpoint)) >= 2, 10, "the setpoint value")
            assert [p.connected for p in points(client, never)] == [False]
            proxy.down()
            for value in (10.0, 11.0, 12.0):
                caput(setpoint, value)
            buffer.wait_for("Redis unreachable", 5)
            assert len(points(client, setpoint)) == 2
            proxy.up()
            wait_until(lambda: len(points(client, setpoint)) == 5, 10, "the flushed backlog")
            proxy.down()
            for value in range(20, 27):  # 7 updates, the backlog keeps 5
                caput(setpoint, float(value))
            time.sleep(0.6)
            proxy.up()
            wait_until(lambda: len(points(client, setpoint)) == 10, 10, "the second flush")
            values = [float(p.value()[0]) for p in points(client, setpoint)[2:]]
            assert values == [10.0, 11.0, 12.0, 22.0, 23.0, 24.0, 25.0, 26.0]
            buffer.wait_for("Redis backlog full (bound 5 updates", 5)
            buffer.wait_for("2 dropped during the outage", 5)
            wait_until(lambda: counters().get("dropped") == 2 and counters()["backlog"] == 0,
                       5, "the counters after the flush")
        finally:
            code = buffer.stop()
            client.delete(setpoint, never, f"status.{name}")
    assert code == 0 and "Traceback" not in buffer.output, buffer.output

