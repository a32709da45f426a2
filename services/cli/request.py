"""stddaq-request: send a request to the services bound to a tag and follow it to its end.

The original ``std_daq_request TAG request.json`` only sent the request; this one also
builds it from stdin and ``--set`` pairs, follows its statuses and the write progress,
and ends with an exit code that says how the request went (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

from fastcore.runtime import add_broker_arguments, add_redis_arguments, broker_address
from fastcore.status import redis_client
from services.broker import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_START,
    ACTION_REQUEST_SUCCESS,
    BrokerClient,
    BrokerError,
)
from services.cli import (
    BOLD,
    DIM,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NOT_ROUTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_TIMEOUT,
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
    seconds_or_zero,
    text_of,
    to_json,
)
from services.progress import ProgressFollower, WriteProgress

PROG = "stddaq-request"
SETTLE_S = 0.5  # without --services: quiet time after the last final status
START_TIMEOUT_S = 60.0  # a request not started by then expires (it never runs late)
KILL_WAIT_S = 5.0  # --kill waits this long for the killed request's final status
QUIET_NOTICE_S = 5.0  # a notice when no service has reported after this long
PROGRESS_EVERY_S = 1.0  # progress lines at most this often when stdout is not a terminal

DESCRIPTION = """\
Send a request to the stddaq services bound to TAG (RabbitMQ) and follow it.

The request is a JSON object read from REQUEST.json, from stdin ('-'), and/or built with
--set key=value pairs (applied last, so they override the file). Values are read as JSON
when they parse (10 -> number, true -> boolean, [1,2] -> list, "10" -> string), else
taken as text; a dotted key sets a nested field (--set metadata.sample=Si).

By default the tool follows the request: one line per status (time, service, action,
message) and, for writer services, the write progress published on Redis
(stddaq.progress.<service>: "written 40/100"), until every expected service finished.
Which services are expected: --services (a count or names); without it, every service
that reports (the request is done once they all finished and nothing new arrived for
0.5 s; name the services when one of them may start late, e.g. because it is busy).
"""

EPILOG = """\
examples:
  stddaq-request debug.writer --set n_images=100 --set output_file=/data/run1.h5
  stddaq-request debug.writer request.json --timeout 120
  echo '{"n_images": 10, "output_file": "/data/x.h5"}' | stddaq-request debug.writer -
  stddaq-request debug.acq request.json --services debug.writer,debug.epics_writer
  stddaq-request debug.writer request.json --no-wait        # prints the request id
  stddaq-request debug.writer --kill 0b8f7c1e-...           # stop a running request
  stddaq-request debug.writer request.json --json | jq .status

exit codes:
  0    every expected service reported success (--no-wait: the message was confirmed
       by RabbitMQ; --kill: the request was running and has ended)
  1    a service reported a failure (its message is printed)
  2    bad usage or bad request JSON (the position of the error is printed)
  3    timeout: the services that did not finish are named
  4    RabbitMQ not reachable
  5    no service is bound to TAG (nothing would receive the request); --kill: no
       service ended REQUEST_ID within --kill-wait (it was not running there)
  6    partial: a writer ended with fewer good images than requested (killed, images
       flagged, lost or absent); the file holds what was written, the printed summary
       says what is missing
  130  interrupted (Ctrl-C); the request keeps running: stop it with --kill

