"""Writer agent: turns a user's write request into a run of the HDF5 writer.

On a request it follows the detector's ImageMetadata stream and forwards the next
``n_images`` images (or the images from ``start_image_id`` on, taking those still in the
ImageBuffer first) to stddaq-h5-writer as StoreStream messages, follows the writer's
statuses, and returns the file name, image count and missing images. A kill ends the run
early with a valid, shorter file. One request at a time per detector.

Request (the original's fields plus stddaq's): ``{"output_file": abs path, "n_images": N,
"user_id"?: int, "run_id"?: int, "start_image_id"?: int, "metadata"?: {...},
"compression"?: "none"|"bitshuffle-lz4"}``; other fields belong to other services and are
ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from fastcore.buffers import ImageBuffer, ShmBufferError, shm_name
from fastcore.config import ConfigError, DetectorConfig, parse_config
from fastcore.formats import IMAGE_METADATA
from fastcore.process import DEFAULT_IPC_DIR, ipc_address, subscribe
from fastcore.writer_protocol import COMPRESSIONS, RunInfo, image_message, stop_message
from services.progress import ProgressPublisher
from services.requests import RequestError, output_path
from services.startup import SetupError, redis_client, serve_primary, service_setup

log = logging.getLogger(__name__)


class BusyError(RuntimeError):
    """The detector is already writing another request."""


class WriterError(RuntimeError):
    """The HDF5 writer reported an error or did not answer."""


@dataclass(frozen=True)
class WriteRequest:
    output_file: str
    n_images: int
    user_id: int | None = None
    run_id: int | None = None
    start_image_id: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    compression: str | None = None


def _int(request: dict, name: str, minimum: int) -> int | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def validate_write_request(request: Any, config: DetectorConfig) -> WriteRequest:
    """Check a write request; raises RequestError naming the first bad field."""
    if not isinstance(request, dict):
        raise RequestError(f"request: expected a JSON object, got {type(request).__name__}")
    if request.get("output_file") is None:
        raise RequestError("output_file: missing (expected an absolute file path)")
    path = output_path(request, "output_file", config.output_root)
    directory = os.path.dirname(os.path.normpath(path))
    if not os.path.isdir(directory):
        raise RequestError(f"output_file: directory {directory} does not exist")
    if "n_images" not in request:
        raise RequestError("n_images: missing (expected an integer >= 1)")
    n_images = _int(request, "n_images", 1)
    metadata = request.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise RequestError(f"metadata: expected an object, got {metadata!r}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError):
        raise RequestError("metadata: must be plain JSON values") from None
    compression = request.get("compression")
    if compression is not None and compression not in COMPRESSIONS:
        raise RequestError(f"compression: expected one of {COMPRESSIONS}, got {compression!r}")
    return WriteRequest(path, n_images, _int(request, "user_id", 0), _int(request, "run_id", 0),
                        _int(request, "start_image_id", 0), metadata, compression)


class WriterAgent:
    """The writer agent's request handling (``on_request``/``on_kill`` of a primary service)."""

    def __init__(self, config: DetectorConfig, ipc_dir: str, image_timeout_s: float = 60.0,
                 writer_timeout_s: float = 10.0,
                 progress: Callable[[dict], None] | None = None):
        self.config = config
        self.ipc_dir = ipc_dir
        self.image_timeout_s = image_timeout_s
        self.writer_timeout_s = writer_timeout_s
        self.progress = progress or (lambda _: None)
        self._busy = threading.Lock()
        self._current: tuple[str, str] | None = None  # (request_id, output_file)
        self._kill = threading.Event()
        self._prepared: _Run | None = None
        self.counters = {"requests": 0, "succeeded": 0, "failed": 0, "images_written": 0,
                         "images_missing": 0}

    @property
    def busy(self) -> bool:
        return self._current is not None

    def validate(self, request: Any) -> None:
        """Refuse a bad request before it starts (the broker service calls this first)."""
        validate_write_request(request, self.config)

    def prepare(self, request_id: str, request: Any) -> None:
        """Claim the detector and subscribe to its streams before the request is announced
        as started (the broker service calls this first), so no image after the start is
        missed."""
        write = validate_write_request(request, self.config)
        if not self._busy.acquire(blocking=False):
            current_id, current_file = self._current or ("?", "?")
            raise BusyError(f"detector {self.config.detector_name} is busy writing request "
                            f"{current_id} to {current_file}; wait for it or kill it")
        self._current = (request_id, write.output_file)
        self._kill.clear()
        try:
            self._prepared = _Run(self, request_id, write)
        except BaseException:
            self._current = None
            self._busy.release()
            raise

    def on_request(self, request_id: str, request: Any) -> dict:
        prepared = self._prepared
        if prepared is None or prepared.request_id != request_id:
            self.prepare(request_id, request)
        run, self._prepared = self._prepared, None
        self.counters["requests"] += 1
        try:
            result = run.execute()
        except Exception:
            self.counters["failed"] += 1
            raise
        finally:
            run.close()
            self._current = None
            self._busy.release()
        self.counters["succeeded"] += 1
        self.counters["images_written"] += result["n_images"]
        self.counters["images_missing"] += result["n_missing"]
        return result

    def on_kill(self, request_id: str) -> None:
        if self._current is not None and self._current[0] == request_id:
            log.info("kill of request %s: stopping the run", request_id)
            self._kill.set()


