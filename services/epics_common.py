"""The EPICS buffer's Redis layout, shared by the EPICS buffer (writer side of Redis) and the
EPICS writer (reader side).

One capped stream per PV, key = the PV name; every record has the fields ``id`` (EPICS
timestamp in microseconds; wall-clock time for a disconnect), ``type`` (``"string"`` or a
numpy code such as ``f8``), ``shape`` (one little-endian uint32 per dimension; a scalar is
``(1,)``), ``value`` (little-endian bytes, UTF-8 text for strings), ``connected`` (1/0) and
``status`` (the EPICS alarm status name). A disconnect record has empty type, shape, value
and status: Redis never gets None. With a pulse-id PV, ``pulse_id`` (entry ID = the pulse
id; fields ``buffer_timestamp`` ns and ``epics_timestamp`` us) and ``pulse_id_reverse``
(fields ``pulse_id``, ``epics_timestamp``) map pulse ids to times.

Entry IDs of the per-PV and ``pulse_id_reverse`` streams are the buffer's arrival time in
ms, the clock of ``pulse_id.buffer_timestamp``, so the writer compares like with like.

An optional ``stream_prefix`` (default empty, i.e. the original key names) is put in front
of every key, so several buffers (or tests) can share one Redis.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

PV_STREAM_MAXLEN = 864000          # one day at 10 Hz
PULSE_ID_STREAM_MAXLEN = 8640000   # one day at 100 Hz
PULSE_ID_STREAM = "pulse_id"
PULSE_ID_REVERSE_STREAM = "pulse_id_reverse"
STRING_TYPE = "string"

# EPICS DBR field types (native, without the TIME/CTRL offset) -> numpy codes.
NATIVE_TYPE_CODES = {1: "i2", 2: "f4", 3: "u2", 4: "u1", 5: "i4", 6: "f8"}

SCALAR_SHAPE = struct.pack("<I", 1)


class EpicsConfigError(ValueError):
    """A bad service config entry; the message names it."""


@dataclass(frozen=True)
class StreamKeys:
    """Redis key names, with an optional prefix in front of each."""

    prefix: str = ""

    def pv(self, name: str) -> str:
        return self.prefix + name

    @property
    def pulse_id(self) -> str:
        return self.prefix + PULSE_ID_STREAM

    @property
    def pulse_id_reverse(self) -> str:
        return self.prefix + PULSE_ID_REVERSE_STREAM


def stream_prefix(config: dict) -> str:
    prefix = config.get("stream_prefix", "")
    if not isinstance(prefix, str):
        raise EpicsConfigError(f"stream_prefix: expected a string, got {prefix!r}")
    return prefix


def encode_shape(shape: tuple[int, ...]) -> bytes:
    return np.asarray(shape, dtype="<u4").tobytes()


def decode_shape(raw: bytes) -> tuple[int, ...]:
    return tuple(int(n) for n in np.frombuffer(raw, dtype="<u4"))


def encode_value(value: Any, native_type: int | None = None) -> tuple[str, bytes, bytes]:
    """``(type, shape, value)`` record fields of a Channel Access value (not None).

    Strings are UTF-8 text with shape (1,); arrays of strings are a JSON list with their
    shape; numbers are little-endian, typed by the channel's native DBR type for scalars
    and by the array's dtype for arrays."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return STRING_TYPE, SCALAR_SHAPE, value.encode("utf-8")
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        value = np.array(value, dtype=object)
    if isinstance(value, np.ndarray) and value.ndim > 0:
        if value.dtype.kind in "OUS":
            texts = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                     for v in value.reshape(-1)]
            return STRING_TYPE, encode_shape(value.shape), json.dumps(texts).encode()
        array = np.ascontiguousarray(value)
        code = f"{array.dtype.kind}{array.dtype.itemsize}"
        return code, encode_shape(array.shape), array.astype("<" + code, copy=False).tobytes()
    code = NATIVE_TYPE_CODES.get(native_type) if native_type is not None else None
    if code is None:
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"cannot store a value of type {type(value).__name__}")
        if array.dtype.kind == "b":
            array = array.astype("u1")
        code = f"{array.dtype.kind}{array.dtype.itemsize}"
    return code, SCALAR_SHAPE, np.asarray(value).astype("<" + code).reshape(-1)[:1].tobytes()


def decode_value(type_code: str, shape: tuple[int, ...], raw: bytes) -> Any:
    """The value of a connected record: an ndarray of ``shape`` (object dtype for strings).
    Raises ValueError if the bytes do not fit the type and shape."""
    if type_code == STRING_TYPE:
        if shape == (1,):
            return np.array([raw.decode("utf-8", errors="replace")], dtype=object)
        try:
            texts = json.loads(raw)
        except ValueError:
            raise ValueError("string array value is not a JSON list") from None
        array = np.array(texts, dtype=object)
        if array.size != math.prod(shape):
            raise ValueError(f"{array.size} strings do not fit shape {shape}")
        return array.reshape(shape)
    try:
        dtype = np.dtype("<" + type_code)
    except TypeError:
        raise ValueError(f"unknown type {type_code!r}") from None
    if len(raw) != dtype.itemsize * math.prod(shape):
        raise ValueError(f"{len(raw)} bytes do not fit type {type_code} shape {shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def connected_record(timestamp_us: int, type_code: str, shape: bytes, value: bytes,
                     status: str) -> dict[str, Any]:
    return {"id": timestamp_us, "type": type_code, "shape": shape, "value": value,
            "connected": 1, "status": status}


def disconnected_record(now_us: int) -> dict[str, Any]:
    return {"id": now_us, "type": b"", "shape": b"", "value": b"", "connected": 0,
            "status": b""}


@dataclass
class Point:
    """One record of a PV stream, decoded."""

    stream_id: bytes
    timestamp_us: int
    connected: bool
    type_code: str
    shape: tuple[int, ...]
    raw_value: bytes
    status: str

    @classmethod
    def from_fields(cls, stream_id: bytes, fields: dict[bytes, bytes]) -> Point:
        connected = fields.get(b"connected", b"0") == b"1"
        return cls(stream_id=stream_id,
                   timestamp_us=int(fields.get(b"id") or 0),
                   connected=connected,
                   type_code=(fields.get(b"type") or b"").decode(),
                   shape=decode_shape(fields.get(b"shape") or b"") if connected else (),
                   raw_value=fields.get(b"value") or b"",
                   status=(fields.get(b"status") or b"").decode(errors="replace"))

    def value(self) -> Any:
        return decode_value(self.type_code, self.shape, self.raw_value)
