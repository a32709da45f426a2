"""Checks shared by the primary services' request validation."""

from __future__ import annotations

import os
from typing import Any


class RequestError(ValueError):
    """A request with a missing or bad field; the message names it."""


PATH_MAX, NAME_MAX = 4095, 255  # Linux: bytes of a path, of one name in it


def output_path(request: dict[str, Any], name: str, output_root: str | None) -> str:
    """The absolute path in ``request[name]``: no '..', inside ``output_root`` if set."""
    path = request.get(name)
    if not isinstance(path, str) or not path or not os.path.isabs(path):
        raise RequestError(f"{name}: expected an absolute file path, got {path!r:.200}")
    if len(path.encode()) > PATH_MAX or any(len(part.encode()) > NAME_MAX
                                            for part in path.split("/")):
        raise RequestError(f"{name}: {path[:60]!r}...{path[-40:]!r} is too long ("
                           f"{len(path.encode())} bytes; at most {PATH_MAX}, and "
                           f"{NAME_MAX} per name)")
    if "\0" in path:
        raise RequestError(f"{name}: a path cannot hold a NUL character, got {path!r:.200}")
    if path.endswith("/"):
        raise RequestError(f"{name}: {path!r:.200} ends with '/': expected a file path")
    if ".." in path.split("/"):
        raise RequestError(f"{name}: '..' is not allowed in {path!r}")
    if output_root:
        root = os.path.abspath(output_root)
        if os.path.commonpath([root, os.path.normpath(path)]) != root:
            raise RequestError(f"{name}: {path!r} is outside the output root {root}")
    return path
