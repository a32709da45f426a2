"""Messages between the writer agent and the HDF5 writer (pure encode/decode, no sockets).

To the writer (ZMQ PUSH -> PULL ``stddaq-<det>-writer``), multipart:
- ``[StoreStream]``: write ImageBuffer image ``image_metadata.id`` as image ``i_image`` of
  run ``run_id`` (``n_images`` in all);
- ``[StoreStream, RunInfo JSON]``: the same, and it opens the run's file (sent with the
  run's first image);
- ``[StoreStream with image id STOP_ID]``: close run ``run_id`` now (kill / stop).
From the writer (ZMQ PUB ``stddaq-<det>-writer-status``): one JSON object per event,
``{"event": "start"|"image"|"stop"|"error", "run_id": ..., ...}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fastcore.formats import INVALID_ID, STORE_STREAM

STOP_ID = int(INVALID_ID)
COMPRESSIONS = ("none", "bitshuffle-lz4")


class ProtocolError(ValueError):
    """A writer message that cannot be understood."""


@dataclass(frozen=True)
class RunInfo:
    """What the writer needs to open a run's file."""

    output_file: str
    n_images: int
    metadata: dict[str, Any] = field(default_factory=dict)
    user_id: int | None = None
    compression: str | None = None  # None: the writer's default

    def validate(self) -> None:
        """Raise ProtocolError naming the bad field."""
        if not isinstance(self.output_file, str) or not os.path.isabs(self.output_file):
            raise ProtocolError(f"output_file: expected an absolute path, got "
                                f"{self.output_file!r}")
        if ".." in self.output_file.split(os.sep):
            raise ProtocolError(f"output_file: '..' is not allowed, got {self.output_file!r}")
        if not isinstance(self.n_images, int) or isinstance(self.n_images, bool) or \
                self.n_images < 1:
            raise ProtocolError(f"n_images: expected an integer >= 1, got {self.n_images!r}")
        if not isinstance(self.metadata, dict):
            raise ProtocolError(f"metadata: expected an object, got {self.metadata!r}")
        if self.user_id is not None and (not isinstance(self.user_id, int)
                                         or isinstance(self.user_id, bool)):
            raise ProtocolError(f"user_id: expected an integer, got {self.user_id!r}")
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ProtocolError(f"compression: expected one of {COMPRESSIONS}, got "
                                f"{self.compression!r}")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunInfo:
        try:
            raw = json.loads(data)
            info = cls(**raw)
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"bad run info: {exc}") from None
        info.validate()
        return info


def store_stream(image_metadata: np.void | np.ndarray, run_id: int, i_image: int,
                 n_images: int) -> np.ndarray:
    record = np.zeros((), STORE_STREAM)
    record["image_metadata"] = image_metadata
    record["run_id"], record["i_image"], record["n_images"] = run_id, i_image, n_images
    return record


def image_message(image_metadata, run_id: int, i_image: int, n_images: int,
                  run_info: RunInfo | None = None) -> list[bytes]:
    frames = [store_stream(image_metadata, run_id, i_image, n_images).tobytes()]
    if run_info is not None:
        frames.append(run_info.to_json())
    return frames


def stop_message(run_id: int) -> list[bytes]:
    record = np.zeros((), STORE_STREAM)
    record["image_metadata"]["id"] = STOP_ID
    record["run_id"] = run_id
    return [record.tobytes()]


def decode(frames: list[bytes]) -> tuple[np.void, RunInfo | None]:
    """(StoreStream record, RunInfo or None); raises ProtocolError on a malformed message."""
    if not 1 <= len(frames) <= 2 or len(frames[0]) != STORE_STREAM.itemsize:
        raise ProtocolError(f"expected [StoreStream ({STORE_STREAM.itemsize} B), optional "
                            f"run info], got {len(frames)} frame(s) of sizes "
                            f"{[len(f) for f in frames]}")
    record = np.frombuffer(frames[0], STORE_STREAM)[0]
    return record, RunInfo.from_json(frames[1]) if len(frames) == 2 else None


def is_stop(record: np.void) -> bool:
    return int(record["image_metadata"]["id"]) == STOP_ID
