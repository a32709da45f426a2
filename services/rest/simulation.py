"""The built-in detector simulator, started and stopped by the REST interface: a
``stddaq-simulator`` child process sending the running config's UDP stream to this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

MAX_RATE_HZ = 10_000.0
DEFAULT_RATE_HZ = 100.0


class SimulationError(ValueError):
    """The simulator cannot be started as asked (the message says why)."""


class Simulation:
    """One simulator process at a time. ``config()`` gives the running detector config;
    ``images_arriving()`` the detector's current image rate (a real detector, or a
    simulator stddaq-run started, must not get a second stream on its ports)."""

    def __init__(self, config: Callable[[], dict], images_arriving: Callable[[], float]):
        self.config = config
        self.images_arriving = images_arriving
        self._process: subprocess.Popen | None = None
        self._config_file: str | None = None
        self._log_file: str | None = None
        self.rate_hz: float | None = None
        self.started_at: float | None = None
        self._lock = threading.Lock()

    def status(self) -> dict:
        with self._lock:
            running = self._process is not None and self._process.poll() is None
            return {"running": running, "rate_hz": self.rate_hz if running else None,
                    "pid": self._process.pid if running else None,
                    "started_at": self.started_at if running else None,
                    "exit_code": None if self._process is None or running
                    else self._process.returncode}

    def start(self, rate_hz: float = DEFAULT_RATE_HZ) -> dict:
        if isinstance(rate_hz, bool) or not isinstance(rate_hz, int | float) \
                or not 0 < rate_hz <= MAX_RATE_HZ:
            raise SimulationError(f"rate_hz: expected frames per second > 0 and <= "
                                  f"{MAX_RATE_HZ:g}, got {rate_hz!r:.40}")
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                raise SimulationError(f"the simulator already runs (pid {self._process.pid}, "
                                      f"{self.rate_hz:g} Hz): stop it first")
            arriving = self.images_arriving()
            if arriving > 0:
                raise SimulationError(f"images are already arriving ({arriving:.0f}/s from "
                                      "the detector or another simulator): a second stream "
                                      "on its ports would mix with it")
            descriptor, self._config_file = tempfile.mkstemp(prefix="stddaq-sim-",
                                                             suffix=".json")
            with os.fdopen(descriptor, "w") as config_file:
                json.dump(self.config(), config_file)
            self._log_file = self._config_file.removesuffix(".json") + ".log"
            with open(self._log_file, "wb") as log:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "fastcore.simulator", self._config_file,
                     "--frames", "0", "--rate", str(float(rate_hz))],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self.rate_hz, self.started_at = float(rate_hz), time.time()
        time.sleep(0.3)  # a simulator that cannot start says so at once
        process = self._process
        if process.poll() is not None:
            with open(self._log_file, errors="replace") as log:
                reason = log.read().strip().splitlines()
            self.stop()
            raise SimulationError(f"the simulator exited at once (code {process.returncode}): "
                                  f"{reason[-1] if reason else 'no message'}")
        return self.status()

    def stop(self) -> dict:
        with self._lock:
            process, self._process = self._process, None
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            for path in (self._config_file, self._log_file):
                if path is not None and os.path.exists(path):
                    os.unlink(path)
            self._config_file = self._log_file = None
        return self.status()
