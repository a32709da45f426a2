"""BrokerClient: send requests and kills, follow their statuses.

The client subscribes to the ``status`` exchange when it connects, before anything is sent,
and registers a request id before publishing it, so no status of its own requests is
missed. A status sent twice (re-sent by a service after a lost connection) is counted
once. Its status queue outlives a dropped connection by a minute (statuses published
meanwhile wait for it). All methods are thread-safe: one client can serve an Ophyd device,
an IOC and a CLI at once.

Example::

    with BrokerClient() as client:
        request_id = client.send_request("debug.writer", {"output_file": ..., "n_images": 10})
        ...
        client.statuses(request_id)["services"]  # {"debug.writer": [["request_start", None],
                                                 #   ["request_success", {...}]]}

To wait on statuses, feed a StatusAggregator from ``status_callback`` (as stddaq-monitor
does) and use its ``wait``; DaqClient follows write requests for front ends.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel

from services.broker.aggregator import StatusAggregator
from services.broker.connection import BrokerConnection
from services.broker.protocol import (
    CLIENT_QUEUE_EXPIRES_MS,
    KILL_EXCHANGE,
    REQUEST_EXCHANGE,
    STATUS_EXCHANGE,
    BrokerError,
    Status,
    client_status_queue_name,
    encode_request,
    kill_properties,
    new_request_id,
    parse_status,
    request_properties,
)

log = logging.getLogger(__name__)

UNROUTABLE_RETRY_S = 0.25  # a request no queue took is published again after this
SEEN_MEMORY = 10000  # status message ids remembered to drop copies
StatusCallback = Callable[[str | None, Any, dict[str, Any]], None]


class BrokerClient:
    """A connection to the broker for users (see the module docstring).

    ``status_callback(request_id, request, headers)`` is called for every status on the
    broker (all requests, as the original), in a thread of its own, in arrival order.
    Statuses of this client's own requests are kept for ``statuses``: the last
    ``max_requests`` ids.
    """

    def __init__(self, broker_host: str = "127.0.0.1", port: int = 5672, *,
                 status_callback: StatusCallback | None = None,
                 connection_name: str | None = None, max_requests: int = 1000,
                 publish_timeout: float = 10.0, max_backoff: float = 1.0,
                 connect: bool = True):
        self.publish_timeout = publish_timeout
        self.status_callback = status_callback
        self.connection_name = connection_name or f"stddaq client {uuid.uuid4().hex[:8]}"
        self.queue_name = client_status_queue_name()
        self._statuses = StatusAggregator(max_requests=max_requests, track_all=False)
        self._conn = BrokerConnection(broker_host, port, name=self.connection_name,
                                      setup=self._setup, max_backoff=max_backoff)
        self._callbacks: queue.Queue[Status | None] = queue.Queue()
        self._callback_thread: threading.Thread | None = None
        self._closed = False
        self._seen: OrderedDict[str, None] = OrderedDict()  # message ids, against copies
        self.duplicates = 0
        if status_callback is not None:
            self._callback_thread = threading.Thread(
                target=self._callback_loop, name=f"{self.connection_name} callbacks",
                daemon=True)
            self._callback_thread.start()
        if connect:
            self._conn.start()

    # ------------------------------------------------------------------ life cycle

    def connect(self) -> None:
        """Start connecting (only needed with ``connect=False``)."""
        self._conn.start()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until subscribed to the statuses; TimeoutError names the last error."""
        self._conn.wait_ready(timeout)

    @property
    def connected(self) -> bool:
        return self._conn.connected

    def close(self) -> None:
        """Delete the status queue, close the connection, stop the callback thread."""
        if self._closed:
            return
        self._closed = True
        if self._conn.connected:
            self._conn.submit(lambda ch: ch.queue_delete(self.queue_name))
        self._conn.stop(flush_timeout=2.0 if self._conn.connected else 0.0)
        if self._callback_thread is not None:
            self._callbacks.put(None)
            self._callback_thread.join(5.0)

    def __enter__(self) -> BrokerClient:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def send_request(self, tag: str, request: Any, headers: Mapping[str, Any] | None = None,
                     timeout: float | None = None, expires_s: float | None = None) -> str:
        """Publish ``request`` (JSON) to the services bound to ``tag``; return its id once
        RabbitMQ confirmed that a service queue holds it. BrokerError if that does not
        happen within ``timeout`` (default ``publish_timeout``): not connected, or no
        service queue bound to ``tag`` (retried meanwhile: a service may be re-binding
        after a RabbitMQ restart). The request is then withdrawn. With ``expires_s`` a
        request no service has taken by then is dropped by RabbitMQ."""
        request_id = new_request_id()
        body = encode_request(request)
        self._statuses.track(request_id, request)
        self._send(REQUEST_EXCHANGE, tag, body,
                   request_properties(request_id, headers, expires_s),
                   timeout, f"request {request_id} to {tag!r}", mandatory=True)
        return request_id

    def kill_request(self, tag: str, request_id: str, timeout: float | None = None) -> None:
        """Ask the services bound to ``tag`` to stop ``request_id``."""
        self._send(KILL_EXCHANGE, tag, b"", kill_properties(request_id), timeout,
                   f"kill of {request_id} to {tag!r}")

    def _send(self, exchange: str, tag: str, body: bytes, properties: pika.BasicProperties,
              timeout: float | None, what: str, mandatory: bool = False) -> None:
        if self._closed:
            raise BrokerError(f"{what} not sent: the client is closed")
        timeout = self.publish_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            publication = self._conn.publish(exchange, tag, body, properties,
                                             mandatory=mandatory)
            if publication.wait(max(0.0, deadline - time.monotonic())):
                return
            if publication.unroutable and time.monotonic() + UNROUTABLE_RETRY_S < deadline:
                time.sleep(UNROUTABLE_RETRY_S)
                continue
            break
        if not self._conn.cancel(publication):  # being sent right now: give it a moment
            publication.wait(5.0)
            if publication.ok:
                return
        if publication.unroutable:
            reason = f"no service queue is bound to tag {tag!r}"
        else:
            reason = publication.error or self._conn.last_error or "no confirm from RabbitMQ"
        raise BrokerError(f"{what} not sent within {timeout:g} s to RabbitMQ at "
                          f"{self._conn.host}:{self._conn.port}: {reason}")

    # ------------------------------------------------------------------ statuses

    def statuses(self, request_id: str) -> dict[str, Any] | None:
        """``{"request", "services": {name: [[action, message], ...]}}`` so far."""
        return self._statuses.get(request_id)

    # ------------------------------------------------------------------ I/O thread

    def _setup(self, channel: BlockingChannel, _generation: int) -> None:
        channel.queue_declare(self.queue_name, arguments={"x-expires": CLIENT_QUEUE_EXPIRES_MS})
        channel.queue_bind(self.queue_name, STATUS_EXCHANGE)
        channel.basic_consume(self.queue_name, self._on_status, auto_ack=True)

    def _on_status(self, _channel: BlockingChannel, _method: Any,
                   properties: pika.BasicProperties, body: bytes) -> None:
        try:
            status = parse_status(properties, body)
            if status.message_id is not None:
                if status.message_id in self._seen:
                    self.duplicates += 1  # re-sent after a connection loss
                    return
                self._seen[status.message_id] = None
                if len(self._seen) > SEEN_MEMORY:
                    self._seen.popitem(last=False)
            self._statuses.on_status_message(status.request_id, status.request,
                                             status.headers)
        except Exception:
            log.exception("%s: bad status message", self.connection_name)
            return
        if self.status_callback is not None:
            self._callbacks.put(status)

    def _callback_loop(self) -> None:
        while True:
            status = self._callbacks.get()
            if status is None:
                return
            try:
                self.status_callback(status.request_id, status.request, status.headers)
            except Exception:
                log.exception("%s: status_callback failed", self.connection_name)
