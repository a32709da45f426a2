"""Messages between the writer agent and the HDF5 writer (pure encode/decode, no sockets).

The writer follows the detector's ImageMetadata stream itself; the agent only tells it what
to write and relays what it reports.

Commands to the writer (ZMQ PUSH -> PULL ``stddaq-<det>-writer``), one JSON object each:
- ``start``: open ``run_info.output_file`` and write the next ``run_info.n_images`` images
  that reach the ImageBuffer (or, with ``start_image_id``, the images from that id on,
  taking those still in the buffer first); with ``run_info.append`` the images are added
  after the rows of an existing file of this detector (created if absent); end the run
  when no image came for ``image_timeout_s``. A start older than :data:`COMMAND_TTL_S` is
  refused (it was queued while the writer was down).
- ``stop``: close run ``run_id`` now (a kill).

A run spread over N writers (``start`` with a ``split``, see fastcore/writer_split.py): each
writer writes its share of the run's images into its own file. Writer 0 starts at the
first image that comes (or ``start_image_id``) and reports it (``first_image``); the others
open their files and wait for ``begin`` with that id, then take their images from there,
those already in the ImageBuffer first. ``master`` has a writer lay out the master file
(:mod:`fastcore.vds_master`) once every writer's file is open.

Events from the writer (ZMQ PUB ``stddaq-<det>-writer-status``), one JSON object each, all
with ``event`` and ``run_id``: ``heartbeat`` every :data:`HEARTBEAT_S` (:class:`Heartbeat`:
``pid``, the open run or None), ``start`` (:class:`RunStarted`), ``progress``
(:class:`RunProgress`: rows flushed to the file, at most every 0.2 s), ``error``
(:class:`WriterFailure`: ``message``), ``stop`` (the run's :class:`RunSummary`),
``first_image`` (:class:`RunFirstImage`) and ``master`` (:class:`MasterWritten`). The writer
builds them, the agent reads them back with :func:`decode_event`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from fastcore.writer_split import MAX_WRITERS, Split

COMPRESSIONS = ("none", "bitshuffle-lz4")
HEARTBEAT_S = 0.5
COMMAND_TTL_S = 5.0
MAX_IMAGES = 2**32 - 1
MAX_IMAGE_TIMEOUT_S = 7 * 24 * 3600.0
MAX_ID = 2**63 - 1


class ProtocolError(ValueError):
    """A writer message that cannot be understood; the message names the bad field."""


def _check_int(name: str, value: Any, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ProtocolError(f"{name}: expected an integer from {minimum} to {maximum}, got "
                            f"{value!r}")


@dataclass(frozen=True)
class RunInfo:
    """What the writer needs to open a run's file."""

    output_file: str
    n_images: int
    metadata: dict[str, Any] = field(default_factory=dict)
    user_id: int | None = None
    compression: str | None = None  # None: the writer's default
    append: bool = False  # add rows to an existing file of this detector (else create it)

    def validate(self) -> None:
        """Raise ProtocolError naming the bad field."""
        if not isinstance(self.output_file, str) or not os.path.isabs(self.output_file) \
                or "\0" in self.output_file or self.output_file.endswith("/"):
            raise ProtocolError(f"output_file: expected an absolute file path, got "
                                f"{self.output_file!r:.200}")
        if ".." in self.output_file.split(os.sep):
            raise ProtocolError(f"output_file: '..' is not allowed, got {self.output_file!r}")
        _check_int("n_images", self.n_images, 1, MAX_IMAGES)
        if not isinstance(self.metadata, dict):
            raise ProtocolError(f"metadata: expected an object, got {self.metadata!r}")
        if self.user_id is not None:
            _check_int("user_id", self.user_id, 0, 2**31 - 1)
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ProtocolError(f"compression: expected one of {COMPRESSIONS}, got "
                                f"{self.compression!r}")
        if not isinstance(self.append, bool):
            raise ProtocolError(f"append: expected true or false, got {self.append!r:.40}")


def valid_image_timeout(value: Any) -> bool:
    """A number of seconds > 0 and <= MAX_IMAGE_TIMEOUT_S (the request's and the
    command's image timeout)."""
    return (not isinstance(value, bool) and isinstance(value, int | float)
            and math.isfinite(value) and 0 < value <= MAX_IMAGE_TIMEOUT_S)