class _Run:
    """One request's run: forward images, follow the writer, build the result."""

    def __init__(self, agent: WriterAgent, request_id: str, write: WriteRequest):
        self.agent, self.request_id, self.write = agent, request_id, write
        self.run_id = write.run_id if write.run_id is not None else time.time_ns()
        self.info = RunInfo(write.output_file, write.n_images, write.metadata, write.user_id,
                            write.compression)
        self.sent = 0
        self.next_id = write.start_image_id
        self.writer_events: list[dict] = []
        self.stop_event: dict | None = None
        self.first_sent_at = self.last_event_at = 0.0
        self.n_written = self.n_missing = 0
        name = agent.config.detector_name
        ctx = zmq.Context.instance()
        self.images_sub = subscribe(ctx, ipc_address(agent.ipc_dir, name, "image"))
        self.status_sub = subscribe(ctx, ipc_address(agent.ipc_dir, name, "writer-status"))
        self.push = ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 1000)
        self.push.connect(ipc_address(agent.ipc_dir, name, "writer"))
        time.sleep(0.2)  # let both subscriptions reach their publishers

    def close(self) -> None:
        self.images_sub.close(0)
        self.status_sub.close(0)
        self.push.close()

    def execute(self) -> dict:
        self._forward()
        killed = self.agent._kill.is_set()
        self._close_file()
        stop = self.stop_event or {"n_written": 0, "n_missing": 0, "missing_image_ids": []}
        return {"output_file": self.write.output_file, "run_id": self.run_id,
                "n_images": stop["n_written"], "n_requested": self.write.n_images,
                "n_missing": stop["n_missing"], "missing_image_ids": stop["missing_image_ids"],
                "killed": killed}

    def _send(self, meta: np.ndarray | np.void) -> None:
        first = self.sent == 0
        if first:
            self.first_sent_at = time.monotonic()
        self.push.send_multipart(image_message(meta, self.run_id, self.sent,
                                               self.write.n_images,
                                               self.info if first else None))
        self.sent += 1
        self.next_id = int(meta["id"]) + 1
        self._report()

    def _report(self, done: bool = False) -> None:
        self.agent.progress({"request_id": self.request_id, "run_id": self.run_id,
                             "output_file": self.write.output_file,
                             "n_images": self.write.n_images, "n_sent": self.sent,
                             "n_written": self.n_written, "n_missing": self.n_missing,
                             "done": done})

    def _close_file(self) -> None:
        """End the writer's run (a stop when it is short of images) and wait for its
        summary; nothing to do when no image was sent (no file was opened)."""
        if not self.sent:
            return
        if self.sent < self.write.n_images:
            self.push.send_multipart(stop_message(self.run_id))
        self._await_writer_stop()

    def _forward(self) -> None:
        agent, n = self.agent, self.write.n_images
        images_sub = self.images_sub
        if self.next_id is not None:
            self._forward_buffered()
        last_image = time.monotonic()
        while self.sent < n and not agent._kill.is_set():
            self._drain_status()
            behind = self.sent > self.n_written + self.n_missing
            if behind and time.monotonic() - max(self.first_sent_at, self.last_event_at) > \
                    agent.writer_timeout_s:
                raise WriterError(self._no_answer())
            if images_sub.poll(100):
                meta = np.frombuffer(images_sub.recv(), IMAGE_METADATA)[0]
                if self.next_id is not None and int(meta["id"]) < self.next_id:
                    continue
                self._send(meta)
                last_image = time.monotonic()
            elif time.monotonic() - last_image > agent.image_timeout_s:
                self._close_file()
                raise WriterError(f"no image from detector {agent.config.detector_name} for "
                                  f"{agent.image_timeout_s:g} s ({self.sent} of {n} written): "
                                  "is the detector (or simulator) running?")

    def _forward_buffered(self) -> None:
        """Images from ``start_image_id`` on that are already in the ImageBuffer."""
        name = shm_name(self.agent.config.detector_name, "image")
        try:
            images = ImageBuffer.attach(name)
        except ShmBufferError:
            return
        try:
            while self.sent < self.write.n_images and images.holds(self.next_id):
                self._send(images.metadata(self.next_id).copy())
        finally:
            images.close()

    def _drain_status(self) -> None:
        while self.status_sub.poll(0):
            event = json.loads(self.status_sub.recv())
            if event.get("run_id") != self.run_id:
                continue
            self.writer_events.append(event)
            self.last_event_at = time.monotonic()
            if event["event"] in ("image", "stop"):
                self.n_written, self.n_missing = event["n_written"], event["n_missing"]
                self._report(done=event["event"] == "stop")
            if event["event"] == "error":
                raise WriterError(f"h5 writer: {event['message']}")
            if event["event"] == "stop":
                self.stop_event = event

    def _await_writer_stop(self) -> None:
        """Wait for the writer's stop of this run; its error becomes a WriterError."""
        deadline = time.monotonic() + self.agent.writer_timeout_s
        seen = len(self.writer_events)
        while self.stop_event is None:
            self._drain_status()
            if len(self.writer_events) > seen:  # the writer is working: extend the wait
                seen = len(self.writer_events)
                deadline = time.monotonic() + self.agent.writer_timeout_s
            if time.monotonic() > deadline:
                raise WriterError(self._no_answer())
            self.status_sub.poll(100)

    def _no_answer(self) -> str:
        return (f"h5 writer for {self.agent.config.detector_name} did not answer within "
                f"{self.agent.writer_timeout_s:g} s: is stddaq-h5-writer running?")


