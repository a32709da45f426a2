"""DaqClient: what a user-facing front end (Ophyd device, IOC) needs from std-daq.

Write requests go to the detector's writer agent over RabbitMQ (routing key = the agent's
service name); their start/success/fail statuses come back on the status exchange; the
written-images counter comes over Redis pub/sub (services.progress). Nothing connects
until ``start()`` (or the first request); every wait has a timeout and fails with a
``StdDaqError`` carrying std-daq's message.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from fastcore.runtime import AMQP_PORT, parse_broker_url
from fastcore.status import read_status, status_key
from services.broker.client import BrokerClient
from services.broker.protocol import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_START,
    ACTION_REQUEST_SUCCESS,
    BrokerError,
)
from services.progress import ProgressFollower, WriteProgress

log = logging.getLogger(__name__)


class StdDaqError(RuntimeError):
    """std-daq refused or failed a request, or could not be reached."""


class WriteRun:
    """One write request as the client follows it."""

    def __init__(self, request_id: str, request: dict):
        self.request_id = request_id
        self.request = request
        self.started = threading.Event()
        self.done = threading.Event()
        self.failed = False
        self.message: str | None = None
        self.result: dict | None = None
        self.n_written = 0  # images written good or flagged (progress, then the result)
        self.n_rows = 0  # rows added to the file: n_written + rows of zeros (images lost)
        self.interrupted: str | None = None  # set by cancel(): waits give up
        self._lock = threading.Lock()
        self._progress_callbacks: list[Callable[[int], None]] = []
        self._done_callbacks: list[Callable[[], None]] = []

    @property
    def outcome(self) -> str | None:
        """None while running, then 'success', 'partial' (the file holds fewer good images
        than requested: see :attr:`summary`) or 'fail' (see :attr:`message`)."""
        if not self.done.is_set():
            return None
        if self.failed:
            return "fail"
        return (self.result or {}).get("outcome", "success")

    @property
    def summary(self) -> str:
        """What the file holds (the writer's summary), or the failure message."""
        if self.failed:
            return self.message or "write failed"
        return str((self.result or {}).get("summary", ""))

    def add_progress_callback(self, callback: Callable[[int], None]) -> None:
        with self._lock:
            self._progress_callbacks.append(callback)

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._done_callbacks.append(callback)
            done = self.done.is_set()
        if done:
            callback()

    def cancel(self, reason: str) -> None:
        """Make every wait on this run give up with ``reason`` (the write is not stopped)."""
        self.interrupted = reason
        self._notify_progress()

    def _set_written(self, n_written: int, n_rows: int | None = None) -> None:
        rows = max(self.n_rows, n_written if n_rows is None else n_rows)
        if n_written > self.n_written or rows > self.n_rows:
            self.n_written = max(self.n_written, n_written)
            self.n_rows = rows
            self._notify_progress()

    def _notify_progress(self) -> None:
        with self._lock:
            callbacks = list(self._progress_callbacks)
        for callback in callbacks:
            callback(self.n_written)

    def _finish(self, failed: bool, message: Any) -> None:
        if self.done.is_set():
            return
        self.failed = failed
        if failed:
            self.message = str(message)
        elif isinstance(message, dict):
            self.result = message
            written, missing = message.get("n_images"), message.get("n_missing")
            if isinstance(written, int):
                self._set_written(written, written + (missing if isinstance(missing, int)
                                                      else 0))
        self.started.set()
        self.done.set()
        with self._lock:
            callbacks = list(self._done_callbacks)
        for callback in callbacks:
            callback()


class DaqClient:
    """Write requests to one writer agent (``writer_service``) and their progress."""

    def __init__(self, writer_service: str, broker_host: str = "127.0.0.1",
                 redis_client: redis.Redis | None = None, broker_port: int = AMQP_PORT,
                 *, status_listener: Callable[[str | None, Any, dict], None] | None = None,
                 progress_listener: Callable[[WriteProgress], None] | None = None):
        """``status_listener(request_id, request, headers)`` and ``progress_listener``
        (progress dict) see every status and progress of the writer agent, whoever sent
        the request (a dashboard's view)."""
        self.writer_service = writer_service
        self.status_listener = status_listener
        self.progress_listener = progress_listener
        host, port = parse_broker_url(broker_host)  # "host:port" is understood as such
        self.broker_host = host
        self.broker_port = port if broker_port == AMQP_PORT else broker_port
        self.redis_client = redis_client
        self._broker: BrokerClient | None = None
        self._progress: ProgressFollower | None = None
        self._runs: dict[str, WriteRun] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Begin connecting to RabbitMQ and Redis in the background (never blocks)."""
        with self._lock:
            if self._broker is not None:
                return
            self._broker = BrokerClient(self.broker_host, self.broker_port,
                                        status_callback=self._on_status,
                                        connection_name=f"stddaq daq-client "
                                        f"{self.writer_service}")
            if self.redis_client is not None:
                self._progress = ProgressFollower(self.redis_client, self.writer_service,
                                                  self._on_progress)
                self._progress.start(timeout=0)

    @property
    def connected(self) -> bool:
        return self._broker is not None and self._broker.connected

    def close(self) -> None:
        with self._lock:
            broker, progress = self._broker, self._progress
            self._broker = self._progress = None
        if progress is not None:
            progress.stop()
        if broker is not None:
            broker.close()

    def check_agent(self, detector_name: str) -> None:
        """StdDaqError unless the writer agent runs (a fresh status in Redis)."""
        try:
            status = read_status(self.redis_client, self.writer_service)
        except redis.RedisError as exc:
            raise StdDaqError(f"Redis not reachable: {exc}") from None
        if status is None or not status.alive:
            raise StdDaqError(f"writer agent {self.writer_service} is not running (no fresh "
                              f"{status_key(self.writer_service)} in Redis): start std-daq "
                              f"for {detector_name} (stddaq-run)")

    def start_write(self, request: dict, timeout: float = 10.0) -> WriteRun:
        """Send a write request; return once the writer agent started it. StdDaqError with
        std-daq's message when it is refused, or when std-daq cannot be reached."""
        self.start()
        deadline = time.monotonic() + timeout
        try:
            self._broker.wait_ready(timeout)
        except TimeoutError as exc:
            raise StdDaqError(f"RabbitMQ at {self.broker_host} not reachable: {exc}") from None
        try:
            request_id = self._broker.send_request(
                self.writer_service, request, timeout=max(0.1, deadline - time.monotonic()),
                expires_s=timeout)  # never started late by an agent that comes back
        except BrokerError as exc:
            raise StdDaqError(str(exc)) from None
        run = WriteRun(request_id, request)
        with self._lock:
            self._runs[request_id] = run
        self._catch_up(run)
        if not run.started.wait(max(0.0, deadline - time.monotonic())):
            self._forget(run)
            with contextlib.suppress(BrokerError):  # taken at the last moment: stop it
                self._broker.kill_request(self.writer_service, request_id, timeout=1.0)
            raise StdDaqError(f"writer agent {self.writer_service} did not start request "
                           f"{request_id} within {timeout:g} s (is it running and idle?); "
                           "the request was withdrawn")
        if run.failed:
            self._forget(run)
            raise StdDaqError(run.message or "request failed")
        return run

    def kill(self, run: WriteRun, timeout: float = 10.0) -> None:
        """Stop a run and wait until std-daq closed its file."""
        if run.done.is_set():
            return
        try:
            self._broker.kill_request(self.writer_service, run.request_id, timeout=timeout)
        except BrokerError as exc:
            raise StdDaqError(str(exc)) from None
        if not run.done.wait(timeout):
            raise StdDaqError(f"writer agent {self.writer_service} did not end request "
                           f"{run.request_id} within {timeout:g} s after the kill")

    def kill_request(self, request_id: str, timeout: float = 10.0) -> None:
        """Send a kill for any request of the writer agent (also one another client sent)."""
        self.start()
        try:
            self._broker.wait_ready(timeout)
            self._broker.kill_request(self.writer_service, request_id, timeout=timeout)
        except (BrokerError, TimeoutError) as exc:
            raise StdDaqError(f"kill of request {request_id} not sent: {exc}") from None

    def _forget(self, run: WriteRun) -> None:
        with self._lock:
            self._runs.pop(run.request_id, None)

    def _catch_up(self, run: WriteRun) -> None:
        """Apply statuses that arrived before the run was registered."""
        entry = self._broker.statuses(run.request_id)
        for action, message in (entry or {}).get("services", {}).get(self.writer_service, []):
            self._apply(run, action, message)

    def _apply(self, run: WriteRun, action: str, message: Any) -> None:
        if action == ACTION_REQUEST_START:
            run.started.set()
        elif action in (ACTION_REQUEST_SUCCESS, ACTION_REQUEST_FAIL):
            run._finish(action == ACTION_REQUEST_FAIL, message)
            self._forget(run)

    def _on_status(self, request_id: str | None, request: Any, headers: dict) -> None:
        if self.status_listener is not None and headers.get("source") == self.writer_service:
            self.status_listener(request_id, request, headers)
        with self._lock:
            run = self._runs.get(request_id) if request_id else None
        if run is not None and headers.get("source") == self.writer_service:
            self._apply(run, headers.get("action"), headers.get("message"))

    def _on_progress(self, message: dict) -> None:
        progress = WriteProgress.from_dict(message)
        if progress is None:
            return
        if self.progress_listener is not None:
            self.progress_listener(progress)
        with self._lock:
            run = self._runs.get(progress.request_id)
        if run is not None:
            run._set_written(progress.n_written, progress.n_rows)
