"""One RabbitMQ connection owned by one thread, reconnecting by itself.

A pika ``BlockingConnection`` is not thread-safe. ``BrokerConnection`` runs it in its own
thread (the I/O thread); every other thread hands work over through a FIFO of tasks that
the I/O thread runs in order, woken with ``add_callback_threadsafe``:

- ``publish()``: a publication, sent with publisher confirms. It stays at the head of the
  FIFO until RabbitMQ confirms it; a publication interrupted by a lost connection is sent
  again after reconnecting (at-least-once), so a final status is never lost. Statuses sent
  just after a reconnect are sent once more a few seconds later, for subscribers that
  reconnect after this connection did (after a RabbitMQ restart, the transient exchanges
  route nothing to them until they re-subscribe).
- ``submit(fn, generation)``: a channel operation (ack, reject, cancel...). Delivery tags
  belong to one connection, so an operation bound to an older connection ``generation``
  is dropped: RabbitMQ redelivers the unacknowledged message instead.

On connect the thread opens a channel, enables confirms, sets the prefetch, declares the
three exchanges (the original's types and arguments) and calls the owner's ``setup`` to
declare queues and start consumers. When RabbitMQ goes away (closed connection, lost
stream, refused connect, channel error) it retries with exponential backoff and runs
``setup`` again. Consumer callbacks run in the I/O thread and must not block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from services.broker.protocol import EXCHANGE_DURABLE, EXCHANGES, BrokerError

log = logging.getLogger(__name__)

# pika logs each failed connect at ERROR with tracebacks, every retry; this module reports
# connection problems itself (a warning per change), so those loggers are quietened unless
# the application configured them.
for _name in ("pika.adapters.blocking_connection", "pika.adapters.utils.connection_workflow",
              "pika.adapters.utils.io_services_utils"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.CRITICAL)

SetupFn = Callable[[BlockingChannel, int], None]
MAX_NACKS = 5  # a publication nacked this many times fails
MAX_CHANNEL_ERRORS = 5  # a publication that closed the channel this many times fails
RECOVERY_WINDOW_S = 3.0  # after a reconnect, ``resend`` publications go out twice ...
RESEND_DELAY_S = 3.0  # ... the second time this much later


@dataclass(eq=False)
class Publication:
    """A message handed to the I/O thread; ``wait()`` for RabbitMQ's confirm."""

    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    mandatory: bool = False
    resend: bool = False
    generation: int = 0  # connection generation when queued; -1: queued while disconnected
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    unroutable: bool = False
    error: str | None = None
    started: bool = False
    cancelled: bool = False
    attempts: int = 0

    def wait(self, timeout: float | None = None) -> bool:
        """Whether RabbitMQ confirmed the message within ``timeout`` seconds."""
        self.done.wait(timeout)
        return self.ok

    def _finish(self, ok: bool, error: str | None = None) -> None:
        self.ok, self.error = ok, error
        self.done.set()


@dataclass(eq=False)
class _Operation:
    fn: Callable[[BlockingChannel], None]
    generation: int | None


# RabbitMQ credentials of every stddaq process (services, tools, IOC, Ophyd), from the
# environment so that they never show on a command line; RabbitMQ's guest is loopback-only.
USER_ENV, PASSWORD_ENV = "BROKER_USER", "BROKER_PASSWORD"


