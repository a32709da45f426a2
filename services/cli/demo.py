"""stddaq-demo: the whole std-daq on this machine, driven by a Bluesky plan.

Launches a supervised single-machine std-daq (stddaq-run) for a simulated detector at a
sustained frame rate, runs ``count`` in a RunEngine with the Ophyd device StdDaqDetector
(one write request, one image per event), shows a progress bar, and ends with a summary:
file, images written, lost images, rate, and a pixel-for-pixel check of the file reopened
against the simulator's content. Exit code 0 only when every image is in the file, good.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - readers of bitshuffle files
import numpy as np
from bluesky import RunEngine
from bluesky import plans as bp

from fastcore.buffer_sizing import MIN_SLOTS
from fastcore.config import ConfigError, load_config
from fastcore.demo import simulated_image
from fastcore.runtime import setup_logging
from services.cli.run import Launcher, LaunchOptions
from stddaq_ophyd import StdDaqDetector

DEMO_BUFFER_SECONDS = 2.0


class ProgressBar:
    def __init__(self, total: int, width: int = 36):
        self.total, self.width = total, width
        self.began = time.monotonic()
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        filled = int(self.width * done / self.total)
        rate = done / max(now - self.began, 1e-9)
        print(f"\r  [{'#' * filled}{'-' * (self.width - filled)}] {done}/{self.total} images "
              f"{rate:6.1f} images/s", end="", flush=True)


def check_file(path: str, config, n_images: int, check_every: int) -> dict:
    """Reopen the file: count images and bad statuses, compare sampled images."""
    with h5py.File(path, "r") as f:
        group = f[config.detector_name]
        data, status, ids = group["data"], group["status"][:], group["image_id"][:]
        checked = wrong = 0
        for i in range(0, min(n_images, data.shape[0]), max(1, check_every)):
            checked += 1
            wrong += not np.array_equal(data[i], simulated_image(config, int(ids[i])))
        return {"rows": data.shape[0], "bad_status": int(np.count_nonzero(status[:n_images])),
                "checked": checked, "wrong": wrong, "first_id": int(ids[0]) if len(ids) else 0,
                "last_id": int(ids[min(n_images, len(ids)) - 1]) if len(ids) else 0}


def demo_config(path: str, config, rate: float, work: Path, output_dir: Path) -> str:
    """A copy of the config for the demo: files only in the demo's output directory, and
    buffers for DEMO_BUFFER_SECONDS of the demo's rate where the file leaves them to their
    default (1 s of the detector's nominal rate: GBs to map at start)."""
    raw = json.loads(Path(path).read_text())
    raw["output_root"] = os.path.abspath(output_dir)
    if "n_frame_slots" not in raw or "n_image_slots" not in raw:
        slots = max(MIN_SLOTS, math.ceil(DEMO_BUFFER_SECONDS * rate))
        default = config.buffer_plan()
        raw.setdefault("n_frame_slots", slots)
        raw.setdefault("n_image_slots", slots)
        print(f"  buffers: {slots} slots = {DEMO_BUFFER_SECONDS:g} s at {rate:g} Hz (the "
              f"config's default, {default.seconds(default.n_image_slots):g} s at "
              f"{default.nominal_rate_hz:g} Hz, maps {default.total_bytes / 1e9:.1f} GB)")
    copy = work / Path(path).name
    copy.write_text(json.dumps(raw, indent=1))
    return str(copy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-demo",
        description="Run the whole std-daq on this machine with a simulated detector and "
        "write images from a Bluesky plan through the Ophyd device; print a checked summary.")
    parser.add_argument("config", nargs="?", default="configs/jungfrau_1m.json",
                        help="detector config (default: %(default)s, a simulated Jungfrau 1M)")
    parser.add_argument("-n", "--images", type=int, default=500, help="images to write")
    parser.add_argument("-r", "--rate", type=float, default=100.0,
                        help="simulated detector frame rate in Hz (default: %(default)s)")
    parser.add_argument("--output-dir", default=None, help="where the file goes "
                        "(default: a new temporary directory)")
    parser.add_argument("--keep-file", action="store_true",
                        help="keep the demo's file (default: removed after the check, unless "
                        "--output-dir is given)")
    parser.add_argument("--check-every", type=int, default=10,
                        help="compare every N-th image with the simulator's content")
    args = parser.parse_args(argv)
    if args.images < 1 or args.rate <= 0 or args.check_every < 1:
        parser.error("--images and --check-every must be >= 1 and --rate > 0")
    setup_logging(logging.WARNING)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"stddaq-demo: error: {exc}", file=sys.stderr)
        return 1
    if config.converts:
        print("stddaq-demo: error: the demo checks raw pixels; use a config without "
              "pedestal/gain files", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="stddaq-demo-"))
    output_dir = Path(args.output_dir or work / "data")
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"stddaq demo: simulated {config.detector_type} {config.detector_name} "
          f"({config.n_modules} modules, {config.image_pixel_width}x"
          f"{config.image_pixel_height}) at {args.rate:g} Hz; logs in {work / 'logs'}")
    config_path = demo_config(args.config, config, args.rate, work, output_dir)
    launcher = Launcher(config_path, LaunchOptions(ipc_dir=str(work), log_dir=str(work / "logs"),
                                                   simulate_hz=args.rate))
    began = time.monotonic()
    try:
        print("  starting receivers, sync, assembler, writer, writer agent, simulator ...")
        launcher.start()
        print(f"  std-daq up in {time.monotonic() - began:.1f} s")
        return run_plan(args, config, output_dir)
    except (RuntimeError, OSError) as exc:
        print(f"\nstddaq-demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstddaq-demo: interrupted")
        return 130
    finally:
        launcher.stop()
        print(f"  services stopped (logs kept in {work / 'logs'})")


