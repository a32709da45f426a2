"""The writer's state as std-daq's REST interface reports it (pure logic, no I/O).

``WriterStatus`` follows every status and progress message of one writer agent, whoever
sent the request (the REST service, the CLI, an Ophyd device, the IOC), and answers
``status()`` in the original's DAQ status shape::

    {"state": "READY" | "WRITING" | "UNKNOWN",
     "acquisition": {"state": "WAITING_IMAGES" | "ACQUIRING_IMAGES" | "FINISHED" | "FAILED",
                     "message": "" | "Completed." | "Interrupted." | "ERROR: ...",
                     "info": {"output_file", "n_images", "run_id"},
                     "stats": {"n_write_requested", "n_write_completed",
                               "start_time", "stop_time"}} | None}

``n_write_completed`` counts the file's rows (images written, flagged ones included). An
acquisition that ended with a file (FINISHED) is handed to ``on_finished`` for the logs.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

from services.broker.protocol import (
    ACTION_REQUEST_FAIL,
    ACTION_REQUEST_START,
    ACTION_REQUEST_SUCCESS,
)
from services.progress import WriteProgress

READY, WRITING, UNKNOWN = "READY", "WRITING", "UNKNOWN"
WAITING_IMAGES, ACQUIRING_IMAGES = "WAITING_IMAGES", "ACQUIRING_IMAGES"
FINISHED, FAILED = "FINISHED", "FAILED"
ACQUISITION_STATES = (FINISHED, FAILED, "WRITING", WAITING_IMAGES, ACQUIRING_IMAGES,
                      "FLUSHING_IMAGES")


def _rows(result: dict) -> int:
    written, missing = result.get("n_images"), result.get("n_missing")
    return (written if isinstance(written, int) else 0) + (
        missing if isinstance(missing, int) else 0)


class WriterStatus:
    """The last acquisition of one writer agent and whether the agent is there."""

    def __init__(self, on_finished: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.on_finished = on_finished or (lambda _: None)
        self.clock = clock
        self.agent_alive = False
        self.request_id: str | None = None  # of the acquisition shown
        self.acquisition: dict[str, Any] | None = None
        self.rows_total = 0  # rows written by every acquisition seen (for rates)
        self._lock = threading.Lock()

    @property
    def running(self) -> str | None:
        """The id of the request being written, if any."""
        with self._lock:
            if self.acquisition and self.acquisition["state"] in (WAITING_IMAGES,
                                                                  ACQUIRING_IMAGES):
                return self.request_id
            return None

    def status(self) -> dict[str, Any]:
        with self._lock:
            acquisition = copy.deepcopy(self.acquisition)
        if acquisition is not None and acquisition["state"] in (WAITING_IMAGES,
                                                                ACQUIRING_IMAGES):
            state = WRITING
        else:
            state = READY if self.agent_alive else UNKNOWN
        return {"state": state, "acquisition": acquisition}

    def on_status(self, request_id: str | None, request: Any, headers: dict) -> None:
        """A status of the writer agent (``headers``: action, source, message)."""
        action, message = headers.get("action"), headers.get("message")
        now = self.clock()
        finished = None
        with self._lock:
            if action == ACTION_REQUEST_START:
                request = request if isinstance(request, dict) else {}
                self.request_id = request_id
                self.acquisition = {
                    "state": WAITING_IMAGES, "message": "",
                    "info": {"output_file": request.get("output_file"),
                             "n_images": request.get("n_images"),
                             "run_id": request.get("run_id")},
                    "stats": {"n_write_requested": request.get("n_images"),
                              "n_write_completed": 0, "start_time": now, "stop_time": None}}
            elif request_id != self.request_id or self.acquisition is None:
                return  # a refusal of a request that never started: nothing to show
            elif action == ACTION_REQUEST_SUCCESS:
                result = message if isinstance(message, dict) else {}
                acquisition = self.acquisition
                acquisition["state"] = FINISHED
                acquisition["message"] = (
                    "Interrupted." if result.get("killed") else "Completed."
                    if result.get("outcome", "success") == "success"
                    else f"Completed: {result.get('summary', '')}")
                if isinstance(result.get("run_id"), int):
                    acquisition["info"]["run_id"] = result["run_id"]
                rows = max(_rows(result), acquisition["stats"]["n_write_completed"])
                self.rows_total += rows - acquisition["stats"]["n_write_completed"]
                acquisition["stats"]["n_write_completed"] = rows
                acquisition["stats"]["stop_time"] = now
                finished = copy.deepcopy(acquisition)
            elif action == ACTION_REQUEST_FAIL:
                self.acquisition["state"] = FAILED
                self.acquisition["message"] = f"ERROR: {message}"
                self.acquisition["stats"]["stop_time"] = now
        if finished is not None:
            self.on_finished(finished)

    def on_progress(self, progress: WriteProgress) -> None:
        """A progress message of the writer agent (rows written so far)."""
        with self._lock:
            acquisition = self.acquisition
            if acquisition is None or progress.request_id != self.request_id \
                    or acquisition["state"] not in (WAITING_IMAGES, ACQUIRING_IMAGES):
                return
            rows = progress.n_rows
            if rows > acquisition["stats"]["n_write_completed"]:
                self.rows_total += rows - acquisition["stats"]["n_write_completed"]
                acquisition["stats"]["n_write_completed"] = rows
                acquisition["state"] = ACQUIRING_IMAGES
            acquisition["info"]["run_id"] = progress.run_id
