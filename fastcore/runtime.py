"""The process runtime: what every stddaq process shares, data plane and services alike.

- **Arguments**, one spelling per flag: ``--ipc-dir``, ``--log-level``, ``--broker-url``,
  ``--redis-host``, ``--redis-port``, ``--service-name``, ``--json-config-file``; the
  original std-daq's underscore spellings (``--log_level``, ``--broker_url``,
  ``--redis_host``, ``--redis_port``, ``--service_name``, ``--json_config_file``) are
  aliases, and so is the deprecated ``--broker-host``. Environment defaults: STDDAQ_IPC_DIR,
  SERVICE_NAME, BROKER_HOST, REDIS_HOST, REDIS_PORT; REDIS_SKIP=true runs a service without
  Redis. An error about a flag names the spelling the user typed (:func:`spelling`).
- **Logging**: :func:`setup_logging`, one format (:data:`LOG_FORMAT`) on stderr.
- **Signals**: :func:`stop_on_signals` gives the stop event SIGTERM and SIGINT set;
  :func:`handle_signals` routes them elsewhere for the special cases (the IOC, uvicorn,
  the command-line tools).
- **Ready**: :func:`announce_ready` writes the line ``ready: ...`` on stderr, whatever the
  log level; waiters (fastcore.launch.ChildProcess.wait_for) match it at the start of a
  line (:data:`READY_LINE`), never inside another word ("already: ...").
- **Heartbeat**: :class:`StatusHeartbeat` (fastcore.status, next to the readers' parser)
  keeps the Redis hash ``status.<service_name>`` fresh.

Two entry points: :func:`run_service` for a data-plane process of one detector config
(a bad config, a missing buffer or a taken port end it with one ``name: error: ...`` line,
exit code 1), :func:`service_setup` for a std-daq service (std-daq's
``default_service_setup``: service name, config file or Redis ``config.<service_name>``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import redis
import zmq

from fastcore.buffers import ShmBufferError
from fastcore.config import ConfigError, DetectorConfig, load_config
from fastcore.status import HEARTBEAT_S, STATUS_TTL_S, StatusHeartbeat, redis_client

__all__ = [
    "AMQP_PORT", "DEFAULT_IPC_DIR", "HEARTBEAT_S", "LOG_FORMAT", "LOG_LEVELS", "READY_LINE",
    "READY_PREFIX", "STATUS_TTL_S", "SetupError", "StatusHeartbeat", "add_broker_arguments",
    "add_common_arguments", "add_ipc_dir", "add_log_level", "add_redis_arguments",
    "add_service_arguments", "announce_ready", "broker_address", "handle_signals",
    "load_service_config", "parse_broker_url", "ready_pattern", "redis_client", "run_service",
    "service_setup", "setup_logging", "spelling", "stop_on_signals",
]

log = logging.getLogger(__name__)

DEFAULT_IPC_DIR = os.environ.get("STDDAQ_IPC_DIR", "/tmp")
LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s %(message)s"
LOG_LEVELS = ["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"]
READY_PREFIX = "ready: "
READY_LINE = re.compile(r"^ready: ", re.MULTILINE)
AMQP_PORT = 5672
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# ------------------------------------------------------------------------------- arguments

class _Spelled(argparse.Action):
    """Store the value and remember which spelling of the option was typed."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        spellings = dict(getattr(namespace, "_spellings", {}))
        spellings[self.dest] = option_string
        namespace._spellings = spellings


def spelling(args: argparse.Namespace, dest: str) -> str:
    """The option spelling the user gave for ``dest`` (the canonical one when not given):
    an error names the flag as the user wrote it."""
    given = getattr(args, "_spellings", {}).get(dest)
    return given or "--" + dest.replace("_", "-")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")


def _level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, "
                                         f"got {text!r}")
    return level


def add_ipc_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ipc-dir", default=DEFAULT_IPC_DIR,
                        help="directory of the ZMQ ipc sockets (default: %(default)s, "
                        "or $STDDAQ_IPC_DIR)")


