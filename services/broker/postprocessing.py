"""Post-processing broker service: runs after a primary service succeeded.

``PostprocessingService(service_name, primary_service_name, handler)`` consumes the durable
queue ``stddaq.<service_name>.status`` bound to the ``status`` exchange and applies the
original's rules to each status, in order:

1. a status from another source than ``primary_service_name`` is acked and skipped (this
   includes the service's own statuses: the exchange is fanout);
2. ``request_start`` is acked and skipped;
3. ``request_fail`` is answered with this service's own ``request_fail`` and the message
   ``"Primary service <primary_service_name> failure. "``, then acked;
4. ``request_success`` runs the request like a primary service: ``request_start``,
   ``handler.on_request(request_id, request)`` in a worker thread, ``request_success`` or
   ``request_fail``, then ack or reject.

Statuses published while the service is down wait in its queue (at most
STATUS_QUEUE_MAX_LENGTH, oldest dropped first). Kills sent to its tag reach
``handler.on_kill``.
"""

from __future__ import annotations

from pika.adapters.blocking_connection import BlockingChannel

from services.broker.protocol import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_START,
    ACTION_REQUEST_SUCCESS,
    STATUS_EXCHANGE,
    STATUS_QUEUE_MAX_LENGTH,
    primary_failure_message,
    status_queue_name,
)
from services.broker.runner import Delivery, Handler, RequestService, log


class PostprocessingService(RequestService):
    """Runs ``handler.on_request`` after each success of ``primary_service_name``."""

    role = "postprocessing"

    def __init__(self, service_name: str, primary_service_name: str, handler: Handler,
                 broker_host: str = "127.0.0.1", tag: str | None = None, **kwargs):
        super().__init__(service_name, handler, broker_host, tag, **kwargs)
        self.primary_service_name = primary_service_name

    @property
    def queue_name(self) -> str:
        return status_queue_name(self.service_name)

    def _declare_work_queue(self, channel: BlockingChannel) -> str:
        channel.queue_declare(self.queue_name, durable=True,
                              arguments={"x-max-length": STATUS_QUEUE_MAX_LENGTH})
        channel.queue_bind(self.queue_name, STATUS_EXCHANGE)
        return self.queue_name

    def _on_delivery(self, delivery: Delivery) -> None:
        source = _text(delivery.headers.get("source"))
        action = _text(delivery.headers.get("action"))
        if source != self.primary_service_name or action == ACTION_REQUEST_START:
            self._settle(delivery, ok=True)
        elif action == ACTION_REQUEST_FAIL:
            self._propagate_failure(delivery)
        elif action == ACTION_REQUEST_SUCCESS:
            self._begin(delivery)
        else:
            log.warning("%s: status with unknown action %r from %s ignored",
                        self.service_name, action, source)
            self._settle(delivery, ok=True)

    def _propagate_failure(self, delivery: Delivery) -> None:
        with self._lock:
            request_id = delivery.request_id
            if request_id is not None and request_id in self._finished:
                self._settle(delivery, ok=True)  # already answered (a redelivery)
                return
            if request_id is not None:
                self._remember(request_id, ACTION_REQUEST_FAIL)
            self.counters["fail"] += 1
            self._publish_status(request_id, delivery.body, ACTION_REQUEST_FAIL,
                                 primary_failure_message(self.primary_service_name))
            self._settle(delivery, ok=True)


def _text(value: object) -> object:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
