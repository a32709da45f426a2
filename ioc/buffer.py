"""``BUF:`` records: the detector buffer as areaDetector users know it.

A worker thread follows the ImageMetadata stream (ZMQ) and keeps counters; a 5 Hz scan hook
on the IOC loop publishes what changed. The loop itself never touches ZMQ or shared memory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import zmq
from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from fastcore.buffers import segment_alive, shm_name
from fastcore.formats import code_dtype, image_records
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address, subscribe
from ioc.common import write_if_changed

DETECTOR_STATES = ["Idle", "Acquire", "Readout", "Correct", "Saving", "Aborting", "Error",
                   "Waiting", "Initializing", "Disconnected", "Aborted"]
IDLE, ACQUIRE, DISCONNECTED = 0, 1, 9
_ACQUIRING_WITHIN_S = 1.0


@dataclass(frozen=True)
class BufferStats:
    connected: bool = False
    acquiring: bool = False
    counter: int = 0
    rate: float = 0.0
    flagged: int = 0
    lost: int = 0
    last_id: int = 0
    height: int = 0
    width: int = 0
    data_type: str = ""


class ImageFollower:
    """Counts images from the ImageMetadata stream in a background thread."""

    def __init__(self, detector_name: str, ipc_dir: str):
        self.detector_name = detector_name
        self.address = ipc_address(ipc_dir, detector_name, Stream.IMAGE)
        self.stats = BufferStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="image-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        sub = subscribe(zmq.Context.instance(), self.address)
        window: list[float] = []
        last_seen = 0.0
        stats = self.stats
        next_check = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_check:  # the producer is there (or not), 2 x per second
                    next_check = now + 0.5
                    alive = segment_alive(shm_name(self.detector_name, Segment.IMAGE))
                    stats = replace(stats, connected=alive)
                if sub.poll(100):
                    for meta in image_records(sub.recv()):
                        image_id = int(meta["id"])
                        gap = image_id - stats.last_id - 1 if stats.counter else 0
                        stats = replace(
                            stats, connected=True, counter=stats.counter + 1,
                            flagged=stats.flagged + (int(meta["status"]) != 0),
                            lost=stats.lost + (gap if 0 < gap < 1_000_000 else 0),
                            last_id=image_id, height=int(meta["height"]),
                            width=int(meta["width"]),
                            data_type=code_dtype(int(meta["dtype"])).name)
                        now = last_seen = time.monotonic()
                        window.append(now)
                window = [t for t in window if now - t <= 1.0]
                stats = replace(stats, rate=float(len(window)),
                                acquiring=now - last_seen < _ACQUIRING_WITHIN_S)
                self.stats = stats
        finally:
            sub.close(0)


class BufferGroup(PVGroup):
    """Detector buffer state and counters (read-only)."""

    detector_state = pvproperty(
        name="DetectorState_RBV", value="Disconnected", dtype=ChannelType.ENUM,
        enum_strings=DETECTOR_STATES, record="mbbi", read_only=True, alarm_group="buf_state",
        doc="Idle, Acquire (images arriving) or Disconnected (no assembler/stream_recv)")
    status_message = pvproperty(
        name="StatusMessage_RBV", value="waiting for the detector buffer",
        dtype=ChannelType.CHAR, max_length=256, read_only=True, alarm_group="buf_msg",
        doc="Human-readable state of the detector buffer")
    array_counter = pvproperty(
        name="ArrayCounter_RBV", value=0, record="longin", read_only=True,
        alarm_group="buf_counters", doc="Images assembled since the IOC started")
    array_rate = pvproperty(
        name="ArrayRate_RBV", value=0.0, record="ai", units="Hz", precision=1,
        read_only=True, alarm_group="buf_counters", doc="Images per second (last second)")
    missing_packets = pvproperty(
        name="MissingPackets_RBV", value=0, record="longin", read_only=True,
        alarm_group="buf_counters",
        doc="Images flagged incomplete (missing packets or modules)")
    missing_images = pvproperty(
        name="MissingImages_RBV", value=0, record="longin", read_only=True,
        alarm_group="buf_counters", doc="Image ids never seen (gaps in the stream)")
    last_image_id = pvproperty(
        name="LastImageId_RBV", value=0.0, record="ai", precision=0, read_only=True,
        alarm_group="buf_counters", doc="Id (frame number) of the newest image")
    size_x = pvproperty(name="ArraySizeX_RBV", value=0, record="longin", read_only=True,
                        alarm_group="buf_counters", doc="Image width in pixels")
    size_y = pvproperty(name="ArraySizeY_RBV", value=0, record="longin", read_only=True,
                        alarm_group="buf_counters", doc="Image height in pixels")
    data_type = pvproperty(name="DataType_RBV", value="", dtype=ChannelType.CHAR,
                           max_length=16, read_only=True, alarm_group="buf_counters",
                           doc="Pixel type (numpy name)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = self.parent.settings
        self.follower = ImageFollower(settings.detector_name, settings.ipc_dir)

    @detector_state.startup
    async def detector_state(self, instance, async_lib):
        self.follower.start()

    @detector_state.shutdown
    async def detector_state(self, instance, async_lib):
        self.follower.stop()

    @detector_state.scan(period=0.2, use_scan_field=False)
    async def detector_state(self, instance, async_lib):
        stats = self.follower.stats
        if not stats.connected:
            state, severity, message = DISCONNECTED, AlarmSeverity.INVALID_ALARM, (
                "no detector buffer: is the assembler (or stream_recv) running?")
        elif stats.acquiring:
            state, severity, message = ACQUIRE, AlarmSeverity.NO_ALARM, "receiving images"
        else:
            state, severity, message = IDLE, AlarmSeverity.NO_ALARM, "idle: no images"
        await write_if_changed(instance, DETECTOR_STATES[state], severity=severity,
                      status=AlarmStatus.COMM if severity else AlarmStatus.NO_ALARM)
        await write_if_changed(self.status_message, message)
        for prop, value in ((self.array_counter, stats.counter),
                            (self.array_rate, stats.rate),
                            (self.missing_packets, stats.flagged),
                            (self.missing_images, stats.lost),
                            (self.last_image_id, float(stats.last_id)),
                            (self.size_x, stats.width), (self.size_y, stats.height),
                            (self.data_type, stats.data_type)):
            await write_if_changed(prop, value)

