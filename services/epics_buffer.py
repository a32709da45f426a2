"""EPICS buffer: records every update of a list of PVs (Channel Access) into Redis streams.

Config: ``{"pv_list": [...], "pulse_id_pv"?: str, "use_archiver_precision"?: bool,
"stream_maxlen"?: int, "stream_prefix"?: str, "backlog_max_events"?: int,
"backlog_max_bytes"?: int}``. The Redis layout is the original std-daq one (see
services/epics_common.py): one capped stream per PV, a ``connected=0`` record per PV at
start and on every disconnect, and with ``pulse_id_pv`` the ``pulse_id`` and
``pulse_id_reverse`` streams.

PVs are monitored with pyepics (libca, the original's client: it reconnects by itself when an
IOC comes back). Callbacks only encode the update and queue it; one thread writes the queue
to Redis in order, in MULTI/EXEC batches. While Redis is unreachable the queue is the
backlog: it keeps at most ``backlog_max_events`` updates and ``backlog_max_bytes`` bytes of
values (drops the oldest beyond that, logged and counted) and is flushed in order when Redis
is back. The ``status.<service_name>`` heartbeat carries the counters.
"""

from __future__ import annotations

import argparse
import collections
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis

from fastcore.runtime import (
    SetupError,
    StatusHeartbeat,
    announce_ready,
    handle_signals,
    redis_client,
    service_setup,
    stop_on_signals,
)
from services.epics_common import (
    PULSE_ID_STREAM_MAXLEN,
    PV_STREAM_MAXLEN,
    EpicsConfigError,
    StreamKeys,
    connected_record,
    disconnected_record,
    encode_value,
    stream_prefix,
)

log = logging.getLogger("EpicsBuffer")

BACKLOG_MAX_EVENTS = 200_000
BACKLOG_MAX_BYTES = 256 * 1024 * 1024
BATCH_SIZE = 500
RETRY_S = 0.5
STATS_PERIOD_S = 10.0
SHUTDOWN_FLUSH_S = 3.0
PULSE_ID_CONNECT_WARN_S = 5.0


@dataclass(frozen=True)
class BufferConfig:
    pv_list: tuple[str, ...]
    pulse_id_pv: str | None = None
    use_archiver_precision: bool = False
    stream_maxlen: int = PV_STREAM_MAXLEN
    stream_prefix: str = ""
    backlog_max_events: int = BACKLOG_MAX_EVENTS
    backlog_max_bytes: int = BACKLOG_MAX_BYTES

    @classmethod
    def from_dict(cls, config: Any) -> BufferConfig:
        if not isinstance(config, dict):
            raise EpicsConfigError("config: expected a JSON object")
        pv_list = config.get("pv_list")
        if pv_list is None:
            raise EpicsConfigError("pv_list: missing (expected a non-empty list of PV names); "
                              "a buffer without PVs records nothing")
        if (not isinstance(pv_list, list) or not pv_list
                or not all(_is_pv_name(name) for name in pv_list)):
            raise EpicsConfigError(f"pv_list: expected a non-empty list of PV names (non-empty "
                              f"strings without spaces), got {pv_list!r}")
        duplicates = sorted({name for name in pv_list if pv_list.count(name) > 1})
        if duplicates:
            raise EpicsConfigError(f"pv_list: duplicate PV names {duplicates}")
        pulse_id_pv = config.get("pulse_id_pv")
        if pulse_id_pv is not None and not _is_pv_name(pulse_id_pv):
            raise EpicsConfigError(f"pulse_id_pv: expected a PV name, got {pulse_id_pv!r}")
        archiver = config.get("use_archiver_precision", False)
        if not isinstance(archiver, bool):
            raise EpicsConfigError(f"use_archiver_precision: expected true or false, "
                              f"got {archiver!r}")
        return cls(pv_list=tuple(pv_list), pulse_id_pv=pulse_id_pv or None,
                   use_archiver_precision=archiver,
                   stream_maxlen=_positive_int(config, "stream_maxlen", PV_STREAM_MAXLEN),
                   stream_prefix=stream_prefix(config),
                   backlog_max_events=_positive_int(config, "backlog_max_events",
                                                    BACKLOG_MAX_EVENTS),
                   backlog_max_bytes=_positive_int(config, "backlog_max_bytes",
                                                   BACKLOG_MAX_BYTES))


