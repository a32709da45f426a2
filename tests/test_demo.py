"""The README's demo command, end to end (it is the main job of this repository)."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.timeout(300)
def test_readme_demo_command_runs_and_checks_its_file():
    result = subprocess.run(["bash", "scripts/demo.sh", "-n", "150"], cwd=REPO,
                            capture_output=True, text=True, timeout=280)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "lost images      0" in out
    assert "15 of 15 sampled images identical to the simulator's content" in out
    assert "result           OK" in out
    assert "services stopped" in out
