"""StdDaqAsyncDetector: std-daq as an ophyd-async ``StandardDetector`` (ophyd-async 0.21).

std-daq does not drive the detector: it receives what the detector sends. So the trigger
logic only records how many images a prepare asks for (internal triggering; livetime and
deadtime belong to the detector's own control), the acquire logic sends the write request
for them (one per ``trigger()``, one per ``kickoff()``) and the data logic picks the file
from the ``PathProvider`` and follows its rows. Requests, progress and stream documents are
the classic device's (``stddaq_ophyd._acquisition``).

- ``connect()`` (``init_devices``) checks that the writer agent runs and the broker
  answers; in mock mode nothing is contacted and each acquisition "writes" its images at
  once (the rows signal advances), so plans can be tried without std-daq.
- ``trigger()`` and ``complete()`` fail with std-daq's message as soon as a request ends
  short (a full disk, a detector that stopped), not after the exposure timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import PurePath
from typing import Any

from event_model import DataKey
from ophyd_async.core import (
    AsyncStatus,
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    DeviceConnector,
    NotConnectedError,
    PathProvider,
    SignalR,
    StandardDetector,
    StreamableDataProvider,
    TriggerInfo,
    WatchableAsyncStatus,
    WatcherUpdate,
    set_mock_value,
    soft_signal_r_and_setter,
)

from fastcore.config import DetectorConfig
from fastcore.writer_protocol import MAX_IMAGES
from services.daq_client import StdDaqError
from stddaq_ophyd._acquisition import Acquisition, StreamDocuments, image_data_key
from stddaq_ophyd.device import as_detector_config


class _Session:
    """What the detector's logics share: the acquisition, the rows signal, the event loop
    (progress arrives in other threads) and whether the device is mocked."""

    def __init__(self, acquisition: Acquisition):
        self.acquisition = acquisition
        self.rows, self._set_rows = soft_signal_r_and_setter(int, 0)
        self.mock = False
        self.collections_per_event = 1  # of the last prepare
        self.events_to_acquire: SignalR[int] | None = None  # the detector's events_to_kickoff
        self.failed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        acquisition.add_rows_callback(self._on_rows)

    def bind(self) -> None:
        """Remember the running event loop (progress callbacks are posted to it)."""
        self._loop = asyncio.get_running_loop()

    def _on_rows(self, rows: int) -> None:
        loop = self._loop
        if loop is not None and not self.mock and not loop.is_closed():
            loop.call_soon_threadsafe(self._set_rows, rows)

    async def n_images(self) -> int:
        """Images of the next acquisition: the events to kick off (1 for a trigger) times
        the collections per event; 0 events (endless) is std-daq's largest request."""
        events = await self.events_to_acquire.get_value() if self.events_to_acquire else 1
        return events * self.collections_per_event if events else MAX_IMAGES

    async def acquire(self) -> None:
        self.bind()
        self.failed.clear()
        n_images = await self.n_images()
        if self.mock:
            set_mock_value(self.rows, await self.rows.get_value() + n_images)
            return
        run = await asyncio.to_thread(self.acquisition.acquire, n_images)
        loop = self._loop

        def ended() -> None:
            if Acquisition.failure(run) is not None:
                loop.call_soon_threadsafe(self.failed.set)

        run.add_done_callback(ended)

    def failure(self) -> str:
        run = self.acquisition.run
        return (Acquisition.failure(run) if run is not None else None) or "std-daq failed"

    async def wait_done(self) -> None:
        """Wait (bounded) until the running request ended; StdDaqError if it ended short."""
        run = self.acquisition.run
        if self.mock or run is None:
            return
        if not await asyncio.to_thread(run.done.wait, self.acquisition.stop_timeout):
            raise StdDaqError(f"std-daq did not end request {run.request_id} within "
                              f"{self.acquisition.stop_timeout:g} s of its last image")
        failure = Acquisition.failure(run)
        if failure is not None:
            raise StdDaqError(failure)

    async def stop(self) -> None:
        if not self.mock:
            await asyncio.to_thread(self.acquisition.stop)


class StdDaqTriggerLogic(DetectorTriggerLogic):
    """Internal triggering only: std-daq takes the next images the detector sends (how many
    is decided per acquisition, from the events to kick off)."""

    async def prepare_internal(self, num: int, livetime: float, deadtime: float) -> None:
        if livetime or deadtime:
            raise ValueError(f"std-daq receives the detector's images and cannot set its "
                             f"exposure (livetime={livetime}, deadtime={deadtime}): set them "
                             "on the detector and prepare with 0")

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class StdDaqAcquireLogic(DetectorAcquireLogic):
    """An acquisition is one std-daq write request appended to the scan's file."""

    def __init__(self, session: _Session):
        self.session = session

    async def start_acquiring(self) -> None:
        await self.session.acquire()

    async def wait_for_idle(self) -> None:
        await self.session.wait_done()

    async def ensure_stopped(self) -> None:
        await self.session.stop()


