"""Writer agent: turns a user's write request into a run of the HDF5 writer.

On a request it tells stddaq-h5-writer what to write (file, the next ``n_images`` images or
those from ``start_image_id`` on, the image timeout), relays the writer's progress and
ends with its summary: success (every requested image written good), partial (returned
with ``outcome: "partial"``: short after a kill, or images flagged or absent) or fail (a
WriterError naming the cause). The writer follows the image stream itself: the agent is
not on the per-image path. A writer that stops sending its heartbeat fails the run within
``writer_timeout_s``; a kill ends it within a loop turn of the writer. One request at a
time per detector.

Request (the original's fields plus stddaq's): ``{"output_file": abs path, "n_images": N,
"user_id"?: int, "run_id"?: int, "start_image_id"?: int, "image_timeout"?: seconds,
"metadata"?: {...}, "compression"?: "none"|"bitshuffle-lz4", "append"?: bool}``; other
fields belong to other services and are ignored. With ``append: true`` the N images are
added after the rows of ``output_file`` (a file of this detector, created if absent): a step
scan sends one such request per point, so its file holds exactly the images it asked for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastcore.config import ConfigError, DetectorConfig, parse_config
from fastcore.runtime import SetupError, add_ipc_dir, redis_client, service_setup
from fastcore.writer_protocol import (
    COMPRESSIONS,
    MAX_ID,
    MAX_IMAGE_TIMEOUT_S,
    MAX_IMAGES,
    valid_image_timeout,
)
from services.cli import seconds
from services.progress import ProgressPublisher
from services.requests import RequestError, output_path
from services.startup import serve_primary
from services.writer_link import BusyError, WriterLink
from services.writer_runs import SingleRun, SplitRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteRequest:
    output_file: str
    n_images: int
    user_id: int | None = None
    run_id: int | None = None
    start_image_id: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    compression: str | None = None
    image_timeout: float | None = None
    append: bool = False


def _int(request: dict, name: str, minimum: int, maximum: int) -> int | None:
    value = request.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(f"{name}: expected an integer >= {minimum}, got {value!r:.40}")
    if value > maximum:
        raise RequestError(f"{name}: {value:.3g} is too large (at most {maximum})")
    return value


def _user_id(request: dict, config: DetectorConfig) -> int | None:
    """The file owner a request asks for: the operator's ``writer_user_id`` decides; a
    request's own ``user_id`` (0 or absent: the config's) only where the config allows it."""
    user_id = _int(request, "user_id", 0, 2**31 - 1)
    if not user_id or user_id == config.writer_user_id:
        return None
    if not config.allow_request_user_id:
        raise RequestError(
            f"user_id: {user_id} is not allowed: files of {config.detector_name} are written "
            f"as writer_user_id {config.writer_user_id} of the detector config (the operator "
            "may let requests choose with allow_request_user_id)")
    return user_id


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
    if request.get("n_images") is None:
        raise RequestError("n_images: missing (expected an integer >= 1)")
    n_images = _int(request, "n_images", 1, MAX_IMAGES)
    metadata = request.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise RequestError(f"metadata: expected an object, got {metadata!r:.80}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError):
        raise RequestError("metadata: must be plain JSON values") from None
    compression = request.get("compression")
    if compression is not None and compression not in COMPRESSIONS:
        raise RequestError(f"compression: expected one of {COMPRESSIONS}, got "
                           f"{compression!r:.40}")
    image_timeout = request.get("image_timeout")
    if image_timeout is not None and not valid_image_timeout(image_timeout):
        raise RequestError(f"image_timeout: expected seconds > 0 and <= "
                           f"{MAX_IMAGE_TIMEOUT_S:g}, got {image_timeout!r:.40}")
    append = request.get("append", False)
    if not isinstance(append, bool):
        raise RequestError(f"append: expected true or false, got {append!r:.40}")
    return WriteRequest(path, n_images, _user_id(request, config),
                        _int(request, "run_id", 0, 2**64 - 1),
                        _int(request, "start_image_id", 0, MAX_ID), metadata, compression,
                        None if image_timeout is None else float(image_timeout), append)


class WriterAgent:
    """The writer agent's request handling (``on_request``/``on_kill`` of a primary service)."""

    def __init__(self, config: DetectorConfig, ipc_dir: str, image_timeout_s: float = 60.0,
                 writer_timeout_s: float = 2.0,
                 progress: Callable[[dict], None] | None = None):
        self.config = config
        self.ipc_dir = ipc_dir
        self.image_timeout_s = image_timeout_s
        self.writer_timeout_s = writer_timeout_s
        self.progress = progress or (lambda _: None)
        self._busy = threading.Lock()
        self._current: tuple[str, str] | None = None  # (request_id, output_file)
        self._kill = threading.Event()
        self._opened: SingleRun | SplitRun | None = None  # before_start's, for on_request
        # connected now, so the writers' events reach the agent by its first request
        self._links = [WriterLink(ipc_dir, config.detector_name, i, config.n_writers)
                       for i in range(config.n_writers)]
        self.counters = {"requests": 0, "succeeded": 0, "partial": 0, "failed": 0,
                         "images_written": 0, "images_missing": 0}

    @property
    def busy(self) -> bool:
        return self._current is not None

    def validate(self, request: Any) -> None:
        """Refuse a bad request before it starts (the broker service calls this first)."""
        validate_write_request(request, self.config)

    def before_start(self, request_id: str, request: Any) -> None:
        """Claim the detector and have the writer open the file before the request is
        announced as started (the broker service's hook before ``request_start``), so no
        image after the start is missed and a file that cannot be written refuses the
        request."""
        write = validate_write_request(request, self.config)
        if not self._busy.acquire(blocking=False):
            current_id, current_file = self._current or ("?", "?")
            raise BusyError(f"detector {self.config.detector_name} is busy writing request "
                            f"{current_id} to {current_file}; wait for it or kill it")
        self._current = (request_id, write.output_file)
        self._kill.clear()
        try:
            run = (SingleRun(self, self._links[0], request_id, write)
                   if self.config.n_writers == 1
                   else SplitRun(self, self._links, request_id, write))
            run.start()
            self._opened = run
        except BaseException:
            self._current = None
            self._busy.release()
            raise

    def on_request(self, request_id: str, request: Any) -> dict:
        opened = self._opened
        if opened is None or opened.request_id != request_id:
            self.before_start(request_id, request)
        run, self._opened = self._opened, None
        self.counters["requests"] += 1
        try:
            result = run.follow()
        except Exception:
            self.counters["failed"] += 1
            raise
        finally:
            self._current = None
            self._busy.release()
        self.counters["succeeded" if result["outcome"] == "success" else "partial"] += 1
        self.counters["images_written"] += result["n_images"]
        self.counters["images_missing"] += result["n_missing"]
        return result

    def on_kill(self, request_id: str) -> None:
        if self._current is not None and self._current[0] == request_id:
            log.info("kill of request %s: stopping the run", request_id)
            self._kill.set()

    def close(self) -> None:
        for link in self._links:
            link.close()
        self._links = []


def main(argv: list[str] | None = None) -> int:
    """stddaq-writer-agent: the detector writer's primary broker service."""
    parser = argparse.ArgumentParser(
        prog="stddaq-writer-agent",
        description="Serve write requests for one detector: forward the requested images to "
        "stddaq-h5-writer and report start/success/fail on the broker. The service config "
        "(--json-config-file or Redis config.<service_name>) is the detector config.")
    parser.add_argument("--tag", default=None,
                        help="routing key of the requests to serve (default: the service name)")
    add_ipc_dir(parser)
    parser.add_argument("--image-timeout", type=seconds, default=60.0,
                        help="end a run as failed when no image arrives for this long (s); "
                        "a request's image_timeout field overrides it (default 60)")
    parser.add_argument("--writer-timeout", type=seconds, default=2.0,
                        help="fail a request when stddaq-h5-writer sends no heartbeat for "
                        "this long (s; it sends one every 0.5 s; default 2)")
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
    try:
        return serve_primary(name, agent, args, raw_config, client, lambda: agent.counters,
                             lambda: agent.busy, f"write requests for {config.detector_name}",
                             refuse_when_busy=True)
    finally:
        agent.close()

if __name__ == "__main__":
    raise SystemExit(main())