def _is_pv_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and not any(c.isspace() for c in name)


def _positive_int(config: dict, name: str, default: int) -> int:
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EpicsConfigError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class _Entry:
    """One XADD waiting for Redis."""

    seq: int
    key: str
    entry_id: str
    fields: dict[str, Any]
    maxlen: int
    nbytes: int
    kind: str  # "pv", "pulse_id" or "pulse_id_reverse"


class StreamSink:
    """Writes queued XADDs to Redis in order from one thread; a bounded backlog while
    Redis is unreachable (the oldest entries are dropped beyond the bounds)."""

    def __init__(self, client: redis.Redis, max_events: int = BACKLOG_MAX_EVENTS,
                 max_bytes: int = BACKLOG_MAX_BYTES):
        self.client = client
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._queue: collections.deque[_Entry] = collections.deque()
        self._queue_bytes = 0
        self._cond = threading.Condition()
        self._seq = 0
        self._last_ms: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-writer", daemon=True)
        self.redis_ok = True
        self.written = 0
        self.written_bytes = 0
        self.dropped = 0
        self.rejected_pulse_ids = 0
        self._dropped_logged = 0
        self._drop_log_time = 0.0
        self._rejected_log_time = 0.0
        self._outage_dropped = 0

    def start(self) -> StreamSink:
        self._thread.start()
        return self

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def submit(self, key: str, fields: dict[str, Any], *, arrival_ms: int | None = None,
               entry_id: str | None = None, maxlen: int = PV_STREAM_MAXLEN,
               kind: str = "pv", nbytes: int = 0) -> None:
        """Queue one XADD. Without ``entry_id`` the entry ID is ``<arrival ms>-*`` (never
        below the previous one of the same key, so the order of a stream is arrival order)."""
        with self._cond:
            if entry_id is None:
                ms = max(arrival_ms if arrival_ms is not None else time.time_ns() // 1_000_000,
                         self._last_ms.get(key, 0))
                self._last_ms[key] = ms
                entry_id = f"{ms}-*"
            self._seq += 1
            self._queue.append(_Entry(self._seq, key, entry_id, fields, maxlen, nbytes, kind))
            self._queue_bytes += nbytes
            while (len(self._queue) > self.max_events
                   or (self._queue_bytes > self.max_bytes and len(self._queue) > 1)):
                old = self._queue.popleft()
                self._queue_bytes -= old.nbytes
                self.dropped += 1
            self._cond.notify()
        self._log_drops()

    def _log_drops(self) -> None:
        new = self.dropped - self._dropped_logged
        if new <= 0:
            return
        now = time.monotonic()
        if self._dropped_logged == 0 or now - self._drop_log_time >= STATS_PERIOD_S:
            log.warning("Redis backlog full (bound %d updates / %d bytes): dropping the "
                        "oldest buffered updates (%d dropped so far)", self.max_events,
                        self.max_bytes, self.dropped)
            self._dropped_logged = self.dropped
            self._drop_log_time = now

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(1.0)
                batch = list(self._queue)[:BATCH_SIZE] if self._queue else []
            if not batch:
                continue
            if not self._write(batch):
                self._stop.wait(RETRY_S)

    def _write(self, batch: list[_Entry]) -> bool:
        """Write a batch; True once Redis took it (and it is off the queue)."""
        try:
            pipe = self.client.pipeline(transaction=True)
            for entry in batch:
                pipe.xadd(entry.key, entry.fields, id=entry.entry_id, maxlen=entry.maxlen,
                          approximate=True)
            results = pipe.execute(raise_on_error=False)
            retry = [e for e, r in zip(batch, results, strict=True)
                     if isinstance(r, redis.ResponseError) and e.kind != "pulse_id"]
            rejected = [(e, r) for e, r in zip(batch, results, strict=True)
                        if isinstance(r, redis.ResponseError) and e.kind == "pulse_id"]
        except redis.RedisError as exc:
            if self.redis_ok:
                log.warning("Redis unreachable or refusing writes (%s): buffering updates "
                            "in memory, at most "
                            "%d updates / %d bytes (the oldest are dropped beyond that)",
                            exc, self.max_events, self.max_bytes)
                self._outage_dropped = self.dropped
            self.redis_ok = False
            return False
        if retry:
            self._write_with_redis_ids(retry)
        if rejected:
            self._log_rejected(rejected)
        with self._cond:
            last = batch[-1].seq
            while self._queue and self._queue[0].seq <= last:
                done = self._queue.popleft()
                self._queue_bytes -= done.nbytes
            self.written += len(batch) - len(rejected)
            self.written_bytes += sum(e.nbytes for e in batch)
            remaining = len(self._queue)
        if not self.redis_ok:
            self.redis_ok = True
            log.info("Redis is back: writing the buffered updates in order (%d still "
                     "queued; %d dropped during the outage)", remaining,
                     self.dropped - self._outage_dropped)
        return True

    def _write_with_redis_ids(self, entries: list[_Entry]) -> None:
        """Entries whose stream already holds a later ID (a clock step, or an earlier
        buffer): let Redis pick the next ID. The batch they came with is stored, so they
        are not retried again; if this fails they are counted as dropped."""
        try:
            pipe = self.client.pipeline(transaction=True)
            for entry in entries:
                pipe.xadd(entry.key, entry.fields, id="*", maxlen=entry.maxlen,
                          approximate=True)
            results = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            results = [exc] * len(entries)
        for entry, result in zip(entries, results, strict=True):
            if isinstance(result, Exception):
                log.error("update of %s lost: %s", entry.key, result)
                self.dropped += 1

    def _log_rejected(self, rejected: list[tuple[_Entry, Exception]]) -> None:
        self.rejected_pulse_ids += len(rejected)
        now = time.monotonic()
        if now - self._rejected_log_time >= STATS_PERIOD_S:
            entry, error = rejected[0]
            log.warning("pulse id %s not stored in %s (%s); pulse ids must increase "
                        "(%d rejected in total)", entry.entry_id.split("-")[0], entry.key,
                        error, self.rejected_pulse_ids)
            self._rejected_log_time = now

    def close(self, timeout: float = SHUTDOWN_FLUSH_S) -> int:
        """Flush for at most ``timeout`` s, stop the thread; the entries left unwritten."""
        deadline = time.monotonic() + timeout
        while self._queue and self.redis_ok and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(max(0.5, deadline - time.monotonic()))
        return len(self._queue)


