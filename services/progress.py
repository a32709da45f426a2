"""Live progress of a write request over Redis pub/sub, for clients on any machine.

The writer agent publishes a :class:`WriteProgress` as JSON on the channel
``stddaq.progress.<service_name>``: at most ``max_rate_hz`` (100) times per second while a run
goes on, and always its final state. The IOC and the Ophyd device follow it to report
NumCaptured and to finish ``trigger()`` statuses. Redis being down only loses progress
messages, never the write itself.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteProgress:
    """Where a write request stands: ``n_rows`` rows of ``output_file`` written so far
    (``n_written`` with their image, ``n_missing`` zeros for images gone from the buffer)
    of ``n_images`` asked for; ``done`` once the request's run ended."""

    request_id: str
    run_id: int
    output_file: str
    n_images: int
    n_rows: int = 0
    n_written: int = 0
    n_missing: int = 0
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> WriteProgress | None:
        """The progress a message carries; None for a message that is not one (another
        publisher's, or of another version)."""
        if not isinstance(raw, dict):
            return None
        values = {}
        for f in fields(cls):
            value = raw.get(f.name)
            if value is None and f.name not in _REQUIRED:
                continue  # the default
            kind = _KINDS[f.name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                return None
            values[f.name] = value
        return cls(**values)


_REQUIRED = ("request_id", "run_id", "output_file", "n_images")
_KINDS = {"request_id": str, "run_id": int, "output_file": str, "n_images": int,
          "n_rows": int, "n_written": int, "n_missing": int, "done": bool}


def progress_channel(service_name: str) -> str:
    return f"stddaq.progress.{service_name}"


class ProgressPublisher:
    """Rate-limited publisher. ``publish(progress)`` never blocks (it is called per image on
    the data path): a background thread sends the newest state at most ``max_rate_hz`` times
    per second and a final (``done``) state at once, so the last state of a burst always goes
    out and a slow or absent Redis never stalls a write."""

    def __init__(self, client: redis.Redis | None, service_name: str, max_rate_hz: float = 100):
        self.client = client
        self.channel = progress_channel(service_name)
        self.min_interval = 1.0 / max_rate_hz
        self._pending: dict | None = None
        self._wake = threading.Condition()
        self._warned = False
        if client is not None:
            threading.Thread(target=self._run, name="progress-publisher", daemon=True).start()

    def publish(self, progress: dict) -> None:
        with self._wake:
            self._pending = progress
            self._wake.notify()

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._wake:
                while self._pending is None:
                    self._wake.wait()
                wait = last + self.min_interval - time.monotonic()
                if wait > 0 and not self._pending.get("done"):
                    self._wake.wait(wait)  # a done state arriving meanwhile goes at once
                    continue
                progress, self._pending = self._pending, None
            last = time.monotonic()
            self._send(progress)

    def _send(self, progress: dict) -> None:
        try:
            self.client.publish(self.channel, json.dumps(progress))
            self._warned = False
        except redis.RedisError as exc:
            if not self._warned:
                log.warning("cannot publish progress on %s: %s", self.channel, exc)
                self._warned = True


class ProgressFollower:
    """Calls ``on_progress(dict)`` for every progress message of a writer agent, from a
    background thread; reconnects to Redis after an outage."""

    def __init__(self, client: redis.Redis, service_name: str,
                 on_progress: Callable[[dict], None]):
        self.client = client
        self.channel = progress_channel(service_name)
        self.on_progress = on_progress
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-follower",
                                        daemon=True)

    def start(self, timeout: float = 5.0) -> ProgressFollower:
        """Start following; waits until subscribed (or ``timeout``)."""
        self._thread.start()
        self._ready.wait(timeout)
        return self

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                self._ready.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message and message["type"] == "message":
                        try:
                            self.on_progress(json.loads(message["data"]))
                        except ValueError:
                            log.warning("bad progress message on %s", self.channel)
            except redis.RedisError as exc:
                self._ready.clear()
                log.warning("progress of %s unavailable (%s): retrying", self.channel, exc)
                self._stop.wait(1.0)
            finally:
                pubsub.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
