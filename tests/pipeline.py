"""Run the real data plane (udp-recv, sync, assembler processes) and compute expected images.

The expected images are built here independently of fastcore.geometry: plain loops,
np.flipud/np.fliplr and explicit row arithmetic, from the simulator's documented content.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import zmq

from fastcore.conversion import convert_reference
from fastcore.detectors import module_format
from fastcore.formats import image_records
from fastcore.names import Stream
from fastcore.process import ipc_address
from fastcore.simulator import simulated_pixels
from tests.conftest import Proc, module_cmd


class Pipeline:
    """udp-recv -> sync -> assembler as child processes, stopped and checked on exit."""

    def __init__(self, config_path: Path, raw: dict, ipc_dir: str, log_dir: Path,
                 sync_timeout: float = 0.5):
        self.config_path, self.raw, self.ipc_dir, self.log_dir = (config_path, raw, ipc_dir,
                                                                  log_dir)
        self.sync_timeout = sync_timeout
        self.procs: list[Proc] = []
        self.name = raw["detector_name"]

    def _start(self, module: str, *extra: str) -> Proc:
        proc = Proc(module_cmd(module, str(self.config_path), "--ipc-dir", self.ipc_dir,
                               *extra), self.log_dir / f"{module.split('.')[-1]}.log")
        self.procs.append(proc)
        proc.wait_for("ready")
        return proc

    def __enter__(self) -> Pipeline:
        try:
            self.recv = self._start("fastcore.udp_recv")
            self.sync = self._start("fastcore.sync", "--timeout", str(self.sync_timeout))
            self.assembler = self._start("fastcore.assembler")
        except BaseException:
            self.stop()
            raise
        return self

    def subscribe(self) -> zmq.Socket:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(ipc_address(self.ipc_dir, self.name, Stream.IMAGE))
        time.sleep(0.3)  # let the subscription reach the publisher
        return sub

    @staticmethod
    def collect(sub: zmq.Socket, n: int, timeout: float = 20.0) -> list[np.void]:
        """Up to ``n`` ImageMetadata records; stops early after ``timeout`` seconds."""
        records = []
        deadline = time.monotonic() + timeout
        while len(records) < n and time.monotonic() < deadline:
            if sub.poll(100):
                records += list(image_records(sub.recv()).copy())
        sub.close(0)
        return records

    def stop(self) -> list[int]:
        codes = [proc.stop() for proc in reversed(self.procs)]
        self.procs = []
        return codes

    def __exit__(self, exc_type, *_) -> None:
        codes = self.stop()
        if exc_type is None:
            assert codes == [0] * len(codes), f"exit codes {codes}"


def _module_on_image(raw: dict, pixels: np.ndarray, module: int, out: np.ndarray) -> None:
    """Place one module by the config's corners with plain numpy (independent of geometry)."""
    fmt = module_format(raw["detector_type"], raw["bit_depth"],
                        (raw["image_pixel_height"], raw["image_pixel_width"]))
    sx, sy, ex, ey = raw["module_positions"][str(module)]
    height, width = abs(ey - sy) + 1, abs(ex - sx) + 1
    tile = np.zeros((height, width), out.dtype)
    if (height, width) == fmt.module_shape:
        tile[:] = pixels
    else:
        chips_y, chips_x = fmt.chips
        ch, cw = fmt.module_shape[0] // chips_y, fmt.module_shape[1] // chips_x
        for cy in range(chips_y):
            for cx in range(chips_x):
                y, x = cy * (ch + 2), cx * (cw + 2)
                tile[y : y + ch, x : x + cw] = pixels[cy * ch : (cy + 1) * ch,
                                                      cx * cw : (cx + 1) * cw]
    if sy > ey:
        tile = np.flipud(tile)
    if sx > ex:
        tile = np.fliplr(tile)
    out[min(sy, ey) : max(sy, ey) + 1, min(sx, ex) : max(sx, ex) + 1] = tile


def _gigafrost_on_image(raw: dict, pixels: np.ndarray, module: int, out: np.ndarray) -> None:
    height, width = raw["image_pixel_height"], raw["image_pixel_width"]
    quadrant, link = module // 2, module % 2  # quadrant: SW=0, SE=1, NW=2, NE=3
    col = width // 2 if quadrant in (1, 3) else 0
    for row in range(pixels.shape[0]):
        quadrant_row = 2 * row + link  # counted from the centre line outwards
        image_row = height // 2 - 1 - quadrant_row if quadrant >= 2 else height // 2 + quadrant_row
        out[image_row, col : col + width // 2] = pixels[row]


def expected_image(raw: dict, frame: int, dtype, calibration: tuple | None = None,
                   zero_packets: dict[int, list[int]] | None = None,
                   missing_modules: set[int] = frozenset()) -> np.ndarray:
    """The image the pipeline must produce for ``frame``.

    ``zero_packets`` maps module -> lost packet indices (their pixels are 0);
    ``calibration`` = (pedestal, gain) arrays of shape (3, n_modules*512, 1024).
    """
    shape = (raw["image_pixel_height"], raw["image_pixel_width"])
    fmt = module_format(raw["detector_type"], raw["bit_depth"], shape)
    out = np.zeros(shape, dtype)
    for module in range(raw["n_modules"]):
        if module in missing_modules:
            continue
        pixels = simulated_pixels(raw["detector_type"], raw["bit_depth"], fmt.module_shape, frame,
                               module).copy()
        for packet in (zero_packets or {}).get(module, []):
            flat = pixels.reshape(-1)
            per_packet = fmt.payload_bytes * 8 // fmt.pixel_bits
            flat[packet * per_packet : (packet + 1) * per_packet] = 0
        if calibration is not None:
            pedestal, gain = calibration
            rows = slice(module * 512, (module + 1) * 512)
            pixels = convert_reference(pixels, pedestal[:, rows], gain[:, rows])
        if raw["detector_type"] == "gigafrost":
            _gigafrost_on_image(raw, pixels, module, out)
        else:
            _module_on_image(raw, pixels, module, out)
    return out
