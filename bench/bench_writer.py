"""HDF5 writer throughput vs a plain sequential write of the same bytes, same directory.

Images sit in a real ImageBuffer (shared memory); the writer path is fastcore's
``H5Writer`` in-process, started by a start command and fed the ImageMetadata records in
batches as its service loop takes them (slot checks, direct chunk writes from the
shared-memory view, metadata, SWMR flushes), raw and bitshuffle-lz4. The
baseline writes the same image bytes with ``os.write`` to one file. Both end with fsync and
close. Each figure is the median of ``--repeat`` interleaved trials; the last line of the
output is one JSON object with every figure and ratio (target: raw writer >= 0.8 x plain).

``--writers N``: a run spread over N writer processes (fastcore/writer_split.py), each an
``H5Writer`` taking its blocks of the same images from the ImageBuffer into its own file,
against one writer process writing all of them, alternated in the same run; it reports the
aggregate throughput and its ratio to N x the one writer (the target, on a machine with
enough cores and disk bandwidth, is >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
from fastcore.writer_split import Split

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


def _writer_process(config, path: str, n: int, split: Split | None, start, done) -> None:
    """Child: wait for ``start``, write this writer's share of images 1..n from the
    ImageBuffer (catch-up, as a writer that begins at an id does), fsync; report."""
    events: list[WriterEvent] = []
    writer = H5Writer(config, events.append, "none")
    start.wait()
    began = time.perf_counter()
    writer.command(StartCommand(1, RunInfo(path, n), 60.0, 1, split=split).to_json())
    while writer.run is not None:
        writer.tick()
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    summaries = [event for event in events if isinstance(event, RunSummary)]
    done.send((began, time.perf_counter(), summaries[-1].n_written if summaries else -1))
    writer.close()


def _spread_run(config, workdir: str, n: int, n_writers: int, fpb: int, tag: str) -> float:
    """Seconds from the start until the last of ``n_writers`` processes has written and
    fsynced its share of the n images (one process without a split when n_writers is 1)."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    pipes, children = [], []
    for i in range(n_writers):
        receive, send = ctx.Pipe(duplex=False)
        split = Split(i, n_writers, fpb) if n_writers > 1 else None
        path = os.path.join(workdir, f"{tag}_w{i}.h5")
        child = ctx.Process(target=_writer_process, args=(config, path, n, split, start, send))
        child.start()
        pipes.append(receive)
        children.append(child)
    time.sleep(0.5)  # every child attached its ImageBuffer
    start.set()
    results = [pipe.recv() for pipe in pipes]
    for child in children:
        child.join(30)
    assert sum(r[2] for r in results) == n, results
    for i in range(n_writers):
        os.unlink(os.path.join(workdir, f"{tag}_w{i}.h5"))
    return max(r[1] for r in results) - min(r[0] for r in results)


def writers_main(args: argparse.Namespace, workdir: str) -> dict:
    """One writer process against ``args.writers`` of them, alternated; 1 MiB images."""
    shape = SIZES["1MiB"]
    image_bytes = shape[0] * shape[1] * 2
    n = args.total_mib * 2**20 // image_bytes
    name = f"bw{uuid.uuid4().hex[:8]}"
    config = parse_config({
        "detector_name": name, "detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
        "image_pixel_height": shape[0], "image_pixel_width": shape[1],
        "start_udp_port": 50000, "writer_user_id": 0, "n_writers": args.writers,
        "frames_per_block": args.frames_per_block,
        "module_positions": {"0": [0, 0, 1023, 511]}})
    times: dict[int, list[float]] = {1: [], args.writers: []}
    with ImageBuffer.create(shm_name(name, Segment.IMAGE), n, shape, np.uint16) as images:
        fill_buffer(images, n)
        for trial in range(args.repeat + 1):  # trial 0: page cache, warm-up
            for count in (1, args.writers):
                seconds = _spread_run(config, workdir, n, count, args.frames_per_block,
                                      f"t{trial}n{count}")
                if trial:
                    times[count].append(seconds)
    one = n * image_bytes / statistics.median(times[1]) / 1e9
    spread = n * image_bytes / statistics.median(times[args.writers]) / 1e9
    ratio = spread / (args.writers * one)
    print(f"{n} images x 1 MiB, median of {args.repeat}: one writer {one:.2f} GB/s, "
          f"{args.writers} writers (blocks of {args.frames_per_block}) {spread:.2f} GB/s "
          f"together = {ratio:.2f} x {args.writers} x one writer ({os.cpu_count()} cores)",
          flush=True)
    return {"images": n, "writers": args.writers, "frames_per_block": args.frames_per_block,
            "one_writer_GBps": round(one, 3), "writers_GBps": round(spread, 3),
            "speedup": round(spread / one, 3), "ratio_to_n_x_one": round(ratio, 3),
            "cores": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="directory to write into "
                        "(default: a new temporary directory under /tmp)")
    parser.add_argument("--total-mib", type=int, default=512,
                        help="bytes per trial in MiB (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=5, help="trials per figure")
    parser.add_argument("--quick", action="store_true", help="128 MiB, 2 trials")
    parser.add_argument("--writers", type=int, default=1,
                        help="compare one writer process with this many sharing each run")
    parser.add_argument("--frames-per-block", type=int, default=16,
                        help="images per block with --writers (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.quick:
        args.total_mib, args.repeat = 128, 2
    if args.writers < 1 or args.frames_per_block < 1:
        parser.error("--writers and --frames-per-block: expected integers >= 1")
    workdir = tempfile.mkdtemp(prefix="stddaq-bench-writer-", dir=args.dir)
    if args.writers > 1:
        try:
            print(json.dumps(writers_main(args, workdir)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
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
