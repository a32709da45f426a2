"""Broker framework: RabbitMQ services and client, wire-compatible with std-daq-service.

- protocol: exchanges, actions, message formats, queue names, body/header helpers
- connection: one self-healing pika connection per thread, confirmed publishing
- runner: the request life cycle shared by the services
- primary: PrimaryService (requests from the ``request`` exchange)
- postprocessing: PostprocessingService (reacts to a primary service's statuses)
- client: BrokerClient (send, kill, wait for statuses)
- aggregator: StatusAggregator (statuses per request and service, waiting)
"""

from services.broker.aggregator import StatusAggregator
from services.broker.client import BrokerClient
from services.broker.postprocessing import PostprocessingService
from services.broker.primary import PrimaryService
from services.broker.protocol import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_START,
    ACTION_REQUEST_SUCCESS,
    BadRequestError,
    BrokerError,
    check_fields,
)
from services.broker.runner import Handler

__all__ = [
    "ACTION_REQUEST_FAIL",
    "ACTION_REQUEST_START",
    "ACTION_REQUEST_SUCCESS",
    "BadRequestError",
    "BrokerClient",
    "BrokerError",
    "Handler",
    "PostprocessingService",
    "PrimaryService",
    "StatusAggregator",
    "check_fields",
]
