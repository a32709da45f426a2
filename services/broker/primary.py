"""Primary broker service: runs the requests sent to its tag on the ``request`` exchange.

``PrimaryService(service_name, handler)`` consumes the durable queue
``stddaq.<service_name>.request`` bound to ``request`` with its tag (default: the service
name), so a request sent while the service is down or restarting waits for it. Life cycle,
kills, reconnection and redelivery handling: see services.broker.runner.

Example::

    service = PrimaryService("debug.writer", handler)   # handler.on_request / on_kill
    service.start()
    service.wait_ready(10)
    ...
    service.stop()
"""

from __future__ import annotations

from pika.adapters.blocking_connection import BlockingChannel

from services.broker.protocol import REQUEST_EXCHANGE, request_queue_name
from services.broker.runner import Delivery, RequestService


class PrimaryService(RequestService):
    """Runs ``handler.on_request`` for each request, one at a time; ``handler.on_kill`` for
    each kill sent to its tag."""

    role = "primary"

    @property
    def queue_name(self) -> str:
        return request_queue_name(self.service_name)

    def _declare_work_queue(self, channel: BlockingChannel) -> str:
        channel.queue_declare(self.queue_name, durable=True)
        channel.queue_bind(self.queue_name, REQUEST_EXCHANGE, routing_key=self.tag)
        return self.queue_name

    def _on_delivery(self, delivery: Delivery) -> None:
        self._begin(delivery)
