"""What every fastcore process shares: CLI arguments, logging, ZMQ addresses, clean exit.

A process body runs with a stop event that SIGTERM and Ctrl-C set; a bad config, a missing
buffer or an occupied port ends the process with one clear error line, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

import zmq

from fastcore.buffers import ShmBufferError
from fastcore.config import ConfigError, DetectorConfig, load_config
from fastcore.names import Stream

log = logging.getLogger(__name__)

DEFAULT_IPC_DIR = os.environ.get("STDDAQ_IPC_DIR", "/tmp")
LOG_FORMAT = "%(levelname)s %(asctime)s %(name)s %(message)s"


IPC_PATH_MAX = getattr(zmq, "IPC_PATH_MAX_LEN", 107)


def ipc_address(ipc_dir: str, detector_name: str, stream: Stream) -> str:
    """ZMQ ipc address of one of a detector's internal streams (ValueError when the socket
    path is longer than a Unix socket allows)."""
    path = os.path.join(ipc_dir, f"stddaq-{detector_name}-{stream}")
    if len(path) > IPC_PATH_MAX:
        raise ValueError(f"the ipc socket path {path} has {len(path)} characters, more than "
                         f"the {IPC_PATH_MAX} a Unix socket allows: use a shorter --ipc-dir "
                         "(or $STDDAQ_IPC_DIR)")
    return f"ipc://{path}"


def subscribe(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A SUB socket connected to ``address``, subscribed to everything."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 100_000)
    sub.connect(address)
    return sub


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="detector config JSON file")
    parser.add_argument("--ipc-dir", default=DEFAULT_IPC_DIR,
                        help="directory of the ZMQ ipc sockets (default: %(default)s, "
                        "or $STDDAQ_IPC_DIR)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)


def run_service(name: str, args: argparse.Namespace,
                body: Callable[[DetectorConfig, threading.Event], None]) -> int:
    """Run ``body(config, stop)`` until it returns or SIGTERM/SIGINT; exit code 0 or 1."""
    setup_logging(args.log_level)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        config = load_config(args.config)
        body(config, stop)
    except (ConfigError, ShmBufferError, OSError, ValueError, RuntimeError,
            zmq.ZMQError) as exc:
        log.debug("%s failed", name, exc_info=True)
        print(f"{name}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
