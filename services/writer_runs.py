"""A write request's run on the h5 writer(s): start it, follow the events, build the result.

:class:`SingleRun` drives the one writer of a detector; :class:`SplitRun` the
``n_writers`` writers of a run spread over several (fastcore/writer_split.py), and the
master file that joins their files. Both end with :func:`run_result`, the dict a write
request's success carries.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from fastcore.file_layout import writer_file
from fastcore.writer_protocol import (
    COMPLETED,
    BeginCommand,
    Heartbeat,
    MasterCommand,
    MasterWritten,
    RunFirstImage,
    RunInfo,
    RunProgress,
    RunStarted,
    RunSummary,
    StartCommand,
    StopCommand,
    WriterEvent,
    WriterFailure,
)
from fastcore.writer_split import Split
from services.progress import WriteProgress
from services.requests import RequestError
from services.writer_link import WriterError, WriterLink

if TYPE_CHECKING:
    from services.writer_agent import WriterAgent, WriteRequest

START_TIMEOUT_S = 10.0  # the writer opens the file before it confirms a start


def run_result(summary: RunSummary, run_id: int, n_requested: int, killed: bool) -> dict:
    """What a write request that ran reports (its ``success`` message)."""
    return {"output_file": summary.output_file, "run_id": run_id,
            "outcome": summary.outcome, "n_images": summary.n_written,
            "n_requested": n_requested, "n_missing": summary.n_missing,
            "missing_image_ids": summary.missing_image_ids, "n_good": summary.n_good,
            "n_flagged": summary.n_flagged, "n_absent": summary.n_absent,
            "absent_ranges": summary.absent_ranges, "killed": killed,
            "first_row": summary.first_row, "summary": summary.describe()}


class SingleRun:
    """One request's run: start the writer, follow its events, build the result."""

    def __init__(self, agent: WriterAgent, link: WriterLink, request_id: str,
                 write: WriteRequest):
        self.agent, self.link, self.request_id, self.write = agent, link, request_id, write
        self.run_id = write.run_id if write.run_id is not None else time.time_ns()
        self.info = RunInfo(write.output_file, write.n_images, write.metadata, write.user_id,
                            write.compression, write.append)
        self.image_timeout_s = write.image_timeout or agent.image_timeout_s
        self.progress = {"n_rows": 0, "n_written": 0, "n_missing": 0}
        self.summary: RunSummary | None = None
        self.writer_pid: int | None = None

    def start(self) -> None:
        """Have the writer open the run; WriterError with the writer's reason if it cannot."""
        self.link.drain()
        self.link.send(StartCommand(self.run_id, self.info, self.image_timeout_s,
                                    self.write.start_image_id).to_json())
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            event = self.link.receive(deadline - time.monotonic())
            if event is None:
                raise WriterError(f"h5 writer for {self.agent.config.detector_name} did not "
                                  f"confirm the start within {START_TIMEOUT_S:g} s: is "
                                  "stddaq-h5-writer running?")
            if event.run_id != self.run_id:
                continue
            if isinstance(event, WriterFailure):
                raise WriterError(f"h5 writer: {event.message}")
            self._on_event(event)
            if isinstance(event, Heartbeat):  # the run is open; its start event was lost
                self._report()
            return

    def follow(self) -> dict:
        """Relay progress until the writer's summary; stop the run on a kill."""
        agent, timeout = self.agent, self.agent.writer_timeout_s
        heard = time.monotonic()
        stop_sent = False
        while self.summary is None:
            if agent._kill.is_set() and not stop_sent:
                self.link.send(StopCommand(self.run_id).to_json())
                stop_sent = True
            event = self.link.receive(0.1)
            now = time.monotonic()
            if event is not None:
                heard = now
                self._on_event(event)
            elif now - heard > timeout:
                raise WriterError(f"h5 writer for {agent.config.detector_name} stopped "
                                  f"answering (no heartbeat for {timeout:g} s) "
                                  f"{self._written()}; a restarted stddaq-h5-writer "
                                  "repairs it")
        summary = self.summary
        self._report(done=True)
        if summary.outcome == "fail":
            raise WriterError(f"{summary.message or summary.reason}; {summary.describe()}")
        return run_result(summary, self.run_id, self.write.n_images, stop_sent)

    def _on_event(self, event: WriterEvent) -> None:
        if isinstance(event, Heartbeat):
            pid = event.pid
            if self.writer_pid is not None and pid != self.writer_pid:
                raise WriterError(f"h5 writer for {self.agent.config.detector_name} "
                                  f"restarted during the run (pid {self.writer_pid} -> {pid}) "
                                  f"{self._written()}")
            self.writer_pid = pid
            return
        if event.run_id != self.run_id:
            return
        if isinstance(event, RunStarted):
            self._report()
        elif isinstance(event, RunProgress):
            self.progress.update(n_rows=event.n_rows, n_written=event.n_written,
                                 n_missing=event.n_missing)
            self._report()
        elif isinstance(event, RunSummary):
            self.summary = event
            self.progress.update(n_rows=event.n_rows, n_written=event.n_written,
                                 n_missing=event.n_missing)
        elif isinstance(event, WriterFailure):
            raise WriterError(f"h5 writer: {event.message}")

    def _written(self) -> str:
        """What the file holds when the writer went away mid-run."""
        return (f"after {self.progress['n_rows']} of {self.write.n_images} images: "
                f"{self.write.output_file} holds the images written")

    def _report(self, done: bool = False) -> None:
        self.agent.progress(WriteProgress(self.request_id, self.run_id, self.write.output_file,
                                          self.write.n_images, **self.progress,
                                          done=done).to_dict())


