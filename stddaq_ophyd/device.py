"""StdDaqDetector: a std-daq detector writer as a classic ``ophyd.Device`` for Bluesky.

Lifecycle (every wait bounded by a timeout):
- ``stage()`` sends ONE write request to the detector's writer agent (RabbitMQ) and returns
  once std-daq started it; a refusal raises ``StdDaqError`` with std-daq's message.
- ``trigger()`` returns a Status that finishes when the written-images counter (followed
  over Redis) passes this point's target, or fails with std-daq's error text.
- ``unstage()`` kills the request and waits (bounded) until the file is closed; idempotent,
  synchronous and safe after any failure, also after a half-finished ``stage()``.
- ``kickoff()``/``complete()``/``collect()`` for fly scans write ``images_per_fly`` images
  (with ``bps.declare_stream(det, name=..., collect=True)`` as bluesky's stream plans do).
- The image is an external ``STREAM:`` key: ``collect_asset_docs()`` yields one
  ``stream_resource`` per file and one ``stream_datum`` per event, pointing at the HDF5
  dataset ``/<detector_name>/data`` (shape ``[H, W]`` per image, ``join_method: stack``).
Constructing the device contacts nothing: connections open at the first stage/kickoff.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import deque
from typing import Any

import numpy as np
from bluesky.utils import NoReplayAllowed
from event_model import compose_stream_resource
from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import Status

from fastcore.config import DetectorConfig, load_config, parse_config
from services.daq_client import DaqClient, StdDaqError, WriteRun
from services.startup import redis_client

log = logging.getLogger(__name__)

class StdDaqDetector(Device):
    """A std-daq detector (e.g. a Jungfrau) whose images std-daq writes to HDF5."""

    frames_written = Cpt(Signal, value=0, kind=Kind.hinted,
                         doc="images written in the current file")
    file_name = Cpt(Signal, value="", kind=Kind.normal, doc="file being written")
    detector_name = Cpt(Signal, value="", kind=Kind.config)
    images_per_trigger = Cpt(Signal, value=1, kind=Kind.config)
    image_shape = Cpt(Signal, value="", kind=Kind.config, doc="height x width")
    pixel_type = Cpt(Signal, value="", kind=Kind.config)
    output_template = Cpt(Signal, value="", kind=Kind.config)

    def __init__(self, name: str, *, detector_config: str | dict | DetectorConfig,
                 output_dir: str, read_dir: str | None = None,
                 writer_service: str | None = None, broker_host: str = "127.0.0.1",
                 redis_host: str = "127.0.0.1", redis_port: int = 6379,
                 images_per_trigger: int = 1, max_images: int = 1_000_000,
                 images_per_fly: int = 100, file_prefix: str = "scan",
                 stage_timeout: float = 15.0, unstage_timeout: float = 15.0,
                 trigger_timeout: float = 30.0, **kwargs):
        super().__init__(name=name, **kwargs)
        if isinstance(detector_config, DetectorConfig):
            self._config = detector_config
        elif isinstance(detector_config, dict):
            self._config = parse_config(detector_config)
        else:
            self._config = load_config(detector_config)
        if images_per_trigger < 1:
            raise ValueError(f"images_per_trigger must be >= 1, got {images_per_trigger}")
        self.output_dir = os.path.abspath(output_dir)
        self.read_dir = os.path.abspath(read_dir or output_dir)
        self.writer_service = writer_service or f"{self._config.detector_name}.writer"
        self._client_args = (broker_host, redis_host, redis_port)
        self._client: DaqClient | None = None
        self.max_images = max_images
        self.images_per_fly = images_per_fly
        self.file_prefix = file_prefix
        self.stage_timeout = stage_timeout
        self.unstage_timeout = unstage_timeout
        self.trigger_timeout = trigger_timeout
        self._run: WriteRun | None = None
        self._index = 0  # images announced to Bluesky in this file
        self._asset_docs: deque = deque()
        self._resource = None
        self._flying = False
        self.detector_name.put(self._config.detector_name)
        self.images_per_trigger.put(images_per_trigger)
        height, width = self._config.image_shape
        self.image_shape.put(f"{height} x {width}")
        self.pixel_type.put(self._config.image_dtype.str)
        self.output_template.put(os.path.join(self.output_dir, f"{file_prefix}_<uuid>.h5"))

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

    def wait_for_connection(self, timeout: float = 5.0) -> None:
        """Explicitly check that the broker answers (the device is lazy otherwise)."""
        deadline = time.monotonic() + timeout
        while not self.client.connected:
            if time.monotonic() > deadline:
                raise StdDaqError(f"std-daq broker at {self._client_args[0]} not reachable")
            time.sleep(0.05)

    # --- writing ------------------------------------------------------------------------
    def _start(self, n_images: int) -> None:
        if not os.path.isdir(self.output_dir):
            raise StdDaqError(f"output directory {self.output_dir} does not exist")
        file_name = f"{self.file_prefix}_{uuid.uuid4().hex[:12]}.h5"
        request = {"output_file": os.path.join(self.output_dir, file_name),
                   "n_images": n_images, "metadata": {"device": self.name}}
        try:
            run = self.client.start_write(request, timeout=self.stage_timeout)
        except StdDaqError as exc:
            raise StdDaqError(f"{self.name}: std-daq did not start writing: {exc}") from None
        self._run = run
        self._index = 0
        self._resource = None
        self.frames_written.put(0)
        self.file_name.put(request["output_file"])
        run.add_progress_callback(lambda n: self.frames_written.put(n))

    def _finish(self) -> None:
        """Stop the current request (if any) and wait until std-daq closed the file."""
        run, self._run = self._run, None
        if run is None:
            return
        if not run.done.is_set():
            try:
                self.client.kill(run, timeout=self.unstage_timeout)
            except StdDaqError as exc:
                raise StdDaqError(f"{self.name}: stopping the write failed: {exc}") from None
        result = run.result or {}
        if result.get("n_missing") or result.get("n_flagged") or result.get("n_absent"):
            log.warning("%s: %s", self.name, run.summary)

    def stage(self) -> list[Device]:
        self._flying = False
        staged = super().stage()
        try:
            self._start(self.max_images)
        except BaseException:
            self.unstage()
            raise
        return staged

    def unstage(self) -> list[Device]:
        try:
            self._finish()
        finally:
            unstaged = super().unstage()
        return unstaged

    def stop(self, *, success: bool = False) -> None:
        run = self._run
        if run is not None:
            run.cancel("stopped")
        self._finish()
        super().stop(success=success)

    def pause(self) -> None:
        if self._run is not None and not self._run.done.is_set():
            raise NoReplayAllowed()  # images written cannot be taken again at a replayed point
        super().pause()

    def trigger(self) -> Status:
        run = self._run
        if run is None:
            raise StdDaqError(f"{self.name}: trigger() before stage()")
        target = self._index + int(self.images_per_trigger.get())
        status = Status(obj=self, timeout=self.trigger_timeout)
        self._watch(run, target, status)
        self._announce(self._index, target)
        self._index = target
        return status

    def _watch(self, run: WriteRun, target: int, status: Status) -> None:
        lock = threading.Lock()  # progress, done and this thread may all check at once
        settled = threading.Event()  # status.done turns True only after its callbacks

        def check(_n_written: int | None = None) -> None:
            with lock:
                if settled.is_set():
                    return
                if run.n_written >= target:
                    settled.set()
                    status.set_finished()
                elif run.done.is_set() or run.interrupted:
                    message = run.interrupted or run.message or (
                        f"std-daq stopped after {run.n_written} images, before image "
                        f"{target}")
                    settled.set()
                    status.set_exception(StdDaqError(message))

        run.add_progress_callback(check)
        run.add_done_callback(check)
        check()

    # --- documents ----------------------------------------------------------------------
    @property
    def image_key(self) -> str:
        return f"{self.name}_image"

    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()
        height, width = self._config.image_shape
        description[self.image_key] = {
            "source": f"std-daq:{self._config.detector_name}", "dtype": "array",
            "shape": [height, width], "dtype_numpy": np.dtype(self._config.image_dtype).str,
            "external": "STREAM:"}
        return description

    def _announce(self, start: int, stop: int) -> None:
        """Queue the stream documents of images [start, stop) of the current file."""
        if self._resource is None:
            height, width = self._config.image_shape
            path = os.path.join(self.read_dir, os.path.basename(self.file_name.get()))
            self._resource = compose_stream_resource(
                mimetype="application/x-hdf5", uri=f"file://localhost{path}",
                data_key=self.image_key,
                parameters={"dataset": f"/{self._config.detector_name}/data",
                            "chunk_shape": [1, height, width], "join_method": "stack",
                            "swmr": True})
            self._asset_docs.append(("stream_resource",
                                     self._resource.stream_resource_doc))
        self._asset_docs.append(("stream_datum", self._resource.compose_stream_datum(
            indices={"start": start, "stop": stop})))

    def collect_asset_docs(self, index: int | None = None):
        run = self._run
        if self._flying and run is not None and run.n_written > self._index:
            stop = run.n_written if index is None else min(index, run.n_written)
            self._announce(self._index, stop)
            self._index = stop
        while self._asset_docs:
            yield self._asset_docs.popleft()

    # --- fly scans ----------------------------------------------------------------------
    def kickoff(self) -> Status:
        status = Status(obj=self, timeout=self.stage_timeout)
        self._flying = True
        try:
            self._start(self.images_per_fly)
        except StdDaqError as exc:
            status.set_exception(exc)
        else:
            status.set_finished()
        return status

    def complete(self) -> Status:
        """Finishes when std-daq wrote all images of the fly scan (immediately if nothing
        was requested)."""
        run = self._run
        status = Status(obj=self, timeout=self.trigger_timeout + self.images_per_fly)
        if run is None:
            status.set_finished()
            return status
        self._watch(run, int(run.request["n_images"]), status)
        return status

    def describe_collect(self) -> dict[str, dict]:
        """The fly scan's data keys (singly nested, for ``declare_stream``)."""
        return {self.image_key: self.describe()[self.image_key]}

    def collect(self):
        """The fly scan's images are a ``STREAM:`` key: they travel in the stream documents
        of ``collect_asset_docs`` only, so no event is yielded."""
        yield from ()
