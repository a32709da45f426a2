"""What both std-daq devices share (the classic ``ophyd.Device`` and the ophyd-async
``StandardDetector``): requests, progress and stream documents.

A scan writes one file. Every acquisition (a step scan's trigger, a fly scan's kickoff) is
one write request to the detector's writer agent with ``append: true``: std-daq adds the
next ``n`` images that reach its buffer to the file's rows, so the file holds exactly the
images the scan asked for, in order, and event ``i`` of ``k`` images per event is rows
``[i * k, (i + 1) * k)``. Rows are followed through the writer's progress (Redis) and, when
a request ends, its result (``first_row`` + rows written). Thread-based, like DaqClient:
the ophyd-async device awaits it from its event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from event_model import compose_stream_resource

from fastcore.config import DetectorConfig
from fastcore.status import redis_client
from services.daq_client import DaqClient, StdDaqError, WriteRun

log = logging.getLogger(__name__)


def image_data_key(config: DetectorConfig, per_event: int | None) -> dict[str, Any]:
    """The event descriptor's data key of the images: ``[H, W]`` per event
    (``per_event`` None), else ``[per_event, H, W]``."""
    height, width = config.image_shape
    shape = [height, width] if per_event is None else [per_event, height, width]
    return {"source": f"std-daq:{config.detector_name}", "dtype": "array", "shape": shape,
            "dtype_numpy": np.dtype(config.image_dtype).str, "external": "STREAM:"}


class StreamDocuments:
    """The stream documents of one file: one ``stream_resource``, then ``stream_datum``s
    whose indices count events (``join_method: stack``, one image per chunk)."""

    def __init__(self, config: DetectorConfig, data_key: str, uri: str):
        height, width = config.image_shape
        self.resource = compose_stream_resource(
            mimetype="application/x-hdf5", uri=uri,
            data_key=data_key,
            parameters={"dataset": f"/{config.detector_name}/data",
                        "chunk_shape": [1, height, width], "join_method": "stack",
                        "swmr": True})
        self.emitted = 0  # events announced

    def until(self, n_events: int) -> list[tuple[str, dict]]:
        """The documents announcing events ``[emitted, n_events)`` (none if nothing new)."""
        if n_events <= self.emitted:
            return []
        docs = [] if self.emitted else [("stream_resource", self.resource.stream_resource_doc)]
        docs.append(("stream_datum", self.resource.compose_stream_datum(
            indices={"start": self.emitted, "stop": n_events})))
        self.emitted = n_events
        return docs


class Acquisition:
    """One detector's acquisitions into a scan's file through std-daq (see the module
    docstring). ``on_rows(rows)`` is called, from any thread, whenever the file grew."""

    def __init__(self, config: DetectorConfig, writer_service: str, *,
                 broker_host: str = "127.0.0.1", redis_host: str = "127.0.0.1",
                 redis_port: int = 6379, start_timeout: float = 15.0,
                 stop_timeout: float = 15.0, metadata: dict | None = None):
        self.config = config
        self.writer_service = writer_service
        self._client_args = (broker_host, redis_host, redis_port)
        self._client: DaqClient | None = None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.metadata = metadata or {}
        self.output_file: str | None = None
        self.run: WriteRun | None = None
        self._rows = 0  # rows of the requests that ended
        self._booked: WriteRun | None = None  # the last request whose rows are in _rows
        self._lock = threading.Lock()
        self._row_callbacks: list[Callable[[int], None]] = []

    # --- connection ---------------------------------------------------------------------
    @property
    def client(self) -> DaqClient:
        """The std-daq client, connected on first use."""
        if self._client is None:
            broker_host, redis_host, redis_port = self._client_args
            self._client = DaqClient(self.writer_service, broker_host,
                                     redis_client(redis_host, redis_port))
            self._client.start()
        return self._client

    def check_ready(self, timeout: float) -> None:
        """StdDaqError unless the writer agent runs (fresh status in Redis) and the broker
        answers within ``timeout``."""
        client = self.client
        client.check_agent(self.config.detector_name)
        deadline = time.monotonic() + timeout
        while not client.connected:
            if time.monotonic() > deadline:
                raise StdDaqError(f"std-daq broker at {self._client_args[0]} not reachable "
                                  f"within {timeout:g} s")
            time.sleep(0.02)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- the file and its rows ----------------------------------------------------------
    def open_file(self, output_file: str) -> None:
        """Make ``output_file`` the file of the next acquisitions (std-daq creates it with
        the first one)."""
        self.output_file = output_file
        self.run = self._booked = None
        self._rows = 0
        self._notify()

    @property
    def rows(self) -> int:
        """Rows of the file: those of ended requests plus the running one's progress."""
        run = self.run
        return self._rows + (run.n_rows if run is not None and run is not self._booked else 0)

    def add_rows_callback(self, callback: Callable[[int], None]) -> None:
        with self._lock:
            self._row_callbacks.append(callback)

    def _notify(self, *_: object) -> None:
        rows = self.rows
        with self._lock:
            callbacks = list(self._row_callbacks)
        for callback in callbacks:
            callback(rows)

    def _settle(self, run: WriteRun) -> None:
        """Book a finished request's rows (once): the writer's ``first_row`` + rows."""
        with self._lock:
            if run is self._booked or run is not self.run:
                return
            result = run.result or {}
            first_row = result.get("first_row")
            base = first_row if isinstance(first_row, int) else self._rows
            self._rows = base + run.n_rows
            self._booked = run
        self._notify()

    # --- requests -----------------------------------------------------------------------
    def acquire(self, n_images: int) -> WriteRun:
        """Request the next ``n_images`` images, appended to the file; returns once std-daq
        started the request. StdDaqError with std-daq's message when it is refused."""
        if self.output_file is None:
            raise StdDaqError("no file chosen for the acquisition (open_file first)")
        previous = self.run
        if previous is not None and not previous.done.is_set() \
                and previous.n_rows >= int(previous.request["n_images"]):
            previous.done.wait(self.stop_timeout)  # all written: std-daq closes the file
        if previous is not None and not previous.done.is_set():
            raise StdDaqError(f"the previous acquisition of {n_images} images into "
                              f"{self.output_file} is still running")
        if previous is not None:
            self._settle(previous)
        request = {"output_file": self.output_file, "n_images": n_images, "append": True,
                   "metadata": self.metadata}
        run = self.client.start_write(request, timeout=self.start_timeout)
        self.run = run
        run.add_progress_callback(self._notify)
        run.add_done_callback(lambda: self._settle(run))
        return run

    @staticmethod
    def failure(run: WriteRun) -> str | None:
        """Why an ended request did not write all its images (None: it did)."""
        if run.failed:
            return run.message or "the write failed"
        if run.interrupted:
            return run.interrupted
        requested = int(run.request["n_images"])
        if run.n_rows < requested:
            return f"std-daq wrote {run.n_rows} of {requested} images: {run.summary}"
        if run.outcome == "partial":
            log.warning("%s: %s", run.request["output_file"], run.summary)
        return None

    def stop(self) -> None:
        """End the running request (a kill) and wait, bounded, until std-daq closed the
        file; nothing to do when none runs. StdDaqError when std-daq does not answer."""
        run = self.run
        if run is None:
            return
        if not run.done.is_set():
            self.client.kill(run, timeout=self.stop_timeout)
        self._settle(run)