class SplitRun:
    """A run spread over the detector's ``n_writers`` writers, joined by a master file.

    Every writer opens its file (writer ``i`` of ``output_file`` ``<stem>_w<i>.h5``), then
    writer 0 lays out the master under the requested name, so the request is announced as
    started only when all files are open. Writer 0 reports the run's first image; the
    others begin there. A writer that fails, or goes silent for ``writer_timeout_s``,
    stops the others and fails the request; the master stays valid and as long as what
    was written.
    """

    def __init__(self, agent: WriterAgent, links: list[WriterLink], request_id: str,
                 write: WriteRequest):
        self.agent, self.links, self.request_id, self.write = agent, links, request_id, write
        config = agent.config
        self.n_writers, self.frames_per_block = len(links), config.frames_per_block
        self.run_id = write.run_id if write.run_id is not None else time.time_ns()
        self.files = [writer_file(write.output_file, i, self.n_writers)
                      for i in range(self.n_writers)]
        self.image_timeout_s = write.image_timeout or agent.image_timeout_s
        self.started: dict[int, RunStarted] = {}
        self.progress: dict[int, RunProgress] = {}
        self.summaries: dict[int, RunSummary] = {}
        self.pids: dict[int, int] = {}
        self.heard = [time.monotonic()] * self.n_writers
        self.master_start: int | None = None
        self.begun = write.start_image_id is not None
        self.stop_sent = False
        self.poller = zmq.Poller()
        for link in links:
            self.poller.register(link.events, zmq.POLLIN)

    # --- start ------------------------------------------------------------------------

    def start(self) -> None:
        """Open every writer's file and the master; WriterError naming the writer that
        cannot (the others are stopped)."""
        write = self.write
        if not write.append and os.path.lexists(write.output_file):
            raise RequestError(f"output_file: {write.output_file} exists (a run spread over "
                               f"{self.n_writers} writers makes it its master file)")
        for link in self.links:
            link.drain()
        try:
            for i, link in enumerate(self.links):
                info = RunInfo(self.files[i], write.n_images, write.metadata, write.user_id,
                               write.compression, write.append)
                link.send(StartCommand(self.run_id, info, self.image_timeout_s,
                                       write.start_image_id, split=Split(
                                           i, self.n_writers, self.frames_per_block)).to_json())
            self._wait_for(lambda: len(self.started) == self.n_writers, "open their files")
            self.links[0].send(MasterCommand(
                self.run_id, write.output_file, self.files, self.frames_per_block,
                [self.started[i].first_row for i in range(self.n_writers)], write.append,
                write.user_id, write.metadata).to_json())
            self._wait_for(lambda: self.master_start is not None, "lay out the master file")
        except BaseException:
            self._stop_all()
            raise
        self._report()

    def _wait_for(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not done():
            if time.monotonic() > deadline:
                missing = [i for i in range(self.n_writers) if i not in self.started]
                raise WriterError(f"h5 writers {missing or [0]} of "
                                  f"{self.agent.config.detector_name} did not {what} within "
                                  f"{START_TIMEOUT_S:g} s: are the {self.n_writers} "
                                  "stddaq-h5-writer processes running?")
            self._poll(0.1)

    # --- follow -----------------------------------------------------------------------

    def follow(self) -> dict:
        """Relay the writers' progress until every summary is in; stop them on a kill."""
        agent = self.agent
        try:
            while len(self.summaries) < self.n_writers:
                if agent._kill.is_set() and not self.stop_sent:
                    self._stop_all()
                self._poll(0.1)
                now = time.monotonic()
                for i in range(self.n_writers):
                    if i not in self.summaries and now - self.heard[i] > agent.writer_timeout_s:
                        raise WriterError(
                            f"h5 writer {i} of {agent.config.detector_name} stopped answering "
                            f"(no heartbeat for {agent.writer_timeout_s:g} s) {self._written()}"
                            f"; a restarted stddaq-h5-writer repairs its file")
        except WriterError:
            self._stop_all()
            raise
        summary = self._combined()
        self._report(done=True)
        failed = [s for s in self.summaries.values() if s.outcome == "fail"]
        if failed:
            raise WriterError(f"{failed[0].message or failed[0].reason}; "
                              f"{summary.describe()}")
        result = run_result(summary, self.run_id, self.write.n_images, self.stop_sent)
        return result | {"writer_files": self.files}

    def _poll(self, timeout_s: float) -> None:
        ready = dict(self.poller.poll(int(timeout_s * 1000)))
        for i, link in enumerate(self.links):
            if link.events in ready:
                while (event := link.receive(0)) is not None:
                    self.heard[i] = time.monotonic()
                    self._on_event(i, event)

    def _on_event(self, i: int, event: WriterEvent) -> None:
        if isinstance(event, Heartbeat):
            known = self.pids.setdefault(i, event.pid)
            if known != event.pid:
                raise WriterError(f"h5 writer {i} of {self.agent.config.detector_name} "
                                  f"restarted during the run (pid {known} -> {event.pid}) "
                                  f"{self._written()}")
            return
        if event.run_id != self.run_id:
            return
        if isinstance(event, RunStarted):
            self.started[i] = event
        elif isinstance(event, MasterWritten):
            self.master_start = event.master_start
        elif isinstance(event, RunFirstImage) and not self.begun:
            self.begun = True
            for link in self.links[1:]:
                link.send(BeginCommand(self.run_id, event.first_image_id).to_json())
        elif isinstance(event, RunProgress):
            self.progress[i] = event
            self._report()
        elif isinstance(event, RunSummary):
            self.summaries[i] = event
        elif isinstance(event, WriterFailure):
            raise WriterError(f"h5 writer {i}: {event.message}")

    def _stop_all(self) -> None:
        """Stop every writer's run (those that opened one close it valid)."""
        self.stop_sent = True
        for link in self.links:
            with contextlib.suppress(WriterError):
                link.send(StopCommand(self.run_id).to_json(), timeout_s=0.2)

    # --- what the run did -------------------------------------------------------------

    def _combined(self) -> RunSummary:
        """The writers' summaries as one, for the master file."""
        parts = [self.summaries[i] for i in range(self.n_writers)]
        flagged: dict[str, int] = {}
        for part in parts:
            for flag, n in part.n_flagged.items():
                flagged[flag] = flagged.get(flag, 0) + n
        reasons = [part.reason for part in parts]
        reason = next((r for r in reasons if r != COMPLETED), COMPLETED)
        return RunSummary(
            run_id=self.run_id, output_file=self.write.output_file,
            n_images=self.write.n_images, reason=reason,
            message="; ".join(p.message for p in parts if p.message),
            n_written=sum(p.n_written for p in parts),
            n_missing=sum(p.n_missing for p in parts), n_good=sum(p.n_good for p in parts),
            n_flagged=flagged, n_absent=sum(p.n_absent for p in parts),
            absent_ranges=merged_ranges([r for p in parts for r in p.absent_ranges]),
            missing_image_ids=sorted(i for p in parts for i in p.missing_image_ids),
            n_id_resets=sum(p.n_id_resets for p in parts), first_row=self.master_start or 0)

    def _rows(self) -> dict[str, int]:
        """Rows written so far, over all writers (their summaries once in)."""
        latest = [self.summaries.get(i) or self.progress.get(i) for i in range(self.n_writers)]
        latest = [p for p in latest if p is not None]
        return {"n_rows": sum(p.n_rows for p in latest),
                "n_written": sum(p.n_written for p in latest),
                "n_missing": sum(p.n_missing for p in latest)}

    def _written(self) -> str:
        return (f"after {self._rows()['n_rows']} of {self.write.n_images} images: "
                f"{self.write.output_file} (master of {len(self.files)} files) holds the "
                "images written")

    def _report(self, done: bool = False) -> None:
        self.agent.progress(WriteProgress(self.request_id, self.run_id, self.write.output_file,
                                          self.write.n_images, **self._rows(),
                                          done=done).to_dict())


def merged_ranges(ranges: list[list[int]]) -> list[list[int]]:
    """Inclusive id ranges, sorted, with touching or overlapping ranges joined."""
    merged: list[list[int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return merged
