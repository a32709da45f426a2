"""stddaq-monitor: live view of the broker statuses and of the Redis service heartbeats.

Raw mode prints one line per status as the original ``std_daq_monitor``; ``--agg`` one
line per change of a request; ``--services`` adds the table of the ``status.<service>``
heartbeats kept in Redis by every running service (fastcore.status.StatusHeartbeat).
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import redis

from fastcore.runtime import (
    add_broker_arguments,
    add_redis_arguments,
    broker_address,
    handle_signals,
    redis_client,
)
from fastcore.status import HEARTBEAT_S, STATUS_PREFIX, ServiceStatus
from services.broker import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_START,
    ACTION_REQUEST_SUCCESS,
    StatusAggregator,
)
from services.cli import (
    BG_GREEN,
    BG_RED,
    BG_YELLOW,
    BLACK,
    BOLD,
    DIM,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    GREEN,
    RED,
    YELLOW,
    CliError,
    Out,
    Parser,
    connect_broker,
    fail,
    note,
    quiet_logging,
    second_interrupt_exits,
    seconds,
    short_id,
    text_of,
    to_json,
)

PROG = "stddaq-monitor"
STALE_S = 3 * HEARTBEAT_S  # a heartbeat older than this is shown as stale

DESCRIPTION = """\
Live view of every request status on the broker (the fanout 'status' exchange), and of
the service heartbeats in Redis.

raw mode (default), one line per status:
  [<first 4>..<last 4 of the request id>] <service> <action> <output_file or message>
  coloured on a terminal: yellow start, green success, red fail.
--agg, one line per change of a request:
  [<id>] [<symbols>] <services>   + success, * running, - fail (failed services first)
--services adds the table of the Redis keys status.<service> (state, age of the last
  heartbeat, counters, last error), refreshed every second; a heartbeat older than 3 s
  is marked stale. On a terminal the screen is redrawn (table, then the latest
  statuses); otherwise the table is printed again whenever it changes.
--once prints the heartbeat table once and exits (no RabbitMQ needed).
"""

EPILOG = """\
examples:
  stddaq-monitor                        # every status, as it happens
  stddaq-monitor --agg                  # one line per request change
  stddaq-monitor --services             # dashboard: heartbeats + latest statuses
  stddaq-monitor --once                 # heartbeat table once (scripts, cron)
  stddaq-monitor --once --json | jq '.[] | select(.stale)'

exit codes:
  0    stopped with Ctrl-C (or SIGTERM), or --once printed the table
  2    bad usage
  4    RabbitMQ not reachable at start (with --once: Redis not reachable)

environment: BROKER_HOST, REDIS_HOST, REDIS_PORT (defaults of the options), NO_COLOR.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    add_broker_arguments(parser)
    add_redis_arguments(parser)  # Redis: the heartbeats of --services and --once
    parser.add_argument("--agg", action="store_true",
                        help="one line per request change instead of one per status")
    parser.add_argument("--services", action="store_true",
                        help="also show the Redis heartbeat table (status.*)")
    parser.add_argument("--once", action="store_true",
                        help="print the heartbeat table once and exit")
    parser.add_argument("--json", action="store_true",
                        help="with --once: the heartbeats as a JSON list")
    parser.add_argument("-t", "--timestamps", action="store_true",
                        help="start each status line with the time it arrived")
    parser.add_argument("--connect_timeout", "--connect-timeout", metavar="S", type=seconds,
                        default=5.0, help="how long to try to reach RabbitMQ (default 5)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' logs on stderr")
    return parser


# ---------------------------------------------------------------------------- statuses


ACTION_COLOUR = {ACTION_REQUEST_START: YELLOW, ACTION_REQUEST_SUCCESS: GREEN,
                 ACTION_REQUEST_FAIL: RED}
AGG_SYMBOL = {ACTION_REQUEST_FAIL: ("-", (BG_RED, BLACK)),
              ACTION_REQUEST_START: ("*", (BG_YELLOW, BLACK)),
              ACTION_REQUEST_SUCCESS: ("+", (BG_GREEN, BLACK))}
AGG_ORDER = {ACTION_REQUEST_FAIL: 0, ACTION_REQUEST_START: 1, ACTION_REQUEST_SUCCESS: 2}


def raw_line(out: Out, request_id: str | None, request: Any, headers: dict) -> str:
    """``[abcd..wxyz] <source> <action> <output_file or message>``."""
    action = text_of(headers.get("action")) or "?"
    source = text_of(headers.get("source")) or "?"
    message = headers.get("message")
    detail = text_of(message)
    if action != ACTION_REQUEST_FAIL and isinstance(request, dict) \
            and request.get("output_file"):
        detail = text_of(request["output_file"])
    text = f"{short_id(request_id)} {source} {action} {detail}".rstrip()
    return out.paint(text, ACTION_COLOUR[action]) if action in ACTION_COLOUR else text


