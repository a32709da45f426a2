"""Names in stddaq's HDF5 files, shared by the writer, the master file and the repair tool.

``/<detector>/data`` (n, H, W) and, beside it, one uint64 value per image in each of
:data:`METADATA_FIELDS`. A run spread over N writers keeps the requested file name for its
master file (virtual datasets over the writers' files) and writes its images into
:func:`writer_file` names next to it.
"""

from __future__ import annotations

import os

from fastcore.formats import ImageStatus

METADATA_FIELDS = ("image_id", "status", "pulse_id", "frame_index", "daq_rec")
FILL_VALUES = {"status": int(ImageStatus.ABSENT)}
"""What a row reads as before (or without) its image: zeros, status ABSENT."""


def writer_file(output_file: str, index: int, n_writers: int) -> str:
    """The file writer ``index`` of ``n_writers`` writes for ``output_file``:
    ``<stem>_w<index>.h5`` next to it (the requested name itself when there is one
    writer)."""
    if n_writers == 1:
        return output_file
    stem, ext = os.path.splitext(output_file)
    width = len(str(n_writers - 1))
    return f"{stem}_w{index:0{width}d}{ext or '.h5'}"
