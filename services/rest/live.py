"""The newest image of the detector's ImageBuffer for viewers: read (copied, slot-checked),
downsampled by striding, scaled to 8 bits between ``low`` and ``high`` (default: the 1st
and 99.5th percentile) and coloured with a lookup table; PNG or JPEG by Pillow."""

from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

from fastcore.buffers import ImageBuffer, ShmBufferError, shm_name
from fastcore.names import Segment

MAX_SIZE = 2048
_ANCHORS = {  # colour-scale anchor points, interpolated to 256 entries
    "gray": [(0, 0, 0), (255, 255, 255)],
    "hot": [(0, 0, 0), (230, 0, 0), (255, 210, 0), (255, 255, 255)],
    "viridis": [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
}
COLORMAPS = tuple(_ANCHORS)


def colormap(name: str) -> np.ndarray:
    """(256, 3) uint8 lookup table; ValueError naming the known ones."""
    if name not in _ANCHORS:
        raise ValueError(f"cmap: expected one of {', '.join(COLORMAPS)}, got {name!r:.40}")
    anchors = np.asarray(_ANCHORS[name], float)
    positions = np.linspace(0, 255, len(anchors))
    levels = np.arange(256)
    return np.stack([np.interp(levels, positions, anchors[:, c]) for c in range(3)],
                    axis=1).astype(np.uint8)


def render(image: np.ndarray, low: float | None = None, high: float | None = None,
           cmap: str = "gray", size: int = 512, fmt: str = "PNG") -> tuple[bytes, float, float]:
    """The image as ``fmt`` bytes, at most ``size`` pixels a side; returns (bytes, low, high)."""
    if not 16 <= size <= MAX_SIZE:
        raise ValueError(f"size: expected 16 to {MAX_SIZE} pixels, got {size}")
    table = colormap(cmap)
    stride = max(1, -(-max(image.shape) // size))
    view = image[::stride, ::stride].astype(np.float32)
    if low is None or high is None:
        auto_low, auto_high = np.percentile(view, (1.0, 99.5))
        low = float(auto_low) if low is None else low
        high = float(auto_high) if high is None else high
    if high <= low:  # a flat image (or limits the wrong way round): show it mid-scale
        low, high = low - 0.5, low + 0.5
    span = high - low
    levels = np.clip((view - low) * (255.0 / span), 0, 255).astype(np.uint8)
    picture = Image.fromarray(table[levels], "RGB")
    out = io.BytesIO()
    picture.save(out, fmt, **({"quality": 80} if fmt == "JPEG" else {}))
    return out.getvalue(), float(low), float(high)


class LiveImage:
    """Reads the newest image of a detector's ImageBuffer (attached on first use, followed
    when the assembler recreates it)."""

    def __init__(self, detector_name: str):
        self.name = shm_name(detector_name, Segment.IMAGE)
        self._buffer: ImageBuffer | None = None
        self._lock = threading.Lock()

    def newest(self) -> tuple[int, np.ndarray] | None:
        """(image id, a copy of the image), or None when no image is there yet."""
        with self._lock:
            try:
                if self._buffer is None:
                    self._buffer = ImageBuffer.attach(self.name)
                else:  # the assembler restarted (a new config): follow its new buffer
                    self._buffer = self._buffer.refreshed()
                for _ in range(3):  # the slot may be rewritten while copied: take a newer one
                    image_id = self._buffer.newest()
                    if image_id is None:
                        return None
                    try:
                        _, image = self._buffer.read(image_id)
                    except ShmBufferError:
                        continue
                    return image_id, image
            except ShmBufferError:
                self.close_locked()
            return None

    def close_locked(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()
