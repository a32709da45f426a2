"""Config deployments through Redis, as the original std-daq's REST interface does them.

The REST service publishes a new detector config on the stream ``stddaq.config.<detector>``
(field ``json``; the entry id is the ``config_id``); every stddaq-run of that detector
applies it (restarts the services that read the config) and reports on
``stddaq.config.<detector>.<config_id>`` (fields ``server_name``, ``message``: Deploying,
Done or ``Error: <why>``). ``deployment_status`` sums that up in the original's shape.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from fastcore.config import ConfigError, parse_config

DEPLOYING, DONE = "Deploying", "Done"
ERROR_PREFIX = "Error"
CONFIGS_KEPT = 100
# where files go may only be changed in the operator's config file, never by a caller
OPERATOR_FIELDS = ("output_root", "allow_request_user_id", "n_writers")
KEPT_S = 30 * 24 * 3600  # a detector's config history expires a month after its last change


def config_stream(detector_name: str) -> str:
    return f"stddaq.config.{detector_name}"


def deploy_stream(detector_name: str, config_id: str) -> str:
    return f"{config_stream(detector_name)}.{config_id}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def merged_config(current: dict, changes: Any) -> dict:
    """``current`` with ``changes`` applied, validated as a config file is (ConfigError names
    the field). The detector's name cannot change on a running std-daq, nor the fields that
    decide where files go (``OPERATOR_FIELDS``)."""
    if not isinstance(changes, dict):
        raise ConfigError(f"config: expected a JSON object, got {type(changes).__name__}")
    name = current.get("detector_name")
    if "detector_name" in changes and changes["detector_name"] != name:
        raise ConfigError(f"detector_name: cannot change from {name!r} to "
                          f"{changes['detector_name']!r} on a running std-daq (start "
                          "another stddaq-run for another detector)")
    for field in OPERATOR_FIELDS:
        if field in changes and changes[field] != current.get(field):
            raise ConfigError(f"{field}: set by the operator in the detector config file, "
                              "not through the REST interface")
    merged = {**current, **changes}
    parse_config(merged, source="the new config")
    return merged


def publish_config(client: redis.Redis, config: dict) -> str:
    """Publish ``config`` for deployment; returns its config_id."""
    key = config_stream(config["detector_name"])
    entry_id = client.xadd(key, {"json": json.dumps(config)}, maxlen=CONFIGS_KEPT,
                           approximate=True)
    client.expire(key, KEPT_S)
    return _text(entry_id)


def latest_config(client: redis.Redis, detector_name: str) -> tuple[str, dict] | None:
    """(config_id, config) of the newest published config, or None."""
    entries = client.xrevrange(config_stream(detector_name), count=1)
    if not entries:
        return None
    entry_id, fields = entries[0]
    return _text(entry_id), json.loads(fields[b"json"])


def report(client: redis.Redis, detector_name: str, config_id: str, server_name: str,
           message: str) -> None:
    """A server's progress in deploying ``config_id``."""
    key = deploy_stream(detector_name, config_id)
    client.xadd(key, {"server_name": server_name, "message": message})
    client.expire(key, KEPT_S)


def deployment_status(client: redis.Redis, detector_name: str) -> dict:
    """The last deployment: config_id, status SUCCESS / RUNNING / ERROR / UNKNOWN, message,
    servers (name -> last message) and start/stop times (from the stream ids)."""
    latest = latest_config(client, detector_name)
    if latest is None:
        return {"config_id": None, "status": "UNKNOWN", "message": "No config available",
                "servers": {}, "stats": {"start_time": None, "stop_time": None}}
    config_id, _ = latest
    servers: dict[str, str] = {}
    last_ms = None
    for entry_id, fields in client.xrange(deploy_stream(detector_name, config_id)):
        servers[_text(fields[b"server_name"])] = _text(fields[b"message"])
        last_ms = int(_text(entry_id).split("-")[0])
    messages = set(servers.values())
    if not servers:
        status, message = "UNKNOWN", "Waiting for servers..."
    elif any(m.startswith(ERROR_PREFIX) for m in messages):
        status, message = "ERROR", "Deployment failed"
    elif DEPLOYING in messages:
        status, message = "RUNNING", "Deploying on servers..."
    elif messages == {DONE}:
        status, message = "SUCCESS", "Deployment successful"
    else:
        status, message = "UNKNOWN", "Unexpected state: see the stddaq-run logs"
    start = int(config_id.split("-")[0]) / 1000
    stop = last_ms / 1000 if status in ("SUCCESS", "ERROR") and last_ms else None
    return {"config_id": config_id, "status": status, "message": message,
            "servers": servers, "stats": {"start_time": start, "stop_time": stop}}
