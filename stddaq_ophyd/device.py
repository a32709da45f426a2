"""StdDaqDetector: a std-daq detector writer as a classic ``ophyd.Device`` for Bluesky.

Lifecycle (every wait bounded by a timeout):
- ``stage()`` checks that std-daq's writer agent runs and chooses the scan's file
  (``<output_dir>/<file_prefix>_<uuid>.h5``); a writer agent that is not there raises
  ``StdDaqError``.
- ``trigger()`` requests the next ``images_per_trigger`` images, appended to the file, and
  returns a Status that finishes when std-daq wrote them, or fails with std-daq's message:
  the file holds exactly the images the events point at (``count(num=10)``: 10 rows).
- ``unstage()`` ends a request still running and waits (bounded) until the file is closed;
  idempotent, synchronous and safe after any failure, also after a half-finished stage.
- ``kickoff()``/``complete()``/``collect()`` for fly scans write ``images_per_fly`` images
  (with ``bps.declare_stream(det, name=..., collect=True)`` as bluesky's stream plans do),
  into the staged scan's file, or a new one when not staged.
- The image is an external ``STREAM:`` key: ``collect_asset_docs()`` yields one
  ``stream_resource`` per file and ``stream_datum``s whose indices count events, pointing at
  the HDF5 dataset ``/<detector_name>/data`` (shape ``[H, W]`` per event, ``[k, H, W]`` with
  ``k = images_per_trigger > 1``).
Requests, progress and documents are shared with the ophyd-async device
(``stddaq_ophyd._acquisition``). Constructing the device contacts nothing: connections
open at the first stage/kickoff.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any

from bluesky.utils import NoReplayAllowed
from ophyd import Component as Cpt
from ophyd import Device, Kind, Signal
from ophyd.status import Status

from fastcore.config import DetectorConfig, load_config, parse_config
from services.daq_client import DaqClient, StdDaqError, WriteRun
from stddaq_ophyd._acquisition import Acquisition, StreamDocuments, image_data_key


def as_detector_config(config: str | dict | DetectorConfig) -> DetectorConfig:
    """A detector config from a path, a dict or itself."""
    if isinstance(config, DetectorConfig):
        return config
    return parse_config(config) if isinstance(config, dict) else load_config(config)


class StdDaqDetector(Device):
    """A std-daq detector (e.g. a Jungfrau) whose images std-daq writes to HDF5."""

    frames_written = Cpt(Signal, value=0, kind=Kind.hinted,
                         doc="images (rows) in the current file")
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
                 images_per_trigger: int = 1, images_per_fly: int = 100,
                 file_prefix: str = "scan", stage_timeout: float = 15.0,
                 unstage_timeout: float = 15.0, trigger_timeout: float = 30.0, **kwargs):
        super().__init__(name=name, **kwargs)
        self._config = as_detector_config(detector_config)
        if images_per_trigger < 1:
            raise ValueError(f"images_per_trigger must be >= 1, got {images_per_trigger}")
        if images_per_fly < 1:
            raise ValueError(f"images_per_fly must be >= 1, got {images_per_fly}")
        self.output_dir = os.path.abspath(output_dir)
        self.read_dir = os.path.abspath(read_dir or output_dir)
        self.acquisition = Acquisition(
            self._config, writer_service or f"{self._config.detector_name}.writer",
            broker_host=broker_host, redis_host=redis_host, redis_port=redis_port,
            start_timeout=stage_timeout, stop_timeout=unstage_timeout,
            metadata={"device": name})
        self.acquisition.add_rows_callback(self.frames_written.put)
        self.images_per_fly = images_per_fly
        self.file_prefix = file_prefix
        self.stage_timeout = stage_timeout
        self.trigger_timeout = trigger_timeout
        self._docs: StreamDocuments | None = None
        self._per_event = images_per_trigger  # images per event of the open file
        self._staged_file = False
        self.detector_name.put(self._config.detector_name)
        self.images_per_trigger.put(images_per_trigger)
        height, width = self._config.image_shape
        self.image_shape.put(f"{height} x {width}")
        self.pixel_type.put(self._config.image_dtype.str)
        self.output_template.put(os.path.join(self.output_dir, f"{file_prefix}_<uuid>.h5"))

    # --- connection ---------------------------------------------------------------------
    @property
    def writer_service(self) -> str:
        return self.acquisition.writer_service

    @writer_service.setter
    def writer_service(self, name: str) -> None:
        self.acquisition.writer_service = name

    @property
    def client(self) -> DaqClient:
        """The std-daq client, connected on first use."""
        return self.acquisition.client

    def wait_for_connection(self, timeout: float = 5.0) -> None:
        """Explicitly check that std-daq's writer agent and broker answer (the device is
        lazy otherwise)."""
        self.acquisition.check_ready(timeout)

    # --- the scan's file ----------------------------------------------------------------
    def _open_file(self, per_event: int) -> None:
        if not os.path.isdir(self.output_dir):
            raise StdDaqError(f"output directory {self.output_dir} does not exist")
        file_name = f"{self.file_prefix}_{uuid.uuid4().hex[:12]}.h5"
        path = os.path.join(self.output_dir, file_name)
        self.acquisition.open_file(path)
        self._per_event = per_event
        self._docs = StreamDocuments(
            self._config, self.image_key,
            f"file://localhost{os.path.join(self.read_dir, file_name)}")
        self.file_name.put(path)

    def _close_file(self) -> None:
        """End a request still running (bounded wait until std-daq closed the file)."""
        try:
            self.acquisition.stop()
        except StdDaqError as exc:
            raise StdDaqError(f"{self.name}: stopping the write failed: {exc}") from None

    def stage(self) -> list[Device]:
        staged = super().stage()
        try:
            self.acquisition.check_ready(self.stage_timeout)
            self._open_file(int(self.images_per_trigger.get()))
            self._staged_file = True
        except BaseException:
            self.unstage()
            raise
        return staged

    def unstage(self) -> list[Device]:
        try:
            self._close_file()
        finally:
            self._staged_file = False
            unstaged = super().unstage()
        return unstaged

    def stop(self, *, success: bool = False) -> None:
        run = self.acquisition.run
        if run is not None:
            run.cancel("stopped")
        self._close_file()
        super().stop(success=success)

    def pause(self) -> None:
        run = self.acquisition.run
        if run is not None and not run.done.is_set():
            raise NoReplayAllowed()  # images written cannot be taken again at a replayed point
        super().pause()

    # --- step scans ---------------------------------------------------------------------
    def trigger(self) -> Status:
        if self._docs is None or not self._staged_file:
            raise StdDaqError(f"{self.name}: trigger() before stage()")
        status = Status(obj=self, timeout=self.trigger_timeout)
        self._acquire(self._per_event, status, wait=True)
        return status

    def _acquire(self, n_images: int, status: Status, wait: bool) -> None:
        """Start a request in a thread (the RunEngine never blocks on the broker); finish
        ``status`` when it started (``wait`` False) or when it wrote its images."""

        def start() -> None:
            try:
                run = self.acquisition.acquire(n_images)
            except StdDaqError as exc:
                status.set_exception(StdDaqError(f"{self.name}: {exc}"))
                return
            if wait:
                self._watch(run, status)
            else:
                status.set_finished()

        threading.Thread(target=start, name=f"{self.name} request", daemon=True).start()

    def _watch(self, run: WriteRun, status: Status) -> None:
        """Finish ``status`` when ``run`` wrote all its images; fail it with std-daq's
        message when it ended short (or the wait was cancelled)."""
        lock = threading.Lock()  # progress, done and this thread may all check at once
        settled = threading.Event()  # status.done turns True only after its callbacks

        def check(_n: int | None = None) -> None:
            with lock:
                if settled.is_set() or not (run.done.is_set() or run.interrupted):
                    return
                settled.set()
            failure = Acquisition.failure(run)
            if failure is None:
                status.set_finished()
            else:
                status.set_exception(StdDaqError(f"{self.name}: {failure}"))

        run.add_progress_callback(check)
        run.add_done_callback(check)

    # --- documents ----------------------------------------------------------------------
    @property
    def image_key(self) -> str:
        return f"{self.name}_image"

    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()
        per_event = self._per_event if self._per_event > 1 else None
        description[self.image_key] = image_data_key(self._config, per_event)
        return description

    def collect_asset_docs(self, index: int | None = None):
        if self._docs is None:
            return
        events = self.acquisition.rows // self._per_event
        yield from self._docs.until(events if index is None else min(index, events))

    # --- fly scans ----------------------------------------------------------------------
    def kickoff(self) -> Status:
        status = Status(obj=self, timeout=self.stage_timeout + 5)
        try:
            if not self._staged_file:
                self._close_file()
                self._open_file(1)
        except StdDaqError as exc:
            status.set_exception(exc)
            return status
        self._acquire(self.images_per_fly, status, wait=False)
        return status

    def complete(self) -> Status:
        """Finishes when std-daq wrote all images of the fly scan (immediately if nothing
        was requested)."""
        run = self.acquisition.run
        status = Status(obj=self, timeout=self.trigger_timeout + self.images_per_fly)
        if run is None:
            status.set_finished()
            return status
        self._watch(run, status)
        return status

    def describe_collect(self) -> dict[str, dict]:
        """The fly scan's data keys (singly nested, for ``declare_stream``)."""
        return {self.image_key: self.describe()[self.image_key]}

    def collect(self):
        """The fly scan's images are a ``STREAM:`` key: they travel in the stream documents
        of ``collect_asset_docs`` only, so no event is yielded."""
        yield from ()
