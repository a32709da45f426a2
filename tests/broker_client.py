"""A BrokerClient for tests that wait on statuses.

The product follows requests as stddaq-monitor does: the client's ``status_callback``
feeds a StatusAggregator, which waits. ``WatchingClient`` does the same, and names the two
waits the tests use.
"""

from __future__ import annotations

from typing import Any

from services.broker import BrokerClient, StatusAggregator
from services.broker.aggregator import ServicesSpec
from services.broker.client import StatusCallback


class WatchingClient(BrokerClient):
    """A BrokerClient whose statuses (every request's, also those sent by others) feed
    ``seen``; ``status_callback`` still gets them after ``seen`` did."""

    def __init__(self, *args: Any, status_callback: StatusCallback | None = None,
                 **kwargs: Any):
        self.seen = StatusAggregator(max_requests=1000)

        def on_status(request_id: str | None, request: Any, headers: dict[str, Any]) -> None:
            self.seen.on_status_message(request_id, request, headers)
            if status_callback is not None:
                status_callback(request_id, request, headers)

        super().__init__(*args, status_callback=on_status, **kwargs)

    def wait_for(self, request_id: str, services: ServicesSpec = None,
                 timeout: float = 10.0) -> dict[str, Any]:
        """``{"request_id", "request", "services", "status"}`` once ``services`` ended the
        request (StatusAggregator.wait)."""
        return self.seen.wait(request_id, services, timeout, until="final")

    def wait_for_start(self, request_id: str, services: ServicesSpec = None,
                       timeout: float = 10.0) -> dict[str, Any]:
        """Like wait_for, until ``services`` reported anything."""
        return self.seen.wait(request_id, services, timeout, until="start")
