"""The README's demo command, end to end (it is the main job of this repository)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(300)
def test_readme_demo_command_runs_and_checks_its_file():
    # the demo keeps its logs and file for the user in a temporary directory: give it one
    # of the test's, removed afterwards (short: it holds ZMQ ipc sockets, whose paths are
    # limited to 107 characters)
    tmp_path = Path(tempfile.mkdtemp(prefix="sdq-demo-test-", dir="/tmp"))
    try:
        check_demo(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def check_demo(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", "scripts/demo.sh", "-n", "150"], cwd=REPO,
                            capture_output=True, text=True, timeout=280, env=env)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "lost images      0" in out
    assert "15 of 15 sampled images identical to the simulator's content" in out
    assert "result           OK" in out
    assert "services stopped" in out
    assert "removed after the check (--keep-file keeps it)" in out
    assert list(tmp_path.glob("stddaq-demo-*/data/*.h5")) == []  # no GBs left behind
    kept = list(tmp_path.glob("stddaq-demo-*/logs"))
    assert len(kept) == 1 and f"logs kept in {kept[0]}" in out
