"""Counters of a detector's ImageMetadata stream, followed in a background thread (for
front ends: the IOC's ``BUF:`` records, the REST service's stats and dashboard)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

import zmq

from fastcore.buffers import segment_alive, shm_name
from fastcore.formats import code_dtype, image_records
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address, subscribe

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