def run_plan(args, config, output_dir: Path) -> int:
    detector = StdDaqDetector("detector", detector_config=config, output_dir=str(output_dir),
                              writer_service=f"{config.detector_name}.writer",
                              trigger_timeout=30)
    RE = RunEngine({})  # noqa: N806 - the RunEngine's usual name
    bar = ProgressBar(args.images)
    resources = []
    RE.subscribe(lambda name, doc: bar.update(doc["seq_num"]) if name == "event" else None)
    RE.subscribe(lambda name, doc: resources.append(doc) if name == "stream_resource"
                 else None)
    print(f"  RunEngine: count([detector], num={args.images}), one image per event")
    started = time.monotonic()
    (uid,) = RE(bp.count([detector], num=args.images))
    elapsed = time.monotonic() - started
    bar.update(args.images, force=True)
    print()
    path = resources[0]["uri"].removeprefix("file://localhost")
    report = check_file(path, config, args.images, args.check_every)
    lost = max(0, args.images - report["rows"]) + report["bad_status"]
    print("summary:")
    print(f"  run              {uid}")
    print(f"  file             {path}")
    print(f"  images written   {report['rows']} (the plan asked for {args.images}: one write "
          "request per event, appended to the file)")
    print(f"  lost images      {lost}")
    image_bytes = np.dtype(config.image_dtype).itemsize * np.prod(config.image_shape)
    rate = args.images / elapsed
    print(f"  rate             {rate:.1f} events/s ({rate * image_bytes / 1e9:.3f} GB/s; a "
          "step scan: one request per event)")
    print(f"  file check       reopened; {report['checked'] - report['wrong']} of "
          f"{report['checked']} sampled images identical to the simulator's content; "
          f"image ids {report['first_id']}..{report['last_id']}")
    ok = lost == 0 and report["wrong"] == 0 and report["rows"] == args.images
    print("  result           " + ("OK" if ok else "PROBLEMS (see the logs)"))
    if not args.keep_file and args.output_dir is None:
        Path(path).unlink()  # a demo leaves no GBs behind in /tmp
        print("  file             removed after the check (--keep-file keeps it)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