def main(argv: list[str] | None = None) -> int:
    """stddaq-writer-agent: the detector writer's primary broker service."""
    parser = argparse.ArgumentParser(
        prog="stddaq-writer-agent",
        description="Serve write requests for one detector: forward the requested images to "
        "stddaq-h5-writer and report start/success/fail on the broker. The service config "
        "(--json_config_file or Redis config.<service_name>) is the detector config.")
    parser.add_argument("--tag", default=None,
                        help="routing key of the requests to serve (default: the service name)")
    parser.add_argument("--ipc-dir", default=DEFAULT_IPC_DIR)
    parser.add_argument("--image-timeout", type=float, default=60.0,
                        help="fail a request when no image arrives for this long (s)")
    parser.add_argument("--writer-timeout", type=float, default=10.0,
                        help="fail a request when stddaq-h5-writer does not answer for this "
                        "long (s)")
    try:
        name, raw_config, args = service_setup(parser, argv)
        config = parse_config(raw_config, source=args.json_config_file)
    except (SetupError, ConfigError) as exc:
        print(f"stddaq-writer-agent: error: {exc}", file=sys.stderr)
        return 1
    client = None if args.redis_skip else redis_client(args.redis_host, args.redis_port)
    progress = ProgressPublisher(client, name)
    agent = WriterAgent(config, args.ipc_dir, image_timeout_s=args.image_timeout,
                        writer_timeout_s=args.writer_timeout, progress=progress.publish)
    return serve_primary(name, agent, args, raw_config, client, lambda: agent.counters,
                         lambda: agent.busy, f"write requests for {config.detector_name}",
                         refuse_when_busy=True)

if __name__ == "__main__":
    raise SystemExit(main())
