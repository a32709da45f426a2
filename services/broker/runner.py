"""The request life cycle shared by primary and post-processing services.

``RequestService`` consumes one durable queue with prefetch 1 and runs one request at a
time: it publishes ``request_start``, calls ``handler.on_request(request_id, request)`` in a
worker thread, publishes ``request_success`` (message = the result) or ``request_fail``
(message = the error), and only then acks (success) or rejects without requeue (failure).
Kills arrive on a per-instance exclusive queue and go to ``handler.on_kill(request_id)`` in
a kill thread, so they reach a running ``on_request``; every kill is passed on, the handler
decides whether it concerns its request. With ``refuse_when_busy`` (prefetch 2) a request
arriving while another runs gets ``request_fail`` "busy: ..." at once instead of waiting.

When the connection drops, the running request keeps running; its final status is published
after reconnecting. RabbitMQ requeues the unacknowledged delivery and delivers it again:
the service recognises the request id (running, or in a bounded set of recently finished
ids) and does not run it twice; it acks or rejects the new delivery once the request ended.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import pika
from pika.adapters.blocking_connection import BlockingChannel

from services.broker.connection import BrokerConnection
from services.broker.journal import RunningJournal
from services.broker.protocol import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_START,
    ACTION_REQUEST_SUCCESS,
    KILL_EXCHANGE,
    STATUS_EXCHANGE,
    BadRequestError,
    decode_request,
    error_message,
    kill_queue_name,
    status_properties,
)

log = logging.getLogger(__name__)

FINISHED_MEMORY = 1000  # recently finished request ids remembered against redeliveries
KILL_WAIT_S = 2.0  # a kill for the starting request waits this long for on_request to begin


class Handler(Protocol):
    """What a service runs. Both methods are called from different threads."""

    def on_request(self, request_id: str, request: dict[str, Any]) -> Any:
        """Do the work; the return value becomes the ``request_success`` message, an
        exception the ``request_fail`` message."""

    def on_kill(self, request_id: str) -> None:
        """Stop ``request_id`` if it is the running request (may be any id, also one that
        has not started yet); must not block for long."""

    # Optional: ``validate(request)`` raising ValueError refuses a request before it starts
    # (request_fail with the message, no request_start). ``before_start(request_id, request)``
    # runs in the request's thread before ``request_start`` is published: what must be
    # ready when the user hears "started" (e.g. subscriptions) goes there; raising fails
    # the request.


@dataclass
class Delivery:
    """One message taken from the service's work queue."""

    generation: int
    delivery_tag: int
    request_id: str | None
    body: bytes
    headers: dict[str, Any]
    redelivered: bool


