"""``BUF:`` records: the detector buffer as areaDetector users know it.

A worker thread follows the ImageMetadata stream (ZMQ) and keeps counters; a 5 Hz scan hook
on the IOC loop publishes what changed. The loop itself never touches ZMQ or shared memory.
"""

from __future__ import annotations

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from ioc.common import write_if_changed
from services.image_stats import ImageFollower

DETECTOR_STATES = ["Idle", "Acquire", "Readout", "Correct", "Saving", "Aborting", "Error",
                   "Waiting", "Initializing", "Disconnected", "Aborted"]
IDLE, ACQUIRE, DISCONNECTED = 0, 1, 9


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

