"""EPICS writer: writes the buffered PV values of a pulse-id or time range to an HDF5 file.

A primary broker service: ``EpicsWriter.on_request(request_id, request) -> result`` and
``on_kill(request_id)``. Request (other services' fields are ignored)::

    {"start_pulse_id": int, "stop_pulse_id": int,      # or "start_time"/"stop_time" (unix s)
     "channels": [pv, ...], "output_file": "/abs/path.h5",
     "metadata"?: {"general/user": "17502", ...}, "run_log_file"?: "/abs/path.log"}

Algorithm (the original's): the pulse ids are turned into a window of buffer arrival times
(ms) through the nearest ``pulse_id`` entries (at most ``max_pulse_distance`` pulses away);
a time range is that window directly. For each channel: the last point at or before the
start, the points strictly inside, the first point at or after the stop; every point gets a
pulse id from the ``pulse_id_reverse`` timeline (the last pulse stamped strictly before it;
0 before the first pulse, when disconnected, or without a timeline).

HDF5 layout (the original's): each metadata key is a UTF-8 string dataset at its path; each
channel with points gets an empty group ``/<pv>`` and, if all its connected points share one
type and shape, ``/data/<pv>/{data, timestamp, connected, status, pulse_id}``. A kill stops
after the channel being written: the request fails with "User requested interruption." and
the file, closed, holds the channels written so far. With ``run_log_file`` the writer
appends the start, success (with a per-channel point count) or failure lines itself.

Config: ``{"output_root"?: dir, "stream_prefix"?: str, "max_pulse_distance"?: int}``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import redis

from fastcore.runtime import SetupError, redis_client, service_setup
from services.epics_common import STRING_TYPE, EpicsConfigError, Point, StreamKeys, stream_prefix
from services.requests import RequestError, output_path
from services.startup import serve_primary

log = logging.getLogger("EpicsWriter")

MAX_PULSE_DISTANCE = 1000
TIMELINE_PAD_MS = 5
PAGE = 10000
INTERRUPTED = "User requested interruption."
STRING_DTYPE = h5py.string_dtype("utf-8")


class KilledError(RuntimeError):
    """A kill arrived while the request was being written."""


@dataclass(frozen=True)
class EpicsWriteRequest:
    channels: tuple[str, ...]
    output_file: str
    start_pulse_id: int | None = None
    stop_pulse_id: int | None = None
    start_time: float | None = None
    stop_time: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    run_log_file: str | None = None

    @property
    def by_pulse_id(self) -> bool:
        return self.start_pulse_id is not None


def _pulse_id(request: dict, name: str) -> int:
    value = request.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RequestError(f"{name}: expected an integer >= 0, got {value!r}")
    return value


def _time(request: dict, name: str) -> float:
    value = request.get(name)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value <= 0):
        raise RequestError(f"{name}: expected unix time in seconds (a number > 0), "
                           f"got {value!r}")
    return float(value)


def _metadata_path(key: Any) -> str:
    if not isinstance(key, str):
        raise RequestError(f"metadata: keys must be strings, got {key!r}")
    parts = key.strip("/").split("/")
    if not key.strip("/") or any(p in ("", ".", "..") for p in parts):
        raise RequestError(f"metadata: {key!r} is not a valid HDF5 path")
    return "/".join(parts)


def validate_request(request: Any, output_root: str | None = None) -> EpicsWriteRequest:
    """Check an Epics writer request; raises RequestError naming the first bad field."""
    if not isinstance(request, dict):
        raise RequestError(f"request: expected a JSON object, got {type(request).__name__}")
    if "output_file" not in request:
        raise RequestError("output_file: missing (expected an absolute file path)")
    output_file = output_path(request, "output_file", output_root)
    if os.path.lexists(output_file):
        raise RequestError(f"output_file: {output_file} already exists (not overwritten)")
    channels = request.get("channels")
    if channels is None:
        raise RequestError("channels: missing (expected a non-empty list of PV names)")
    if (not isinstance(channels, list) or not channels
            or not all(isinstance(c, str) and c and "/" not in c
                       and not any(ch.isspace() for ch in c) for c in channels)):
        raise RequestError(f"channels: expected a non-empty list of PV names (strings "
                           f"without spaces or '/'), got {channels!r}")
    duplicates = sorted({c for c in channels if channels.count(c) > 1})
    if duplicates:
        raise RequestError(f"channels: duplicate names {duplicates}")
    if "data" in channels:
        raise RequestError("channels: 'data' cannot be a channel name (it is the /data "
                           "group of the file)")
    pulse_fields = [n for n in ("start_pulse_id", "stop_pulse_id") if request.get(n) is not None]
    time_fields = [n for n in ("start_time", "stop_time") if request.get(n) is not None]
    if pulse_fields and time_fields:
        raise RequestError(f"{time_fields[0]}: give either start_pulse_id/stop_pulse_id or "
                           f"start_time/stop_time, not both")
    start_pid = stop_pid = start_time = stop_time = None
    if time_fields:
        for name in ("start_time", "stop_time"):
            if name not in time_fields:
                raise RequestError(f"{name}: missing (a time range needs start_time and "
                                   f"stop_time in unix seconds)")
        start_time, stop_time = _time(request, "start_time"), _time(request, "stop_time")
        if stop_time < start_time:
            raise RequestError(f"stop_time: {stop_time} is before start_time {start_time}")
    else:
        for name in ("start_pulse_id", "stop_pulse_id"):
            if name not in pulse_fields:
                raise RequestError(f"{name}: missing (expected an integer >= 0; or give "
                                   f"start_time/stop_time)")
        start_pid = _pulse_id(request, "start_pulse_id")
        stop_pid = _pulse_id(request, "stop_pulse_id")
        if stop_pid < start_pid:
            raise RequestError(f"stop_pulse_id: {stop_pid} is below start_pulse_id "
                               f"{start_pid}")
    metadata = request.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise RequestError(f"metadata: expected an object, got {metadata!r}")
    paths: dict[str, Any] = {}
    for key, value in metadata.items():
        path = _metadata_path(key)
        top = path.split("/")[0]
        if top == "data" or top in channels:
            raise RequestError(f"metadata: {key!r} collides with the group /{top} of the "
                               f"channel data")
        if path in paths:
            raise RequestError(f"metadata: {key!r} given twice")
        paths[path] = value
    for path in paths:
        parts = path.split("/")
        for n in range(1, len(parts)):
            parent = "/".join(parts[:n])
            if parent in paths:
                raise RequestError(f"metadata: {parent!r} is both a value and the group of "
                                   f"{path!r}")
    run_log_file = None
    if request.get("run_log_file") is not None:
        run_log_file = output_path(request, "run_log_file", output_root)
    return EpicsWriteRequest(tuple(channels), output_file, start_pid, stop_pid, start_time,
                             stop_time, paths, run_log_file)


def map_pulse_ids(timestamps_us: Sequence[int],
                  timeline: Sequence[tuple[int, int]]) -> list[int]:
    """Pulse id of each timestamp: that of the last timeline entry stamped strictly before
    it (the first entry for a point stamped exactly at it), 0 before the first entry.
    ``timeline`` is ``(epics_timestamp_us, pulse_id)`` sorted by time."""
    if not timeline:
        return [0] * len(timestamps_us)
    stamps = [t for t, _ in timeline]
    result = []
    for ts in timestamps_us:
        if ts < stamps[0]:
            result.append(0)
        else:
            result.append(timeline[max(bisect.bisect_left(stamps, ts) - 1, 0)][1])
    return result


class EpicsWriter:
    """The Epics writer's request handling (``on_request``/``on_kill`` of a primary service).

    ``on_channel(request_id, channel)`` is called after each channel is written (progress;
    tests use it to send a kill at a known point)."""

    def __init__(self, client: redis.Redis, service_name: str = "epics_writer",
                 config: dict | None = None,
                 on_channel: Callable[[str, str], None] | None = None):
        config = config or {}
        output_root = config.get("output_root")
        if output_root is not None and (not isinstance(output_root, str)
                                        or not os.path.isabs(output_root)):
            raise EpicsConfigError(f"output_root: expected an absolute directory, got "
                              f"{output_root!r}")
        distance = config.get("max_pulse_distance", MAX_PULSE_DISTANCE)
        if isinstance(distance, bool) or not isinstance(distance, int) or distance < 0:
            raise EpicsConfigError(f"max_pulse_distance: expected an integer >= 0, got "
                              f"{distance!r}")
        self.client = client
        self.service_name = service_name
        self.output_root = output_root
        self.max_pulse_distance = distance
        self.keys = StreamKeys(stream_prefix(config))
        self.on_channel = on_channel or (lambda _request_id, _channel: None)
        self._kills: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._counters = {"requests": 0, "succeeded": 0, "failed": 0, "points_written": 0}

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._counters, running=len(self._kills))

    # -- primary service contract --------------------------------------------------------
    def on_request(self, request_id: str, request: Any) -> dict:
        started = time.monotonic()
        run_log = _run_log_of(request, self.output_root)
        self._run_log(run_log, f"Processing of {request_id} started in service "
                               f"{self.service_name}.")
        kill = threading.Event()
        with self._lock:
            self._counters["requests"] += 1
            self._kills[request_id] = kill
        try:
            write = validate_request(request, self.output_root)
            span = ("pulse_id range" if write.by_pulse_id else "time range")
            start, stop = ((write.start_pulse_id, write.stop_pulse_id) if write.by_pulse_id
                           else (write.start_time, write.stop_time))
            self._run_log(run_log, f"Requesting file {write.output_file} for {span} {start} "
                                   f"to {stop} with {len(write.channels)} channels.")
            result = self._write(request_id, write, kill)
        except Exception as exc:
            with self._lock:
                self._counters["failed"] += 1
            self._run_log(run_log, f"Request {request_id} failed. Error:", f"|{exc}")
            raise
        finally:
            with self._lock:
                self._kills.pop(request_id, None)
        with self._lock:
            self._counters["succeeded"] += 1
            self._counters["points_written"] += result["n_points"]
        if run_log:
            self._run_log(run_log, f"Request {request_id} completed in "
                                   f"{time.monotonic() - started:.2f} seconds.",
                          "Output file analysis:", *analyse_file(write))
        return result

    def on_kill(self, request_id: str) -> None:
        with self._lock:
            kill = self._kills.get(request_id)
        if kill is not None:
            log.info("kill of request %s: stopping after the current channel", request_id)
            kill.set()

    # -- the write -----------------------------------------------------------------------
    def _write(self, request_id: str, write: EpicsWriteRequest, kill: threading.Event
               ) -> dict:
        try:
            start_ms, stop_ms = self._window(write)
            timeline = self._timeline(start_ms, stop_ms)
        except redis.RedisError as exc:
            raise RuntimeError(f"Redis unavailable: {exc}") from exc
        log.info("request %s: %d channels, window %d..%d ms, %d pulse ids in the timeline, "
                 "-> %s", request_id, len(write.channels), start_ms, stop_ms, len(timeline),
                 write.output_file)
        os.makedirs(os.path.dirname(write.output_file), exist_ok=True)
        with_data, without_data, n_points = [], [], 0
        try:
            file = h5py.File(write.output_file, "x")
        except FileExistsError:
            raise RequestError(f"output_file: {write.output_file} already exists (not "
                               f"overwritten)") from None
        with file:
            for path, value in write.metadata.items():
                if not isinstance(value, str):
                    log.debug("metadata %s: %r stored as JSON text", path, value)
                    value = json.dumps(value)
                file.create_dataset(path, data=value, dtype=STRING_DTYPE)
            for channel in write.channels:
                if kill.is_set():
                    raise KilledError(INTERRUPTED)
                try:
                    points = self._download(channel, start_ms, stop_ms)
                except redis.RedisError as exc:
                    raise RuntimeError(f"Redis unavailable while reading {channel}: "
                                       f"{exc}") from exc
                if points:
                    n_points += write_channel(file, channel, points, timeline)
                    with_data.append(channel)
                else:
                    log.warning("request %s: no data for %s", request_id, channel)
                    without_data.append(channel)
                file.flush()
                self.on_channel(request_id, channel)
                if kill.is_set():
                    raise KilledError(INTERRUPTED)
        log.info("request %s: wrote %s (%d points of %d channels; %d without data)",
                 request_id, write.output_file, n_points, len(with_data), len(without_data))
        return {"output_file": write.output_file, "n_channels": len(write.channels),
                "channels_with_data": with_data, "channels_without_data": without_data,
                "n_points": n_points}

    def _window(self, write: EpicsWriteRequest) -> tuple[int, int]:
        """The request's window of buffer arrival times, in ms."""
        if not write.by_pulse_id:
            return math.floor(write.start_time * 1000), math.floor(write.stop_time * 1000)
        key = self.keys.pulse_id
        start = self.client.xrevrange(key, max=str(write.start_pulse_id), count=1)
        stop = self.client.xrange(key, min=str(write.stop_pulse_id), count=1)
        start_ms = self._pulse_time(write.start_pulse_id, start, "start_pulse_id",
                                    "at or before")
        stop_ms = self._pulse_time(write.stop_pulse_id, stop, "stop_pulse_id",
                                   "at or after")
        if stop_ms < start_ms:
            raise RuntimeError(f"pulse ids {write.start_pulse_id}..{write.stop_pulse_id} "
                               f"map to a reversed time window ({start_ms} > {stop_ms} ms)")
        return start_ms, stop_ms

    def _pulse_time(self, pulse_id: int, found: list, name: str, where: str) -> int:
        if not found:
            raise RuntimeError(f"{name} {pulse_id}: cannot map it to a time, no pulse id "
                               f"{where} it in the buffer ({self._pulse_range()})")
        entry_id, fields = found[0]
        nearest = int(entry_id.split(b"-")[0])
        if abs(nearest - pulse_id) > self.max_pulse_distance:
            raise RuntimeError(f"{name} {pulse_id}: the nearest buffered pulse id {where} it "
                               f"is {nearest}, more than {self.max_pulse_distance} pulses "
                               f"away ({self._pulse_range()})")
        return int(fields[b"buffer_timestamp"]) // 1_000_000

    def _pulse_range(self) -> str:
        first = self.client.xrange(self.keys.pulse_id, count=1)
        last = self.client.xrevrange(self.keys.pulse_id, count=1)
        if not first:
            return f"the stream {self.keys.pulse_id} is empty"
        return (f"buffered pulse ids {int(first[0][0].split(b'-')[0])} to "
                f"{int(last[0][0].split(b'-')[0])}")

    def _timeline(self, start_ms: int, stop_ms: int) -> list[tuple[int, int]]:
        entries = self._xrange_all(self.keys.pulse_id_reverse, str(start_ms - TIMELINE_PAD_MS),
                                   str(stop_ms + TIMELINE_PAD_MS))
        timeline = [(int(f[b"epics_timestamp"]), int(f[b"pulse_id"])) for _, f in entries]
        timeline.sort(key=lambda entry: entry[0])
        return timeline

    def _xrange_all(self, key: str, low: str, high: str) -> list:
        out: list = []
        cursor = low
        while True:
            page = self.client.xrange(key, min=cursor, max=high, count=PAGE)
            out.extend(page)
            if len(page) < PAGE:
                return out
            cursor = "(" + page[-1][0].decode()

    def _download(self, channel: str, start_ms: int, stop_ms: int) -> list[Point]:
        """The last point at or before ``start_ms``, the points strictly between, the first
        point at or after ``stop_ms`` (in stream order, each once)."""
        key = self.keys.pv(channel)
        before = self.client.xrevrange(key, max=str(start_ms), count=1)
        inside = (self._xrange_all(key, str(start_ms + 1), str(stop_ms - 1))
                  if stop_ms - start_ms >= 2 else [])
        after = self.client.xrange(key, min=str(stop_ms), count=1)
        seen: set[bytes] = set()
        points = []
        for entry_id, fields in [*before, *inside, *after]:
            if entry_id not in seen:
                seen.add(entry_id)
                points.append(Point.from_fields(entry_id, fields))
        return points

    # -- run log -------------------------------------------------------------------------
    def _run_log(self, path: str | None, *lines: str) -> None:
        """Append lines to the run log; ``[<service>] `` in front of each, except the lines
        starting with ``\t`` (per-channel analysis) or ``|`` (a quoted error text, which is
        written without the ``|``)."""
        if not path:
            return
        text = "".join(f"{line[1:]}\n" if line.startswith("|")
                       else f"{line}\n" if line.startswith("\t")
                       else f"[{self.service_name}] {line}\n" for line in lines)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as out:
                out.write(text)
        except OSError as exc:
            log.warning("cannot append to run log %s: %s", path, exc)


