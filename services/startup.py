"""Service start-up (std-daq's ``default_service_setup``) and the Redis status heartbeat.

Every service takes ``--service_name`` (env SERVICE_NAME), ``--json_config_file`` (default
``config.json``; when missing, the Redis key ``config.<service_name>``; else ``{}``),
``--log_level``, ``--broker_url`` (env BROKER_HOST) and ``--redis_host`` (env REDIS_HOST;
env REDIS_SKIP=true disables Redis). While running, a service refreshes the hash
``status.<service_name>`` every second with the original's fields (``config``,
``service_name``, ``start_timestamp``) plus ``state``, ``heartbeat``, ``counters`` (JSON)
and ``last_error``; the key expires a few seconds after the service stops. Redis being down
never stops a service: the heartbeat logs it once, retries, and reports again when it is back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fastcore.process import DEFAULT_IPC_DIR
from services.broker.address import parse_broker_url
from services.broker.journal import RunningJournal
from services.status import ServiceStatus, status_key

log = logging.getLogger(__name__)

LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s %(message)s"
HEARTBEAT_S = 1.0
STATUS_TTL_S = 5


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service_name", default=os.environ.get("SERVICE_NAME"),
                        help="unique service name, e.g. sls.x12sa.writer (env SERVICE_NAME)")
    parser.add_argument("--json_config_file", default="config.json",
                        help="service config JSON (default: config.json; if it does not "
                        "exist: Redis key config.<service_name>, else {})")
    parser.add_argument("--log_level", default="INFO",
                        choices=["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"])
    parser.add_argument("--broker_url", default=os.environ.get("BROKER_HOST", "127.0.0.1"),
                        help="RabbitMQ host or host:port (env BROKER_HOST, default 127.0.0.1)")
    parser.add_argument("--redis_host", default=os.environ.get("REDIS_HOST", "127.0.0.1"),
                        help="Redis host (env REDIS_HOST, default 127.0.0.1)")
    parser.add_argument("--redis_port", type=int,
                        default=int(os.environ.get("REDIS_PORT", "6379")))


class SetupError(RuntimeError):
    """A service cannot start: the message says why."""


def redis_client(host: str, port: int) -> redis.Redis:
    """A client that fails fast when Redis is away (one immediate retry, for a connection
    broken by a Redis restart) instead of redis-py's retries with back-off."""
    return redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2,
                       retry=Retry(NoBackoff(), 1))


def load_service_config(path: str, service_name: str, client: redis.Redis | None) -> dict:
    """The config file if it exists, else Redis ``config.<service_name>``, else ``{}``."""
    file = Path(path)
    if file.exists():
        try:
            config = json.loads(file.read_text() or "null")
        except json.JSONDecodeError as exc:
            raise SetupError(f"{file}: not valid JSON at line {exc.lineno} column "
                             f"{exc.colno}: {exc.msg}") from None
        if not isinstance(config, dict):
            raise SetupError(f"{file}: expected a JSON object")
        return config
    if client is not None:
        try:
            stored = client.get(f"config.{service_name}")
        except redis.RedisError as exc:
            log.warning("no %s and Redis is not reachable (%s): empty config", path, exc)
            return {}
        if stored and len(stored) > 1:
            try:
                config = json.loads(stored)
            except json.JSONDecodeError:
                raise SetupError(f"Redis config.{service_name} is not valid JSON") from None
            if isinstance(config, dict):
                log.info("config from Redis key config.%s", service_name)
                return config
    log.info("no %s and no Redis config.%s: empty config", path, service_name)
    return {}


def service_setup(parser: argparse.ArgumentParser, argv: list[str] | None = None
                  ) -> tuple[str, dict, argparse.Namespace]:
    """Parse arguments, configure logging, load the config: ``(name, config, args)``."""
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT, stream=sys.stderr,
                        force=True)
    logging.getLogger("pika").setLevel(logging.WARNING)
    try:
        args.broker_host, args.broker_port = parse_broker_url(args.broker_url)
    except ValueError as exc:
        raise SetupError(f"--broker_url: {exc} (expected host, host:port or "
                         "amqp://host:port)") from None
    args.redis_skip = _env_true("REDIS_SKIP")
    if not args.service_name:
        if not args.redis_skip:
            raise SetupError("no service name: set SERVICE_NAME or --service_name "
                             "(or REDIS_SKIP=true for a throw-away name)")
        args.service_name = str(uuid.uuid4())
    client = None if args.redis_skip else redis_client(args.redis_host, args.redis_port)
    config = load_service_config(args.json_config_file, args.service_name, client)
    return args.service_name, config, args


class StatusHeartbeat:
    """Refreshes ``status.<service_name>`` in Redis every second from a background thread."""

    def __init__(self, service_name: str, config: dict, client: redis.Redis | None,
                 counters: Callable[[], dict[str, Any]] | None = None):
        self.service_name = service_name
        self.key = status_key(service_name)
        self.client = client
        self.counters = counters or dict
        self.config_json = json.dumps(config)
        self.start_timestamp = int(time.time())
        self.state = "starting"
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-heartbeat",
                                        daemon=True)
        self._redis_ok = True

    def start(self) -> StatusHeartbeat:
        if self.client is not None:
            self._thread.start()
        return self

    def set_state(self, state: str) -> None:
        self.state = state

    def error(self, message: str) -> None:
        self.last_error = message

    def fields(self) -> dict[str, Any]:
        return ServiceStatus(self.service_name, start_timestamp=self.start_timestamp,
                             state=self.state, heartbeat=time.time(),
                             counters=self.counters(), last_error=self.last_error,
                             ).to_fields(self.config_json)

    def beat(self) -> bool:
        """Write the status once; False (logged on the first failure) if Redis is down."""
        try:
            pipe = self.client.pipeline()
            pipe.hset(self.key, mapping=self.fields())
            pipe.expire(self.key, STATUS_TTL_S)
            pipe.execute()
        except redis.RedisError as exc:
            if self._redis_ok:
                log.warning("Redis unavailable for %s (%s): the service keeps running, "
                            "retrying every %.0f s", self.key, exc, HEARTBEAT_S)
            self._redis_ok = False
            return False
        if not self._redis_ok:
            log.info("Redis is back: reporting %s again", self.key)
        self._redis_ok = True
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(HEARTBEAT_S)

    def stop(self) -> None:
        """Stop beating and remove the status (a stopped service is not shown as alive)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if self.client is not None:
            with contextlib.suppress(redis.RedisError):
                self.client.delete(self.key)


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
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    heartbeat.start()
    service.start()
    try:
        service.wait_ready(10.0)
    except TimeoutError as exc:
        log.warning("broker not reachable yet (%s): requests are served once it is", exc)
    heartbeat.set_state("running")
    log.info("ready: %s serving %s (tag %s)", service_name, what, service.tag)
    try:
        while not stop.wait(1.0):
            heartbeat.set_state("writing" if busy() else (
                "running" if service.connected else "broker unreachable"))
    finally:
        service.stop(timeout=10.0, kill_running=True)
        heartbeat.stop()
    log.info("stopped")
    return 0