def agg_line(out: Out, request_id: str, entry: dict) -> str:
    """``[abcd..wxyz] [-*+] failed running succeeded``."""
    services = []
    for name, statuses in entry["services"].items():
        action = statuses[-1][0] if statuses else None
        services.append((AGG_ORDER.get(action, 1), name, action))
    services.sort()
    symbols = ""
    for _, _, action in services:
        symbol, colours = AGG_SYMBOL.get(action, ("?", ()))
        symbols += out.paint(symbol, *colours)
    names = " ".join(name for _, name, _ in services)
    return f"{short_id(request_id)} [{symbols}] {names}"


# ---------------------------------------------------------------------------- heartbeats


def read_heartbeats(client: redis.Redis) -> list[dict[str, Any]]:
    """Every ``status.*`` hash: service, state, heartbeat age, counters, last error."""
    keys = sorted(set(client.scan_iter(match=STATUS_PREFIX + "*", count=1000)))
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
        pipe.ttl(key)
    replies = pipe.execute(raise_on_error=False)
    now = time.time()
    rows = []
    for i, key in enumerate(keys):
        fields, ttl = replies[2 * i], replies[2 * i + 1]
        if not isinstance(fields, dict) or not fields:
            continue  # another type under status.*, or expired meanwhile
        status = ServiceStatus.from_fields(key, fields)
        started = status.start_timestamp
        age = status.heartbeat_age(now)
        rows.append({
            "key": _str(key), "service": status.service_name, "state": status.state,
            "heartbeat_age": None if age is None else round(age, 3),
            "stale": age is not None and age > STALE_S,
            "uptime": None if started is None else round(max(0.0, now - started), 3),
            "ttl": ttl if isinstance(ttl, int) and ttl >= 0 else None,
            "counters": status.counters, "last_error": status.last_error or None,
        })
    rows.sort(key=lambda row: row["service"])
    return rows


def _str(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def counters_text(counters: Any) -> str:
    if isinstance(counters, dict):
        return " ".join(f"{k}={text_of(v)}" for k, v in counters.items())
    return text_of(counters)


def heartbeat_cells(row: dict[str, Any]) -> list[str]:
    if row["heartbeat_age"] is None:  # the original's keys: no heartbeat field
        beat = f"- (expires {row['ttl']}s)" if row["ttl"] is not None else "-"
    elif row["stale"]:
        beat = f"STALE {duration(row['heartbeat_age'])}"
    else:
        beat = f"{duration(row['heartbeat_age'])} ago"
    return [row["service"], row["state"] or "-", beat, duration(row["uptime"]),
            text_of(row["last_error"]) or "-", counters_text(row["counters"]) or "-"]


HEADER = ["SERVICE", "STATE", "HEARTBEAT", "UP", "LAST ERROR", "COUNTERS"]
ERROR_WIDTH = 40  # last errors are cut to this in the table (--once --json: whole)


def table(out: Out, rows: list[dict[str, Any]], width: int | None = None) -> list[str]:
    """The heartbeat table as lines (cut to ``width`` on a terminal)."""
    if not rows:
        return ["no service heartbeats in Redis (no status.* keys)"]
    cells = []
    for row in rows:
        values = heartbeat_cells(row)
        if len(values[4]) > ERROR_WIDTH:
            values[4] = values[4][:ERROR_WIDTH - 1] + "…"
        cells.append(values)
    widths = [max(len(HEADER[i]), *(len(c[i]) for c in cells)) for i in range(5)]

    def fmt(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, [*widths, 0], strict=True))

    lines = [out.paint(fmt(HEADER).rstrip(), BOLD)]
    for row, values in zip(rows, cells, strict=True):
        line = fmt(values).rstrip()
        if width is not None and len(line) > width:
            line = line[:max(1, width - 1)] + "…"
        if row["stale"]:
            line = out.paint(line, RED)
        elif row["last_error"]:
            line = out.paint(line, YELLOW)
        lines.append(line)
    return lines


def table_signature(rows: list[dict[str, Any]]) -> tuple:
    """What the table shows apart from ages: a change prints it again (not a terminal)."""
    return tuple((r["service"], r["state"], r["stale"], r["heartbeat_age"] is None,
                  counters_text(r["counters"]), r["last_error"]) for r in rows)


def once(args: argparse.Namespace, out: Out) -> int:
    client = redis_client(args.redis_host, args.redis_port)
    try:
        rows = read_heartbeats(client)
    except redis.RedisError as exc:
        raise CliError(f"cannot read the heartbeats from Redis at {args.redis_host}:"
                       f"{args.redis_port}: {exc}", EXIT_UNREACHABLE) from None
    finally:
        client.close()
    if args.json:
        out.line(to_json(rows))
    else:
        width = shutil.get_terminal_size().columns if out.tty else None
        for line in table(out, rows, width):
            out.line(line)
    return EXIT_OK


# ---------------------------------------------------------------------------- live view


class TerminatedError(Exception):
    """SIGTERM: leave like Ctrl-C."""


