"""Start and stop stddaq processes: log to a file, wait for 'ready', stop by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastcore.runtime import READY_PREFIX, ready_pattern


class ChildProcess:
    """A child process in its own session; output goes to ``log_path``."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.args = args
        self.log_path = Path(log_path)
        # appended: a restart keeps the output (the traceback) of the run before it
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} started: "
                        f"{' '.join(args)}\n".encode())
        self._log.flush()
        self._offset = self._log.tell()
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True)

    @classmethod
    def module(cls, module: str, args: list[str], log_path: Path) -> ChildProcess:
        """Run ``python -m module args...`` with this interpreter."""
        return cls([sys.executable, "-m", module, *args], log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def output(self) -> str:
        """What this run of the process printed (not the runs before it in the log)."""
        with open(self.log_path, "rb") as log:
            log.seek(self._offset)
            return log.read().decode(errors="replace")

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Wait until ``text`` appears in the output: a ready text ("ready", "ready:",
        "ready: std-daq"...) at the start of a line, where the runtime's ready line has it
        ("already: ..." never counts), any other text as a word of its own (at the start of
        a line or after a blank); raise RuntimeError with the log if the process exits first
        or the time runs out."""
        pattern = ready_pattern(text)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pattern.search(self.output):
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{' '.join(self.args[1:4])} exited with code "
                                   f"{self.popen.returncode}:\n{self.output}")
            time.sleep(0.05)
        raise RuntimeError(f"{' '.join(self.args[1:4])}: no {text!r} within {timeout} s:\n"
                           f"{self.output}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the process's ``ready: ...`` line (fastcore.runtime.announce_ready)."""
        self.wait_for(READY_PREFIX, timeout)

    def session_pids(self) -> list[int]:
        """Processes still alive in this child's session (its own children included)."""
        found = subprocess.run(["pgrep", "-s", str(self.pid)], capture_output=True, text=True)
        return [int(pid) for pid in found.stdout.split()]

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL the session if it does not end. Returns the exit code.
        Leftover processes of the session are killed and reported in the log."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait()
        leftovers = self.session_pids()
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        if leftovers:
            self._log.write(f"stddaq: killed leftover processes {leftovers}\n".encode())
        self._log.close()
        self.leftovers = leftovers
        return self.popen.returncode
