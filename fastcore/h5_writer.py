"""HDF5 writer: StoreStream messages -> images copied from the ImageBuffer into a file.

Layout (DESIGN.md section 7): ``/<detector>/data`` (n, H, W), one image per chunk written
with direct chunk writes straight from the shared-memory view (optionally bitshuffle-lz4,
HDF5 filter 32008), and ``image_id``, ``status``, ``pulse_id``, ``frame_index``,
``daq_rec`` (n,) uint64 beside it. Datasets grow image by image, so a file closed early
(stop, error, SIGTERM) holds exactly the images written; the file is SWMR-readable while
it is written. An image whose slot was overwritten before or during the write is stored as
zeros with status NOT_IN_BUFFER and counted missing, never passed off as good data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import bitshuffle
import h5py
import hdf5plugin
import numpy as np
import zmq

from fastcore import __version__
from fastcore.buffers import ImageBuffer, ShmBufferError, shm_name
from fastcore.config import DetectorConfig
from fastcore.formats import ImageStatus
from fastcore.process import add_common_arguments, ipc_address, run_service
from fastcore.writer_protocol import COMPRESSIONS, ProtocolError, RunInfo, decode, is_stop

log = logging.getLogger(__name__)

METADATA_FIELDS = ("image_id", "status", "pulse_id", "frame_index", "daq_rec")
_FLUSH_EVERY_S = 0.5
_MAX_MISSING_IDS = 1000
_RESERVE_BYTES = 2**20


class WriteError(RuntimeError):
    """A run's file cannot be opened or written; the message names the path."""


@contextlib.contextmanager
def effective_user(uid: int | None):
    """Act as ``uid`` (files created are owned by it) when running as root."""
    if not uid or uid < 1 or os.geteuid() != 0:
        yield
        return
    try:
        import pwd

        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = uid
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def bitshuffle_chunk(image: np.ndarray) -> np.ndarray:
    """One image as an HDF5 filter-32008 chunk: 12-byte header + bitshuffle-lz4 blocks."""
    compressed = bitshuffle.compress_lz4(image, 0)
    chunk = np.empty(12 + compressed.nbytes, np.uint8)
    chunk[:12] = np.frombuffer(struct.pack(">QI", image.nbytes, 8192), np.uint8)
    chunk[12:] = compressed
    return chunk


