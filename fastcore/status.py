"""A service's status in Redis (the hash ``status.<service_name>``): one definition for the
writer (:class:`StatusHeartbeat`, started by the process runtime, fastcore.runtime) and every
reader (stddaq-monitor, the IOC's EPB: records, the REST interface, DaqClient).

The original std-daq's fields (``config``, ``service_name``, ``start_timestamp``) come
first; stddaq adds ``state``, ``heartbeat`` (epoch seconds of the last refresh),
``counters`` (JSON) and ``last_error``. The heartbeat refreshes the hash every
:data:`HEARTBEAT_S`; the key expires :data:`STATUS_TTL_S` after the last refresh. Redis being
down never stops a service: the heartbeat logs it once, retries, and reports again when it
is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

STATUS_PREFIX = "status."
HEARTBEAT_S = 1.0  # how often a running service refreshes its status
STATUS_TTL_S = 5  # the status key outlives its last refresh by this long
STATUS_FRESH_S = 5.0  # a heartbeat older than this: the service is not running


def redis_client(host: str, port: int) -> redis.Redis:
    """A client that fails fast when Redis is away (one immediate retry, for a connection
    broken by a Redis restart) instead of redis-py's retries with back-off."""
    return redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2,
                       retry=Retry(NoBackoff(), 1))


def status_key(service_name: str) -> str:
    return STATUS_PREFIX + service_name


@dataclass(frozen=True)
class ServiceStatus:
    service_name: str
    config: dict[str, Any] = field(default_factory=dict)
    start_timestamp: float | None = None
    state: str | None = None
    heartbeat: float | None = None
    counters: dict[str, Any] = field(default_factory=dict)
    last_error: str = ""

    def to_fields(self, config_json: str | None = None) -> dict[str, Any]:
        """The hash fields (``config_json``: the config already as JSON, to save work)."""
        return {
            "config": config_json if config_json is not None else json.dumps(self.config),
            "service_name": self.service_name,
            "start_timestamp": self.start_timestamp if self.start_timestamp is not None else "",
            "state": self.state or "",
            "heartbeat": self.heartbeat if self.heartbeat is not None else "",
            "counters": json.dumps(self.counters),
            "last_error": self.last_error,
        }

    def heartbeat_age(self, now: float | None = None) -> float | None:
        """Seconds since the last heartbeat (None: it never sent one)."""
        if self.heartbeat is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.heartbeat)

    @property
    def alive(self) -> bool:
        """The service runs: its heartbeat is younger than :data:`STATUS_FRESH_S`."""
        age = self.heartbeat_age()
        return age is not None and age < STATUS_FRESH_S

    @classmethod
    def from_fields(cls, key: str | bytes, raw: Mapping[Any, Any]) -> ServiceStatus:
        """Read a hash as Redis returns it (bytes or str); tolerant of missing or bad
        fields (a hash of another writer, or the original's three fields only)."""
        fields = {_text(k): _text(v) for k, v in raw.items()}
        name = fields.get("service_name") or _text(key).removeprefix(STATUS_PREFIX)
        return cls(service_name=name, config=_json_object(fields.get("config")),
                   start_timestamp=_number(fields.get("start_timestamp")),
                   state=fields.get("state") or None,
                   heartbeat=_number(fields.get("heartbeat")),
                   counters=_json_object(fields.get("counters")),
                   last_error=fields.get("last_error") or "")


def read_status(client: redis.Redis, service_name: str) -> ServiceStatus | None:
    """The service's status hash, or None when there is none (redis errors pass)."""
    raw = client.hgetall(status_key(service_name))
    return ServiceStatus.from_fields(status_key(service_name), raw) if raw else None


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _json_object(value: str | None) -> dict[str, Any]:
    try:
        parsed = json.loads(value) if value else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


class StatusHeartbeat:
    """Refreshes ``status.<service_name>`` in Redis every second from a background thread
    (``client`` None: no Redis, nothing is written)."""

    def __init__(self, service_name: str, config: dict, client: redis.Redis | None,
                 counters: Callable[[], dict[str, Any]] | None = None):
        self.service_name = service_name
        self.key = status_key(service_name)
        self.client = client
        self.counters = counters or dict
        self.config_json = json.dumps(config)
        self.start_timestamp = int(time.time())
        self.state = "starting"
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-heartbeat",
                                        daemon=True)
        self._redis_ok = True

    def start(self) -> StatusHeartbeat:
        if self.client is not None:
            self._thread.start()
        return self

    def set_state(self, state: str) -> None:
        self.state = state

    def error(self, message: str) -> None:
        self.last_error = message

    def status(self) -> ServiceStatus:
        return ServiceStatus(self.service_name, start_timestamp=self.start_timestamp,
                             state=self.state, heartbeat=time.time(),
                             counters=self.counters(), last_error=self.last_error)

    def fields(self) -> dict[str, Any]:
        return self.status().to_fields(self.config_json)

    def beat(self) -> bool:
        """Write the status once; False (logged on the first failure) if Redis is down."""
        try:
            pipe = self.client.pipeline()
            pipe.hset(self.key, mapping=self.fields())
            pipe.expire(self.key, STATUS_TTL_S)
            pipe.execute()
        except redis.RedisError as exc:
            if self._redis_ok:
                log.warning("Redis unavailable for %s (%s): the service keeps running, "
                            "retrying every %.0f s", self.key, exc, HEARTBEAT_S)
            self._redis_ok = False
            return False
        if not self._redis_ok:
            log.info("Redis is back: reporting %s again", self.key)
        self._redis_ok = True
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(HEARTBEAT_S)

    def stop(self) -> None:
        """Stop beating and remove the status (a stopped service is not shown as alive)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.client is not None:
            with contextlib.suppress(redis.RedisError):
                self.client.delete(self.key)
