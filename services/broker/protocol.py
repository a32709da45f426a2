"""The broker wire protocol, shared by every stddaq broker participant.

It is wire-compatible with PSI's std-daq-service (G1 broker), so the original's clients and
services and stddaq's can share one RabbitMQ.

Exchanges (declared by every participant on connect, idempotently, with the original's
arguments: not durable, not auto-delete):

========== ======= ===================================================================
name       type    use
========== ======= ===================================================================
request    topic   client -> services; routing key = the target service's tag
kill       topic   client -> services; routing key = the target service's tag
status     fanout  services -> everybody; routing key = the publishing service's tag
========== ======= ===================================================================

Request (``request`` exchange)
    body: the request, JSON (UTF-8); a service expects a JSON object.
    properties: ``correlation_id`` = request id (a UUID4 string), ``headers`` = caller's
    dict (default ``{}``). stddaq's client also sets ``delivery_mode=2`` (persistent) so a
    request waiting in a durable service queue survives a RabbitMQ restart.

Status (``status`` exchange)
    body: the request body bytes, verbatim (also when they are not valid JSON).
    properties: ``correlation_id`` = request id, ``message_id`` = unique per status (stddaq;
    a status re-sent after a lost connection keeps it, receivers drop copies), ``headers`` =
    ``{"action": <action>, "source": <service name>, "message": <value>}`` where action is
    ``request_start`` (message ``None``), ``request_success`` (message = the handler's
    result) or ``request_fail`` (message = the error text). A request refused before it
    started (body not JSON, not an object, no correlation id) gets a ``request_fail`` only.
    A post-processing service answers its primary's failure with ``request_fail`` and the
    message ``"Primary service <primary name> failure. "`` (trailing space, as the original).

Kill (``kill`` exchange)
    body: empty. properties: ``correlation_id`` = the id of the request to stop,
    ``headers`` = ``{}``. Routing key: the target service's tag.

Queues (stddaq's; the original used one exclusive UUID-named queue per binding):
    - ``stddaq.<service_name>.request``: durable, bound to ``request`` with the service's
      tag; manual ack after the request ends, prefetch 1. Every instance of one service
      name shares it (work queue); different services each have their own.
    - ``stddaq.<service_name>.status``: durable, bound to ``status``; the queue of a
      post-processing service (same ack rules).
    - ``stddaq.<service_name>.kill.<random>``: exclusive, auto-delete, per instance, bound to
      ``kill`` with the tag, auto-ack, so a kill reaches the instance running the request.
    - ``stddaq.client.<random>.status``: a client's status queue (auto-ack), not exclusive
      and expiring a minute after its client is gone, so statuses published while the
      client reconnects wait for it.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pika

REQUEST_EXCHANGE = "request"
KILL_EXCHANGE = "kill"
STATUS_EXCHANGE = "status"
EXCHANGES: dict[str, str] = {
    REQUEST_EXCHANGE: "topic",
    KILL_EXCHANGE: "topic",
    STATUS_EXCHANGE: "fanout",
}
# The original declares the exchanges with pika's defaults; a declare with other arguments
# would be refused (PRECONDITION_FAILED) by a broker the original already uses.
EXCHANGE_DURABLE = False

ACTION_REQUEST_START = "request_start"
ACTION_REQUEST_SUCCESS = "request_success"
ACTION_REQUEST_FAIL = "request_fail"
ACTIONS = (ACTION_REQUEST_START, ACTION_REQUEST_SUCCESS, ACTION_REQUEST_FAIL)
FINAL_ACTIONS = frozenset((ACTION_REQUEST_SUCCESS, ACTION_REQUEST_FAIL))

PERSISTENT = 2  # AMQP delivery_mode of messages that survive a RabbitMQ restart
MAX_MESSAGE_CHARS = 8000  # longer status message strings are cut (header frames are small)
STATUS_QUEUE_MAX_LENGTH = 10000  # a post-processing queue keeps at most this many statuses
CLIENT_QUEUE_EXPIRES_MS = 60_000


class BrokerError(Exception):
    """A broker operation failed (not confirmed, not connected, bad argument)."""


class BadRequestError(BrokerError, ValueError):
    """A request a service cannot run; the message names the problem."""


def primary_failure_message(primary_service_name: str) -> str:
    """The post-processing service's message when its primary service failed."""
    return f"Primary service {primary_service_name} failure. "


# ---------------------------------------------------------------------------- queue names


def request_queue_name(service_name: str) -> str:
    """The durable request queue shared by every instance of ``service_name``."""
    return f"stddaq.{service_name}.request"


def status_queue_name(service_name: str) -> str:
    """The durable status queue of the post-processing service ``service_name``."""
    return f"stddaq.{service_name}.status"


def kill_queue_name(service_name: str) -> str:
    """A new name for one service instance's exclusive kill queue."""
    return f"stddaq.{service_name}.kill.{uuid.uuid4().hex[:12]}"


def client_status_queue_name() -> str:
    """A new name for one client's status queue."""
    return f"stddaq.client.{uuid.uuid4().hex[:12]}.status"


def new_request_id() -> str:
    """A new request id (a UUID4 string, as the original)."""
    return str(uuid.uuid4())


# ---------------------------------------------------------------------------- bodies