environment: BROKER_HOST (default for --broker-url), REDIS_HOST, REDIS_PORT, NO_COLOR.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("tag", metavar="TAG",
                        help="routing tag of the services (usually the service name, "
                        "e.g. debug.writer)")
    parser.add_argument("request_file", metavar="REQUEST.json", nargs="?",
                        help="request JSON object; '-' reads it from stdin")
    parser.add_argument("--set", dest="sets", metavar="KEY=VALUE", action="append",
                        default=[], help="set a request field (repeatable; VALUE as JSON "
                        "when it parses, else text; dotted KEY for nested fields)")
    add_broker_arguments(parser)
    parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="follow the request until it ended (default); --no-wait "
                        "prints the request id once RabbitMQ confirmed it, and exits")
    parser.add_argument("--timeout", metavar="S", type=seconds, default=None,
                        help="give up waiting after S seconds (exit 3; default: wait "
                        "until the request ended or Ctrl-C)")
    parser.add_argument("--services", metavar="N|NAME,...", type=_services, default=None,
                        help="the services expected to finish: a count, or names "
                        "separated by commas (default: every service that reports)")
    parser.add_argument("--start-timeout", metavar="S", type=seconds_or_zero,
                        default=START_TIMEOUT_S,
                        help="a request no service has started within S seconds expires "
                        "from the queue (it never runs late) and the tool exits 3 "
                        "(default: %(default)s; 0: wait and keep it queued forever)")
    parser.add_argument("--kill", metavar="REQUEST_ID",
                        help="send a kill for REQUEST_ID to TAG instead of a request, and "
                        "wait for the request to end")
    parser.add_argument("--kill-wait", metavar="S", type=seconds, default=KILL_WAIT_S,
                        help="how long --kill waits for the request's final status "
                        "(default: %(default)s s; exit 5 when none comes)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document (request id, outcome, statuses per "
                        "service, last progress) instead of the live lines")
    add_redis_arguments(parser)  # Redis: the write progress
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="do not follow the write progress on Redis")
    parser.add_argument("--connect_timeout", "--connect-timeout", metavar="S",
                        type=seconds, default=5.0,
                        help="how long to try to reach RabbitMQ (default 5)")
    parser.add_argument("--send_timeout", "--send-timeout", metavar="S", type=seconds,
                        default=5.0, help="how long RabbitMQ may take to confirm the "
                        "request, retrying while no service is bound to TAG (default 5)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the libraries' logs on stderr")
    return parser


def _services(text: str) -> int | list[str]:
    value = text.strip()
    if value.isdigit():
        if int(value) < 1:
            raise argparse.ArgumentTypeError("expected at least 1 service")
        return int(value)
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a count or service names, got {text!r}")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------- the request


