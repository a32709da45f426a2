"""A detector with two h5 writer processes: one request, two files, one master file whose
virtual datasets read as one dataset in image order (also while the run goes on, and after
a writer is killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from fastcore.config import load_config
from fastcore.formats import ImageStatus
from services.writer_agent import WriterAgent
from services.writer_link import WriterError
from tests.conftest import Proc, module_cmd, wait_until
from tests.test_writer_agent import FakeAssembler, run_in_thread

N_WRITERS, BLOCK = 2, 4


class SplitSetup:
    """Fake assembler, two writer processes, the agent."""

    def __init__(self, make_config, ipc_dir, tmp_path):
        self.path, _ = make_config("eiger_500k.json", output_root=str(tmp_path),
                                   n_writers=N_WRITERS, frames_per_block=BLOCK)
        self.config = load_config(self.path)
        self.ipc_dir, self.tmp_path = ipc_dir, tmp_path
        self.assembler = FakeAssembler(self.config, ipc_dir, n_slots=64)
        self.writers = [self.start_writer(i) for i in range(N_WRITERS)]
        self.progress: list[dict] = []
        self.agent = WriterAgent(self.config, ipc_dir, image_timeout_s=5, writer_timeout_s=2,
                                 progress=self.progress.append)

    def start_writer(self, index: int) -> Proc:
        writer = Proc(module_cmd("fastcore.h5_writer", str(self.path), "--ipc-dir",
                                 self.ipc_dir, "--writer-index", str(index)),
                      self.tmp_path / f"writer{index}.log")
        writer.wait_for("ready")
        return writer

    def emit(self, ids, pause: float = 0.01) -> None:
        for image_id in ids:
            self.assembler.emit(image_id)
            time.sleep(pause)

    def close(self) -> list[int]:
        self.agent.close()
        self.assembler.close()
        return [writer.stop() for writer in self.writers]


@pytest.fixture
def split(make_config, ipc_dir, tmp_path):
    setup = SplitSetup(make_config, ipc_dir, tmp_path)
    yield setup
    assert setup.close() == [0] * N_WRITERS, [w.output for w in setup.writers]


def read_master(path: str, name: str, swmr: bool = False) -> dict:
    """The master as a fresh process with plain h5py sees it."""
    script = f"""
import json, h5py
with h5py.File({path!r}, "r", swmr={swmr}) as f:
    g = f[{name!r}]
    print(json.dumps({{"shape": list(g["data"].shape), "ids": [int(i) for i in g["image_id"]],
                      "status": [int(s) for s in g["status"]],
                      "pixel": [int(d.max()) for d in g["data"]]}}))
"""
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60, cwd="/")
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def test_one_request_two_writers_one_master(split, tmp_path):
    out = str(tmp_path / "scan.h5")
    thread, outcome = run_in_thread(split.agent, "s1", {"output_file": out, "n_images": 20})
    split.emit([i for i in range(10, 40) if i != 17])  # 17 never comes
    thread.join(20)
    result = outcome["result"]
    assert result["outcome"] == "partial" and result["n_images"] == 19, result
    assert result["n_absent"] == 1 and result["absent_ranges"] == [[17, 17]], result
    assert result["writer_files"] == [str(tmp_path / "scan_w0.h5"),
                                      str(tmp_path / "scan_w1.h5")]
    assert "19 good" in result["summary"] and "1 ids never arrived (17)" in result["summary"]
    assert split.progress[-1]["n_written"] == 19 and split.progress[-1]["done"]
    ids = list(range(10, 30))
    master = read_master(out, split.config.detector_name)
    assert master["shape"] == [20, *split.config.image_shape]
    assert master["ids"] == ids
    assert master["status"] == [ImageStatus.ABSENT if i == 17 else 0 for i in ids]
    assert master["pixel"] == [0 if i == 17 else i for i in ids]
    with h5py.File(str(tmp_path / "scan_w1.h5"), "r") as f:  # blocks 14-17, 22-25
        assert list(f[split.config.detector_name]["image_id"]) == [14, 15, 16, 17,
                                                                  22, 23, 24, 25]
    left = sorted(p for p in os.listdir(tmp_path) if not p.endswith((".log", ".json")))
    assert left == ["scan.h5", "scan_w0.h5", "scan_w1.h5"]  # no reserve or temporary file


def test_the_master_is_readable_while_the_run_goes_on(split, tmp_path):
    out = str(tmp_path / "live.h5")
    thread, outcome = run_in_thread(split.agent, "s2", {"output_file": out, "n_images": 40})
    split.emit(range(100, 112))
    wait_until(lambda: split.progress[-1]["n_written"] >= 12, "12 images written")
    time.sleep(0.5)  # the writers flush for SWMR readers every 0.2 s
    live = read_master(out, split.config.detector_name, swmr=True)
    assert live["shape"][0] == 12 and live["ids"] == list(range(100, 112))
    assert live["pixel"] == list(range(100, 112))
    split.emit(range(112, 140))
    thread.join(20)
    assert outcome["result"]["outcome"] == "success", outcome
    assert read_master(out, split.config.detector_name)["ids"] == list(range(100, 140))


def test_a_killed_writer_fails_the_request_and_the_master_stays_valid(split, tmp_path):
    out = str(tmp_path / "killed.h5")
    thread, outcome = run_in_thread(split.agent, "s3", {"output_file": out, "n_images": 60})
    split.emit(range(1, 21))
    wait_until(lambda: split.progress[-1]["n_written"] >= 20, "20 images written")
    time.sleep(0.5)
    killed_at = time.monotonic()
    os.kill(split.writers[1].pid, signal.SIGKILL)
    split.writers[1].popen.wait()
    thread.join(10)
    failed_after = time.monotonic() - killed_at
    assert isinstance(outcome.get("error"), WriterError), outcome
    assert "h5 writer 1" in str(outcome["error"]) and failed_after < 4.0, (
        outcome["error"], failed_after)
    split.writers[1] = split.start_writer(1)  # repairs the file writer 1 left open
    assert "repaired the file left open" in split.writers[1].output
    master = read_master(out, split.config.detector_name)  # plain h5py, no swmr
    assert master["ids"] == list(range(1, 21)) and master["pixel"] == list(range(1, 21))
    np.testing.assert_array_equal(master["status"], 0)
