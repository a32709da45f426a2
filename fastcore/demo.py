"""stddaq-dataplane-demo: a simulated detector through the data plane, with live statistics.

Starts stddaq-udp-recv, stddaq-sync and stddaq-assembler for a detector config, streams
frames from stddaq-simulator, follows the ImageMetadata stream, checks sampled images pixel
for pixel against the simulator's content and ends with a summary. Exit code 0 only when
every frame arrived as a good, correct image.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from fastcore.buffers import ImageBuffer, ShmBufferError, SlotOverwrittenError, shm_name
from fastcore.config import ConfigError, DetectorConfig, load_config
from fastcore.formats import image_records
from fastcore.geometry import module_blocks
from fastcore.launch import ChildProcess
from fastcore.names import Segment, Stream
from fastcore.process import ipc_address


def simulated_image(config: DetectorConfig, frame: int) -> np.ndarray:
    """The raw image the simulator's frame must assemble to (no conversion)."""
    shape = config.module_format.module_shape
    image = np.zeros(config.image_shape, config.image_dtype)
    for module in range(config.n_modules):
        pixels = config.kind.simulated_pixels(config.bit_depth, shape, frame, module)
        for source, dest in module_blocks(config, module):
            image[dest] = pixels[source]
    return image


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / max(total, 1))
    return "#" * filled + "-" * (width - filled)


class Demo:
    def __init__(self, config_path: str, config: DetectorConfig, frames: int, rate: float,
                 check_every: int, work_dir: Path):
        self.config_path, self.config = config_path, config
        self.frames, self.rate, self.check_every = frames, rate, check_every
        self.work_dir = work_dir
        self.children: list[ChildProcess] = []

    def start(self, module: str, *extra: str, ready: str | None = "ready") -> ChildProcess:
        name = module.split(".")[-1]
        child = ChildProcess.module(
            module, [self.config_path, *extra], self.work_dir / f"{name}.log")
        self.children.append(child)
        if ready:
            child.wait_for(ready)
        print(f"  started {name:<10} pid {child.pid}  log {child.log_path}")
        return child

    def run(self) -> int:
        config, ipc = self.config, str(self.work_dir)
        print(f"stddaq demo: {config.detector_type} {config.detector_name}, "
              f"{config.n_modules} modules, {config.image_pixel_width}x"
              f"{config.image_pixel_height} {config.image_dtype}, {self.frames} frames at "
              f"{self.rate:g} Hz")
        self.start("fastcore.udp_recv", "--ipc-dir", ipc)
        self.start("fastcore.sync", "--ipc-dir", ipc)
        self.start("fastcore.assembler", "--ipc-dir", ipc)
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(ipc_address(ipc, config.detector_name, Stream.IMAGE))
        images = ImageBuffer.attach(shm_name(config.detector_name, Segment.IMAGE))
        time.sleep(0.3)
        simulator = self.start("fastcore.simulator", "-n", str(self.frames), "-r",
                               str(self.rate), "--host", "127.0.0.1", ready=None)
        try:
            return self._follow(sub, images, simulator)
        finally:
            sub.close(0)
            images.close()

    def _follow(self, sub: zmq.Socket, images: ImageBuffer, simulator: ChildProcess) -> int:
        received = flagged = checked = wrong = missed_checks = 0
        first = last = None
        last_print = time.monotonic()
        quiet_since = time.monotonic()
        nbytes = images.shape[0] * images.shape[1] * images.dtype.itemsize
        while received < self.frames:
            if sub.poll(100):
                records = image_records(sub.recv())
                now = time.monotonic()
                first = first or now
                last = quiet_since = now
                received += len(records)
                flagged += int(np.count_nonzero(records["status"]))
                for image_id in records["id"].tolist():
                    if not self.check_every or image_id % self.check_every:
                        continue
                    try:
                        _, image = images.read(image_id)
                    except SlotOverwrittenError:
                        missed_checks += 1
                    else:
                        checked += 1
                        wrong += not np.array_equal(image, simulated_image(self.config,
                                                                           image_id))
            elif simulator.popen.poll() is not None and time.monotonic() - quiet_since > 2:
                break
            if time.monotonic() - last_print >= 0.5 or received == self.frames:
                last_print = time.monotonic()
                span = (last - first) if first and last and last > first else 0
                rate = (received - 1) / span if span else 0.0
                print(f"\r  [{_bar(received, self.frames)}] {received}/{self.frames} images "
                      f"{rate:7.1f} Hz {rate * nbytes / 1e9:5.2f} GB/s  flagged {flagged}  "
                      f"checked {checked}", end="", flush=True)
        print()
        with contextlib.suppress(subprocess.TimeoutExpired):  # if so, stop() ends it
            simulator.popen.wait(10)
        span = (last - first) if first and last and last > first else 0
        lost = self.frames - received
        print("summary:")
        print(f"  images received   {received} of {self.frames} (lost {lost})")
        print(f"  flagged images    {flagged} (missing packets or modules)")
        if span:
            rate = (received - 1) / span
            print(f"  rate              {rate:.1f} images/s, {rate * nbytes / 1e9:.3f} GB/s")
        print(f"  pixel check       {checked - wrong} of {checked} sampled images identical "
              f"to the simulator's content" + (f" ({missed_checks} overwritten before the "
                                               "check)" if missed_checks else ""))
        ok = lost == 0 and flagged == 0 and wrong == 0 and checked > 0
        print("  result            " + ("OK" if ok else "PROBLEMS (see the logs above)"))
        return 0 if ok else 1

    def stop(self) -> None:
        for child in reversed(self.children):
            code = child.stop()
            if code not in (0, None):
                print(f"  {child.log_path.stem} exited with code {code}; last log lines:")
                print("    " + "\n    ".join(child.output.splitlines()[-5:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-dataplane-demo",
        description="Run a simulated detector through receiver, sync and assembler on this "
        "machine and show live statistics and a checked summary.",
    )
    parser.add_argument("config", help="detector config JSON (see configs/)")
    parser.add_argument("-n", "--frames", type=int, default=1000, help="frames to send")
    parser.add_argument("-r", "--rate", type=float, default=100.0, help="frames per second")
    parser.add_argument("--check-every", type=int, default=10,
                        help="check every N-th image pixel for pixel (0 = none)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the log directory")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.rate <= 0 or args.check_every < 0:
        parser.error("--frames must be >= 1, --rate > 0 and --check-every >= 0")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"stddaq-dataplane-demo: error: {exc}", file=sys.stderr)
        return 1
    if config.converts:
        print("stddaq-dataplane-demo: error: the demo checks raw pixels; use a config without "
              "pedestal_file/gain_file", file=sys.stderr)
        return 1
    work_dir = Path(tempfile.mkdtemp(prefix="stddaq-demo-"))
    demo = Demo(args.config, config, args.frames, args.rate, args.check_every, work_dir)
    code = 1
    try:
        code = demo.run()
    except (RuntimeError, ShmBufferError) as exc:
        print(f"\nstddaq-dataplane-demo: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstddaq-dataplane-demo: interrupted")
    finally:
        demo.stop()
        if args.keep_logs or code:
            print(f"  logs kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
