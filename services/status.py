"""A service's status in Redis (the hash ``status.<service_name>``): one definition for the
service that writes it (services.startup.StatusHeartbeat) and every reader (stddaq-monitor,
the IOC's EPB: records).

The original std-daq's fields (``config``, ``service_name``, ``start_timestamp``) come
first; stddaq adds ``state``, ``heartbeat`` (epoch seconds of the last refresh),
``counters`` (JSON) and ``last_error``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

STATUS_PREFIX = "status."
STATUS_FRESH_S = 5.0  # a heartbeat older than this: the service is not running


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