@dataclass(frozen=True)
class StartCommand:
    """Open a run and write its images (see the module docstring)."""

    run_id: int
    run_info: RunInfo
    image_timeout_s: float
    start_image_id: int | None = None
    sent_at: float = field(default_factory=time.time)
    split: Split | None = None  # this writer's share of a run spread over several

    def validate(self) -> None:
        _check_int("run_id", self.run_id, 0, 2**64 - 1)
        self.run_info.validate()
        if not valid_image_timeout(self.image_timeout_s):
            raise ProtocolError(f"image_timeout_s: expected seconds > 0 and <= "
                                f"{MAX_IMAGE_TIMEOUT_S:g}, got {self.image_timeout_s!r}")
        if self.start_image_id is not None:
            _check_int("start_image_id", self.start_image_id, 0, MAX_ID)
        if self.split is not None:
            _check_int("split.n_writers", self.split.n_writers, 1, MAX_WRITERS)
            _check_int("split.index", self.split.index, 0, self.split.n_writers - 1)
            _check_int("split.frames_per_block", self.split.frames_per_block, 1, MAX_IMAGES)

    def to_json(self) -> bytes:
        return json.dumps({"command": "start"} | asdict(self)).encode()


@dataclass(frozen=True)
class StopCommand:
    """Close run ``run_id`` now."""

    run_id: int

    def to_json(self) -> bytes:
        return json.dumps({"command": "stop", "run_id": self.run_id}).encode()


@dataclass(frozen=True)
class BeginCommand:
    """Run ``run_id`` (a writer of a split run other than writer 0) starts at image
    ``first_image_id``."""

    run_id: int
    first_image_id: int

    def to_json(self) -> bytes:
        return json.dumps({"command": "begin"} | asdict(self)).encode()


@dataclass(frozen=True)
class MasterCommand:
    """Lay out ``output_file`` as the master of a split run: virtual datasets over
    ``writer_files``, this run's rows starting at ``bases[w]`` in writer ``w``'s file
    (after the runs the master already holds when ``append``)."""

    run_id: int
    output_file: str
    writer_files: list[str]
    frames_per_block: int
    bases: list[int]
    append: bool = False
    user_id: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _check_int("run_id", self.run_id, 0, 2**64 - 1)
        RunInfo(self.output_file, 1, self.metadata, self.user_id, None, self.append).validate()
        if not isinstance(self.writer_files, list) or not self.writer_files or any(
                not isinstance(p, str) or os.path.dirname(p) != os.path.dirname(
                    self.output_file) for p in self.writer_files):
            raise ProtocolError("writer_files: expected the writers' file paths, in the "
                                f"master's directory, got {self.writer_files!r:.200}")
        _check_int("frames_per_block", self.frames_per_block, 1, MAX_IMAGES)
        if not isinstance(self.bases, list) or len(self.bases) != len(self.writer_files):
            raise ProtocolError(f"bases: expected one row number per writer file, got "
                                f"{self.bases!r:.200}")
        for base in self.bases:
            _check_int("bases[]", base, 0, MAX_ID)

    def to_json(self) -> bytes:
        return json.dumps({"command": "master"} | asdict(self)).encode()


WriterCommand = StartCommand | StopCommand | BeginCommand | MasterCommand


def decode_command(data: bytes) -> WriterCommand:
    """A command from its JSON; raises ProtocolError naming what is wrong."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"a writer command must be a JSON object: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"a writer command must be a JSON object, got {raw!r:.80}")
    command = raw.pop("command", None)
    try:
        if command == "stop":
            stop = StopCommand(**raw)
            _check_int("run_id", stop.run_id, 0, 2**64 - 1)
            return stop
        if command == "start":
            info = raw.pop("run_info", None)
            if not isinstance(info, dict):
                raise ProtocolError(f"run_info: expected an object, got {info!r:.80}")
            split = raw.pop("split", None)
            if split is not None and not isinstance(split, dict):
                raise ProtocolError(f"split: expected an object, got {split!r:.80}")
            start = StartCommand(run_info=RunInfo(**info),
                                 split=Split(**split) if split else None, **raw)
            start.validate()
            return start
        if command == "begin":
            begin = BeginCommand(**raw)
            _check_int("run_id", begin.run_id, 0, 2**64 - 1)
            _check_int("first_image_id", begin.first_image_id, 0, MAX_ID)
            return begin
        if command == "master":
            master = MasterCommand(**raw)
            master.validate()
            return master
    except TypeError as exc:
        raise ProtocolError(f"bad {command} command: {exc}") from None
    raise ProtocolError(f"command: expected 'start', 'stop', 'begin' or 'master', got "
                        f"{command!r:.40}")


# --- events (writer -> agent) ---------------------------------------------------------


class _Event:
    """An event's wire form: ``{"event": EVENT, <its fields>}`` as JSON."""

    EVENT: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.EVENT} | asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


@dataclass(frozen=True)
class Heartbeat(_Event):
    """The writer is alive (every HEARTBEAT_S); ``run_id`` is its open run or None."""

    EVENT: ClassVar[str] = "heartbeat"
    pid: int
    sent_at: float
    run_id: int | None = None


