"""stddaq-rest: std-daq's REST admin interface for one detector (FastAPI on uvicorn).

A front end like the IOC and the Ophyd devices: writes go to the writer agent over
RabbitMQ, progress and statuses come back over Redis and the broker. It binds 127.0.0.1
unless told otherwise; the ``ready:`` line is written once the socket listens.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import socket
import sys

import uvicorn

from fastcore.config import ConfigError, parse_config, read_config_json
from fastcore.runtime import (
    add_broker_arguments,
    add_ipc_dir,
    add_log_level,
    add_redis_arguments,
    announce_ready,
    broker_address,
    handle_signals,
    setup_logging,
)
from services.rest.app import create_app
from services.rest.backend import RestBackend

log = logging.getLogger("stddaq-rest")
DEFAULT_PORT = 5000  # the original's
API_KEY_ENV = "STDDAQ_REST_API_KEY"


def read_api_key(path: str | None) -> str | None:
    """The API key from ``path`` (stripped) or the environment; None when neither."""
    if path:
        with open(path) as key_file:
            key = key_file.read().strip()
        if not key:
            raise ValueError(f"--api-key-file {path} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (uvicorn serves on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-rest",
        description="Serve std-daq's REST admin interface (std_daq_client 1.3.5) for one "
        "detector: writes through its writer agent, writer status, stats, logs, config.")
    parser.add_argument("config", help="detector config JSON")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT}, as the original)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--api-key-file", default=None, metavar="PATH",
                        help="file holding the API key that requests changing anything must "
                        f"carry (or the environment variable {API_KEY_ENV}); required when "
                        "binding an address other than loopback")
    parser.add_argument("--writer-service", default=None,
                        help="service name of the writer agent (default: <detector>.writer)")
    add_broker_arguments(parser)
    add_redis_arguments(parser)
    add_ipc_dir(parser)
    add_log_level(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        broker_address(args)  # a bad address is an error now, not at the first request
        api_key = read_api_key(args.api_key_file)
        if not api_key and not is_loopback(args.host):
            raise ValueError(f"--host {args.host} is reachable from other machines: give an "
                             f"API key (--api-key-file or {API_KEY_ENV}), or anyone who "
                             "reaches it could start writes and change the config")
        raw_config = read_config_json(args.config)
        config = parse_config(raw_config, source=args.config)
        sock = listening_socket(args.host, args.port)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"stddaq-rest: error: {exc}", file=sys.stderr)
        return 1
    backend = RestBackend(config, raw_config,
                          args.writer_service or f"{config.detector_name}.writer",
                          args.broker_url, args.redis_host, args.redis_port, args.ipc_dir)
    backend.start()
    app = create_app(backend, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        announce_ready("REST admin interface of %s on http://%s:%d (writer agent %s; %s)",
                       config.detector_name, args.host, args.port, backend.writer_service,
                       "changes need the API key" if api_key else "no API key")
        yield

    app.router.lifespan_context = lifespan
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    # uvicorn shuts down on SIGTERM/SIGINT, then passes them on: to these, so the exit is clean
    handle_signals(lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        backend.close()
        sock.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