def build_request(request_file: str | None, sets: Sequence[str],
                  stdin: Any = None) -> dict[str, Any]:
    """The request from the file or stdin plus the ``--set`` pairs; CliError(EXIT_USAGE)
    naming the problem (with line and column for bad JSON)."""
    request: dict[str, Any] = {}
    if request_file is not None:
        if request_file == "-":
            source = "stdin"
            stream = stdin if stdin is not None else sys.stdin
            if stream is None or stream.isatty():
                raise CliError("'-' reads the request from stdin, but stdin is a terminal "
                               "(pipe the JSON in, or give a file)", EXIT_USAGE)
            text = stream.read()
        else:
            source = request_file
            try:
                text = Path(request_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise CliError(f"cannot read {request_file}: {reason}", EXIT_USAGE) from None
        try:
            loaded = json.loads(text, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise CliError(f"{source}: not valid JSON at line {exc.lineno} column "
                           f"{exc.colno} (char {exc.pos}): {exc.msg}", EXIT_USAGE) from None
        except ValueError as exc:
            raise CliError(f"{source}: not valid JSON: {exc}", EXIT_USAGE) from None
        if not isinstance(loaded, dict):
            raise CliError(f"{source}: the request must be a JSON object ({{...}}), got "
                           f"{_kind(loaded)}", EXIT_USAGE)
        request = loaded
    elif not sets:
        raise CliError("no request: give REQUEST.json, '-' to read it from stdin, or "
                       "--set key=value", EXIT_USAGE)
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CliError(f"--set {item!r}: expected KEY=VALUE", EXIT_USAGE)
        path = key.split(".")
        if any(not part for part in path):
            raise CliError(f"--set {item!r}: empty part in the key {key!r}", EXIT_USAGE)
        target = request
        for part in path[:-1]:
            child = target.get(part)
            if child is None:
                child = target[part] = {}
            elif not isinstance(child, dict):
                raise CliError(f"--set {item!r}: {part!r} is {_kind(child)}, not an object",
                               EXIT_USAGE)
            target = child
        target[path[-1]] = parse_value(raw)
    return request


def parse_value(raw: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true/false/null, lists, objects,
    quoted strings), else the text itself."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except ValueError:
        return raw


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------- following


class Follow:
    """The statuses of one request per service, and when it is over."""

    def __init__(self, request_id: str, services: int | list[str] | None):
        self.request_id = request_id
        self.wanted = services
        self.services: dict[str, list[list[Any]]] = {}
        self.last_change = time.monotonic()
        self.progress: dict[str, dict] = {}

    def add(self, source: str, action: str | None, message: Any) -> None:
        self.services.setdefault(source, []).append([action, message])
        self.last_change = time.monotonic()

    def final(self, name: str) -> bool:
        statuses = self.services.get(name)
        return bool(statuses) and statuses[-1][0] in (ACTION_REQUEST_SUCCESS,
                                                      ACTION_REQUEST_FAIL)

    def done(self) -> bool:
        reported = list(self.services)
        if not all(self.final(name) for name in reported):
            return False
        if isinstance(self.wanted, list):
            return all(self.final(name) for name in self.wanted)
        if isinstance(self.wanted, int):
            return len(reported) >= self.wanted
        return bool(reported) and time.monotonic() - self.last_change >= SETTLE_S

    def failed(self) -> list[tuple[str, Any]]:
        return [(name, statuses[-1][1]) for name, statuses in sorted(self.services.items())
                if statuses[-1][0] == ACTION_REQUEST_FAIL]

    def missing(self) -> str:
        """The services that did not finish, for the timeout message."""
        parts = []
        names = list(self.wanted) if isinstance(self.wanted, list) else []
        names += [name for name in sorted(self.services) if name not in names]
        for name in names:
            if self.final(name):
                continue
            statuses = self.services.get(name)
            parts.append(f"{name} (last status {statuses[-1][0]})" if statuses
                         else f"{name} (no status)")
        if isinstance(self.wanted, int) and len(self.services) < self.wanted:
            parts.append(f"{len(self.services)} of {self.wanted} expected services reported")
        if self.wanted is None and not self.services:
            parts.append("no service reported")
        return ", ".join(parts)

    def partial(self) -> list[tuple[str, Any]]:
        """The services that succeeded with a partial result (a writer's ``outcome``)."""
        return [(name, statuses[-1][1]) for name, statuses in sorted(self.services.items())
                if statuses[-1][0] == ACTION_REQUEST_SUCCESS
                and isinstance(statuses[-1][1], dict)
                and statuses[-1][1].get("outcome") == "partial"]

    def outcome(self) -> str:
        if self.failed():
            return ACTION_REQUEST_FAIL
        return "partial" if self.partial() else ACTION_REQUEST_SUCCESS

    def as_dict(self, status: str, tag: str) -> dict[str, Any]:
        return {"request_id": self.request_id, "tag": tag, "status": status,
                "services": self.services, "progress": self.progress or None}


class Printer:
    """The live lines: statuses as they come, progress (in place on a terminal)."""

    ACTION_STYLE = {ACTION_REQUEST_START: (YELLOW, "start"),
                    ACTION_REQUEST_SUCCESS: (GREEN, "success"),
                    ACTION_REQUEST_FAIL: (RED, "fail")}

    def __init__(self, out: Out, enabled: bool):
        self.out = out
        self.enabled = enabled
        self.progress_text = ""  # the in-place progress line shown on a terminal
        self.progress_printed: dict[str, float] = {}

    def status(self, when: float, source: str, action: str | None, message: Any) -> None:
        if not self.enabled:
            return
        colour, word = self.ACTION_STYLE.get(action or "", ("", str(action)))
        text = f"{_clock(when)}  {self.out.paint(source, BOLD)}  " \
               f"{self.out.paint(word.ljust(7), colour)}  {text_of(message)}".rstrip()
        self._line(text)

    def progress(self, when: float, source: str, progress: WriteProgress) -> None:
        if not self.enabled:
            return
        text = f"written {progress.n_written}/{progress.n_images}"
        if progress.n_missing:
            text += f", {progress.n_missing} missing"
        text += f"  {progress.output_file}"
        line = f"{_clock(when)}  {self.out.paint(source, BOLD)}  " \
               f"{self.out.paint('progress', DIM)}  {text}"
        done = progress.done
        if self.out.tty:  # one line updated in place; the final state stays
            self.out.write("\r\033[K" + line)
            if done:
                self.out.line()
            self.progress_text = "" if done else line
            return
        now = time.monotonic()
        if not done and now - self.progress_printed.get(source, -1e9) < PROGRESS_EVERY_S:
            return
        self.progress_printed[source] = now
        self._line(line)

    def _line(self, text: str) -> None:
        if self.out.tty and self.progress_text:
            self.out.write("\r\033[K")
            self.out.line(text)
            self.out.write(self.progress_text)
        else:
            self.out.line(text)

    def finish(self) -> None:
        if self.progress_text:
            self.out.line()
            self.progress_text = ""


def _clock(when: float) -> str:
    return datetime.fromtimestamp(when).strftime("%H:%M:%S.%f")[:-3]


class Session:
    """One run of the tool: broker client, progress followers, events for the main
    thread (every callback only queues; the main thread prints)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.events: queue.Queue[tuple] = queue.Queue()
        self.client: BrokerClient | None = None
        self.redis: redis.Redis | None = None
        self.followers: dict[str, ProgressFollower] = {}

    def connect(self) -> None:
        try:
            host, port = broker_address(self.args)
        except ValueError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        with_statuses = self.args.wait or self.args.kill
        if with_statuses and self.args.progress:
            self.redis = redis_client(self.args.redis_host, self.args.redis_port)
            self.follow_progress(self.args.tag, timeout=0)
        callback = self._on_status if with_statuses else None
        self.client = connect_broker(PROG, host, port, self.args.connect_timeout, callback)
        # give the tag's progress subscription a moment (Redis is quick or absent)
        follower = self.followers.get(self.args.tag)
        deadline = time.monotonic() + 0.5
        while follower is not None and not follower.connected and time.monotonic() < deadline:
            time.sleep(0.01)

    def follow_progress(self, service: str, timeout: float = 0.0) -> None:
        if self.redis is None or service in self.followers:
            return
        follower = ProgressFollower(
            self.redis, service,
            lambda progress: self.events.put(("progress", time.time(), service, progress)))
        self.followers[service] = follower
        follower.start(timeout=timeout)

    def _on_status(self, request_id: str | None, _request: Any, headers: dict) -> None:
        self.events.put(("status", time.time(), request_id, headers))

    def close(self) -> None:
        for follower in self.followers.values():
            follower.stop()
        if self.client is not None:
            self.client.close()
        if self.redis is not None:
            self.redis.close()


def send(session: Session, request: dict[str, Any]) -> str:
    args = session.args
    try:
        return session.client.send_request(args.tag, request, timeout=args.send_timeout,
                                           expires_s=args.start_timeout or None)
    except BrokerError as exc:
        text = str(exc)
        if "no service queue is bound" in text:
            raise CliError(f"no service is bound to tag {args.tag!r} (is it running, and "
                           f"is the tag right?): {text}", EXIT_NOT_ROUTED) from None
        if not session.client.connected:
            raise CliError(text, EXIT_UNREACHABLE) from None
        raise CliError(text, EXIT_FAILED) from None


def follow(session: Session, request_id: str, out: Out) -> int:
    args = session.args
    printer = Printer(out, enabled=not args.json)
    state = Follow(request_id, args.services)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    started = time.monotonic()
    noticed = False
    connected = True
    status = None
    try:
        while status is None:
            try:
                event = session.events.get(timeout=0.1)
            except queue.Empty:
                event = None
            if event is not None and event[0] == "status":
                _, when, rid, headers = event
                if rid == request_id:
                    source = text_of(headers.get("source")) or "?"
                    action = text_of(headers.get("action")) or None
                    state.add(source, action, headers.get("message"))
                    printer.status(when, source, action, headers.get("message"))
                    session.follow_progress(source)
            elif event is not None and event[0] == "progress":
                _, when, source, message = event
                progress = WriteProgress.from_dict(message)
                if progress is not None and progress.request_id == request_id:
                    state.progress[source] = message
                    printer.progress(when, source, progress)
            if event is not None and not session.events.empty():
                continue  # print what arrived before deciding
            if session.client.connected != connected:
                connected = session.client.connected
                note(PROG, "reconnected to RabbitMQ" if connected else
                     "lost the connection to RabbitMQ; reconnecting (statuses sent "
                     "meanwhile wait for up to a minute)")
            if state.done():
                status = state.outcome()
            elif deadline is not None and time.monotonic() >= deadline:
                status = "timeout"
            elif (not state.services and args.start_timeout
                  and time.monotonic() - started >= args.start_timeout):
                status = "not started"
            elif (not noticed and not state.services and not args.json
                  and time.monotonic() - started >= QUIET_NOTICE_S):
                noticed = True
                note(PROG, f"no service has started request {request_id} yet (busy with "
                     "another request, or not running?); still waiting")
    finally:
        printer.finish()
    if args.json:
        out.line(to_json(state.as_dict(status, args.tag)))
    if status == "not started":
        raise CliError(f"no service started request {request_id} within "
                       f"{args.start_timeout:g} s (is {args.tag}'s service running, and idle?); "
                       "the request expired from its queue and will not run later",
                       EXIT_TIMEOUT)
    if status == "timeout":
        raise CliError(f"timeout after {args.timeout:g} s: request {request_id} did not "
                       f"finish: {state.missing()}; it may still be running (stop it with: "
                       f"{PROG} {args.tag} --kill {request_id})", EXIT_TIMEOUT)
    failed = state.failed()
    if failed:
        reasons = "; ".join(f"{name} failed: {text_of(message) or '(no message)'}"
                            for name, message in failed)
        raise CliError(f"request {request_id}: {reasons}", EXIT_FAILED)
    partial = state.partial()
    if partial:
        reasons = "; ".join(f"{name} partial: {message.get('summary') or text_of(message)}"
                            for name, message in partial)
        raise CliError(f"request {request_id}: {reasons}", EXIT_PARTIAL)
    return EXIT_OK


def await_kill(session: Session, out: Out) -> int:
    """After a kill: the final status of the killed request, or exit 5 when no service
    ends it within --kill-wait (the id was not running at that tag)."""
    args = session.args
    if not args.json:
        note(PROG, f"kill for request {args.kill} sent to {args.tag}")
    deadline = time.monotonic() + args.kill_wait
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = session.events.get(timeout=left)
        except queue.Empty:
            break
        if event[0] != "status" or event[2] != args.kill:
            continue
        headers = event[3]
        action = headers.get("action")
        if action not in (ACTION_REQUEST_SUCCESS, ACTION_REQUEST_FAIL):
            continue
        source = headers.get("source")
        if args.json:
            out.line(to_json({"killed": args.kill, "tag": args.tag, "found": True,
                              "source": source, "action": action,
                              "message": headers.get("message")}))
        else:
            note(PROG, f"request {args.kill} ended at {source}: {action} "
                 f"{text_of(headers.get('message'))}")
        return EXIT_OK
    if args.json:
        out.line(to_json({"killed": args.kill, "tag": args.tag, "found": False}))
    raise CliError(f"kill for request {args.kill} sent to {args.tag}, but no service ended "
                   f"it within {args.kill_wait:g} s: no request with that id was running "
                   "there (unknown id, or it had already finished)", EXIT_NOT_ROUTED)


def run(args: argparse.Namespace, out: Out) -> int:
    if args.kill and (args.request_file is not None or args.sets):
        raise CliError("--kill sends only a kill: give no request with it", EXIT_USAGE)
    request = None if args.kill else build_request(args.request_file, args.sets)
    session = Session(args)
    request_id = None
    try:
        session.connect()
        if args.kill:
            try:
                session.client.kill_request(args.tag, args.kill, timeout=args.send_timeout)
            except BrokerError as exc:
                raise CliError(str(exc), EXIT_UNREACHABLE if not session.client.connected
                               else EXIT_FAILED) from None
            return await_kill(session, out)
        request_id = send(session, request)
        if not args.wait:
            out.line(to_json({"request_id": request_id, "tag": args.tag}) if args.json
                     else request_id)
            return EXIT_OK
        if not args.json:
            note(PROG, f"request {request_id} sent to {args.tag}")
        return follow(session, request_id, out)
    except KeyboardInterrupt:
        second_interrupt_exits()
        if request_id is not None and args.wait:
            raise CliError(f"interrupted; request {request_id} keeps running. Stop it with: "
                           f"{PROG} {args.tag} --kill {request_id}", EXIT_INTERRUPTED) from None
        raise CliError("interrupted" + ("" if args.kill or request_id else
                                        " (the request may have been sent)"),
                       EXIT_INTERRUPTED) from None
    finally:
        session.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_logging(args.verbose)
    try:
        return run(args, Out())
    except CliError as exc:
        fail(PROG, str(exc))
        return exc.code
    except KeyboardInterrupt:
        fail(PROG, "interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
