"""Command-line tools for beamline users: ``stddaq-request`` and ``stddaq-monitor``.

- request: send a request to the services bound to a tag and follow it to its end
  (services.cli.request)
- monitor: live view of every status on the broker and of the Redis service heartbeats
  (services.cli.monitor)

This module holds what both share: one-line errors with exit codes, broker address
parsing, connecting with a quick "unreachable" answer, colours, and output that survives a
closed pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from fastcore.runtime import handle_signals, setup_logging
from services.broker import BrokerClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_UNREACHABLE = 4
EXIT_NOT_ROUTED = 5
EXIT_PARTIAL = 6
EXIT_INTERRUPTED = 130

FAIL_FAST_S = 1.0  # a connection error seen within this time ends the wait for RabbitMQ


class CliError(Exception):
    """Ends the program with ``prog: error: <message>`` on stderr and ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse with the examples kept as written (RawDescriptionHelpFormatter)."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)


def seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of seconds, got {text!r}")
    return value


def seconds_or_zero(text: str) -> float:
    """argparse type: seconds > 0, or 0 for "no limit"."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return seconds(text)


def fail(prog: str, message: str) -> None:
    """Print the one-line error (never more than one line)."""
    text = " ".join(str(message).split())
    with contextlib.suppress(OSError, ValueError):
        print(f"{prog}: error: {text}", file=sys.stderr, flush=True)


def note(prog: str, message: str) -> None:
    """An informational line on stderr (stdout is for results)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"{prog}: {message}", file=sys.stderr, flush=True)


def quiet_logging(verbose: bool) -> None:
    """Library warnings (reconnect attempts...) would garble the output: the tools report
    problems themselves; ``--verbose`` shows the libraries' INFO logs."""
    setup_logging(logging.INFO if verbose else logging.CRITICAL)


def connect_broker(prog: str, host: str, port: int, connect_timeout: float,
                   status_callback: Callable[[str | None, Any, dict], None] | None = None
                   ) -> BrokerClient:
    """A BrokerClient subscribed to the statuses, or CliError(EXIT_UNREACHABLE).

    A refused connection or an unknown host ends the wait after about a second; a host
    that does not answer at all after ``connect_timeout`` seconds."""
    try:
        user = getpass.getuser()
    except Exception:
        user = "?"
    client = BrokerClient(host, port, status_callback=status_callback, max_backoff=1.0,
                          connection_name=f"{prog} {user}@{socket.gethostname()} "
                                          f"pid {os.getpid()}")
    try:
        start = time.monotonic()
        while True:
            step = min(FAIL_FAST_S, max(0.05, connect_timeout - (time.monotonic() - start)))
            try:
                client.wait_ready(step)
                return client
            except TimeoutError as exc:
                # wait_ready names the last connection error when there was one
                if "last error" in str(exc) or time.monotonic() - start >= connect_timeout:
                    raise CliError(f"{exc}; is RabbitMQ running there? (--broker-url or "
                                   "env BROKER_HOST)", EXIT_UNREACHABLE) from None
    except BaseException:
        client.close()
        raise


# ---------------------------------------------------------------------------- output


class Out:
    """Line output to stdout that stops quietly when the reader went away (``| head``)."""

    def __init__(self, stream: TextIO | None = None, colour: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = _isatty(self.stream)
        self.colour = (self.tty and "NO_COLOR" not in os.environ) if colour is None else colour
        self.broken = False

    def write(self, text: str) -> None:
        if self.broken:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError:
            self.broken = True
            # the interpreter's final flush of stdout would fail again: point it elsewhere
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)

    def line(self, text: str = "") -> None:
        self.write(text + "\n")

    def paint(self, text: str, *codes: str) -> str:
        """``text`` in ANSI colours/styles when colour is on."""
        if not self.colour or not codes:
            return text
        return f"\033[{';'.join(codes)}m{text}\033[0m"


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


BOLD, DIM = "1", "2"
RED, GREEN, YELLOW, CYAN = "31", "32", "33", "36"
BG_RED, BG_GREEN, BG_YELLOW = "41", "42", "43"
BLACK = "30"


def short_id(request_id: str | None) -> str:
    """``[abcd..wxyz]`` as the original monitor (the whole id when it is short)."""
    if not request_id:
        return "[no id]"
    if len(request_id) <= 10:
        return f"[{request_id}]"
    return f"[{request_id[:4]}..{request_id[-4:]}]"


def text_of(value: Any) -> str:
    """A status message or request value as one line: strings as they are, the rest as
    compact JSON."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return " ".join(value.split())
    try:
        return json.dumps(value, separators=(", ", ": "), default=_json_default)
    except (TypeError, ValueError):
        return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def to_json(value: Any, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent, default=_json_default)


def second_interrupt_exits() -> None:
    """While cleaning up after Ctrl-C, a second Ctrl-C leaves at once."""
    handle_signals(lambda *_: os._exit(EXIT_INTERRUPTED), (signal.SIGINT,))
