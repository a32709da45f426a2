"""Supervise a set of stddaq processes: start in order, restart the ones that crash, stop all.

Each service is a :class:`ServiceSpec` (a console command, a text its log shows when it is
ready, whether to restart it). A crashed service is restarted with a log line, with a
back-off; one that keeps crashing (``max_restarts`` within ``restart_window_s``) is given
up on, loudly. ``stop()`` ends every process (and its children) in reverse order, by pid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastcore.launch import ChildProcess
from fastcore.runtime import READY_PREFIX

log = logging.getLogger(__name__)


@dataclass
class ServiceSpec:
    name: str
    args: list[str]
    ready_text: str | None = READY_PREFIX  # matched at a line start (fastcore.runtime)
    restart: bool = True
    ready_timeout: float = 60.0


@dataclass
class _Service:
    spec: ServiceSpec
    process: ChildProcess | None = None
    restarts: list[float] = field(default_factory=list)
    given_up: bool = False
    next_start: float = 0.0


class Supervisor:
    def __init__(self, specs: list[ServiceSpec], log_dir: Path, max_restarts: int = 5,
                 restart_window_s: float = 60.0):
        self.services = [_Service(spec) for spec in specs]
        self.log_dir = Path(log_dir)
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s

    def _launch(self, service: _Service) -> None:
        spec = service.spec
        service.process = ChildProcess(spec.args, self.log_dir / f"{spec.name}.log")
        if spec.ready_text:
            service.process.wait_for(spec.ready_text, spec.ready_timeout)
        log.info("%s running (pid %d), log %s", spec.name, service.process.pid,
                 service.process.log_path)

    def start(self) -> None:
        """Start every service in order, each after the previous one is ready."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in self.services:
            self._launch(service)

    def pid(self, name: str) -> int:
        return self._service(name).process.pid

    def _service(self, name: str) -> _Service:
        for service in self.services:
            if service.spec.name == name:
                return service
        raise KeyError(name)

    def check(self) -> list[str]:
        """Restart crashed services; returns the names restarted in this call."""
        restarted = []
        now = time.monotonic()
        for service in self.services:
            process = service.process
            if service.given_up or process is None or process.popen.poll() is None:
                continue
            code = process.popen.returncode
            if not service.spec.restart:
                continue
            if now < service.next_start:
                continue
            service.restarts = [t for t in service.restarts
                                if now - t < self.restart_window_s]
            if len(service.restarts) >= self.max_restarts:
                service.given_up = True
                log.error("%s crashed %d times within %.0f s (last exit code %s): giving up; "
                          "see %s", service.spec.name, len(service.restarts) + 1,
                          self.restart_window_s, code, process.log_path)
                continue
            log.warning("%s exited with code %s: restarting (restart %d), log %s",
                        service.spec.name, code, len(service.restarts) + 1, process.log_path)
            process.stop()
            service.restarts.append(now)
            service.next_start = now + min(2.0 ** len(service.restarts) * 0.25, 5.0)
            try:
                self._launch(service)
            except RuntimeError as exc:
                log.error("%s did not come back: %s", service.spec.name,
                          str(exc).splitlines()[0])
            restarted.append(service.spec.name)
        return restarted

    def restart(self, specs: list[ServiceSpec]) -> None:
        """Stop the services named in ``specs`` (in reverse order), then start them again
        with these specs, in order, each after the previous one is ready."""
        by_name = {spec.name: spec for spec in specs}
        targets = [service for service in self.services if service.spec.name in by_name]
        for service in reversed(targets):
            if service.process is not None:
                code = service.process.stop()
                log.info("%s stopped for a new config (exit code %s)", service.spec.name,
                         code)
        for service in targets:
            service.spec = by_name[service.spec.name]
            service.restarts, service.given_up, service.next_start = [], False, 0.0
            self._launch(service)

    def stop(self) -> list[int]:
        """Stop everything in reverse order; returns the processes that had to be killed."""
        leftovers = []
        for service in reversed(self.services):
            if service.process is not None:
                code = service.process.stop()
                leftovers += service.process.leftovers
                log.info("%s stopped (exit code %s)", service.spec.name, code)
        return leftovers
