"""StatusAggregator: the statuses of recent requests, per service, and waiting on them.

State per request id: ``{"request": <request>, "services": {<service name>: [[action,
message], ...]}}``, at most ``max_requests`` ids (100, as the original), the oldest evicted
first. Waiting uses a Condition, so a status that arrives before or while someone waits is
never missed (the original's ZMQ PUB/SUB hand-over could lose it).

A request is complete when every service that reported (or every service asked for) has a
final action (``request_success`` / ``request_fail``). Its outcome is ``request_fail`` when any
of those services failed, else ``request_success`` (the original took the last action of the
alphabetically last service).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from services.broker.protocol import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_SUCCESS,
    FINAL_ACTIONS,
)

log = logging.getLogger(__name__)

ServicesSpec = None | int | Iterable[str]
StatusChangeCallback = Callable[[str, dict[str, Any]], None]


class StatusAggregator:
    """Collects statuses (feed it with ``on_status_message``) and waits for requests.

    ``track_all=False`` keeps only ids registered with ``track()`` (a client's own
    requests). ``status_change_callback(request_id, entry)`` runs after every update, in
    the thread that fed the status; ``entry`` is a copy.
    """

    def __init__(self, status_change_callback: StatusChangeCallback | None = None,
                 max_requests: int = 100, track_all: bool = True):
        if max_requests < 1:
            raise ValueError("max_requests must be at least 1")
        self.status_change_callback = status_change_callback
        self.max_requests = max_requests
        self.track_all = track_all
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._changed = threading.Condition()

    # ------------------------------------------------------------------ feeding

    def track(self, request_id: str, request: Any = None) -> None:
        """Keep the statuses of ``request_id`` (also when ``track_all`` is False)."""
        with self._changed:
            entry = self._entry(request_id)
            if request is not None:
                entry["request"] = request

    def on_status_message(self, request_id: str | None, request: Any,
                          headers: Mapping[str, Any]) -> None:
        """Record one status (``headers``: ``action``, ``source``, ``message``)."""
        if request_id is None:
            return
        with self._changed:
            if not self.track_all and request_id not in self._entries:
                return
            entry = self._entry(request_id)
            if entry["request"] is None:
                entry["request"] = request
            source = str(headers.get("source"))
            entry["services"].setdefault(source, []).append(
                [headers.get("action"), headers.get("message")])
            snapshot = _copy(entry)
            self._changed.notify_all()
        if self.status_change_callback is not None:
            try:
                self.status_change_callback(request_id, snapshot)
            except Exception:
                log.exception("status_change_callback failed for %s", request_id)

    def _entry(self, request_id: str) -> dict[str, Any]:
        entry = self._entries.get(request_id)
        if entry is None:
            while len(self._entries) >= self.max_requests:
                self._entries.popitem(last=False)
            entry = self._entries[request_id] = {"request": None, "services": {}}
        return entry

    # ------------------------------------------------------------------ reading

    def __contains__(self, request_id: str) -> bool:
        with self._changed:
            return request_id in self._entries

    def __len__(self) -> int:
        with self._changed:
            return len(self._entries)

    def request_ids(self) -> list[str]:
        """The ids kept, oldest first."""
        with self._changed:
            return list(self._entries)

    def get(self, request_id: str) -> dict[str, Any] | None:
        """A copy of the entry of ``request_id``, None when unknown or evicted."""
        with self._changed:
            entry = self._entries.get(request_id)
            return None if entry is None else _copy(entry)

    def wait(self, request_id: str, services: ServicesSpec = None, timeout: float = 10.0,
             until: str = "final") -> dict[str, Any]:
        """Wait until the services of ``request_id`` have a final action (``until="final"``)
        or have reported at all (``until="start"``); return ``{"request_id", "request",
        "services", "status"}`` (status: the outcome, None if not final).

        ``services``: None = every service that reported (at least one); a list of names =
        those; an int n = at least n services, and every one that reported. Raise
        TimeoutError naming what is missing.
        """
        if until not in ("final", "start"):
            raise ValueError("until must be 'final' or 'start'")
        wanted = services if services is None or isinstance(services, int) else list(services)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                entry = self._entries.get(request_id)
                missing = _missing(entry, wanted, until)
                if not missing:
                    return _result(request_id, entry, wanted)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    what = "complete" if until == "final" else "started"
                    raise TimeoutError(
                        f"request {request_id} not {what} after {timeout:g} s: {missing}")
                self._changed.wait(remaining)

    def wait_for_complete(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The original's call: ``{"status": <outcome>, "request_details": <request>}`` once
        every service seen so far has finished; TimeoutError otherwise."""
        try:
            result = self.wait(request_id, None, timeout)
        except TimeoutError:
            raise TimeoutError("The request did not complete in time.") from None
        return {"status": result["status"], "request_details": result["request"]}


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    return {"request": entry["request"],
            "services": {name: [list(s) for s in statuses]
                         for name, statuses in entry["services"].items()}}


def _done(statuses: list[list[Any]], until: str) -> bool:
    return bool(statuses) and (until == "start" or statuses[-1][0] in FINAL_ACTIONS)


def _missing(entry: dict[str, Any] | None, wanted: int | list[str] | None,
             until: str) -> str:
    """Why the request is not there yet ("" when it is)."""
    reported = entry["services"] if entry is not None else {}
    state = "not finished" if until == "final" else "not started"
    if isinstance(wanted, list):
        names = [n for n in wanted if not _done(reported.get(n, []), until)]
    else:
        names = [n for n, s in sorted(reported.items()) if not _done(s, until)]
    parts = [f"{n} ({_last(reported.get(n))})" for n in names]
    if isinstance(wanted, int):
        n_done = sum(_done(s, until) for s in reported.values())
        if n_done < wanted:
            parts.append(f"{n_done} of {wanted} services {state.split()[1]}")
    elif wanted is None and not reported:
        parts.append("no service has reported yet")
    return f"{state}: " + ", ".join(parts) if parts else ""


def _last(statuses: list[list[Any]] | None) -> str:
    return f"last status {statuses[-1][0]}" if statuses else "no status yet"


def _result(request_id: str, entry: dict[str, Any] | None,
            wanted: int | list[str] | None) -> dict[str, Any]:
    copy = _copy(entry) if entry is not None else {"request": None, "services": {}}
    services = copy["services"]
    names = wanted if isinstance(wanted, list) else list(services)
    finals = [services[n][-1][0] for n in names if services.get(n)]
    if finals and all(a in FINAL_ACTIONS for a in finals):
        status = ACTION_REQUEST_FAIL if ACTION_REQUEST_FAIL in finals else ACTION_REQUEST_SUCCESS
    else:
        status = None
    return {"request_id": request_id, "request": copy["request"], "services": services,
            "status": status}