def encode_request(request: Any) -> bytes:
    """JSON-encode a request body (UTF-8); raise BrokerError when it is not JSON-able."""
    try:
        return json.dumps(request).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise BrokerError(f"request is not JSON-serialisable: {exc}") from exc


def decode_request(body: bytes) -> dict[str, Any]:
    """Decode a request body; raise BadRequestError naming the problem unless it is a JSON
    object."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"request body is not valid UTF-8: {exc}") from exc
    try:
        request = json.loads(text)
    except ValueError as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(request, dict):
        raise BadRequestError(
            f"request body must be a JSON object, got {_json_type(request)}")
    return request


def decode_body(body: bytes) -> Any:
    """A status body as the client sees it: the JSON value, else the text itself."""
    text = body.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array"}.get(type(value), type(value).__name__)


def _is_kind(value: Any, kind: type) -> bool:
    """isinstance, except that a bool is no number and an int is a float."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
               dict: "an object", list: "an array"}


def check_fields(request: Mapping[str, Any], required: Mapping[str, type | tuple[type, ...]],
                 optional: Mapping[str, type | tuple[type, ...]] | None = None) -> None:
    """Raise BadRequestError naming the first missing or ill-typed field.

    Fields not listed are ignored (they may belong to another service). ``bool`` is not
    accepted where ``int`` or ``float`` is asked for; ``int`` is accepted for ``float``.
    """
    for name, expected in required.items():
        if name not in request:
            raise BadRequestError(f"request field '{name}' is missing")
        _check_type(name, request[name], expected)
    for name, expected in (optional or {}).items():
        if name in request and request[name] is not None:
            _check_type(name, request[name], expected)


def _check_type(name: str, value: Any, expected: type | tuple[type, ...]) -> None:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    ok = any(_is_kind(value, kind) for kind in kinds)
    if not ok:
        wanted = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise BadRequestError(
            f"request field '{name}' must be {wanted}, got {_json_type(value)} {value!r}")


# ---------------------------------------------------------------------------- headers


def header_value(value: Any) -> Any:
    """``value`` made encodable in an AMQP header table.

    str, int, bool, None, bytes and dicts/lists of them pass unchanged; tuples and sets
    become lists, dict keys strings, numpy scalars Python scalars, floats (AMQP tables as
    pika writes them have no float) and any other object their ``str``. Long strings are
    cut to MAX_MESSAGE_CHARS.
    """
    if value is None or isinstance(value, bool | int | bytes):
        return value
    if isinstance(value, str):
        if len(value) > MAX_MESSAGE_CHARS:
            return value[:MAX_MESSAGE_CHARS] + "... (cut)"
        return value
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): header_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [header_value(v) for v in value]
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and getattr(value, "shape", None) == ():
        try:
            return header_value(item())
        except (TypeError, ValueError):
            pass
    return header_value(str(value))


def error_message(exc: BaseException) -> str:
    """The ``request_fail`` message for an exception: ``str(exc)``, or its type name when
    that is empty."""
    return str(exc) or type(exc).__name__


def status_headers(action: str, source: str, message: Any = None) -> dict[str, Any]:
    """The headers of a status message."""
    if action not in ACTIONS:
        raise ValueError(f"unknown status action {action!r}")
    return {"action": action, "source": source, "message": header_value(message)}


def status_properties(request_id: str | None, action: str, source: str,
                      message: Any = None) -> pika.BasicProperties:
    """The properties of a status message. ``message_id`` is new for each status and kept
    when the status is sent again after a lost connection, so receivers can drop copies."""
    return pika.BasicProperties(correlation_id=request_id, delivery_mode=PERSISTENT,
                                message_id=uuid.uuid4().hex,
                                headers=status_headers(action, source, message))


def request_properties(request_id: str, headers: Mapping[str, Any] | None = None,
                       expires_s: float | None = None) -> pika.BasicProperties:
    """The properties of a request message; with ``expires_s`` RabbitMQ drops the request
    if no service has taken it by then (it never runs late)."""
    expiration = None if expires_s is None else str(max(1, round(expires_s * 1000)))
    return pika.BasicProperties(correlation_id=request_id, delivery_mode=PERSISTENT,
                                headers=dict(headers or {}), expiration=expiration)


def kill_properties(request_id: str) -> pika.BasicProperties:
    """The properties of a kill message."""
    return pika.BasicProperties(correlation_id=request_id, headers={})


@dataclass(frozen=True)
class Status:
    """One status message as received."""

    request_id: str | None
    action: str | None
    source: str | None
    message: Any
    request: Any  # the decoded body: a dict for a good request
    body: bytes
    message_id: str | None = None

    @property
    def final(self) -> bool:
        return self.action in FINAL_ACTIONS

    @property
    def headers(self) -> dict[str, Any]:
        return {"action": self.action, "source": self.source, "message": self.message}


def parse_status(properties: pika.BasicProperties, body: bytes) -> Status:
    """Read a status message; missing headers become None."""
    headers = properties.headers or {}
    return Status(request_id=properties.correlation_id,
                  action=_text(headers.get("action")),
                  source=_text(headers.get("source")),
                  message=headers.get("message"),
                  request=decode_body(body), body=body, message_id=properties.message_id)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value