def add_log_level(parser: argparse.ArgumentParser, default: str = "INFO") -> None:
    parser.add_argument("--log-level", "--log_level", type=_level, default=default,
                        action=_Spelled, metavar="LEVEL",
                        help=f"{', '.join(LOG_LEVELS)} (default: %(default)s)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """A data-plane process: the detector config, ``--ipc-dir``, ``--log-level``."""
    parser.add_argument("config", help="detector config JSON file")
    add_ipc_dir(parser)
    add_log_level(parser)


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """``--broker-url`` (aliases ``--broker_url`` and the deprecated ``--broker-host``)."""
    parser.add_argument("--broker-url", "--broker_url", "--broker-host", dest="broker_url",
                        action=_Spelled, metavar="HOST[:PORT]",
                        default=os.environ.get("BROKER_HOST", "127.0.0.1"),
                        help="RabbitMQ host, host:port or amqp://host:port (env BROKER_HOST, "
                        "default 127.0.0.1; --broker-host is a deprecated spelling)")


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-host", "--redis_host", dest="redis_host", action=_Spelled,
                        metavar="HOST", default=os.environ.get("REDIS_HOST", "127.0.0.1"),
                        help="Redis host (env REDIS_HOST, default 127.0.0.1)")
    parser.add_argument("--redis-port", "--redis_port", dest="redis_port", action=_Spelled,
                        metavar="PORT", type=int,
                        default=int(os.environ.get("REDIS_PORT", "6379")),
                        help="Redis port (env REDIS_PORT, default 6379)")


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """A std-daq service: name, config file, log level, broker and Redis."""
    parser.add_argument("--service-name", "--service_name", dest="service_name",
                        action=_Spelled, default=os.environ.get("SERVICE_NAME"),
                        help="unique service name, e.g. sls.x12sa.writer (env SERVICE_NAME)")
    parser.add_argument("--json-config-file", "--json_config_file", dest="json_config_file",
                        action=_Spelled, default="config.json",
                        help="service config JSON (default: config.json; if it does not "
                        "exist: Redis key config.<service_name>, else {})")
    add_log_level(parser)
    add_broker_arguments(parser)
    add_redis_arguments(parser)


def parse_broker_url(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``amqp://host[:port][/]`` or ``[v6addr]:port`` ->
    (host, port); ValueError naming the problem."""
    value = text.strip()
    for scheme in ("amqp://", "AMQP://"):
        if value.startswith(scheme):
            value = value[len(scheme):].split("/", 1)[0].rsplit("@", 1)[-1]
    if not value:
        raise ValueError(f"empty broker address {text!r}")
    host, port = value, AMQP_PORT
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad broker address {text!r}")
            port = _port(rest[1:], text)
    elif value.count(":") == 1:
        host, port_text = value.split(":")
        port = _port(port_text, text)
    if not host:
        raise ValueError(f"bad broker address {text!r}: no host")
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad port in broker address {whole!r}")
    return int(text)


def broker_address(args: argparse.Namespace) -> tuple[str, int]:
    """(host, port) of ``--broker-url``; ValueError naming the flag as it was typed."""
    try:
        return parse_broker_url(args.broker_url)
    except ValueError as exc:
        raise ValueError(f"{spelling(args, 'broker_url')}: {exc} (expected host, host:port "
                         "or amqp://host:port)") from None


# ---------------------------------------------------------------------- logging, signals

def setup_logging(level: str | int = "INFO", quiet: Iterable[str] = ("pika",),
                  quiet_level: str | int = logging.WARNING) -> None:
    """Log ``level`` and above on stderr in :data:`LOG_FORMAT`; the chatty libraries in
    ``quiet`` only from ``quiet_level`` (or from ``level``, if higher)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    floor = max(logging.getLevelName(quiet_level) if isinstance(quiet_level, str)
                else quiet_level, logging.getLogger().level)
    for name in quiet:
        logging.getLogger(name).setLevel(floor)


def handle_signals(handler: Callable[[int, Any], Any],
                   signals: Iterable[int] = STOP_SIGNALS) -> None:
    """Route ``signals`` (SIGTERM and SIGINT) to ``handler``; outside the main thread,
    where Python cannot install handlers, nothing happens."""
    with contextlib.suppress(ValueError):
        for sig in signals:
            signal.signal(sig, handler)


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """The process's stop event (``stop`` or a new one), set by SIGTERM and SIGINT."""
    event = stop if stop is not None else threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if not event.is_set():
            log.info("%s: stopping", signal.Signals(signum).name)
        event.set()

    handle_signals(on_signal)
    return event


# -------------------------------------------------------------------------------- ready

def announce_ready(message: str, *args: Any) -> None:
    """Write ``ready: <message % args>`` as a line of its own on stderr (unformatted, at any
    log level): what supervisors and tests wait for."""
    text = message % args if args else message
    with contextlib.suppress(OSError, ValueError):
        print(f"{READY_PREFIX}{text}", file=sys.stderr, flush=True)


def ready_pattern(text: str = READY_PREFIX) -> re.Pattern[str]:
    """How a waiter finds ``text`` in a process's output: a ready text (``ready``,
    ``ready:``, ``ready: std-daq``...) at the start of a line, where :func:`announce_ready`
    writes it; any other text as a word of its own (at a line start or after a blank)."""
    if READY_PREFIX.startswith(text) or text.startswith(READY_PREFIX):
        return re.compile(rf"^{re.escape(text)}", re.MULTILINE)
    return re.compile(rf"(?:^|\s){re.escape(text)}", re.MULTILINE)


# ------------------------------------------------------------------- data-plane process

def run_service(name: str, args: argparse.Namespace,
                body: Callable[[DetectorConfig, threading.Event], None]) -> int:
    """Run ``body(config, stop)`` until it returns or SIGTERM/SIGINT; exit code 0 or 1."""
    setup_logging(args.log_level)
    stop = stop_on_signals()
    try:
        config = load_config(args.config)
        body(config, stop)
    except (ConfigError, ShmBufferError, OSError, ValueError, RuntimeError,
            zmq.ZMQError) as exc:
        log.debug("%s failed", name, exc_info=True)
        print(f"{name}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


# --------------------------------------------------------------------- std-daq service

class SetupError(RuntimeError):
    """A service cannot start: the message says why."""


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
    """Parse arguments, configure logging, load the config: ``(name, config, args)``;
    ``args.broker_host``/``args.broker_port`` hold the parsed ``--broker-url`` and
    ``args.redis_skip`` REDIS_SKIP. SetupError when the service cannot start."""
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        args.broker_host, args.broker_port = broker_address(args)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    args.redis_skip = _env_true("REDIS_SKIP")
    if not args.service_name:
        if not args.redis_skip:
            raise SetupError(f"no service name: set SERVICE_NAME or "
                             f"{spelling(args, 'service_name')} (or REDIS_SKIP=true for a "
                             "throw-away name)")
        args.service_name = str(uuid.uuid4())
    client = None if args.redis_skip else redis_client(args.redis_host, args.redis_port)
    config = load_service_config(args.json_config_file, args.service_name, client)
    return args.service_name, config, args
