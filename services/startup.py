"""The primary broker service's loop (std-daq's ``PrimaryService`` run with its heartbeat).

A service starts with the process runtime's ``service_setup`` (fastcore.runtime: arguments,
logging, config file or Redis ``config.<service_name>``) and serves with
:func:`serve_primary`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from fastcore.runtime import (
    DEFAULT_IPC_DIR,
    StatusHeartbeat,
    announce_ready,
    stop_on_signals,
)
from services.broker.journal import RunningJournal

log = logging.getLogger(__name__)


def serve_primary(service_name: str, handler: Any, args: argparse.Namespace, config: dict,
                  client: redis.Redis | None, counters: Callable[[], dict[str, Any]],
                  busy: Callable[[], bool], what: str, refuse_when_busy: bool = False) -> int:
    """Run ``handler`` as a primary broker service until SIGTERM/SIGINT, with its heartbeat
    (state: running / <busy> / broker unreachable). ``what`` names the work in the log."""
    from services.broker.primary import PrimaryService  # pika only for broker services

    journal = RunningJournal(Path(getattr(args, "ipc_dir", None) or DEFAULT_IPC_DIR)
                             / f"stddaq-{service_name}.running")
    service = PrimaryService(service_name, handler, broker_host=args.broker_host,
                             port=args.broker_port, tag=args.tag,
                             refuse_when_busy=refuse_when_busy, journal=journal)
    heartbeat = StatusHeartbeat(service_name, config, client, lambda: dict(
        counters(), busy=busy(), broker_connected=service.connected))
    stop = stop_on_signals()
    heartbeat.start()
    service.start()
    try:
        service.wait_ready(10.0)
    except TimeoutError as exc:
        log.warning("broker not reachable yet (%s): requests are served once it is", exc)
    heartbeat.set_state("running")
    announce_ready("%s serving %s (tag %s)", service_name, what, service.tag)
    try:
        while not stop.wait(1.0):
            heartbeat.set_state("writing" if busy() else (
                "running" if service.connected else "broker unreachable"))
    finally:
        service.stop(timeout=10.0, kill_running=True)
        heartbeat.stop()
    log.info("stopped")
    return 0
