"""Every binary layout of stddaq, defined once as numpy structured dtypes.

All layouts are little-endian and packed. The stddaq stream structs (DESIGN.md section 3)
are all ``uint64`` fields. The UDP packet headers are the detectors' own: each detector
type's module in :mod:`fastcore.detectors` defines its header.
"""

from __future__ import annotations

import enum

import numpy as np

_U64 = "<u8"


def _u64_struct(*names: str) -> np.dtype:
    return np.dtype([(name, _U64) for name in names])


# --- stddaq stream structs ------------------------------------------------------------

MODULE_FRAME = _u64_struct(
    "id", "pulse_id", "frame_index", "daq_rec", "n_recv_packets", "module_id", "pos_y", "pos_x"
)
"""Per-module frame metadata, written by udp_recv into the FrameBuffer and sent to sync
(a ZMQ message holds one or more consecutive records)."""

RAW_METADATA = _u64_struct("id", "pulse_id", "frame_index", "daq_rec", "status")
"""One frame of all modules, sent by sync to the assembler."""

IMAGE_METADATA = _u64_struct(
    "id", "height", "width", "dtype", "encoding", "source_id", "status", "user_1", "user_2",
    "frame_index",
)
"""One assembled image in the ImageBuffer, published by the assembler (and stream_recv); a
message of the image stream holds one or more records (the assembler sends a batch as one).
The first nine fields are std-daq's ImageMetadata; ``frame_index`` (stddaq's) is the
detector's own frame index of the image (RawMetadata.frame_index), which the HDF5 writer
stores beside the image id."""


def image_records(message: bytes | memoryview) -> np.ndarray:
    """The ImageMetadata records of one image-stream message; ValueError on a message that
    is not a whole number of records."""
    if not message or len(message) % IMAGE_METADATA.itemsize:
        raise ValueError(f"an image-stream message holds whole {IMAGE_METADATA.itemsize}-byte "
                         f"ImageMetadata records, got {len(message)} bytes")
    return np.frombuffer(message, IMAGE_METADATA)


def image_message(metadata: np.void, image: bytes | np.ndarray) -> list:
    """One replicated image as stream_send sends it and stream_recv takes it: the frames
    ``[ImageMetadata, image bytes]`` of a multipart message."""
    return [metadata.tobytes(), image]


def parse_image_message(frames: list) -> tuple[np.void, memoryview]:
    """(ImageMetadata, image bytes) of an :func:`image_message` (frames: bytes-likes);
    ValueError on another shape of message."""
    if len(frames) != 2 or len(frames[0]) != IMAGE_METADATA.itemsize:
        raise ValueError(f"expected [ImageMetadata, image], got {len(frames)} frame(s)"
                         + (f" of {[len(f) for f in frames][:4]} bytes" if frames else ""))
    return np.frombuffer(frames[0], IMAGE_METADATA)[0], memoryview(frames[1])


class ImageStatus(enum.IntFlag):
    """Bit flags of RawMetadata.status and ImageMetadata.status (0 = good image)."""

    GOOD = 0
    MISSING_PACKETS = 1
    MISSING_MODULES = 2
    ID_MISMATCH = 4
    """A module's FrameBuffer slot was overwritten before or while the image was assembled
    (the assembler fell more than n_frame_slots frames behind)."""
    NOT_IN_BUFFER = 8
    """The writer found the image's ImageBuffer slot overwritten: it is not in the file."""
    ABSENT = 16
    """The image never reached the writer (its id was skipped): a run spread over several
    writers keeps its row, zeros, so every writer's rows stay in image order."""


class Encoding(enum.IntEnum):
    RAW = 0
    BITSHUFFLE_LZ4 = 1


_DTYPE_CODES: dict[str, int] = {
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "int8": 11,
    "int16": 12,
    "int32": 14,
    "int64": 18,
    "float16": 22,
    "float32": 24,
    "float64": 28,
}
_CODE_DTYPES = {code: np.dtype(name) for name, code in _DTYPE_CODES.items()}


def dtype_code(dtype: np.dtype | str | type) -> int:
    """ImageMetadata.dtype code of a numpy dtype (std-daq's ImageMetadataDtype numbering)."""
    name = np.dtype(dtype).name
    try:
        return _DTYPE_CODES[name]
    except KeyError:
        raise ValueError(
            f"dtype {name!r} has no ImageMetadata code; supported: {', '.join(_DTYPE_CODES)}"
        ) from None


def code_dtype(code: int) -> np.dtype:
    """Numpy dtype of an ImageMetadata.dtype code."""
    try:
        return _CODE_DTYPES[int(code)]
    except KeyError:
        raise ValueError(
            f"unknown ImageMetadata dtype code {code}; known: {sorted(_CODE_DTYPES)}"
        ) from None


def pack(dtype: np.dtype, /, **fields: int | float) -> bytes:
    """One struct of ``dtype`` as bytes; unnamed fields are 0 (``dtype`` is positional-only,
    so ImageMetadata's own ``dtype`` field can be given)."""
    record = np.zeros((), dtype=dtype)
    for name, value in fields.items():
        record[name] = value
    return record.tobytes()


def unpack(dtype: np.dtype, data: bytes | memoryview) -> np.void:
    """Parse one struct of ``dtype``; raises ValueError naming the struct on a size mismatch."""
    if len(data) != dtype.itemsize:
        raise ValueError(f"expected a {dtype.itemsize}-byte message, got {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype)[0]


SHM_MAGIC = b"STDDAQ01"
SHM_HEADER = np.dtype(
    [
        ("magic", "S8"),
        ("kind", "S8"),
        ("creator_pid", "<u8"),
        ("n_slots", "<u8"),
        ("slot_bytes", "<u8"),
        ("meta_bytes", "<u8"),
        ("data_bytes", "<u8"),
        ("n_modules", "<u8"),
        ("height", "<u8"),
        ("width", "<u8"),
        ("dtype", "<u8"),
    ]
)
"""Header page of every stddaq shared-memory segment: lets consumers attach by name alone."""
SHM_HEADER_BYTES = 4096
INVALID_ID = np.uint64(2**64 - 1)
"""Slot id while a producer rewrites the slot (the seqlock's 'being written' mark)."""