class EpicsBuffer:
    """Turns Channel Access monitor events into stream records (see the module doc)."""

    def __init__(self, config: BufferConfig, sink: StreamSink):
        self.config = config
        self.sink = sink
        self.keys = StreamKeys(config.stream_prefix)
        self._pvs: list[Any] = []
        self._lock = threading.Lock()
        self._connected = dict.fromkeys(config.pv_list, False)
        self.events = 0
        self.value_bytes = 0
        self.pulse_ids = 0
        self.pulse_id_connected = False
        self._changed: set[str] = set()
        self._changed_last = 0
        self._changed_since = time.monotonic()
        self._empty_logged = 0.0

    # -- Channel Access side -------------------------------------------------------------
    def start(self) -> None:
        """Write the initial ``connected=0`` record of every PV, then monitor them."""
        import epics
        from epics import dbr

        # libca's own messages (printf) go to the debug log.
        epics.ca.enable_ca_messages(lambda *args: log.debug("libca: %s", " ".join(
            str(a) for a in args).strip()))
        stamp = now_us()
        for name in self.config.pv_list:
            self.sink.submit(self.keys.pv(name), disconnected_record(stamp),
                             arrival_ms=stamp // 1000)
        mask = dbr.DBE_VALUE | dbr.DBE_ALARM
        if self.config.use_archiver_precision:
            mask |= dbr.DBE_LOG
        names = list(self.config.pv_list)
        if self.config.pulse_id_pv and self.config.pulse_id_pv not in self._connected:
            names.append(self.config.pulse_id_pv)
        for name in names:
            self._pvs.append(epics.PV(name, form="time", auto_monitor=mask,
                                      callback=self._on_value,
                                      connection_callback=self._on_connection))
        log.info("monitoring %d PVs%s", len(self.config.pv_list),
                 f" and pulse id PV {self.config.pulse_id_pv}" if self.config.pulse_id_pv
                 else "")

    def stop(self) -> None:
        for pv in self._pvs:
            pv.clear_callbacks(with_connect_callback=True)
        for pv in self._pvs:
            pv.disconnect()
        self._pvs.clear()

    def _on_connection(self, pvname: str | None = None, conn: bool = False, **_: Any) -> None:
        try:
            if pvname in self._connected:
                self.on_connection(pvname, bool(conn))
            elif pvname == self.config.pulse_id_pv:
                self.pulse_id_connected = bool(conn)
                log.log(logging.INFO if conn else logging.WARNING, "pulse id PV %s %s",
                        pvname, "connected" if conn else "disconnected")
        except Exception:
            log.exception("connection event of %s", pvname)

    def _on_value(self, pvname: str | None = None, value: Any = None, **kwargs: Any) -> None:
        try:
            if pvname == self.config.pulse_id_pv:
                self.on_pulse_id(value, kwargs)
            if pvname in self._connected:
                self.on_value(pvname, value, kwargs)
        except Exception:
            log.exception("value event of %s", pvname)

    # -- record making (callable without CA, for tests) ----------------------------------
    def on_connection(self, pvname: str, connected: bool) -> None:
        with self._lock:
            was = self._connected[pvname]
            self._connected[pvname] = connected
        if was and not connected:
            stamp = now_us()
            log.info("%s disconnected", pvname)
            self._count(pvname, 0)
            self.sink.submit(self.keys.pv(pvname), disconnected_record(stamp),
                             arrival_ms=stamp // 1000)
        elif connected and not was:
            log.info("%s connected", pvname)

    def on_value(self, pvname: str, value: Any, meta: dict[str, Any]) -> None:
        arrival_ms = time.time_ns() // 1_000_000
        if value is None:
            return
        with self._lock:
            self._connected[pvname] = True
        type_code, shape, raw = encode_value(value, _native_type(meta.get("ftype")))
        record = connected_record(epics_time_us(meta), type_code, shape, raw,
                                  alarm_status_name(meta.get("status")))
        self._count(pvname, len(raw))
        self.sink.submit(self.keys.pv(pvname), record, arrival_ms=arrival_ms, nbytes=len(raw),
                         maxlen=self.config.stream_maxlen)

    def on_pulse_id(self, value: Any, meta: dict[str, Any]) -> None:
        buffer_ns = time.time_ns()
        if value is None or (hasattr(value, "__len__") and len(value) == 0):
            now = time.monotonic()
            if now - self._empty_logged >= STATS_PERIOD_S:
                log.warning("Pulse_id PV empty.")
                self._empty_logged = now
            return
        try:
            pulse_id = int(value if not hasattr(value, "__len__") else value[0])
        except (TypeError, ValueError, OverflowError):
            pulse_id = -1
        if pulse_id < 1:  # Redis stream IDs start at 0-1
            log.warning("pulse id PV value %r is not a positive integer: ignored", value)
            return
        epics_us = epics_time_us(meta)
        self.pulse_ids += 1
        self.sink.submit(self.keys.pulse_id,
                         {"buffer_timestamp": buffer_ns, "epics_timestamp": epics_us},
                         entry_id=f"{pulse_id}-0", maxlen=PULSE_ID_STREAM_MAXLEN,
                         kind="pulse_id")
        self.sink.submit(self.keys.pulse_id_reverse,
                         {"pulse_id": pulse_id, "epics_timestamp": epics_us},
                         arrival_ms=buffer_ns // 1_000_000, maxlen=PULSE_ID_STREAM_MAXLEN,
                         kind="pulse_id_reverse")

    def _count(self, pvname: str, nbytes: int) -> None:
        with self._lock:
            self.events += 1
            self.value_bytes += nbytes
            self._changed.add(pvname)

    def counters(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            if now - self._changed_since >= STATS_PERIOD_S:
                self._changed_last = len(self._changed)
                self._changed.clear()
                self._changed_since = now
            return {
                "pvs": len(self._connected),
                "pvs_connected": sum(self._connected.values()),
                "events": self.events,
                "bytes": self.value_bytes,
                "channels_changed": self._changed_last,
                "pulse_ids": self.pulse_ids,
                "pulse_id_pv_connected": self.pulse_id_connected,
                "written": self.sink.written,
                "dropped": self.sink.dropped,
                "backlog": self.sink.backlog,
                "pulse_ids_rejected": self.sink.rejected_pulse_ids,
                "redis_ok": self.sink.redis_ok,
            }


def _native_type(ftype: Any) -> int | None:
    if ftype is None:
        return None
    from epics import dbr

    return int(dbr.native_type(ftype))


def epics_time_us(meta: dict[str, Any]) -> int:
    """The EPICS timestamp of a pyepics callback in microseconds."""
    seconds = meta.get("posixseconds")
    if seconds:
        return int(seconds) * 1_000_000 + int(meta.get("nanoseconds") or 0) // 1000
    stamp = meta.get("timestamp")
    return round(stamp * 1e6) if stamp else now_us()


def alarm_status_name(status: Any) -> str:
    if status is None:
        return ""
    from epics import dbr

    return dbr.AlarmStatus(int(status)).name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-epics-buffer",
        description="Record EPICS PV updates into Redis streams (std-daq layout).")
    try:
        service_name, config, args = service_setup(parser, argv)
        settings = BufferConfig.from_dict(config)
    except (SetupError, EpicsConfigError) as exc:
        print(f"stddaq-epics-buffer: {exc}", file=sys.stderr)
        return 1
    client = redis_client(args.redis_host, args.redis_port)
    sink = StreamSink(client, settings.backlog_max_events, settings.backlog_max_bytes).start()
    buffer = EpicsBuffer(settings, sink)
    heartbeat = None
    if not args.redis_skip:
        heartbeat = StatusHeartbeat(service_name, config,
                                    redis_client(args.redis_host, args.redis_port),
                                    buffer.counters).start()
    stop = stop_on_signals()
    # libca forks a child to start caRepeater and never reaps it; this process has no
    # other children, so let the kernel reap them (no zombie left behind).
    handle_signals(signal.SIG_IGN, (signal.SIGCHLD,))
    buffer.start()
    if heartbeat is not None:
        heartbeat.set_state("running")
    announce_ready("%s buffering %d PVs into Redis %s:%d", service_name,
                   len(settings.pv_list), args.redis_host, args.redis_port)
    started = time.monotonic()
    warned = False
    while not stop.wait(1.0):
        if (settings.pulse_id_pv and not warned and not buffer.pulse_id_connected
                and time.monotonic() - started >= PULSE_ID_CONNECT_WARN_S):
            log.warning("pulse id PV %s not connected after %.0f s: no pulse_id stream "
                        "until it connects (is its IOC running and in EPICS_CA_ADDR_LIST?)",
                        settings.pulse_id_pv, PULSE_ID_CONNECT_WARN_S)
            warned = True
    if heartbeat is not None:
        heartbeat.set_state("stopping")
    buffer.stop()
    left = sink.close()
    if left:
        log.warning("stopped with %d updates not written to Redis", left)
    if heartbeat is not None:
        heartbeat.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