def _run_log_of(request: Any, output_root: str | None) -> str | None:
    if not isinstance(request, dict) or request.get("run_log_file") is None:
        return None
    try:
        return output_path(request, "run_log_file", output_root)
    except RequestError:
        return None


def write_channel(file: h5py.File, channel: str, points: list[Point],
                  timeline: Sequence[tuple[int, int]]) -> int:
    """Write one channel (see the module doc); the number of points in its datasets."""
    file.create_group(channel)
    kinds = {(p.type_code, p.shape) for p in points if p.connected}
    if len(kinds) != 1:
        log.warning("%s: %s: only the empty group /%s is written", channel,
                    f"inconsistent types/shapes {sorted(kinds)}" if kinds
                    else "no connected point", channel)
        return 0
    type_code, shape = kinds.pop()
    n = len(points)
    if type_code == STRING_TYPE:
        data = np.full((n, *shape), "", dtype=object)
        dtype = STRING_DTYPE
    else:
        dtype = np.dtype("<" + type_code)
        data = np.zeros((n, *shape), dtype=dtype)
    for i, point in enumerate(points):
        if point.connected:
            try:
                data[i] = point.value()
            except ValueError as exc:
                log.warning("%s: point %s unreadable (%s): stored as zero", channel,
                            point.stream_id.decode(), exc)
    pulse_ids = map_pulse_ids([p.timestamp_us for p in points], timeline)
    group = file.create_group(f"data/{channel}")
    group.create_dataset("data", data=data, dtype=dtype)
    group.create_dataset("timestamp", data=np.array(
        [[p.timestamp_us] for p in points], dtype="<u8"))
    group.create_dataset("connected", data=np.array(
        [[int(p.connected)] for p in points], dtype="<u1"))
    group.create_dataset("status", data=np.array(
        [[p.status if p.connected else "unknown"] for p in points], dtype=object),
        dtype=STRING_DTYPE)
    group.create_dataset("pulse_id", data=np.array(
        [[pid if p.connected else 0] for p, pid in zip(points, pulse_ids, strict=True)],
        dtype="<u8"))
    return n