@dataclass
class _Running:
    request_id: str
    body: bytes
    delivery: Delivery | None
    entered: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class RequestService:
    """Base of PrimaryService and PostprocessingService (see the module docstring).

    Subclasses name the work queue (``_declare_work_queue``) and decide what a delivery
    means (``_on_delivery``, which calls ``_begin`` to run a request).
    """

    role = "service"

    def __init__(self, service_name: str, handler: Handler, broker_host: str = "127.0.0.1",
                 tag: str | None = None, *, port: int = 5672,
                 connection_name: str | None = None, min_backoff: float = 0.25,
                 max_backoff: float = 5.0, refuse_when_busy: bool = False,
                 journal: RunningJournal | None = None):
        if not service_name:
            raise ValueError("service_name must not be empty")
        self.service_name = service_name
        self.handler = handler
        self.tag = tag if tag is not None else service_name
        self.connection_name = connection_name or (
            f"stddaq {self.role} {service_name} {uuid.uuid4().hex[:8]}")
        self._conn = BrokerConnection(
            broker_host, port, name=self.connection_name, setup=self._setup,
            on_disconnect=self._on_disconnect, prefetch=2 if refuse_when_busy else 1,
            min_backoff=min_backoff, max_backoff=max_backoff)
        self._lock = threading.Lock()
        self._running: _Running | None = None
        self._waiting: deque[Delivery] = deque()
        self.refuse_when_busy = refuse_when_busy
        self._journal = journal
        self._finished: OrderedDict[str, str] = OrderedDict()
        self._stopping = False
        self._consumer_tags: list[str] = []
        self._kills: queue.Queue[str | None] = queue.Queue()
        self._kill_thread: threading.Thread | None = None
        self.counters = {"requests": 0, "success": 0, "fail": 0, "refused": 0, "kills": 0,
                         "redelivered": 0}

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Connect and consume in background threads; returns at once (see wait_ready)."""
        self._kill_thread = threading.Thread(
            target=self._kill_loop, name=f"{self.connection_name} kill", daemon=True)
        self._kill_thread.start()
        self._conn.start()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until consuming; raise TimeoutError naming the last connection error."""
        self._conn.wait_ready(timeout)

    def stop(self, timeout: float = 10.0, kill_running: bool = False) -> None:
        """Stop taking requests; wait up to ``timeout`` s for the running request (after
        calling ``on_kill`` for it when ``kill_running``), publish its final status, ack,
        and close. A request still running after ``timeout`` is abandoned unacknowledged:
        RabbitMQ gives it to the next instance of this service."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            running = self._running
        self._conn.submit(self._cancel_consumers)
        if running is not None:
            if kill_running:
                self._call_on_kill(running.request_id)
            if running.thread is not None:
                running.thread.join(timeout)
            if running.thread is not None and running.thread.is_alive():
                log.warning("%s: abandoning running request %s after %g s; RabbitMQ will "
                            "deliver it again", self.service_name, running.request_id, timeout)
        self._conn.stop(flush_timeout=5.0 if self._conn.connected else 1.0)
        self._kills.put(None)
        if self._kill_thread is not None:
            self._kill_thread.join(5.0)

    def __enter__(self) -> RequestService:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._conn.connected

    @property
    def last_error(self) -> str | None:
        """The last connection error, None while connected."""
        return self._conn.last_error

    # ------------------------------------------------------------------ subclass hooks

    def _declare_work_queue(self, channel: BlockingChannel) -> str:
        raise NotImplementedError

    def _on_delivery(self, delivery: Delivery) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ I/O thread

    def _setup(self, channel: BlockingChannel, generation: int) -> None:
        work_queue = self._declare_work_queue(channel)
        if self._stopping:
            self._consumer_tags = []
            return  # reconnected while stopping: publish the last statuses, take no work
        kill_queue = kill_queue_name(self.service_name)
        channel.queue_declare(kill_queue, exclusive=True, auto_delete=True)
        channel.queue_bind(kill_queue, KILL_EXCHANGE, routing_key=self.tag)
        self._consumer_tags = [
            channel.basic_consume(kill_queue, self._on_kill_message, auto_ack=True),
            channel.basic_consume(work_queue, self._on_work_message(generation)),
        ]
        log.info("%s: consuming %s (tag %r)", self.service_name, work_queue, self.tag)

    def _cancel_consumers(self, channel: BlockingChannel) -> None:
        for consumer_tag in self._consumer_tags:
            channel.basic_cancel(consumer_tag)
        self._consumer_tags = []

    def _on_disconnect(self) -> None:
        with self._lock:  # their delivery tags died with the connection
            self._waiting.clear()
        if self._running is not None:
            log.warning("%s: connection lost while running %s; it keeps running",
                        self.service_name, self._running.request_id)

    def _on_work_message(self, generation: int):
        def on_message(_channel: BlockingChannel, method: Any,
                       properties: pika.BasicProperties, body: bytes) -> None:
            delivery = Delivery(generation, method.delivery_tag, properties.correlation_id,
                                body, dict(properties.headers or {}), bool(method.redelivered))
            try:
                self._on_delivery(delivery)
            except Exception as exc:
                log.exception("%s: delivery of %s failed", self.service_name,
                              delivery.request_id)
                self._settle(delivery, ok=False)
                self._publish_status(delivery.request_id, body, ACTION_REQUEST_FAIL,
                                     f"internal error: {error_message(exc)}")
        return on_message

    def _on_kill_message(self, _channel: BlockingChannel, _method: Any,
                         properties: pika.BasicProperties, _body: bytes) -> None:
        if properties.correlation_id:
            self._kills.put(properties.correlation_id)

    # ------------------------------------------------------------------ requests

    def _begin(self, delivery: Delivery) -> None:
        """Run the request of ``delivery`` unless it is running, finished, or another one
        runs (then it waits its turn)."""
        request_id = delivery.request_id
        with self._lock:
            if self._stopping:
                return  # left unacknowledged: RabbitMQ requeues it when the connection closes
            if request_id is not None and request_id in self._finished:
                outcome = self._finished[request_id]
                log.info("%s: %s already finished (%s); not run again", self.service_name,
                         request_id, outcome)
                self.counters["redelivered"] += 1
                self._settle(delivery, ok=outcome == ACTION_REQUEST_SUCCESS)
                return
            if request_id and self._journal is not None \
                    and self._journal.left_behind(request_id):
                self._refuse(delivery, f"not run again: {self.service_name} stopped while "
                             f"running request {request_id} (it crashed or was killed; see "
                             "its log)")
                return
            if self._running is not None:
                if self._running.request_id == request_id:
                    log.info("%s: %s delivered again while running; not run twice",
                             self.service_name, request_id)
                    self.counters["redelivered"] += 1
                    self._running.delivery = delivery
                elif self.refuse_when_busy and not delivery.redelivered:
                    self._refuse(delivery, f"busy: {self.service_name} is running request "
                                 f"{self._running.request_id}; wait for it to end or kill it")
                else:
                    self._waiting.append(delivery)
                return
            if not request_id:
                self._refuse(delivery, "request has no correlation_id (request id)")
                return
            try:
                request = decode_request(delivery.body)
                validate = getattr(self.handler, "validate", None)
                if validate is not None:
                    validate(request)
            except (BadRequestError, ValueError) as exc:
                self._refuse(delivery, str(exc))
                return
            running = _Running(request_id, delivery.body, delivery)
            self._running = running
            if self._journal is not None:
                self._journal.begin(request_id)
            self.counters["requests"] += 1
            running.thread = threading.Thread(
                target=self._work, args=(running, request), daemon=True,
                name=f"{self.service_name} request {request_id[:8]}")
            running.thread.start()

    def _refuse(self, delivery: Delivery, message: str) -> None:
        """A request that cannot start: request_fail, reject (called with the lock)."""
        log.warning("%s: refused request %s: %s", self.service_name, delivery.request_id,
                    message)
        self.counters["refused"] += 1
        if delivery.request_id:
            self._remember(delivery.request_id, ACTION_REQUEST_FAIL)
        self._publish_status(delivery.request_id, delivery.body, ACTION_REQUEST_FAIL, message)
        self._settle(delivery, ok=False)

    def _work(self, running: _Running, request: dict[str, Any]) -> None:
        running.entered.set()
        try:
            before_start = getattr(self.handler, "before_start", None)
            if before_start is not None:
                before_start(running.request_id, request)
            self._publish_status(running.request_id, running.body, ACTION_REQUEST_START, None)
            result = self.handler.on_request(running.request_id, request)
        except Exception as exc:
            log.warning("%s: request %s failed: %s", self.service_name, running.request_id,
                        error_message(exc), exc_info=not isinstance(exc, ValueError))
            action, message = ACTION_REQUEST_FAIL, error_message(exc)
        else:
            action, message = ACTION_REQUEST_SUCCESS, result
        self._finish(running, action, message)

    def _finish(self, running: _Running, action: str, message: Any) -> None:
        with self._lock:
            self._remember(running.request_id, action)
            self._running = None
            if self._journal is not None:
                self._journal.end()
            self.counters["success" if action == ACTION_REQUEST_SUCCESS else "fail"] += 1
            self._publish_status(running.request_id, running.body, action, message)
            if running.delivery is not None:
                self._settle(running.delivery, ok=action == ACTION_REQUEST_SUCCESS)
            waiting = list(self._waiting)
            self._waiting.clear()
        log.info("%s: request %s ended: %s", self.service_name, running.request_id, action)
        for delivery in waiting:
            if delivery.generation == self._conn.generation:
                self._begin(delivery)

    def _remember(self, request_id: str, action: str) -> None:
        self._finished[request_id] = action
        self._finished.move_to_end(request_id)
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _settle(self, delivery: Delivery, ok: bool) -> None:
        """Ack (ok) or reject without requeue, on the delivery's own connection only."""
        tag = delivery.delivery_tag
        if ok:
            self._conn.submit(lambda ch: ch.basic_ack(tag), delivery.generation)
        else:
            self._conn.submit(lambda ch: ch.basic_reject(tag, requeue=False),
                              delivery.generation)

    def _publish_status(self, request_id: str | None, body: bytes, action: str,
                        message: Any) -> None:
        properties = status_properties(request_id, action, self.service_name, message)
        self._conn.publish(STATUS_EXCHANGE, self.tag, body, properties, resend=True)

    # ------------------------------------------------------------------ kills

    def _kill_loop(self) -> None:
        while True:
            request_id = self._kills.get()
            if request_id is None:
                return
            running = self._running
            if running is not None and running.request_id == request_id:
                running.entered.wait(KILL_WAIT_S)
            self.counters["kills"] += 1
            self._call_on_kill(request_id)

    def _call_on_kill(self, request_id: str) -> None:
        on_kill = getattr(self.handler, "on_kill", None)
        if on_kill is None:
            log.info("%s: kill for %s ignored (handler has no on_kill)", self.service_name,
                     request_id)
            return
        try:
            on_kill(request_id)
        except Exception:
            log.exception("%s: on_kill(%s) failed", self.service_name, request_id)
