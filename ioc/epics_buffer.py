"""``EPB:`` records: the Epics buffer service, from its Redis heartbeat."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import redis
from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from fastcore.status import read_status
from ioc.common import write_if_changed

EPB_STATES = ["Disconnected", "Running", "Error"]


@dataclass(frozen=True)
class EpicsBufferStatus:
    state: str = "Disconnected"
    channels: tuple[str, ...] = ()
    events: int = 0
    message: str = "no status yet"


class HeartbeatReader:
    """Reads ``status.<service>`` from Redis once per second in a background thread."""

    def __init__(self, service_name: str | None, client: redis.Redis):
        self.service_name = service_name
        self.client = client
        self.status = EpicsBufferStatus(message="no Epics buffer configured" if not
                                        service_name else "no status yet")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epb-heartbeat", daemon=True)

    def start(self) -> None:
        if self.service_name:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def read_once(self) -> EpicsBufferStatus:
        try:
            status = read_status(self.client, self.service_name)
        except redis.RedisError as exc:
            return EpicsBufferStatus(message=f"Redis unreachable: {exc}")
        if status is None:
            return EpicsBufferStatus(message=f"service {self.service_name} is not running "
                                     "(no heartbeat in Redis)")
        channels = tuple(str(pv) for pv in status.config.get("pv_list", []))
        return EpicsBufferStatus(
            state="Error" if status.last_error else "Running", channels=channels,
            events=int(status.counters.get("events", 0)),
            message=status.last_error or f"{status.state or 'running'}: {len(channels)} "
                    "channels")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.status = self.read_once()
            self._stop.wait(1.0)


class EpicsBufferGroup(PVGroup):
    """State and channels of the Epics buffer service (read-only)."""

    state = pvproperty(
        name="State_RBV", value="Disconnected", dtype=ChannelType.ENUM,
        enum_strings=EPB_STATES, record="mbbi", read_only=True, alarm_group="epb_state",
        doc="Running (heartbeat in Redis), Error (it reports one) or Disconnected")
    message = pvproperty(
        name="Message_RBV", value="", dtype=ChannelType.CHAR, max_length=256, read_only=True,
        alarm_group="epb_info", doc="Details of the Epics buffer state")
    n_channels = pvproperty(
        name="NumChannels_RBV", value=0, record="longin", read_only=True,
        alarm_group="epb_info", doc="Number of PVs the Epics buffer records")
    channels = pvproperty(
        name="Channels_RBV", value="", dtype=ChannelType.CHAR, max_length=4096,
        read_only=True, alarm_group="epb_info",
        doc="PVs the Epics buffer records, comma separated")
    events = pvproperty(
        name="Events_RBV", value=0, record="longin", read_only=True, alarm_group="epb_info",
        doc="PV updates buffered since the Epics buffer started")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = self.parent.settings
        self.reader = HeartbeatReader(settings.epics_buffer_service, settings.redis())

    @state.startup
    async def state(self, instance, async_lib):
        self.reader.start()

    @state.shutdown
    async def state(self, instance, async_lib):
        self.reader.stop()

    @state.scan(period=0.5, use_scan_field=False)
    async def state(self, instance, async_lib):
        status = self.reader.status
        severity = {"Running": AlarmSeverity.NO_ALARM, "Error": AlarmSeverity.MAJOR_ALARM,
                    "Disconnected": AlarmSeverity.INVALID_ALARM}[status.state]
        await write_if_changed(instance, status.state, severity=severity,
                      status=AlarmStatus.STATE if severity else AlarmStatus.NO_ALARM)
        await write_if_changed(self.message, status.message[:255])
        await write_if_changed(self.n_channels, len(status.channels))
        await write_if_changed(self.channels, ",".join(status.channels)[:4095])
        await write_if_changed(self.events, status.events)
