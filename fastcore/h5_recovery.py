"""Make an HDF5 file left open by a killed writer (``kill -9``, OOM kill) valid again.

stddaq-h5-writer (``fastcore/h5_writer.py``) writes with ``libver="latest"`` in SWMR mode,
so a file whose writer died keeps the "open for write / SWMR write" status flags of its
superblock (version 3): plain ``h5py.File(path)`` then refuses it ("file is already open
for write") and only SWMR readers can open it. HDF5's ``h5clear -s --increment=0`` repairs
that; this module does the same without hdf5-tools, then makes the run's datasets agree.

What :func:`recover_file` changes, in this order, and only when needed:

1. The superblock (version 2 or 3, found at byte 0, 512, 1024, 2048, ... as HDF5 searches
   for it): its status flags are cleared and, if the stored end-of-allocation address (EOA)
   is below the real file size, it is raised to the file size; the checksum (Jenkins'
   lookup3, as the HDF5 format specifies) is recomputed. The writer's superblock is only
   rewritten when it flushes, so after a kill the stored EOA is the file size at the last
   flush while the images written since lie beyond it. Raising the EOA is HDF5's own repair
   of a crashed SWMR file (``h5clear --increment``): metadata the writer's cache evicted
   between two flushes may point beyond the stored EOA, and HDF5 would refuse to read there
   ("addr overflow") and allocate new space on top of it. The price: the bytes of images
   written after the last flush stay in the file as unused space.
2. The group's datasets (``/<detector>/data`` and the (n,) metadata datasets): the writer
   extends ``data`` image by image and the metadata datasets when it flushes. What reached
   the file is normally the state of the last flush, but a kill in the middle of a flush
   (or an eviction from the writer's metadata cache) can leave ``data`` (or some metadata
   datasets) longer than ``image_id``. Every dataset of the group that is extendible along
   its first axis is shrunk to the shortest of them (normally ``image_id``'s length: the
   rows whose metadata was flushed); nothing is ever grown.

A file closed cleanly whose datasets agree is not touched (not even its modification
time). Errors are :class:`RecoveryError`, whose message names the file and what was found;
nothing is changed before every check passed. Only call this when the file's writer is
known to be dead: a SWMR writer holds no file lock, so this module can only check (on
Linux, best effort) that no process of this host has the file open for writing.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import struct
from dataclasses import dataclass, field

import h5py

SIGNATURE = b"\x89HDF\r\n\x1a\n"
FLAG_WRITE_ACCESS = 0x01  # the file is open for writing
FLAG_FILE_OK = 0x02  # also defined by the library; h5clear -s clears it too
FLAG_SWMR_WRITE = 0x04  # the file is open for SWMR writing (superblock version 3)
KNOWN_FLAGS = FLAG_WRITE_ACCESS | FLAG_FILE_OK | FLAG_SWMR_WRITE

_SIZES = {2: "<H", 4: "<I", 8: "<Q"}  # size of offsets -> struct format (little-endian)
_MASK32 = 0xFFFFFFFF


class RecoveryError(RuntimeError):
    """The file cannot be recovered (or is not understood); the message names the path."""


@dataclass(frozen=True)
class Superblock:
    """The fields of a version 2/3 superblock (all addresses as stored)."""

    offset: int  # where the signature is in the file
    version: int
    size_of_offsets: int
    size_of_lengths: int
    flags: int
    base_address: int
    extension_address: int | None  # None: undefined (no superblock extension)
    eoa: int  # "end of file address": end of the space HDF5 allocated, an absolute offset
    root_address: int
    checksum: int

    def encode(self, flags: int, eoa: int) -> bytes:
        """The superblock with other flags and EOA, checksum recomputed."""
        fmt = _SIZES[self.size_of_offsets]
        undefined = (1 << (8 * self.size_of_offsets)) - 1
        ext = undefined if self.extension_address is None else self.extension_address
        body = SIGNATURE + bytes([self.version, self.size_of_offsets, self.size_of_lengths,
                                  flags])
        body += b"".join(struct.pack(fmt, value) for value in
                         (self.base_address, ext, eoa, self.root_address))
        return body + struct.pack("<I", lookup3(body))


@dataclass
class RecoveryReport:
    """What :func:`recover_file` found and did."""

    path: str
    group: str | None  # the datasets' group (None: no group with an image_id dataset)
    flags_found: int  # the superblock status flags before recovery
    flags_cleared: bool  # the superblock was rewritten with the flags cleared
    eoa_before: int
    eoa_after: int
    file_size: int  # before recovery
    rows_kept: int | None  # the common length of the group's datasets afterwards
    rows_dropped: int  # rows removed from the longest dataset (normally ``data``)
    lengths_before: dict[str, int] = field(default_factory=dict)
    missing_data_chunks: int = 0  # kept rows of ``data`` without a chunk (read as zeros)

    @property
    def changed(self) -> bool:
        return self.flags_cleared or self.rows_dropped > 0

    def describe(self) -> str:
        if not self.changed:
            rows = "" if self.rows_kept is None else f" ({self.rows_kept} rows)"
            return f"{self.path}: closed cleanly, nothing to recover{rows}"
        parts = []
        if self.flags_cleared:
            parts.append(f"cleared superblock status flags 0x{self.flags_found:02x}")
            if self.eoa_after != self.eoa_before:
                parts.append(f"raised the end-of-allocation address from {self.eoa_before} "
                             f"to the file size {self.eoa_after}")
        if self.rows_kept is not None:
            parts.append(f"kept {self.rows_kept} rows in /{self.group}, dropped "
                         f"{self.rows_dropped} written after the last flush")
        if self.missing_data_chunks:
            parts.append(f"WARNING: {self.missing_data_chunks} kept rows of data have no "
                         "chunk in the file (they read as zeros)")
        return f"{self.path}: " + "; ".join(parts)


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` of ``data``: HDF5's metadata checksum."""

    def rot(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & _MASK32

    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & _MASK32
    pos = 0
    while length - pos > 12:
        a = (a + int.from_bytes(data[pos : pos + 4], "little")) & _MASK32
        b = (b + int.from_bytes(data[pos + 4 : pos + 8], "little")) & _MASK32
        c = (c + int.from_bytes(data[pos + 8 : pos + 12], "little")) & _MASK32
        a = ((a - c) & _MASK32) ^ rot(c, 4)
        c = (c + b) & _MASK32
        b = ((b - a) & _MASK32) ^ rot(a, 6)
        a = (a + c) & _MASK32
        c = ((c - b) & _MASK32) ^ rot(b, 8)
        b = (b + a) & _MASK32
        a = ((a - c) & _MASK32) ^ rot(c, 16)
        c = (c + b) & _MASK32
        b = ((b - a) & _MASK32) ^ rot(a, 19)
        a = (a + c) & _MASK32
        c = ((c - b) & _MASK32) ^ rot(b, 4)
        b = (b + a) & _MASK32
        pos += 12
    if pos == length:  # nothing left (only for empty input): no final mixing
        return c
    tail = data[pos:].ljust(12, b"\0")
    a = (a + int.from_bytes(tail[0:4], "little")) & _MASK32
    b = (b + int.from_bytes(tail[4:8], "little")) & _MASK32
    c = (c + int.from_bytes(tail[8:12], "little")) & _MASK32
    c = ((c ^ b) - rot(b, 14)) & _MASK32
    a = ((a ^ c) - rot(c, 11)) & _MASK32
    b = ((b ^ a) - rot(a, 25)) & _MASK32
    c = ((c ^ b) - rot(b, 16)) & _MASK32
    a = ((a ^ c) - rot(c, 4)) & _MASK32
    b = ((b ^ a) - rot(a, 14)) & _MASK32
    c = ((c ^ b) - rot(b, 24)) & _MASK32
    return c


def read_superblock(path: str) -> Superblock:
    """Find and decode the superblock; RecoveryError for anything not understood."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset + len(SIGNATURE) <= size:
                f.seek(offset)
                if f.read(len(SIGNATURE)) == SIGNATURE:
                    break
                offset = 512 if offset == 0 else 2 * offset
            else:
                raise RecoveryError(f"{path} is not an HDF5 file: no HDF5 signature at byte "
                                    "0, 512, 1024, 2048, ...")
            head = f.read(4)
            if len(head) < 4:
                raise RecoveryError(f"{path}: truncated superblock at byte {offset}")
            version, size_of_offsets, size_of_lengths, flags = head
            if version not in (2, 3):
                raise RecoveryError(f"{path}: superblock version {version} at byte {offset} "
                                    "is not supported (only versions 2 and 3, which "
                                    "libver='latest' writes)")
            if size_of_offsets not in _SIZES or size_of_lengths not in _SIZES:
                raise RecoveryError(f"{path}: unsupported superblock sizes of offsets "
                                    f"{size_of_offsets} / lengths {size_of_lengths}")
            rest = f.read(4 * size_of_offsets + 4)
    except OSError as exc:
        raise RecoveryError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(rest) < 4 * size_of_offsets + 4:
        raise RecoveryError(f"{path}: truncated superblock at byte {offset}")
    base, ext, eoa, root, checksum = struct.unpack(
        "<" + _SIZES[size_of_offsets][1] * 4 + "I", rest)
    stored = SIGNATURE + head + rest[:-4]
    if lookup3(stored) != checksum:
        raise RecoveryError(f"{path}: superblock checksum mismatch at byte {offset} (stored "
                            f"0x{checksum:08x}, computed 0x{lookup3(stored):08x}): corrupt "
                            "or not an HDF5 superblock")
    undefined = (1 << (8 * size_of_offsets)) - 1
    if eoa == undefined or root == undefined:
        raise RecoveryError(f"{path}: superblock has an undefined end-of-file or root group "
                            "address")
    return Superblock(offset, version, size_of_offsets, size_of_lengths, flags, base,
                      None if ext == undefined else ext, eoa, root, checksum)


def open_for_writing_by(path: str) -> list[int]:
    """Pids of processes of this host holding ``path`` open for writing (Linux /proc, best
    effort: processes of other users are invisible without privileges)."""
    target = os.path.realpath(path)
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for pid in filter(str.isdigit, entries):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != target:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = next((int(line.split()[1], 8) for line in info
                                  if line.startswith("flags:")), 0)
            except (OSError, ValueError):
                continue
            if flags & os.O_ACCMODE != os.O_RDONLY:
                pids.append(int(pid))
                break
    return pids


def _h5_error(path: str, what: str, exc: BaseException) -> RecoveryError:
    return RecoveryError(f"{path}: {what}: {exc}")


def _find_group(f: h5py.File, path: str, datasets_group: str | None) -> str | None:
    if datasets_group is not None:
        name = datasets_group.strip("/")
        group = f.get(name)
        if not isinstance(group, h5py.Group):
            raise RecoveryError(f"{path}: there is no group /{name}")
        if not isinstance(group.get("image_id"), h5py.Dataset):
            raise RecoveryError(f"{path}: group /{name} has no image_id dataset")
        return name
    candidates = [name for name, item in f.items() if isinstance(item, h5py.Group)
                  and isinstance(item.get("image_id"), h5py.Dataset)]
    if len(candidates) > 1:
        raise RecoveryError(f"{path}: several groups with an image_id dataset "
                            f"({', '.join(sorted(candidates))}): say which one to recover")
    return candidates[0] if candidates else None


def _row_datasets(group: h5py.Group) -> dict[str, h5py.Dataset]:
    """The group's datasets that grow along their first axis (``data`` and the (n,) ones)."""
    return {name: item for name, item in group.items()
            if isinstance(item, h5py.Dataset) and item.ndim >= 1 and item.chunks is not None
            and item.maxshape[0] is None}


def _inspect(path: str, superblock: Superblock,
             datasets_group: str | None) -> tuple[str | None, dict[str, int]]:
    """(group, first-axis length of each row dataset), read without changing the file."""
    dirty = bool(superblock.flags)
    try:  # a killed SWMR writer's file opens only for SWMR reading
        f = h5py.File(path, "r", swmr=dirty and superblock.version == 3)
    except OSError as exc:
        raise _h5_error(path, "HDF5 cannot open it", exc) from None
    with f:
        try:
            group = _find_group(f, path, datasets_group)
            if group is None:
                return None, {}
            lengths = {name: ds.shape[0] for name, ds in _row_datasets(f[group]).items()}
        except RecoveryError:
            raise
        except (OSError, KeyError, RuntimeError) as exc:
            raise _h5_error(path, "HDF5 cannot read its datasets", exc) from None
    return group, lengths


def _patch_superblock(path: str, superblock: Superblock) -> Superblock:
    """Clear the status flags and raise the EOA to the file size, in place (one write)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise RecoveryError(f"cannot open {path} for writing: {exc.strerror}") from None
    try:
        try:  # HDF5 locks the files it opens (except once in SWMR write mode)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RecoveryError(f"{path} is locked by a process that has it open") from None
        if read_superblock(path) != superblock:
            raise RecoveryError(f"{path}: the superblock changed while it was recovered: is "
                                "a writer still running?")
        eoa = max(superblock.eoa, os.fstat(fd).st_size)
        image = superblock.encode(superblock.flags & ~KNOWN_FLAGS, eoa)
        os.pwrite(fd, image, superblock.offset)
        os.fsync(fd)
    except OSError as exc:
        raise RecoveryError(f"cannot rewrite the superblock of {path}: {exc.strerror}") \
            from None
    finally:
        os.close(fd)
    return read_superblock(path)


def _shrink(path: str, group: str, rows: int) -> int:
    """Shrink the group's row datasets to ``rows``; the kept rows of ``data`` lacking a
    chunk."""
    try:
        with h5py.File(path, "r+") as f:
            datasets = _row_datasets(f[group])
            for ds in datasets.values():
                if ds.shape[0] > rows:
                    ds.resize(rows, axis=0)
            return _missing_chunks(datasets.get("data"), rows)
    except OSError as exc:
        raise _h5_error(path, "shrinking the datasets failed", exc) from None


def _missing_chunks(data: h5py.Dataset | None, rows: int) -> int:
    """Rows of a one-row-per-chunk ``data`` dataset that have no chunk in the file."""
    if data is None or data.chunks is None or data.chunks[0] != 1 or \
            tuple(data.chunks[1:]) != tuple(data.shape[1:]):
        return 0
    return max(0, rows - data.id.get_num_chunks())


def _check(path: str, group: str, rows: int) -> int:
    """Kept rows of ``data`` without a chunk, read from the recovered file."""
    try:
        with h5py.File(path, "r") as f:
            return _missing_chunks(_row_datasets(f[group]).get("data"), rows)
    except OSError as exc:
        raise _h5_error(path, "HDF5 cannot open it after recovery", exc) from None


def _verify(path: str, group: str | None, rows: int | None) -> None:
    """The file opens without SWMR and the group's row datasets all have ``rows`` rows."""
    if read_superblock(path).flags:
        raise RecoveryError(f"{path}: the superblock status flags are still set")
    try:
        with h5py.File(path, "r") as f:
            if group is None:
                return
            lengths = {name: ds.shape[0] for name, ds in _row_datasets(f[group]).items()}
    except (OSError, KeyError) as exc:
        raise _h5_error(path, "HDF5 cannot open it after recovery", exc) from None
    if set(lengths.values()) != {rows}:
        raise RecoveryError(f"{path}: datasets of /{group} still differ in length after "
                            f"recovery: {lengths}")


def recover_file(path: str | os.PathLike, datasets_group: str | None = None) -> RecoveryReport:
    """Make ``path``, left open by a killed stddaq-h5-writer, a valid HDF5 file again.

    ``datasets_group`` is the group holding ``data`` and ``image_id`` (the detector name);
    None finds the one top-level group with an ``image_id`` dataset (a file without such a
    group only gets its superblock repaired). Clears the superblock status flags (raising
    the end-of-allocation address to the file size), then shrinks the group's datasets
    that grow along their first axis to their common length: the shortest of them,
    normally ``image_id``'s, i.e. the rows flushed before the writer died. A cleanly
    closed file whose datasets agree is left untouched. Everything is checked before
    anything is changed; RecoveryError, naming the path, for a file it does not
    understand, a truncated file, or a file a process of this host has open for writing.
    """
    path = os.fspath(path)
    superblock = read_superblock(path)
    try:
        file_size = os.path.getsize(path)
    except OSError as exc:
        raise RecoveryError(f"cannot read {path}: {exc.strerror}") from None
    if file_size < superblock.eoa:
        raise RecoveryError(f"{path} is truncated: it has {file_size} bytes but its "
                            f"superblock says HDF5 allocated {superblock.eoa}")
    if superblock.flags & ~KNOWN_FLAGS:
        raise RecoveryError(f"{path}: unknown superblock status flags "
                            f"0x{superblock.flags:02x}")
    dirty = bool(superblock.flags)
    if dirty and superblock.extension_address is not None:
        raise RecoveryError(f"{path}: the superblock has an extension (at "
                            f"{superblock.extension_address}), which may hold free-space or "
                            "cache-image state this tool does not repair; use h5clear")
    if dirty and (writers := open_for_writing_by(path)):
        raise RecoveryError(f"{path} is open for writing by process(es) "
                            f"{', '.join(map(str, writers))}: stop them first")
    group, lengths = _inspect(path, superblock, datasets_group)
    rows = min(lengths.values()) if lengths else None
    dropped = max(lengths.values()) - rows if lengths else 0
    report = RecoveryReport(path, group, superblock.flags, False, superblock.eoa,
                            superblock.eoa, file_size, rows, 0, lengths)
    if not dirty and not dropped:
        return report  # closed cleanly: not even opened for writing
    if dirty:
        patched = _patch_superblock(path, superblock)
        report.flags_cleared, report.eoa_after = True, patched.eoa
    if dropped:
        report.missing_data_chunks = _shrink(path, group, rows)
        report.rows_dropped = dropped
    elif rows is not None:
        report.missing_data_chunks = _check(path, group, rows)
    _verify(path, group, rows)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stddaq-h5-recover",
        description="Make HDF5 files left open by a killed stddaq-h5-writer valid again "
        "(clear the superblock's open-for-write flags, drop rows not flushed).",
    )
    parser.add_argument("files", nargs="+", help="HDF5 files to recover")
    parser.add_argument("--group", help="the datasets' group (default: the one top-level "
                        "group with an image_id dataset)")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            print(recover_file(path, args.group).describe())
        except RecoveryError as exc:
            failed += 1
            print(f"error: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