@dataclass(frozen=True)
class RunStarted(_Event):
    """The run's file is open: the next images are the run's."""

    EVENT: ClassVar[str] = "start"
    run_id: int
    output_file: str
    n_images: int
    first_row: int = 0


@dataclass(frozen=True)
class RunProgress(_Event):
    """Rows flushed to the file so far (a kill cannot take them back)."""

    EVENT: ClassVar[str] = "progress"
    run_id: int
    n_rows: int
    n_written: int
    n_missing: int
    n_absent: int = 0


@dataclass(frozen=True)
class WriterFailure(_Event):
    """A command the writer refused: a run it could not open (``run_id``) or a command it
    could not read (``run_id`` None)."""

    EVENT: ClassVar[str] = "error"
    run_id: int | None
    message: str


@dataclass(frozen=True)
class RunFirstImage(_Event):
    """Writer 0 of a split run: the run starts at image ``first_image_id``."""

    EVENT: ClassVar[str] = "first_image"
    run_id: int
    first_image_id: int


@dataclass(frozen=True)
class MasterWritten(_Event):
    """The master file of a split run is laid out."""

    EVENT: ClassVar[str] = "master"
    run_id: int
    output_file: str
    master_start: int  # the master's row of this run's first image


# Why a run ended (RunSummary.reason).
COMPLETED, STOPPED, IMAGE_TIMEOUT, FAILED, INTERRUPTED, REPLACED = (
    "completed", "stopped", "image timeout", "error", "interrupted", "replaced")


@dataclass
class RunSummary(_Event):
    """Everything a finished run accounts for, sent as the writer's ``stop`` event.

    ``n_written`` rows (from the file's row ``first_row`` on) hold their image,
    ``n_missing`` rows are zeros because the image had left the ImageBuffer
    (``missing_image_ids``, capped). ``n_flagged`` counts the rows per status flag name (an
    image may carry several). ``absent_ranges`` are the inclusive
    id ranges (capped) that never reached the writer between the run's images (``n_absent``
    ids in all).
    """

    EVENT: ClassVar[str] = "stop"
    run_id: int
    output_file: str
    n_images: int
    reason: str
    message: str = ""
    n_written: int = 0
    n_missing: int = 0
    n_good: int = 0
    n_flagged: dict[str, int] = field(default_factory=dict)
    n_absent: int = 0
    absent_ranges: list[list[int]] = field(default_factory=list)
    missing_image_ids: list[int] = field(default_factory=list)
    n_id_resets: int = 0
    first_row: int = 0  # the file's row of this run's first image (> 0 when appending)

    @property
    def n_rows(self) -> int:
        return self.n_written + self.n_missing

    @property
    def outcome(self) -> str:
        """'success' (every requested image written good), 'partial' (the file holds what
        was written, short or flagged) or 'fail' (the run could not go on)."""
        if self.reason in (IMAGE_TIMEOUT, FAILED, INTERRUPTED, REPLACED):
            return "fail"
        if self.reason == COMPLETED and self.n_good == self.n_images and not self.n_absent:
            return "success"
        return "partial"

    def describe(self) -> str:
        """One line: rows, flags and absent ids, for logs and error messages."""
        text = f"{self.n_rows} of {self.n_images} images in {self.output_file}"
        details = [f"{self.n_good} good"]
        if self.n_missing:
            details.append(f"{self.n_missing} no longer in the buffer")
        details += [f"{n} {flag}" for flag, n in sorted(self.n_flagged.items())]
        if self.n_absent:
            ranges = ", ".join(f"{a}-{b}" if a != b else str(a)
                               for a, b in self.absent_ranges[:5])
            more = ", ..." if len(self.absent_ranges) > 5 else ""
            details.append(f"{self.n_absent} ids never arrived ({ranges}{more})")
        return f"{text} ({', '.join(details)})"

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"outcome": self.outcome}


WriterEvent = (Heartbeat | RunStarted | RunProgress | WriterFailure | RunSummary
               | RunFirstImage | MasterWritten)
_EVENTS: dict[str, type] = {cls.EVENT: cls for cls in
                            (Heartbeat, RunStarted, RunProgress, WriterFailure, RunSummary,
                             RunFirstImage, MasterWritten)}


def decode_event(data: bytes | dict[str, Any]) -> WriterEvent:
    """An event from its JSON (or its decoded dict); fields it does not know are ignored
    (``outcome`` of a stop is derived); ProtocolError naming what is wrong."""
    if isinstance(data, dict):
        raw = data
    else:
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"a writer event must be a JSON object: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"a writer event must be a JSON object, got {raw!r:.80}")
    kind = raw.get("event")
    cls = _EVENTS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"event: expected one of {sorted(_EVENTS)}, got {kind!r:.40}")
    names = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in names})
    except TypeError as exc:
        raise ProtocolError(f"bad {kind} event: {exc}") from None
