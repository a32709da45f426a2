"""The request a service is running, kept on disk for the next process of that service.

A process that dies mid-request (crash, kill -9) leaves the request unacknowledged, so
RabbitMQ delivers it again to the service's next process. A request that made a process
die may do so again: the journal tells the successor which request its predecessor was
running, and the successor fails it instead of running it a second time.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class RunningJournal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._left = {line for line in self.path.read_text().split() if line}
        except OSError:
            self._left = set()
        self.end()

    def left_behind(self, request_id: str) -> bool:
        """True (once) if a dead predecessor was running ``request_id``."""
        if request_id in self._left:
            self._left.discard(request_id)
            return True
        return False

    def begin(self, request_id: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(request_id + "\n")
        os.replace(tmp, self.path)

    def end(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
