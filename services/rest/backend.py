"""What the REST service does behind its endpoints: writes through the writer agent (over
the broker, like every front end), the writer's status, rates, the acquisition log."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import redis

from fastcore.config import ConfigError, DetectorConfig, parse_config
from fastcore.status import STATUS_PREFIX, ServiceStatus, redis_client
from services.daq_client import DaqClient, StdDaqError
from services.deployment import (
    deployment_status,
    latest_config,
    merged_config,
    publish_config,
)
from services.image_stats import ImageFollower
from services.requests import RequestError
from services.rest.live import LiveImage
from services.rest.simulation import Simulation
from services.rest.writer_status import WriterStatus

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0
SYNC_LIMIT_S = 60.0  # the original's write_sync limit
STOP_WAIT_S = 5.0
LOG_LENGTH = 1000  # acquisitions kept in the log stream
HISTORY_S = 600  # seconds of rates kept for the dashboard's plots


def log_key(writer_service: str) -> str:
    """The Redis stream of a writer agent's finished acquisitions (JSON, field ``json``)."""
    return f"stddaq.log.{writer_service}"


def _count(value: Any, name: str, minimum: int) -> int:
    """An integer (or its decimal text, as the original accepted) >= ``minimum``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(f"{name}: expected an integer >= {minimum}, got {value!r:.60}")
    return value


def write_request(body: Any) -> dict:
    """The writer agent's request for a REST write body ``{"output_file", "n_images",
    "run_id"?}``; a run_id that is not a number (the client allows any) goes to the
    metadata. RequestError names the bad field."""
    if not isinstance(body, dict):
        raise RequestError(f"request: expected a JSON object, got {type(body).__name__}")
    if body.get("output_file") is None:
        raise RequestError("output_file: missing (expected an absolute file path)")
    if body.get("n_images") is None:
        raise RequestError("n_images: missing (expected an integer >= 1)")
    request: dict[str, Any] = {"output_file": body["output_file"],
                               "n_images": _count(body["n_images"], "n_images", 1)}
    run_id = body.get("run_id")
    if run_id is not None:
        try:
            request["run_id"] = _count(run_id, "run_id", 0)
        except RequestError:
            request["metadata"] = {"run_id": str(run_id)}
    return request


class RestBackend:
    """One detector's writer agent and image stream, seen from the REST service."""

    def __init__(self, config: DetectorConfig, raw_config: dict, writer_service: str,
                 broker_host: str, redis_host: str, redis_port: int, ipc_dir: str):
        self.config = config
        self.raw_config = raw_config
        self.writer_service = writer_service
        self.redis: redis.Redis = redis_client(redis_host, redis_port)
        self.writer = WriterStatus(on_finished=self._log_acquisition)
        self.client = DaqClient(writer_service, broker_host, self.redis,
                                status_listener=self.writer.on_status,
                                progress_listener=self.writer.on_progress)
        self.images = ImageFollower(config.detector_name, ipc_dir)
        self.live = LiveImage(config.detector_name)
        self.simulation = Simulation(lambda: self.current_config()[1],
                                     lambda: self.rates["detector"]["images_per_second"])
        self.image_bytes = int(np.prod(config.image_shape)) * config.image_dtype.itemsize
        self._sized_config_id: str | None = None  # the deployed config image_bytes is of
        self.rates = {"detector": {"bytes_per_second": 0.0, "images_per_second": 0.0},
                      "writer": {"bytes_per_second": 0.0, "images_per_second": 0.0}}
        self.history: deque[dict] = deque(maxlen=HISTORY_S)  # one sample per second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rest-stats", daemon=True)

    def start(self) -> None:
        self.client.start()
        self.images.start()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.images.stop()
        self.simulation.stop()
        self.live.close()
        self.client.close()

    # --- periodic: agent presence and rates ---------------------------------------------
    def _sample(self) -> None:
        last_images, last_rows, last_at = self.images.stats.counter, 0, time.monotonic()
        last_lost = self.images.stats.lost + self.images.stats.flagged
        while not self._stop.wait(1.0):
            self.writer.agent_alive = self._agent_alive()
            with contextlib.suppress(redis.RedisError, ConfigError, ValueError):
                self._follow_image_size()
            now = time.monotonic()
            images, rows = self.images.stats.counter, self.writer.rows_total
            elapsed = max(now - last_at, 1e-3)
            image_rate = (images - last_images) / elapsed
            row_rate = (rows - last_rows) / elapsed
            self.rates = {
                "detector": {"bytes_per_second": image_rate * self.image_bytes,
                             "images_per_second": image_rate},
                "writer": {"bytes_per_second": row_rate * self.image_bytes,
                           "images_per_second": row_rate}}
            lost = self.images.stats.lost + self.images.stats.flagged
            self.history.append({"time": time.time(), "detector": image_rate,
                                 "writer": row_rate, "lost": (lost - last_lost) / elapsed})
            last_images, last_rows, last_at, last_lost = images, rows, now, lost

    def services(self) -> dict:
        """The detector buffer as the image stream shows it, and every service of this
        detector with a status in Redis (state, heartbeat age, last error)."""
        statuses = []
        prefixes = (f"{self.config.detector_name}.", self.writer_service)
        for key in self.redis.scan_iter(match=STATUS_PREFIX + "*", count=500):
            name = key.decode(errors="replace").removeprefix(STATUS_PREFIX)
            if not name.startswith(prefixes):
                continue
            status = ServiceStatus.from_fields(key, self.redis.hgetall(key))
            statuses.append({"service_name": status.service_name, "state": status.state,
                             "heartbeat_age_s": status.heartbeat_age(),
                             "alive": status.alive, "last_error": status.last_error})
        buffer = self.images.stats
        return {"buffer": {"connected": buffer.connected, "acquiring": buffer.acquiring,
                           "images": buffer.counter, "rate": buffer.rate,
                           "flagged": buffer.flagged, "lost": buffer.lost,
                           "last_image_id": buffer.last_id},
                "services": sorted(statuses, key=lambda s: s["service_name"])}

    def _follow_image_size(self) -> None:
        """Image bytes of a newly deployed config (parsed once per config_id)."""
        config_id, raw = self.current_config()
        if config_id is not None and config_id != self._sized_config_id:
            config = parse_config(raw)
            self.image_bytes = int(np.prod(config.image_shape)) * config.image_dtype.itemsize
            self._sized_config_id = config_id

    def _agent_alive(self) -> bool:
        try:
            self.client.check_agent(self.config.detector_name)
        except StdDaqError:
            return False
        return True

    # --- writing ------------------------------------------------------------------------
    def status(self) -> dict:
        return self.writer.status()

    def write(self, body: Any, wait: bool) -> dict:
        """Start a write (``wait``: and return when the file is closed, at most 60 s)."""
        request = write_request(body)
        self.client.check_agent(self.config.detector_name)
        run = self.client.start_write(request, timeout=START_TIMEOUT_S)
        if wait and not run.done.wait(SYNC_LIMIT_S):
            raise StdDaqError("Your acquisition is still running, just the REST call has "
                              f"ended. Sync acquisition limit of {SYNC_LIMIT_S:g} seconds "
                              "exceeded. Use async write call for long acquisitions.")
        if wait and run.failed:
            raise StdDaqError(run.message or "the write failed")
        self._settle(run.request_id)
        return self.writer.status()

    def _settle(self, request_id: str) -> None:
        """Let the status listener see the statuses the client already saw (both are fed
        by the same broker thread; a moment at most)."""
        deadline = time.monotonic() + 1.0
        while self.writer.request_id != request_id and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> dict:
        """Kill the running write, whoever started it, and wait until it ended."""
        request_id = self.writer.running
        if request_id is not None:
            self.client.kill_request(request_id, timeout=STOP_WAIT_S)
            deadline = time.monotonic() + STOP_WAIT_S
            while self.writer.running == request_id:
                if time.monotonic() > deadline:
                    raise StdDaqError(f"the writer did not end request {request_id} within "
                                      f"{STOP_WAIT_S:g} s of the stop")
                time.sleep(0.05)
        return self.writer.status()

    # --- config -------------------------------------------------------------------------
    def current_config(self) -> tuple[str | None, dict]:
        """(config_id, config): the newest deployed one, else the file's."""
        latest = latest_config(self.redis, self.config.detector_name)
        return latest if latest is not None else (None, self.raw_config)

    def set_config(self, changes: Any) -> dict:
        """Validate the current config with ``changes`` and publish it; every stddaq-run of
        the detector restarts its services with it (see ``deployment``)."""
        _, current = self.current_config()
        config = merged_config(current, changes)
        publish_config(self.redis, config)
        return config

    def deployment(self) -> dict:
        return deployment_status(self.redis, self.config.detector_name)

    # --- log ----------------------------------------------------------------------------
    def _log_acquisition(self, acquisition: dict) -> None:
        try:
            self.redis.xadd(log_key(self.writer_service), {"json": json.dumps(acquisition)},
                            maxlen=LOG_LENGTH, approximate=True)
        except redis.RedisError as exc:
            log.warning("acquisition of %s not logged (Redis: %s)",
                        acquisition["info"].get("output_file"), exc)

    def logs(self, n: int) -> list[dict]:
        """The last ``n`` acquisitions that produced a file, newest first."""
        entries = self.redis.xrevrange(log_key(self.writer_service), count=n)
        return [json.loads(fields[b"json"]) for _, fields in entries]