class BrokerConnection:
    """A self-healing BlockingConnection in a thread of its own (see the module docstring).

    ``setup(channel, generation)`` runs in the I/O thread after every (re)connect;
    ``on_disconnect()`` after every connection loss.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 5672, *,
                 name: str, setup: SetupFn | None = None,
                 on_disconnect: Callable[[], None] | None = None,
                 prefetch: int | None = None,
                 username: str | None = None, password: str | None = None,
                 min_backoff: float = 0.25, max_backoff: float = 5.0,
                 heartbeat: int | None = None):
        self.host, self.port, self.name = host, port, name
        self._setup = setup
        self._on_disconnect = on_disconnect
        self._prefetch = prefetch
        username = username or os.environ.get(USER_ENV, "guest")
        password = password or os.environ.get(PASSWORD_ENV, "guest")
        self._params = pika.ConnectionParameters(
            host=host, port=port, credentials=pika.PlainCredentials(username, password),
            client_properties={"connection_name": name}, connection_attempts=1,
            socket_timeout=5, heartbeat=heartbeat, blocked_connection_timeout=60)
        self._min_backoff, self._max_backoff = min_backoff, max_backoff
        self._lock = threading.Lock()
        self._tasks: deque[Publication | _Operation] = deque()
        self._connection: pika.BlockingConnection | None = None
        self._generation = 0
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.n_connects = 0
        self._connected_at = 0.0

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        """Connected, exchanges declared and ``setup`` done."""
        return self._ready.is_set()

    @property
    def generation(self) -> int:
        """Number of the current connection (1 for the first); bumps on each reconnect."""
        return self._generation

    @property
    def in_io_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the I/O thread (it connects, and keeps reconnecting until ``stop()``)."""
        if self._thread is not None:
            raise BrokerError(f"connection {self.name} already started")
        self._thread = threading.Thread(target=self._run, name=f"{self.name} io", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float) -> None:
        """Block until connected and set up; raise TimeoutError naming the last error."""
        if not self._ready.wait(timeout):
            raise TimeoutError(
                f"no connection to RabbitMQ at {self.host}:{self.port} after {timeout:g} s"
                + (f" (last error: {self.last_error})" if self.last_error else ""))

    def publish(self, exchange: str, routing_key: str, body: bytes,
                properties: pika.BasicProperties, *, mandatory: bool = False,
                resend: bool = False) -> Publication:
        """Queue a message for publishing with confirms; returns at once.

        ``mandatory``: a message no queue receives fails with ``unroutable`` set.
        ``resend``: when the message goes out in the first RECOVERY_WINDOW_S after a
        reconnect (or waited for the reconnect), send it once more RESEND_DELAY_S later,
        for subscribers that reconnect after this connection (receivers drop the copy by
        its ``message_id``).
        """
        try:
            properties.encode()  # refuse an unencodable header here, not in the I/O thread
        except Exception as exc:
            raise BrokerError(f"message properties cannot be encoded: {exc!r}") from exc
        publication = Publication(exchange, routing_key, body, properties,
                                  mandatory=mandatory, resend=resend,
                                  generation=self._generation if self.connected else -1)
        with self._lock:
            if self._stopped:
                publication._finish(False, "connection stopped")
                return publication
            self._tasks.append(publication)
        self._wake()
        return publication

    def cancel(self, publication: Publication) -> bool:
        """Withdraw a publication not yet handed to RabbitMQ; True when withdrawn."""
        with self._lock:
            if publication.started or publication.done.is_set():
                return False
            publication.cancelled = True
            with contextlib.suppress(ValueError):
                self._tasks.remove(publication)
        publication._finish(False, "cancelled")
        return True

    def submit(self, fn: Callable[[BlockingChannel], None],
               generation: int | None = None) -> None:
        """Run ``fn(channel)`` in the I/O thread, after the tasks queued before it; dropped
        when ``generation`` is given and is not the current connection's."""
        with self._lock:
            if self._stopped:
                return
            self._tasks.append(_Operation(fn, generation))
        self._wake()

    def pending(self) -> int:
        """Number of tasks not yet done."""
        with self._lock:
            return len(self._tasks)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued task is done; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.pending():
            if time.monotonic() >= deadline or self._thread is None:
                return False
            time.sleep(0.01)
        return True

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Wait up to ``flush_timeout`` s for queued tasks, then close and join the thread.
        Publications still queued fail."""
        if self._thread is not None and self._thread.is_alive():
            self.flush(flush_timeout)
        with self._lock:
            self._stopped = True
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(10.0)
            if self._thread.is_alive():
                log.error("%s: I/O thread did not stop", self.name)
        self._fail_remaining("connection stopped")

    # ------------------------------------------------------------------ I/O thread

    def _wake(self) -> None:
        connection = self._connection
        if connection is None or self.in_io_thread:
            return
        with contextlib.suppress(Exception):  # closed: the loop drains after reconnecting
            connection.add_callback_threadsafe(_noop)

    def _run(self) -> None:
        backoff = self._min_backoff
        while not self._stopping.is_set():
            channel = None
            try:
                channel = self._connect()
                backoff = self._min_backoff
                while not self._stopping.is_set():
                    self._drain(channel)
                    self._connection.process_data_events(time_limit=1.0)
                self._drain(channel)
            except Exception as exc:  # anything: log, back off, reconnect
                self._note_error(exc, channel is not None)
            finally:
                was_ready = self._ready.is_set()
                self._ready.clear()
                self._close()
                if was_ready and self._on_disconnect is not None:
                    try:
                        self._on_disconnect()
                    except Exception:
                        log.exception("%s: on_disconnect failed", self.name)
            if not self._stopping.is_set():
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    def _connect(self) -> BlockingChannel:
        connection = pika.BlockingConnection(self._params)
        self._connection = connection
        channel = connection.channel()
        channel.confirm_delivery()
        if self._prefetch is not None:
            channel.basic_qos(prefetch_count=self._prefetch)
        for exchange, kind in EXCHANGES.items():
            channel.exchange_declare(exchange=exchange, exchange_type=kind,
                                     durable=EXCHANGE_DURABLE)
        self._generation += 1
        if self._setup is not None:
            self._setup(channel, self._generation)
        self.n_connects += 1
        self._connected_at = time.monotonic()
        if self.n_connects > 1:
            log.info("%s: reconnected to RabbitMQ at %s:%d", self.name, self.host, self.port)
        self.last_error = None
        self._ready.set()
        return channel

    def _note_error(self, exc: Exception, was_connected: bool) -> None:
        text = _describe(exc)
        if self._stopping.is_set() and isinstance(exc, pika.exceptions.AMQPError):
            return
        if not isinstance(exc, pika.exceptions.AMQPError | OSError):
            log.exception("%s: unexpected error in the I/O thread", self.name)
        elif was_connected or text != self.last_error:
            log.warning("%s: RabbitMQ at %s:%d: %s; reconnecting", self.name, self.host,
                        self.port, text)
        self.last_error = text

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()

    def _drain(self, channel: BlockingChannel) -> None:
        while True:
            with self._lock:
                if not self._tasks:
                    return
                task = self._tasks[0]
                if isinstance(task, Publication):
                    task.started = True
                else:
                    self._tasks.popleft()  # an operation runs at most once
            if isinstance(task, Publication):
                if self._publish(channel, task):
                    with self._lock:
                        self._tasks.popleft()
            elif task.generation is None or task.generation == self._generation:
                task.fn(channel)

    def _publish(self, channel: BlockingChannel, publication: Publication) -> bool:
        """Send one publication; True when it is done (confirmed or given up)."""
        publication.attempts += 1
        try:
            channel.basic_publish(publication.exchange, publication.routing_key,
                                  publication.body, publication.properties,
                                  mandatory=publication.mandatory)
        except pika.exceptions.UnroutableError:
            publication.unroutable = True
            publication._finish(False, f"no queue is bound to {publication.exchange!r} with "
                                       f"routing key {publication.routing_key!r}")
            return True
        except pika.exceptions.NackError:
            if publication.attempts < MAX_NACKS:
                log.warning("%s: RabbitMQ nacked a message to %r; retrying", self.name,
                            publication.exchange)
                return False
            publication._finish(False, "RabbitMQ refused (nacked) the message")
            return True
        except pika.exceptions.AMQPChannelError:
            if publication.attempts >= MAX_CHANNEL_ERRORS:
                publication._finish(False, "RabbitMQ closed the channel on this message")
                with self._lock:
                    self._tasks.popleft()
            else:
                publication.started = False
            raise
        except BaseException:
            publication.started = False  # lost connection: send again after reconnecting
            raise
        publication._finish(True)
        if publication.resend and self.n_connects > 1 and (
                publication.generation != self._generation
                or time.monotonic() - self._connected_at < RECOVERY_WINDOW_S):
            self._connection.call_later(RESEND_DELAY_S, lambda: self._resend(publication))
        return True

    def _resend(self, publication: Publication) -> None:
        copy = Publication(publication.exchange, publication.routing_key, publication.body,
                           publication.properties, generation=self._generation)
        with self._lock:
            if not self._stopped:
                self._tasks.append(copy)

    def _fail_remaining(self, reason: str) -> None:
        with self._lock:
            tasks = list(self._tasks)
            self._tasks.clear()
        for task in tasks:
            if isinstance(task, Publication):
                task._finish(False, reason)


def _describe(exc: BaseException) -> str:
    """One line for a connection error (str() of pika's connect errors is empty)."""
    detail = str(exc) or ", ".join(str(a) for a in exc.args)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _noop() -> None:
    """Wakes the I/O thread; the loop drains the task FIFO afterwards."""