@dataclass
class RunFile:
    """The open file of one run. Images are written in ``i_image`` order."""

    path: str
    run_id: int
    info: RunInfo
    config: DetectorConfig
    images: ImageBuffer
    compression: str
    n_rows: int = 0
    n_written: int = 0
    missing_ids: list[int] = field(default_factory=list)
    n_missing: int = 0

    def __post_init__(self) -> None:
        config, shape, dtype = self.config, self.images.shape, self.images.dtype
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise WriteError(f"cannot write {self.path}: directory {directory} does not exist")
        self._reserve = os.path.join(directory, f".{os.path.basename(self.path)}.reserve")
        try:
            with effective_user(self.info.user_id or config.writer_user_id):
                self.file = h5py.File(self.path, "w-", libver="latest")
                self._reserve_space()
        except FileExistsError:
            raise WriteError(f"cannot write {self.path}: the file exists (stddaq never "
                             "overwrites data)") from None
        except OSError as exc:
            reason = "permission denied" if isinstance(exc, PermissionError) else str(exc)
            raise WriteError(f"cannot write {self.path}: {reason}") from None
        try:
            group = self.file.create_group(config.detector_name)
            filters = hdf5plugin.Bitshuffle(cname="lz4") if self.compression != "none" else {}
            self.data = group.create_dataset(
                "data", shape=(0, *shape), maxshape=(None, *shape), chunks=(1, *shape),
                dtype=dtype, **filters)
            self.meta_sets = {
                name: group.create_dataset(name, shape=(0,), maxshape=(None,),
                                           chunks=(4096,), dtype="<u8")
                for name in METADATA_FIELDS
            }
            self.file.attrs["software_version"] = f"stddaq {__version__}"
            self.file.attrs["run_id"] = self.run_id
            self.file.attrs["detector_config"] = json.dumps(
                {k: v for k, v in vars(config).items() if k != "extra"}
                | {"module_positions": {str(k): v for k, v in config.module_positions.items()}})
            self.file.attrs["request_metadata"] = json.dumps(self.info.metadata)
            for key, value in self.info.metadata.items():
                if isinstance(value, str | int | float | bool):
                    group.attrs[key] = value
            self.file.swmr_mode = True
        except BaseException:
            self.file.close()
            raise
        self.meta = np.zeros((len(METADATA_FIELDS), self.info.n_images), np.uint64)
        self._flushed = 0
        self._last_flush = time.monotonic()
        self._zero_chunk: np.ndarray | None = None

    def _reserve_space(self) -> None:
        """Hold back some disk space, released before closing, so the file can always be
        closed valid even when the disk fills up during the run."""
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, _RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:
            self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._reserve)
            os.unlink(self.path)
            raise

    @property
    def complete(self) -> bool:
        return self.n_rows >= self.info.n_images

    def write(self, i_image: int, image_metadata: np.void) -> bool:
        """Write one image from the ImageBuffer; False if it was not there (missing)."""
        if not 0 <= i_image < self.info.n_images or i_image < self.n_rows:
            raise WriteError(f"image index {i_image} out of order (next is {self.n_rows} "
                             f"of {self.info.n_images})")
        image_id = int(image_metadata["id"])
        for skipped in range(self.n_rows, i_image):  # never sent: recorded as missing
            self.meta[1, skipped] = ImageStatus.NOT_IN_BUFFER
            self.n_missing += 1
        self.data.id.set_extent((i_image + 1, *self.images.shape))  # low level: ~5x cheaper
        self.n_rows = i_image + 1
        if not self.images.holds(image_id):
            self._reattach()
        good = self.images.holds(image_id) and self._write_chunk(i_image, image_id)
        status = int(image_metadata["status"])
        if not good:
            self._write_zeros(i_image)
            status |= ImageStatus.NOT_IN_BUFFER
            self.n_missing += 1
            if len(self.missing_ids) < _MAX_MISSING_IDS:
                self.missing_ids.append(image_id)
        else:
            self.n_written += 1
        self.meta[:, i_image] = (image_id, status, image_metadata["user_1"], image_id,
                                 image_metadata["user_2"])
        if time.monotonic() - self._last_flush > _FLUSH_EVERY_S:
            self.flush()
        return good

    def _reattach(self) -> None:
        """The producer restarted with a new ImageBuffer: follow it (same geometry only)."""
        images = self.images.refreshed()
        if (images.shape, images.dtype) != (self.images.shape, self.images.dtype):
            raise WriteError(f"the ImageBuffer {images.name} was recreated with another "
                             "image geometry")
        self.images = images

    def _write_chunk(self, i_image: int, image_id: int) -> bool:
        view = self.images.image(image_id)
        if self.compression == "none":
            self.data.id.write_direct_chunk((i_image, 0, 0), view)
            return self.images.holds(image_id)
        chunk = bitshuffle_chunk(view)
        if not self.images.holds(image_id):  # compressed a slot being rewritten
            return False
        self.data.id.write_direct_chunk((i_image, 0, 0), chunk)
        return True

    def _write_zeros(self, i_image: int) -> None:
        if self._zero_chunk is None:
            zeros = np.zeros(self.images.shape, self.images.dtype)
            self._zero_chunk = zeros if self.compression == "none" else bitshuffle_chunk(zeros)
        self.data.id.write_direct_chunk((i_image, 0, 0), self._zero_chunk)

    def flush(self) -> None:
        """Make the written images and their metadata visible to SWMR readers."""
        rows = self.n_rows
        if rows > self._flushed:
            for i, name in enumerate(METADATA_FIELDS):
                dataset = self.meta_sets[name]
                dataset.resize(rows, axis=0)
                dataset[self._flushed : rows] = self.meta[i, self._flushed : rows]
            self._flushed = rows
        self.file.flush()
        self._last_flush = time.monotonic()

    def close(self, rows: int | None = None) -> None:
        """Flush and close; ``rows`` shrinks the file to that many images (after an error)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._reserve)
        if rows is not None and rows < self.n_rows:
            self.n_rows = rows
            self._flushed = min(self._flushed, rows)
            self.data.resize(rows, axis=0)
            for dataset in self.meta_sets.values():
                dataset.resize(min(rows, dataset.shape[0]), axis=0)
        try:
            self.flush()
        finally:
            self.file.close()

    def summary(self, reason: str) -> dict:
        return {"event": "stop", "run_id": self.run_id, "output_file": self.path,
                "n_images": self.info.n_images, "n_written": self.n_written,
                "n_missing": self.n_missing, "missing_image_ids": self.missing_ids,
                "reason": reason}


class H5Writer:
    """Handles writer messages; ``publish(status_dict)`` reports every event."""

    def __init__(self, config: DetectorConfig, publish: Callable[[dict], None],
                 compression: str = "none"):
        self.config = config
        self.publish = publish
        self.compression = compression
        self.run: RunFile | None = None
        self.images: ImageBuffer | None = None
        self.failed_runs: set[int] = set()

    def handle(self, frames: list[bytes]) -> None:
        try:
            record, info = decode(frames)
        except ProtocolError as exc:
            self.publish({"event": "error", "run_id": None, "message": str(exc)})
            return
        run_id = int(record["run_id"])
        if is_stop(record):
            if self.run is not None and self.run.run_id == run_id:
                self.finish("stopped")
            return
        if info is not None and (self.run is None or self.run.run_id != run_id):
            if self.run is not None:
                self.finish(f"replaced by run {run_id}")
            self.open(run_id, info)
        if self.run is None or self.run.run_id != run_id:
            if run_id not in self.failed_runs:
                self.failed_runs.add(run_id)
                self.publish({"event": "error", "run_id": run_id,
                              "message": f"run {run_id} is not open: its first image with "
                              "the run info was not received"})
            return
        self.write(int(record["i_image"]), record["image_metadata"])

    def open(self, run_id: int, info: RunInfo) -> None:
        root = self.config.output_root
        path = os.path.normpath(info.output_file)
        try:
            if root and os.path.commonpath([os.path.abspath(root), path]) != \
                    os.path.abspath(root):
                raise WriteError(f"output_file {path} is outside the output root {root}")
            images = self._image_buffer()
        except (WriteError, ShmBufferError) as exc:
            self._fail_open(run_id, str(exc))
            return
        try:
            self.run = RunFile(path, run_id, info, self.config, images,
                               info.compression or self.compression)
        except (WriteError, OSError) as exc:
            self._fail_open(run_id, str(exc))
            return
        log.info("run %d: writing %d images to %s", run_id, info.n_images, path)
        self.publish({"event": "start", "run_id": run_id, "output_file": path,
                      "n_images": info.n_images})

    def _image_buffer(self) -> ImageBuffer:
        """The ImageBuffer, attached once and kept (a fresh mapping would page-fault through
        its first pass); re-attached when the assembler recreated it."""
        if self.images is None:
            self.images = ImageBuffer.attach(shm_name(self.config.detector_name, "image"))
        else:
            self.images = self.images.refreshed()
        return self.images

    def close(self) -> None:
        self.finish("interrupted")
        if self.images is not None:
            self.images.close()
            self.images = None

    def _fail_open(self, run_id: int, message: str) -> None:
        log.error("run %d: %s", run_id, message)
        self.failed_runs.add(run_id)
        self.publish({"event": "error", "run_id": run_id, "message": message})

    def write(self, i_image: int, image_metadata: np.void) -> None:
        run = self.run
        try:
            run.write(i_image, image_metadata)
        except (OSError, WriteError) as exc:
            message = f"writing image {i_image} to {run.path} failed: {exc}"
            log.error("run %d: %s", run.run_id, message)
            self.publish({"event": "error", "run_id": run.run_id, "message": message})
            self.finish("error", rows=i_image)
            return
        self.publish({"event": "image", "run_id": run.run_id, "i_image": i_image,
                      "image_id": int(image_metadata["id"]), "n_written": run.n_written,
                      "n_missing": run.n_missing})
        if run.complete:
            self.finish("completed")

    def finish(self, reason: str, rows: int | None = None) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.close(rows)
        except (OSError, RuntimeError) as exc:  # h5py raises both for a full disk
            self.publish({"event": "error", "run_id": run.run_id,
                          "message": f"closing {run.path} failed: {exc}"})
        self.images = run.images  # the run may have re-attached a recreated buffer
        summary = run.summary(reason)
        log.info("run %d %s: %d written, %d missing -> %s", run.run_id, reason, run.n_written,
                 run.n_missing, run.path)
        self.publish(summary)

    def idle(self) -> None:
        """Periodic work between messages: keep SWMR readers up to date."""
        if self.run is not None:
            try:
                self.run.flush()
            except OSError as exc:
                self.publish({"event": "error", "run_id": self.run.run_id,
                              "message": f"flushing {self.run.path} failed: {exc}"})
                self.finish("error", rows=self.run.n_written)


def serve(config: DetectorConfig, ipc_dir: str, stop: threading.Event,
          compression: str) -> None:
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(ipc_address(ipc_dir, config.detector_name, "writer"))
    pub = ctx.socket(zmq.PUB)
    pub.bind(ipc_address(ipc_dir, config.detector_name, "writer-status"))
    writer = H5Writer(config, lambda status: pub.send_json(status), compression)
    log.info("ready: writing %s images on request (compression %s)", config.detector_name,
             compression)
    try:
        while not stop.is_set():
            if pull.poll(int(_FLUSH_EVERY_S * 1000)):
                writer.handle(pull.recv_multipart())
            else:
                writer.idle()
    finally:
        writer.close()
        pull.close(0)
        pub.close(linger=500)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-h5-writer",
        description="Write images from the ImageBuffer to HDF5 files as StoreStream "
        "messages from the writer agent ask.",
    )
    add_common_arguments(parser)
    parser.add_argument("--compression", choices=COMPRESSIONS, default="none",
                        help="chunk compression when a request does not say (default: none)")
    args = parser.parse_args(argv)
    return run_service("stddaq-h5-writer", args,
                       lambda config, stop: serve(config, args.ipc_dir, stop, args.compression))


if __name__ == "__main__":
    raise SystemExit(main())
