"""``WRT:`` records: the file writer, areaDetector NDFile style.

Capture=1 builds the file name from FilePath/FileName/FileNumber/FileTemplate and sends a
write request for NumCapture images to the writer agent over RabbitMQ; the put returns once
the request has started. Capture follows the request and drops to Done when it ends;
Capture=0 kills it. CA clients do not see put failures, so every failure is also published
in WriteStatus/WriteMessage. Broker calls run in an executor, never on the IOC loop.
"""

from __future__ import annotations

import asyncio
import os

from caproto import AlarmSeverity, AlarmStatus, ChannelType
from caproto.server import PVGroup, pvproperty

from ioc.common import write_if_changed
from services.daq_client import StdDaqError

WRITER_STATES = ["Idle", "Starting", "Writing", "Stopping", "Done", "Error", "Disconnected"]
DEFAULT_TEMPLATE = "%s%s_%3.3d.h5"


def full_file_name(template: str, path: str, name: str, number: int) -> str:
    """areaDetector's FileTemplate expansion: ``template % (path, name, number)``."""
    try:
        return template % (path, name, number)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"FileTemplate {template!r} does not take (path, name, number): "
                         f"{exc}") from None


class WriterGroup(PVGroup):
    """File writer control and progress."""

    file_path = pvproperty(
        name="FilePath", value="", dtype=ChannelType.CHAR, max_length=256,
        alarm_group="wrt_path", doc="Directory of the files (a trailing / is added)")
    file_path_exists = pvproperty(
        name="FilePathExists_RBV", value="No", dtype=ChannelType.ENUM, enum_strings=["No", "Yes"],
        record="bi", read_only=True, alarm_group="wrt_path",
        doc="Whether FilePath is an existing directory (as seen by the IOC host)")
    file_name = pvproperty(
        name="FileName", value="", dtype=ChannelType.CHAR, max_length=256,
        alarm_group="wrt_name", doc="Base name of the files")
    file_template = pvproperty(
        name="FileTemplate", value=DEFAULT_TEMPLATE, dtype=ChannelType.CHAR, max_length=256,
        alarm_group="wrt_name", doc="printf template of (FilePath, FileName, FileNumber)")
    file_number = pvproperty(
        name="FileNumber", value=1, record="longout", lower_ctrl_limit=0,
        upper_ctrl_limit=2**31 - 1, alarm_group="wrt_name",
        doc="Number of the next file")
    auto_increment = pvproperty(
        name="AutoIncrement", value="Yes", dtype=ChannelType.ENUM, enum_strings=["No", "Yes"],
        record="bo", alarm_group="wrt_name", doc="Increment FileNumber after each file")
    num_capture = pvproperty(
        name="NumCapture", value=1, record="longout", lower_ctrl_limit=1,
        upper_ctrl_limit=2**31 - 1, alarm_group="wrt_capture",
        doc="Images to write per capture")
    capture = pvproperty(
        name="Capture", value="Done", dtype=ChannelType.ENUM, enum_strings=["Done", "Capture"],
        record="bo", alarm_group="wrt_capture_command",
        doc="1 starts a write request, 0 stops it; drops to Done when the file is complete")
    num_captured = pvproperty(
        name="NumCaptured_RBV", value=0, record="longin", read_only=True,
        alarm_group="wrt_progress", doc="Images written in the current or last capture")
    full_file_name = pvproperty(
        name="FullFileName_RBV", value="", dtype=ChannelType.CHAR, max_length=512,
        read_only=True, alarm_group="wrt_progress",
        doc="File being written or last written")
    writer_state = pvproperty(
        name="WriterState_RBV", value="Disconnected", dtype=ChannelType.ENUM,
        enum_strings=WRITER_STATES, record="mbbi", read_only=True, alarm_group="wrt_state",
        doc="Idle, Starting, Writing, Stopping, Done, Error or Disconnected (no broker)")
    write_status = pvproperty(
        name="WriteStatus", value="Write OK", dtype=ChannelType.ENUM,
        enum_strings=["Write OK", "Write error"], record="bi", read_only=True,
        alarm_group="wrt_status", doc="Outcome of the last write")
    write_message = pvproperty(
        name="WriteMessage", value="", dtype=ChannelType.CHAR, max_length=256,
        read_only=True, alarm_group="wrt_status",
        doc="Error text of the last write, or what a partial file lacks")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client = self.parent.settings.daq_client()
        self.run = None  # the WriteRun in progress
        self.outcome = "Idle"  # state shown between captures: Idle, Done or Error

    async def _publish_error(self, message: str) -> None:
        await self.write_status.write("Write error", severity=AlarmSeverity.MAJOR_ALARM,
                                      status=AlarmStatus.STATE)
        await self.write_message.write(message[:255])

    async def _publish_ok(self, partial: str = "") -> None:
        """Write OK; a partial file (stopped early, images flagged or lost) keeps its
        summary in WriteMessage with a minor alarm."""
        severity = AlarmSeverity.MINOR_ALARM if partial else AlarmSeverity.NO_ALARM
        await self.write_status.write("Write OK", severity=severity, status=(
            AlarmStatus.STATE if partial else AlarmStatus.NO_ALARM))
        await self.write_message.write(partial[:255])

    async def _set_state(self, state: str) -> None:
        severity = {"Error": AlarmSeverity.MAJOR_ALARM,
                    "Disconnected": AlarmSeverity.INVALID_ALARM}.get(state, 0)
        await write_if_changed(self.writer_state, state, severity=severity,
                               status=AlarmStatus.STATE if severity else AlarmStatus.NO_ALARM)

    @file_path.putter
    async def file_path(self, instance, value):
        path = value.strip()
        if path and not path.endswith("/"):
            path += "/"
        exists = bool(path) and os.path.isdir(path)
        await self.file_path_exists.write(
            "Yes" if exists else "No",
            severity=AlarmSeverity.NO_ALARM if exists else AlarmSeverity.MAJOR_ALARM,
            status=AlarmStatus.NO_ALARM if exists else AlarmStatus.STATE)
        return path

    @file_path.startup
    async def file_path(self, instance, async_lib):
        self.client.start()

    @file_path.shutdown
    async def file_path(self, instance, async_lib):
        self.client.close()

    @capture.putter
    async def capture(self, instance, value):
        loop = asyncio.get_running_loop()
        if value == "Done":
            if self.run is not None and not self.run.done.is_set():
                await self._set_state("Stopping")
                await loop.run_in_executor(None, self.client.kill, self.run)
            return "Capture" if self.run is not None and not self.run.done.is_set() else "Done"
        if self.run is not None and not self.run.done.is_set():
            message = f"already capturing to {self.full_file_name.value}: Capture=0 stops it"
            await self._publish_error(message)
            raise RuntimeError(message)
        try:
            output_file = self._output_file()
        except ValueError as exc:
            await self._publish_error(str(exc))
            self.outcome = "Error"
            raise
        await self._set_state("Starting")
        await self.num_captured.write(0)
        await self.full_file_name.write(output_file)
        request = {"output_file": output_file, "n_images": int(self.num_capture.value)}
        try:
            self.run = await loop.run_in_executor(None, self.client.start_write, request)
        except StdDaqError as exc:
            await self._publish_error(str(exc))
            self.outcome = "Error"
            raise
        await self._publish_ok()
        await self._set_state("Writing")
        return "Capture"

    def _output_file(self) -> str:
        path, name = self.file_path.value, self.file_name.value
        if not path or not os.path.isabs(path):
            raise ValueError(f"FilePath must be an absolute directory, got {path!r}")
        if not name:
            raise ValueError("FileName is empty")
        output = full_file_name(self.file_template.value, path, name,
                                int(self.file_number.value))
        if not os.path.isabs(output):
            raise ValueError(f"FileTemplate gives a relative path {output!r}")
        return output

    @capture.scan(period=0.1, use_scan_field=False)
    async def capture(self, instance, async_lib):
        run = self.run
        if run is None:
            await self._set_state(self.outcome if self.client.connected else "Disconnected")
            return
        await write_if_changed(self.num_captured, int(run.n_written))
        if not run.done.is_set():
            return
        self.run = None
        if run.failed:
            await self._publish_error(run.message or "write failed")
            self.outcome = "Error"
        else:
            await self._publish_ok(run.summary if run.outcome == "partial" else "")
            self.outcome = "Done"
            if self.auto_increment.value == "Yes":
                await self.file_number.write(int(self.file_number.value) + 1)
        await instance.write("Done")
