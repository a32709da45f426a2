"""HDF5 writer throughput vs a plain sequential write of the same bytes, same directory.

Images sit in a real ImageBuffer (shared memory); the writer path is fastcore's
``H5Writer`` in-process, started by a start command and fed the ImageMetadata records in
batches as its service loop takes them (slot checks, direct chunk writes from the
shared-memory view, metadata, SWMR flushes), raw and bitshuffle-lz4. The
baseline writes the same image bytes with ``os.write`` to one file. Both end with fsync and
close. Each figure is the median of ``--repeat`` interleaved trials; the last line of the
output is one JSON object with every figure and ratio (target: raw writer >= 0.8 x plain).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid

import numpy as np

from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import parse_config
from fastcore.formats import IMAGE_METADATA, dtype_code
from fastcore.h5_writer import MAX_BATCH, H5Writer
from fastcore.names import Segment
from fastcore.simulator import simulated_pixels
from fastcore.writer_protocol import RunInfo, RunSummary, StartCommand, WriterEvent

SIZES = {"1MiB": (512, 1024), "4MiB": (1024, 2048)}


def fill_buffer(images: ImageBuffer, n: int) -> list[np.ndarray]:
    """Jungfrau-like content (as the simulator sends) in every slot; the metadata list."""
    metas = []
    for image_id in range(1, n + 1):
        view = images.begin_write(image_id)
        rows = view.shape[0] // 512
        for r in range(rows):
            for c in range(view.shape[1] // 1024):
                view[r * 512:(r + 1) * 512, c * 1024:(c + 1) * 1024] = simulated_pixels(
                    "jungfrau", 16, (512, 1024), image_id, r * 2 + c)
        meta = np.zeros((), IMAGE_METADATA)
        meta["id"], meta["height"], meta["width"] = image_id, *images.shape
        meta["dtype"] = dtype_code(images.dtype)
        images.commit(meta)
        metas.append(meta)
    return metas


def plain_write(images: ImageBuffer, n: int, path: str) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for image_id in range(1, n + 1):
            os.write(fd, images.image(image_id))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def writer_write(writer: H5Writer, events: list[WriterEvent], metas, path: str,
                 run_id: int) -> tuple[float, int]:
    """One run of ``writer`` (a long-lived H5Writer, as in the service, which keeps the
    ImageBuffer attached between runs): seconds until the file is closed and fsynced."""
    n = len(metas)
    records = np.array(metas, IMAGE_METADATA)
    start = time.perf_counter()
    writer.command(StartCommand(run_id, RunInfo(path, n), 60.0).to_json())
    for first in range(0, n, MAX_BATCH):  # as the service loop does
        writer.take(records[first:first + MAX_BATCH])
        writer.tick()
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    stop = events[-1]
    assert isinstance(stop, RunSummary) and stop.n_written == n, stop
    return elapsed, os.path.getsize(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="directory to write into "
                        "(default: a new temporary directory under /tmp)")
    parser.add_argument("--total-mib", type=int, default=512,
                        help="bytes per trial in MiB (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="trials per figure")
    parser.add_argument("--quick", action="store_true", help="128 MiB, 2 trials")
    args = parser.parse_args(argv)
    if args.quick:
        args.total_mib, args.repeat = 128, 2
    workdir = tempfile.mkdtemp(prefix="stddaq-bench-writer-", dir=args.dir)
    figures: dict[str, float] = {}
    try:
        for label, shape in SIZES.items():
            image_bytes = shape[0] * shape[1] * 2
            n = args.total_mib * 2**20 // image_bytes
            name = f"bw{uuid.uuid4().hex[:8]}"
            config = parse_config({
                "detector_name": name, "detector_type": "jungfrau", "n_modules": 1,
                "bit_depth": 16, "image_pixel_height": shape[0],
                "image_pixel_width": shape[1], "start_udp_port": 50000, "writer_user_id": 0,
                "module_positions": {"0": [0, 0, 1023, 511]}})
            with ImageBuffer.create(shm_name(name, Segment.IMAGE), n, shape, np.uint16) as images:
                metas = fill_buffer(images, n)
                times: dict[str, list[float]] = {"plain": [], "raw": [], "bslz4": []}
                compressed_size = 0
                raw_events: list[WriterEvent] = []
                bs_events: list[WriterEvent] = []
                raw_writer = H5Writer(config, raw_events.append, "none")
                bs_writer = H5Writer(config, bs_events.append, "bitshuffle-lz4")
                for trial in range(args.repeat + 1):  # trial 0: page cache, attach, warm-up
                    base = os.path.join(workdir, f"{label}-{trial}")
                    plain = plain_write(images, n, base + ".bin")
                    raw, _ = writer_write(raw_writer, raw_events, metas, base + "-raw.h5",
                                          trial + 1)
                    bslz4, compressed_size = writer_write(bs_writer, bs_events, metas,
                                                          base + "-bs.h5", trial + 1)
                    for path in (".bin", "-raw.h5", "-bs.h5"):
                        os.unlink(base + path)
                    if trial:
                        times["plain"].append(plain)
                        times["raw"].append(raw)
                        times["bslz4"].append(bslz4)
                raw_writer.close()
                bs_writer.close()
            total = n * image_bytes
            rates = {k: total / statistics.median(v) / 1e9 for k, v in times.items()}
            figures[f"{label}_images"] = n
            figures[f"{label}_plain_GBps"] = round(rates["plain"], 3)
            figures[f"{label}_raw_GBps"] = round(rates["raw"], 3)
            figures[f"{label}_bslz4_GBps"] = round(rates["bslz4"], 3)
            figures[f"{label}_raw_ratio"] = round(rates["raw"] / rates["plain"], 3)
            figures[f"{label}_bslz4_ratio"] = round(rates["bslz4"] / rates["plain"], 3)
            figures[f"{label}_bslz4_compression"] = round(total / compressed_size, 2)
            print(f"{label}: {n} images x {image_bytes / 2**20:.0f} MiB, median of "
                  f"{args.repeat}: plain {rates['plain']:.2f} GB/s, writer raw "
                  f"{rates['raw']:.2f} GB/s ({figures[f'{label}_raw_ratio']:.2f} x plain), "
                  f"bitshuffle-lz4 {rates['bslz4']:.2f} GB/s of image data "
                  f"({figures[f'{label}_bslz4_ratio']:.2f} x plain, ratio "
                  f"{figures[f'{label}_bslz4_compression']:.2f})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    targets = [figures[f"{label}_raw_ratio"] >= 0.8 for label in SIZES]
    figures["target_raw_ge_0.8x_plain_met"] = all(targets)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
