"""Image assembly and Jungfrau conversion throughput, each as a ratio to a plain numpy copy.

A 4-module Jungfrau (2 x 2 modules of 512 x 1024, flipped vertically as in
configs/jungfrau_1m.json) is assembled from raw module frames with
``fastcore.assembler.ImageAssembler.place_module``:

- raw: 16-bit pixels copied block by block into a uint16 image;
- conversion: pedestal/gain conversion (numba, ``fastcore.conversion.convert_jungfrau``)
  into a float32 image, calibration per module as ``load_calibration`` returns it;
- conversion, all pixels in gain stage 0: the same frames with the gain bits cleared, to
  show how much the pixels in stages 1 and 2 cost;
- reference: ``fastcore.conversion.convert_reference`` (plain numpy) per module, for context;
- copy: ``np.copyto`` of the same raw bytes (each module frame into a contiguous quarter of
  a destination image): the yardstick of the ratios.

Every task reads many distinct source frames in rotation (default 128 MiB, more than any
cache) and writes into a rotation of destination images, like the assembler writing the
ImageBuffer ring. Each task runs once to warm up (numba compiles, pages fault in), then the
tasks take turns for several repeats; the median pass gives images/s and GB/s of raw input.

The last line of the output is one JSON object holding every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import numba
import numpy as np

from fastcore.assembler import SERIAL_COPY_MAX_BYTES, Assembler, ImageAssembler
from fastcore.config import DetectorConfig, parse_config
from fastcore.conversion import convert_reference
from fastcore.detectors.jungfrau import MODULE_SHAPE as JUNGFRAU_MODULE_SHAPE
from fastcore.simulator import simulated_pixels

N_MODULES = 4
MOD_H, MOD_W = JUNGFRAU_MODULE_SHAPE
MODULE_BYTES = MOD_H * MOD_W * 2
IMAGE_RAW_BYTES = N_MODULES * MODULE_BYTES  # raw input per image: 4 MiB
TARGETS = {"raw": 0.7, "convert": 0.25, "convert_batch": 0.25}


def detector_config(gaps: bool) -> DetectorConfig:
    """2 x 2 Jungfrau modules; with ``gaps`` each module spans 514 x 1030 pixels (2-pixel
    gaps between its chips, 8 blocks per module) instead of 512 x 1024."""
    height, width = (MOD_H + 2, MOD_W + 6) if gaps else (MOD_H, MOD_W)
    positions = {}
    for m in range(N_MODULES):
        row, col = divmod(m, 2)
        sx, ex = col * width, col * width + width - 1
        top, bottom = row * height, row * height + height - 1
        positions[str(m)] = [sx, bottom, ex, top]  # flipped vertically, like the 1M config
    return parse_config({
        "detector_name": f"bench-asm-{os.getpid()}", "detector_type": "jungfrau",
        "n_modules": N_MODULES, "bit_depth": 16, "image_pixel_height": 2 * height,
        "image_pixel_width": 2 * width, "start_udp_port": 50000, "writer_user_id": 0,
        "module_positions": positions,
    }, source="bench")


def make_calibration(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray,
                                                        np.ndarray]:
    """(per-module (2, 3, 512, 1024) float32 pedestal and 1/gain as load_calibration builds
    it, pedestal (3, 512, 1024) and gain (3, 512, 1024) of module 0 for the reference)."""
    calibration = []
    pedestal0 = gain0 = None
    for _ in range(N_MODULES):
        pedestal = rng.normal([[[1000.0]], [[12000.0]], [[14000.0]]], 50.0,
                              (3, MOD_H, MOD_W)).astype(np.float32)
        gain = rng.normal([[[40.0]], [[-1.5]], [[-0.1]]], [[[1.0]], [[0.05]], [[0.005]]],
                          (3, MOD_H, MOD_W)).astype(np.float32)
        calibration.append(np.stack([pedestal, 1.0 / gain]).astype(np.float32))
        if pedestal0 is None:
            pedestal0, gain0 = pedestal, gain
    return calibration, pedestal0, gain0


def make_sources(n_images: int) -> np.ndarray:
    """(n_images, 4, 1 MiB) uint8 raw module frames as the FrameBuffer holds them; pixel
    content from the simulator (gain bits set per 32 x 32 block: 75 % of pixels in G0)."""
    sources = np.empty((n_images, N_MODULES, MODULE_BYTES), np.uint8)
    for i in range(n_images):
        for m in range(N_MODULES):
            pixels = simulated_pixels("jungfrau", 16, JUNGFRAU_MODULE_SHAPE, i, m)
            sources[i, m] = pixels.view(np.uint8).ravel()
    return sources


def time_pass(task: Callable[[int, int], None], n_images: int, n_dest: int,
              start: int, step: int = 1) -> float:
    """Seconds to run ``task(image, dest)`` over images 0..n_images-1 once (a batch task
    handles ``step`` images from ``image`` on)."""
    began = time.perf_counter()
    for i in range(0, n_images, step):
        task(i, (start + i) % n_dest)
    return time.perf_counter() - began


def check(assembler: ImageAssembler, converter: ImageAssembler, sources: np.ndarray,
          calibration: list[np.ndarray], pedestal0: np.ndarray, gain0: np.ndarray,
          raw_image: np.ndarray, float_image: np.ndarray) -> dict:
    """Assemble and convert image 0 once and compare module 0 with expectations."""
    for m in range(N_MODULES):
        assembler.place_module(m, sources[0, m], raw_image)
        converter.place_module(m, sources[0, m], float_image)
    module0 = sources[0, 0].view(np.uint16).reshape(JUNGFRAU_MODULE_SHAPE)
    expected = convert_reference(module0, pedestal0, gain0)
    raw_ok = float_err = 0.0
    raw_parts, float_parts = [], []
    for source, dest in assembler.blocks[0]:
        raw_parts.append(np.array_equal(raw_image[dest], module0[source]))
        diff = np.abs(float_image[dest] - expected[source]) / np.maximum(
            np.abs(expected[source]), 1.0)
        float_parts.append(float(diff.max()))
    raw_ok = all(raw_parts)
    float_err = max(float_parts)
    return {"raw_matches": bool(raw_ok), "conversion_max_rel_error": float_err}


def run_layout(layout: str, args: argparse.Namespace, repeats: int, sources: np.ndarray,
               calibration: list[np.ndarray], pedestal0: np.ndarray,
               gain0: np.ndarray) -> dict:
    """Time every task on one layout; print and return its figures."""
    n_src = len(sources)
    threads = numba.get_num_threads()
    # the same frames with every pixel in gain stage 0: conversion's data dependence
    sources_g0 = (sources.view(np.uint16) & np.uint16(0x3FFF)).view(np.uint8)
    config = detector_config(layout == "gaps")
    height, width = config.image_shape
    n_dest = max(2, -(-args.dest_mib * 2**20 // (height * width * 2)))
    raw_images = np.zeros((n_dest, height, width), np.uint16)
    float_images = np.zeros((n_dest, height, width), np.float32)
    # the copy writes each module frame into a contiguous quarter of a raw image
    copy_dest = raw_images.reshape(n_dest, -1)[:, : IMAGE_RAW_BYTES // 2].reshape(
        n_dest, N_MODULES, -1)
    src16 = sources.view(np.uint16)
    raw_serial = raw_images[0].nbytes <= SERIAL_COPY_MAX_BYTES
    assembler = ImageAssembler(config)
    converter = ImageAssembler(config, calibration)
    blocks = len(assembler.blocks[0])
    print(f"layout {layout}: image {height} x {width}, {blocks} block(s) per module, "
          f"{n_dest} destination images in rotation "
          f"({raw_images.nbytes / 2**20:.0f} MiB uint16, "
          f"{float_images.nbytes / 2**20:.0f} MiB float32)", flush=True)

    def copy(i: int, d: int) -> None:
        for m in range(N_MODULES):
            np.copyto(copy_dest[d, m], src16[i, m])

    def raw(i: int, d: int) -> None:
        for m in range(N_MODULES):
            assembler.place_module(m, sources[i, m], raw_images[d])

    def convert(i: int, d: int) -> None:
        for m in range(N_MODULES):
            converter.place_module(m, sources[i, m], float_images[d])

    def convert_g0(i: int, d: int) -> None:
        for m in range(N_MODULES):
            converter.place_module(m, sources_g0[i, m], float_images[d])

    # batches as the assembler places them when it is behind: frames and images reached
    # as rows of 2-D arrays (like FrameBuffer/ImageBuffer.pixel_rows)
    frame_rows = src16.reshape(n_src * N_MODULES, -1)
    image_rows = float_images.reshape(n_dest, -1)

    def batch_task(size: int) -> Callable[[int, int], None]:
        def convert_batch(i: int, d: int) -> None:
            images = np.arange(i, i + size)
            dests = (d + np.arange(size)) % n_dest
            for m in range(N_MODULES):
                converter.place_frames(m, (frame_rows, images * N_MODULES + m, 0),
                                       (image_rows, dests, 0))
        return convert_batch

    def reference(i: int, d: int) -> None:
        for m in range(N_MODULES):
            convert_reference(src16[i, m].reshape(JUNGFRAU_MODULE_SHAPE), pedestal0,
                              gain0)

    batch = args.batch
    tasks = {"copy": (copy, n_src, 1), "raw": (raw, n_src, 1),
             "convert": (convert, n_src, 1), "convert_batch": (batch_task(batch), n_src, batch),
             "convert_1thread": (convert, n_src, 1), "convert_g0": (convert_g0, n_src, 1),
             "reference": (reference, min(args.reference_images, n_src), 1)}
    checks = check(assembler, converter, sources, calibration, pedestal0, gain0,
                   raw_images[0], float_images[0])
    # a batch gives the same images as one call per image
    batch_task(batch)(0, 0)
    batched = float_images[:batch].copy()
    for k in range(batch):
        convert(k, k)
    checks["batch_matches"] = bool(np.array_equal(batched, float_images[:batch]))
    print(f"  checks: raw module placed exactly: {checks['raw_matches']}; conversion vs "
          f"reference, max relative error {checks['conversion_max_rel_error']:.2e}; "
          f"batch of {batch} equals one by one: {checks['batch_matches']}",
          flush=True)

    def run(name: str, repeat: int) -> float:
        task, n, step = tasks[name]
        if name == "convert_1thread" or (name == "raw" and raw_serial):
            numba.set_num_threads(1)  # raw: on one thread, as the assembler copies it
        try:
            return time_pass(task, n, n_dest, repeat * n, step)
        finally:
            numba.set_num_threads(threads)

    began = time.perf_counter()
    for name in tasks:  # warm-up: compile, fault in, settle
        run(name, 0)
    print(f"  warm-up done in {time.perf_counter() - began:.1f} s; {repeats} timed "
          "passes per task, tasks interleaved", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in tasks}
    for r in range(repeats):
        for name in tasks:
            seconds[name].append(run(name, r + 1))
    result: dict = {"image_shape": [height, width], "blocks_per_module": blocks,
                    "dest_images": n_dest, **checks}
    copy_rate = 0.0
    for name, (_, n, _) in tasks.items():
        median = float(np.median(seconds[name]))
        rate = n / median
        gb = rate * IMAGE_RAW_BYTES / 1e9
        if name == "copy":
            copy_rate = rate
        ratio = rate / copy_rate
        spread = (max(seconds[name]) - min(seconds[name])) / median
        result[f"{name}_images_per_s"] = round(rate, 1)
        result[f"{name}_gbps"] = round(gb, 3)
        result[f"{name}_ratio_to_copy"] = round(ratio, 3)
        result[f"{name}_spread"] = round(spread, 3)
        target = TARGETS.get(name)
        verdict = ""
        if target is not None:
            met = ratio >= target
            result[f"{name}_target"] = target
            result[f"{name}_target_met"] = met
            verdict = f"  target >= {target}: {'met' if met else 'MISSED'}"
        print(f"  {name:16s} {rate:8.1f} images/s  {gb:6.2f} GB/s raw  "
              f"{ratio:5.2f} x copy  (spread {spread:.0%}, {n} images/pass){verdict}",
              flush=True)
    result["convert_module_frames_per_s"] = round(4 * result["convert_images_per_s"], 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="4-module Jungfrau image assembly (raw 16-bit) and pedestal/gain "
        "conversion with fastcore's ImageAssembler, as ratios to np.copyto of the same "
        "bytes. Ends with one JSON line of all figures.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: fewer repeats (5 instead of 9)")
    parser.add_argument("--layout", choices=["plain", "gaps", "both"], default="both",
                        help="module layout: plain 1024 x 2048 image, with chip gaps "
                        "(1028 x 2060, 8 blocks per module), or both (default)")
    parser.add_argument("--source-mib", type=int, default=128,
                        help="raw source frames in rotation, MiB (default: %(default)s; "
                        ">= 64 keeps them out of the caches)")
    parser.add_argument("--dest-mib", type=int, default=64,
                        help="destination images in rotation, MiB of raw image "
                        "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed passes per task, median taken (default 9, --quick 5)")
    parser.add_argument("--batch", type=int, default=Assembler.MAX_BATCH,
                        help="images per call of the batched conversion, as the assembler "
                        "forms batches when it falls behind (default: %(default)s)")
    parser.add_argument("--reference-images", type=int, default=4,
                        help="images per pass of the slow numpy reference conversion "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 9)
    if repeats < 1 or args.source_mib < 4 or args.dest_mib < 4 or args.reference_images < 1:
        parser.error("--repeats >= 1, --source-mib/--dest-mib >= 4, --reference-images >= 1")
    layouts = ["plain", "gaps"] if args.layout == "both" else [args.layout]

    rng = np.random.default_rng(0)
    n_src = max(1, args.source_mib * 2**20 // IMAGE_RAW_BYTES)
    if args.batch < 1 or n_src % args.batch:
        parser.error(f"--batch must divide the {n_src} source images")
    print(f"bench_assemble: 4-module Jungfrau, {n_src} source images ({n_src * 4} distinct "
          f"module frames, {n_src * IMAGE_RAW_BYTES / 2**20:.0f} MiB) in rotation; "
          f"numba {numba.__version__} with {numba.get_num_threads()} threads, "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs", flush=True)
    sources = make_sources(n_src)
    calibration, pedestal0, gain0 = make_calibration(rng)
    figures: dict = {"benchmark": "bench_assemble", "quick": args.quick, "repeats": repeats,
                     "source_images": n_src, "source_mib": round(sources.nbytes / 2**20, 1),
                     "image_raw_bytes": IMAGE_RAW_BYTES,
                     "numba_threads": numba.get_num_threads(), "cpus": os.cpu_count()}

    for layout in layouts:
        figures[layout] = run_layout(layout, args, repeats, sources, calibration,
                                     pedestal0, gain0)

    for layout in layouts:
        for key in ("raw_ratio_to_copy", "convert_ratio_to_copy", "convert_batch_ratio_to_copy",
                    "raw_target_met", "convert_target_met", "convert_batch_target_met"):
            figures[f"{layout}_{key}"] = figures[layout][key]
    sys.stdout.flush()
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