class StdDaqDataProvider(StreamableDataProvider):
    """The scan file's images as a ``STREAM:`` key, one row per collection."""

    def __init__(self, session: _Session, data_key: str, uri: str):
        self.config = session.acquisition.config
        self.data_key = data_key
        self.collections_written_signal = session.rows
        self.docs = StreamDocuments(self.config, data_key, uri)

    async def make_datakeys(self, collections_per_event: int) -> dict[str, DataKey]:
        return {self.data_key: DataKey(**image_data_key(self.config, collections_per_event))}

    async def make_stream_docs(self, collections_written: int,
                               collections_per_event: int) -> AsyncIterator[Any]:
        for doc in self.docs.until(collections_written // collections_per_event):
            yield doc


class StdDaqDataLogic(DetectorDataLogic):
    """Each prepare starts a file ``<directory>/<filename>.h5`` from the PathProvider."""

    def __init__(self, session: _Session, path_provider: PathProvider):
        self.session = session
        self.path_provider = path_provider

    async def prepare_unbounded(self, datakey_name: str) -> StdDaqDataProvider:
        self.session.bind()
        await self.session.stop()
        info = self.path_provider(datakey_name)
        file_name = f"{info.filename}.h5"
        self.session.acquisition.open_file(str(PurePath(info.directory_path, file_name)))
        if self.session.mock:
            set_mock_value(self.session.rows, 0)
        return StdDaqDataProvider(self.session, datakey_name,
                                  f"{info.directory_uri}{file_name}")

    async def stop(self) -> None:
        await self.session.stop()

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]


class StdDaqConnector(DeviceConnector):
    """Connected means: the writer agent runs and the broker answers (mock: nothing)."""

    def __init__(self, session: _Session):
        self.session = session

    async def connect_mock(self, device, mock) -> None:
        self.session.mock = True
        await super().connect_mock(device, mock)

    async def connect_real(self, device, timeout: float, force_reconnect: bool) -> None:
        self.session.mock = False
        self.session.bind()
        await super().connect_real(device, timeout, force_reconnect)
        try:
            await asyncio.to_thread(self.session.acquisition.check_ready, timeout)
        except StdDaqError as exc:
            raise NotConnectedError(f"{device.name}: {exc}") from None


class StdDaqAsyncDetector(StandardDetector):
    """A std-daq detector for ophyd-async plans: step scans (``trigger``) and fly scans
    (``prepare(TriggerInfo(number_of_events=N))``, ``kickoff``, ``complete``,
    ``collect_asset_docs``) into files the ``path_provider`` names."""

    def __init__(self, detector_config: str | dict | DetectorConfig,
                 path_provider: PathProvider, *, writer_service: str | None = None,
                 broker_host: str = "127.0.0.1", redis_host: str = "127.0.0.1",
                 redis_port: int = 6379, start_timeout: float = 15.0,
                 stop_timeout: float = 15.0, name: str = ""):
        config = as_detector_config(detector_config)
        acquisition = Acquisition(
            config, writer_service or f"{config.detector_name}.writer",
            broker_host=broker_host, redis_host=redis_host, redis_port=redis_port,
            start_timeout=start_timeout, stop_timeout=stop_timeout,
            metadata={"device": name or "ophyd-async"})
        self._session = _Session(acquisition)
        self.images_written = self._session.rows
        self.detector_name, _ = soft_signal_r_and_setter(str, config.detector_name)
        self.add_detector_logics(StdDaqTriggerLogic(),
                                 StdDaqAcquireLogic(self._session),
                                 StdDaqDataLogic(self._session, path_provider))
        self.add_config_signals(self.detector_name)
        super().__init__(name=name, connector=StdDaqConnector(self._session))
        self._session.events_to_acquire = self.events_to_kickoff

    @AsyncStatus.wrap
    async def prepare(self, value: TriggerInfo) -> None:
        """As StandardDetector's; std-daq also needs the collections per event."""
        self._session.collections_per_event = value.collections_per_event
        await super().prepare(value)

    @property
    def acquisition(self) -> Acquisition:
        return self._session.acquisition

    def trigger(self) -> WatchableAsyncStatus:
        self._session.failed.clear()  # a failure of an earlier request is not this one's
        return WatchableAsyncStatus(self._unless_std_daq_fails(super().trigger()), self.name)

    def complete(self) -> WatchableAsyncStatus:
        return WatchableAsyncStatus(self._unless_std_daq_fails(super().complete()),
                                    self.name)

    async def _unless_std_daq_fails(
            self, inner: WatchableAsyncStatus) -> AsyncIterator[WatcherUpdate]:
        """``inner``'s updates, until it ends or std-daq's request ended short: then
        ``inner`` is cancelled and StdDaqError carries std-daq's message."""
        updates: asyncio.Queue[WatcherUpdate] = asyncio.Queue()
        inner.watch(lambda **values: updates.put_nowait(WatcherUpdate(**values)))
        failed = asyncio.ensure_future(self._session.failed.wait())
        try:
            while not inner.done:
                update = asyncio.ensure_future(updates.get())
                await asyncio.wait({inner.task, update, failed},
                                   return_when=asyncio.FIRST_COMPLETED)
                if update.done():
                    yield update.result()
                else:
                    update.cancel()
                if failed.done() and not inner.done:
                    inner.task.cancel()
                    raise StdDaqError(f"{self.name}: {self._session.failure()}")
            while not updates.empty():
                yield updates.get_nowait()
            await inner
        finally:
            failed.cancel()