def analyse_file(write: EpicsWriteRequest) -> list[str]:
    """The run log's per-channel lines for a written file (tab-indented)."""
    try:
        with h5py.File(write.output_file, "r") as file:
            lines = []
            for channel in write.channels:
                if channel not in file:
                    lines.append(f"\t[{channel}] No data")
                    continue
                dataset = file.get(f"data/{channel}/pulse_id" if write.by_pulse_id
                                   else f"data/{channel}/timestamp")
                if dataset is None:
                    lines.append(f"\t[{channel}] Missing pulse_id mapping")
                    continue
                values = dataset[:, 0]
                if write.by_pulse_id:
                    low, high = write.start_pulse_id, write.stop_pulse_id
                else:
                    low, high = write.start_time * 1e6, write.stop_time * 1e6
                before = _leading(values < low)
                after = _leading((values >= high)[::-1])
                inside = max(len(values) - before - after, 0)
                lines.append(f"\t[{channel}] Point count {len(values)} "
                             f"({before}[{inside}){after})")
            return lines
    except Exception as exc:
        return [f"\tCould not process output file: {exc}"]


def _leading(flags: np.ndarray) -> int:
    """How many leading elements are True."""
    false = np.flatnonzero(~flags)
    return int(false[0]) if false.size else len(flags)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-epics-writer",
        description="Write buffered EPICS PV values of a pulse-id or time range to HDF5 "
                    "(a primary broker service).")
    parser.add_argument("--tag", default=None,
                        help="broker routing key of the requests to take (default: the "
                             "service name)")
    try:
        service_name, config, args = service_setup(parser, argv)
        client = redis_client(args.redis_host, args.redis_port)
        writer = EpicsWriter(client, service_name, config)
    except (SetupError, EpicsConfigError) as exc:
        print(f"stddaq-epics-writer: {exc}", file=sys.stderr)
        return 1
    return serve_primary(service_name, writer, args, config,
                         None if args.redis_skip else client, writer.counters,
                         lambda: bool(writer.counters()["running"]), "Epics write requests")


if __name__ == "__main__":
    sys.exit(main())
