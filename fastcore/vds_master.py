"""The master file of a run spread over several writers: HDF5 virtual datasets.

``/<detector>/data`` and the per-image datasets of the master are virtual datasets over
the writers' files (:mod:`fastcore.writer_split` gives the row mapping), so plain h5py reads
them as one (n, H, W) dataset in image order. The run being written is mapped without an
end: the master grows with the writers' files, and its length is always what was written
(up to the last image any writer wrote; a row not written reads as zeros with status
ABSENT). Finished runs of an appended file are mapped with their final lengths. The master
records its runs in the attribute ``stddaq_runs`` so an appending run can rebuild it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import h5py
import numpy as np
from h5py import h5d, h5p, h5s, h5t

from fastcore.file_layout import FILL_VALUES, METADATA_FIELDS
from fastcore.writer_split import Mapping, closed_run_mappings, open_run_mappings

RUNS_ATTR = "stddaq_runs"
FILES_ATTR = "stddaq_writer_files"
BLOCK_ATTR = "stddaq_frames_per_block"


class MasterError(ValueError):
    """An existing file cannot be appended to as a master: the message says why."""


@dataclass
class MasterRun:
    """One run in a master: where it starts there, where it starts in each writer's file,
    and (once finished) how many rows each writer wrote."""

    run_id: int
    master_start: int
    bases: list[int]
    rows: list[int] | None = None


def read_runs(file: h5py.File, writer_names: list[str], frames_per_block: int
              ) -> list[MasterRun]:
    """The runs recorded in an existing master; MasterError if it is not a master of these
    writer files and block size."""
    try:
        names = [str(n) for n in json.loads(file.attrs[FILES_ATTR])]
        block = int(file.attrs[BLOCK_ATTR])
        runs = [MasterRun(**run) for run in json.loads(file.attrs[RUNS_ATTR])]
    except (KeyError, TypeError, ValueError) as exc:
        raise MasterError(f"{file.filename} is not a stddaq master file ({exc})") from None
    if names != writer_names or block != frames_per_block:
        raise MasterError(f"{file.filename} joins {names} in blocks of {block}; this run "
                          f"writes {writer_names} in blocks of {frames_per_block}")
    return runs


def add_run(runs: list[MasterRun], run_id: int, bases: list[int], frames_per_block: int
            ) -> list[MasterRun]:
    """The runs with a new one appended: the previous open run is closed with the rows its
    writers wrote (the new run's bases are where they stopped)."""
    if not runs:
        return [MasterRun(run_id, 0, list(bases))]
    last = runs[-1]
    rows = [new - old for new, old in zip(bases, last.bases, strict=True)]
    if min(rows) < 0:
        raise MasterError(f"the writers' files are shorter ({bases} rows) than the master "
                          f"says ({last.bases} at its last run)")
    _, length = closed_run_mappings(len(bases), frames_per_block, last.master_start,
                                    last.bases, rows)
    closed = MasterRun(last.run_id, last.master_start, last.bases, rows)
    return [*runs[:-1], closed, MasterRun(run_id, last.master_start + length, list(bases))]


def mappings_of(runs: list[MasterRun], frames_per_block: int) -> list[Mapping]:
    n_writers = len(runs[0].bases)
    mappings: list[Mapping] = []
    for run in runs:
        if run.rows is None:
            mappings += open_run_mappings(n_writers, frames_per_block, run.master_start,
                                          run.bases)
        else:
            mappings += closed_run_mappings(n_writers, frames_per_block, run.master_start,
                                            run.bases, run.rows)[0]
    return mappings


def _virtual_dataset(group: h5py.Group, name: str, item_shape: tuple[int, ...],
                     dtype: np.dtype, fill: int, mappings: list[Mapping],
                     writer_names: list[str], source: str) -> None:
    """One virtual dataset of rows of ``item_shape`` (unlimited along the rows)."""
    unlimited = h5s.UNLIMITED
    rest, zeros, ones = item_shape, (0,) * len(item_shape), (1,) * len(item_shape)
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_fill_value(np.array([fill], dtype))
    # the rows of finished runs are there from the start; the open run's grow
    extent = max((m.master_start + (m.count - 1) * m.stride + m.block for m in mappings
                  if m.count is not None), default=0)
    for m in mappings:
        count = unlimited if m.count is None else m.count
        virtual = h5s.create_simple((extent, *rest), (unlimited, *rest))
        virtual.select_hyperslab((m.master_start, *zeros), (count, *ones), (m.stride, *ones),
                                 (m.block, *rest))
        if m.count is None:
            src = h5s.create_simple((0, *rest), (unlimited, *rest))
            src.select_hyperslab((m.source_start, *zeros), (unlimited, *ones), (1, *ones),
                                 (1, *rest))
        else:
            rows = m.count * m.block
            src = h5s.create_simple((m.source_start + rows, *rest))
            src.select_hyperslab((m.source_start, *zeros), (1, *ones), (1, *ones),
                                 (rows, *rest))
        dcpl.set_virtual(virtual, writer_names[m.writer].encode(), source.format(
            name=name).encode(), src)
    tid = h5t.py_create(np.dtype(dtype), logical=1)
    h5d.create(group.id, name.encode(), tid,
               h5s.create_simple((extent, *rest), (unlimited, *rest)), dcpl=dcpl)


def write_master(file: h5py.File, detector_name: str, image_shape: tuple[int, int],
                 dtype: np.dtype, writer_names: list[str], frames_per_block: int,
                 runs: list[MasterRun], attrs: dict[str, str | int]) -> None:
    """Lay out a master in ``file`` (new and empty): the virtual datasets of ``runs`` over
    the writer files ``writer_names`` (names relative to the master's directory)."""
    mappings = mappings_of(runs, frames_per_block)
    group = file.create_group(detector_name)
    source = f"/{detector_name}/{{name}}"
    _virtual_dataset(group, "data", tuple(image_shape), np.dtype(dtype), 0, mappings,
                     writer_names, source)
    for name in METADATA_FIELDS:
        _virtual_dataset(group, name, (), np.dtype("<u8"), FILL_VALUES.get(name, 0),
                         mappings, writer_names, source)
    for key, value in attrs.items():
        file.attrs[key] = value
    file.attrs[FILES_ATTR] = json.dumps(writer_names)
    file.attrs[BLOCK_ATTR] = frames_per_block
    file.attrs[RUNS_ATTR] = json.dumps([vars(run) for run in runs])


def relative_names(master: str, writer_files: list[str]) -> list[str]:
    """Writer file names as the master refers to them (relative to its directory)."""
    directory = os.path.dirname(master)
    return [os.path.relpath(path, directory) for path in writer_files]
