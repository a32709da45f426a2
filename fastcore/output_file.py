"""Create an output file where the operator allows it, without a window for a symlink.

The request's path is checked as text before a run starts (``services.requests``); here the
file itself is created: every directory below the output root is opened with
``O_NOFOLLOW`` relative to the one before it, and the file with ``O_CREAT | O_EXCL |
O_NOFOLLOW``, so a symbolic link anywhere below the root (or swapped in meanwhile) is
refused, and nothing that exists is ever opened (except by :func:`open_or_create`, for a
request that appends: then only a regular file, never through a link). The writer then opens
the file through ``/proc/self/fd``: the same inode, whatever happens to the path.
"""

from __future__ import annotations

import errno
import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputPathError(Exception):
    """The file cannot or may not be created there (the message names the path and why)."""


class OutputFileExistsError(OutputPathError):
    """The file to create exists already."""


def _directory_error(path: str, directory: str, exc: OSError) -> OutputPathError:
    if exc.errno == errno.ENOENT:
        return OutputPathError(f"cannot write {path}: directory {directory} does not exist")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OutputPathError(f"cannot write {path}: permission denied")
    return OutputPathError(f"cannot write {path}: directory {directory}: {exc.strerror}")


def _open_directory(path: str, root: str | None) -> int:
    """A descriptor of ``path``'s directory, reached from ``root`` without symlinks."""
    directory = os.path.dirname(os.path.normpath(path))
    if root is None:
        try:
            return os.open(directory, _DIR_FLAGS)
        except OSError as exc:
            raise _directory_error(path, directory, exc) from None
    root = os.path.abspath(root)
    relative = os.path.relpath(directory, root)
    if relative == os.curdir:
        parts = []
    elif relative.split(os.sep)[0] == os.pardir:
        raise OutputPathError(f"cannot write {path}: outside the output root {root}")
    else:
        parts = relative.split(os.sep)
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise _directory_error(path, root, exc) from None
    reached = root
    for part in parts:
        reached = os.path.join(reached, part)
        try:
            next_fd = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OutputPathError(
                    f"cannot write {path}: {reached} is a symbolic link or not a directory "
                    f"(nothing below the output root {root} may lead elsewhere)") from None
            raise _directory_error(path, directory if exc.errno == errno.ENOENT else reached,
                                   exc) from None
        os.close(fd)
        fd = next_fd
    return fd


def _create(dir_fd: int, path: str, mode: int) -> int:
    """Create ``path``'s file in ``dir_fd`` (it must not exist); OutputFileExistsError when it
    does."""
    try:
        return os.open(os.path.basename(path), _FILE_FLAGS, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise OutputFileExistsError(f"cannot write {path}: the file exists (stddaq never "
                                        "overwrites data)") from None
        if exc.errno == errno.ELOOP:
            raise OutputPathError(f"cannot write {path}: it is a symbolic link") from None
        reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) \
            else exc.strerror
        raise OutputPathError(f"cannot write {path}: {reason}") from None


def _open_existing(dir_fd: int, path: str) -> int:
    """Open ``path``'s regular file in ``dir_fd`` for writing, never through a link."""
    try:
        fd = os.open(os.path.basename(path), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as exc:
        reason = {errno.ELOOP: "it is a symbolic link", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied"}.get(exc.errno, exc.strerror)
        raise OutputPathError(f"cannot append to {path}: {reason}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputPathError(f"cannot append to {path}: not a regular file")
    return fd


def create_exclusive(path: str, root: str | None, mode: int = 0o644) -> tuple[int, int]:
    """Create ``path`` (it must not exist) below ``root``; returns (directory fd, file fd).
    The caller closes both."""
    dir_fd = _open_directory(path, root)
    try:
        return dir_fd, _create(dir_fd, path, mode)
    except OutputPathError:
        os.close(dir_fd)
        raise


def open_or_create(path: str, root: str | None, mode: int = 0o644) -> tuple[int, int, bool]:
    """Open ``path`` below ``root`` for appending, creating it if it does not exist; returns
    (directory fd, file fd, created). A symbolic link or anything but a regular file is
    refused. The caller closes both descriptors."""
    dir_fd = _open_directory(path, root)
    try:
        try:
            return dir_fd, _create(dir_fd, path, mode), True
        except OutputFileExistsError:
            return dir_fd, _open_existing(dir_fd, path), False
    except OutputPathError:
        os.close(dir_fd)
        raise


def fd_path(fd: int) -> str:
    """A path that opens the very file behind ``fd`` (for libraries that take paths)."""
    return f"/proc/self/fd/{fd}"