class Monitor:
    def __init__(self, args: argparse.Namespace, out: Out):
        self.args = args
        self.out = out
        self.events: queue.Queue[tuple] = queue.Queue()
        self.dashboard = args.services and out.tty
        self.recent: deque[str] = deque(maxlen=200)
        self.aggregator = StatusAggregator(self._on_change, max_requests=100)
        self.redis: redis.Redis | None = None
        self.rows: list[dict[str, Any]] = []
        self.redis_error: str | None = None
        self.signature: tuple | None = None
        self.connected = True
        self.when = 0.0

    def _on_status(self, request_id: str | None, request: Any, headers: dict) -> None:
        self.events.put((time.time(), request_id, request, headers))

    def _on_change(self, request_id: str, entry: dict) -> None:
        self.emit(self.when, agg_line(self.out, request_id, entry))

    def emit(self, when: float, text: str) -> None:
        if self.args.timestamps:
            text = f"{datetime.fromtimestamp(when).strftime('%H:%M:%S.%f')[:-3]} {text}"
        if self.dashboard:
            self.recent.append(text)
        else:
            self.out.line(text)

    def on_event(self, event: tuple) -> None:
        self.when, request_id, request, headers = event
        if self.args.agg:
            self.aggregator.on_status_message(request_id or "", request, headers)
        else:
            self.emit(self.when, raw_line(self.out, request_id, request, headers))

    def refresh(self) -> None:
        try:
            self.rows = read_heartbeats(self.redis)
            self.redis_error = None
        except redis.RedisError as exc:
            self.redis_error = f"Redis at {self.args.redis_host}:{self.args.redis_port} " \
                               f"not reachable: {exc}"
        if self.dashboard:
            self.draw()
            return
        signature = (self.redis_error, table_signature(self.rows))
        if signature != self.signature:
            self.signature = signature
            stamp = datetime.now().strftime("%H:%M:%S")
            self.out.line(f"--- services at {stamp} ---")
            for line in ([self.redis_error] if self.redis_error
                         else table(self.out, self.rows)):
                self.out.line(line)
            self.out.line("---")

    def draw(self) -> None:
        size = shutil.get_terminal_size()
        stamp = datetime.now().strftime("%H:%M:%S")
        broker = "" if self.connected else self.out.paint("  RabbitMQ: reconnecting", RED)
        lines = [self.out.paint(f"stddaq-monitor  {stamp}  RabbitMQ {self.args.broker_url}"
                                f"  Redis {self.args.redis_host}:{self.args.redis_port}",
                                DIM) + broker, ""]
        if self.redis_error:
            lines.append(self.out.paint(self.redis_error, RED))
        else:
            lines += table(self.out, self.rows, size.columns)
        lines += ["", self.out.paint("latest statuses (Ctrl-C to quit):", BOLD)]
        room = max(1, size.lines - len(lines) - 1)
        lines += list(self.recent)[-room:]
        self.out.write("\033[H\033[2J" + "\n".join(lines) + "\n")

    def run(self) -> int:
        args = self.args
        try:
            host, port = broker_address(args)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        if args.services:
            self.redis = redis_client(args.redis_host, args.redis_port)
        client = connect_broker(PROG, host, port, args.connect_timeout, self._on_status)
        try:
            mode = "per request (--agg)" if args.agg else "per status"
            note(PROG, f"watching statuses on RabbitMQ {host}:{port}, {mode} (Ctrl-C to stop)")
            next_refresh = time.monotonic()
            while not self.out.broken:
                if args.services and time.monotonic() >= next_refresh:
                    self.refresh()
                    next_refresh = time.monotonic() + HEARTBEAT_S
                try:
                    event = self.events.get(timeout=0.2)
                except queue.Empty:
                    event = None
                if event is not None:
                    self.on_event(event)
                    if self.dashboard and self.events.empty():
                        self.draw()
                if client.connected != self.connected:
                    self.connected = client.connected
                    note(PROG, "reconnected to RabbitMQ" if self.connected else
                         "lost the connection to RabbitMQ; reconnecting")
            return EXIT_OK
        except (KeyboardInterrupt, TerminatedError):
            second_interrupt_exits()
            return EXIT_OK
        finally:
            with contextlib.suppress(Exception):
                handle_signals(signal.SIG_DFL, (signal.SIGTERM,))
            client.close()
            if self.redis is not None:
                self.redis.close()


def _on_sigterm(*_: Any) -> None:
    raise TerminatedError()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and not args.once:
        parser.error("--json goes with --once")
    quiet_logging(args.verbose)
    out = Out()
    try:
        if args.once:
            return once(args, out)
        handle_signals(_on_sigterm, (signal.SIGTERM,))
        return Monitor(args, out).run()
    except CliError as exc:
        fail(PROG, str(exc))
        return exc.code
    except (KeyboardInterrupt, TerminatedError):
        return EXIT_OK if not args.once else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
