"""A run spread over several writers (fastcore/writer_split.py): the block arithmetic,
and H5Writers in-process writing their shares with a master file of virtual datasets
(fastcore/vds_master.py) that reads as one dataset in image order."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fastcore.buffers import ImageBuffer, shm_name
from fastcore.config import load_config
from fastcore.file_layout import writer_file
from fastcore.formats import IMAGE_METADATA, ImageStatus, dtype_code
from fastcore.h5_writer import H5Writer
from fastcore.names import Segment
from fastcore.writer_protocol import (
    BeginCommand,
    MasterCommand,
    MasterWritten,
    RunFirstImage,
    RunInfo,
    RunStarted,
    RunSummary,
    StartCommand,
    decode_command,
)
from fastcore.writer_split import Split, closed_run_mappings


@pytest.mark.parametrize("n_writers", [1, 2, 3, 4])
@pytest.mark.parametrize("fpb", [1, 2, 5])
def test_split_arithmetic_agrees_with_counting(n_writers, fpb):
    for index in range(n_writers):
        split = Split(index, n_writers, fpb)
        owned = [k for k in range(200) if (k // fpb) % n_writers == index]
        assert [k for k in range(200) if split.owns(k)] == owned
        for row, k in enumerate(owned):
            assert split.rows_before(k) == row
            assert split.image_of_row(row) == k
        assert split.rows_before(200) == len(owned)
        assert [split.next_owned(k) for k in range(150)] == [
            min(o for o in owned if o >= k) for k in range(150)]


def test_closed_run_length_is_through_the_last_image_written():
    # 2 writers, blocks of 3: writer 0 has k 0-2, 6-8; writer 1 k 3-5, 9-11
    mappings, length = closed_run_mappings(2, 3, 10, [0, 4], [5, 2])
    assert length == 8  # writer 0's fifth row is k = 7
    assert [(m.writer, m.master_start, m.block, m.count, m.source_start)
            for m in mappings] == [(0, 10, 3, 1, 0), (0, 16, 2, 1, 3), (1, 13, 2, 1, 4)]


def test_a_split_start_round_trips_and_bad_splits_are_named():
    start = StartCommand(5, RunInfo("/tmp/x_w1.h5", 10), 3.0, None, split=Split(1, 2, 4))
    assert decode_command(start.to_json()) == start
    bad = StartCommand(5, RunInfo("/tmp/x.h5", 10), 3.0, None, split=Split(2, 2, 4))
    with pytest.raises(ValueError, match=r"split\.index: expected an integer from 0 to 1"):
        decode_command(bad.to_json())
    master = MasterCommand(5, "/tmp/x.h5", ["/tmp/x_w0.h5", "/elsewhere/x_w1.h5"], 4, [0, 0])
    with pytest.raises(ValueError, match="writer_files: expected the writers"):
        decode_command(master.to_json())


class Detector:
    """An ImageBuffer the test fills (image id -> pixels id % 65000 + row)."""

    def __init__(self, config):
        self.config = config
        self.images = ImageBuffer.create(shm_name(config.detector_name, Segment.IMAGE), 64,
                                         config.image_shape, config.image_dtype)

    def produce(self, ids) -> np.ndarray:
        records = np.zeros(len(ids), IMAGE_METADATA)
        records["id"], records["frame_index"] = ids, ids
        records["height"], records["width"] = self.config.image_shape
        records["dtype"] = dtype_code(self.config.image_dtype)
        for record in records:
            self.images.begin_write(int(record["id"]))[:] = self.pixels(int(record["id"]))
            self.images.commit(record)
        return records

    def pixels(self, image_id: int) -> np.ndarray:
        rows = np.arange(self.config.image_shape[0])[:, None]
        return np.broadcast_to((image_id % 65000 + rows).astype(self.config.image_dtype),
                               self.config.image_shape)


def _run(writers, events, detector, master, n, run_id, ids, append=False):
    """One split run: start both writers, write the master, feed ``ids`` in two halves
    (writer 1 begins when writer 0 announces the first image)."""
    files = [writer_file(master, i, len(writers)) for i in range(len(writers))]
    for i, writer in enumerate(writers):
        writer.command(StartCommand(run_id, RunInfo(files[i], n, append=append), 30.0,
                                    split=Split(i, len(writers), 3)).to_json())
        assert isinstance(events[i][-1], RunStarted), events[i]
    bases = [events[i][-1].first_row for i in range(len(writers))]
    writers[0].command(MasterCommand(run_id, master, files, 3, bases, append).to_json())
    assert isinstance(events[0][-1], MasterWritten), events[0]
    half = len(ids) // 2
    writers[0].take(detector.produce(ids[:half]))
    first = [e for e in events[0] if isinstance(e, RunFirstImage)]
    assert first and first[-1].first_image_id == ids[0]
    for writer in writers[1:]:
        writer.command(BeginCommand(run_id, ids[0]).to_json())
        writer.tick()  # takes the first half from the buffer
    records = detector.produce(ids[half:])
    for writer in writers:
        writer.take(records)
    return [next(e for e in reversed(events[i]) if isinstance(e, RunSummary))
            for i in range(len(writers))]


def test_two_writers_and_a_master_read_as_one_dataset(make_config, tmp_path):
    path, _ = make_config("eiger_500k.json", n_writers=2, frames_per_block=3)
    config = load_config(path)
    detector = Detector(config)
    events: list[list] = [[], []]
    writers = [H5Writer(config, events[i].append) for i in range(2)]
    master = str(tmp_path / "scan.h5")
    absent = {104, 110}
    ids = [i for i in range(100, 115) if i not in absent]  # 15 images asked, 2 never come
    try:
        summaries = _run(writers, events, detector, master, 15, 9, ids)
        # a second, appended run of 7: the master joins both
        more = list(range(200, 207))
        summaries2 = _run(writers, events, detector, master, 7, 10, more, append=True)
    finally:
        for writer in writers:
            writer.close()
        detector.images.close()
    assert [s.n_images for s in summaries] == [9, 6]  # writer 0: k 0-2, 6-8, 12-14
    assert sum(s.n_absent for s in summaries) == 2, summaries
    assert sorted(r for s in summaries for r in map(tuple, s.absent_ranges)) == [
        (104, 104), (110, 110)]
    assert all(s.reason == "completed" for s in summaries + summaries2), summaries
    assert [s.outcome for s in summaries2] == ["success", "success"]
    assert summaries2[0].first_row == 9 and summaries2[1].first_row == 6
    all_ids = list(range(100, 115)) + more
    script = f"""
import json, h5py
with h5py.File({master!r}, "r") as f:
    g = f[{config.detector_name!r}]
    print(json.dumps([list(g["data"].shape), [int(i) for i in g["image_id"]],
                      [int(s) for s in g["status"]], [int(d[0, 0]) for d in g["data"]]]))
"""
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60, cwd="/")
    assert shown.returncode == 0, shown.stderr
    shape, image_ids, status, corner = json.loads(shown.stdout)
    assert shape == [len(all_ids), *config.image_shape]
    assert image_ids == all_ids
    assert status == [ImageStatus.ABSENT if i in absent else 0 for i in all_ids]
    assert corner == [0 if i in absent else i for i in all_ids]
    with h5py.File(master, "r") as f:
        data = f[config.detector_name]["data"]
        for row, image_id in enumerate(all_ids):
            if image_id not in absent:
                np.testing.assert_array_equal(data[row], detector.pixels(image_id))
