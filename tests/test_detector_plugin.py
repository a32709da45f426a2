"""A detector type defined in the test folder (tests/toy_detector.py) runs through the
whole pipeline as real processes - simulator, udp-recv, sync, assembler, h5 writer - with
no change to fastcore: the operator names its module in $STDDAQ_DETECTOR_MODULES."""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
import uuid

import h5py
import numpy as np
import pytest

from fastcore import detectors
from fastcore.config import ConfigError, load_config, parse_config
from fastcore.detectors import PLUGINS_ENV, detector_type, detector_type_names, register
from fastcore.simulator import DetectorSimulator
from services.writer_agent import WriterAgent
from tests.conftest import Proc, module_cmd
from tests.pipeline import Pipeline, expected_image

TOY = {
    "detector_type": "toycam", "n_modules": 2, "bit_depth": 8,
    "image_pixel_height": 130, "image_pixel_width": 100, "writer_user_id": 0,
    # module 0 with 2-pixel chip gaps (66 x 100), module 1 without, upside down
    "module_positions": {"0": [0, 0, 99, 65], "1": [0, 129, 95, 66]},
}


@pytest.fixture
def toy_detector(monkeypatch):
    """The toy type: its module named for every child process, as an operator would, and
    registered in this process for the test only (other tests see the built-in types)."""
    monkeypatch.setenv(PLUGINS_ENV, "tests.toy_detector")
    module = importlib.import_module("tests.toy_detector")
    register(module.ToyCam())
    yield module
    detectors._TYPES.pop(module.ToyCam.name, None)


def test_the_toy_type_is_known_and_validated_like_a_built_in(toy_detector):
    assert "toycam" in detector_type_names()
    assert isinstance(detector_type("toycam"), toy_detector.ToyCam)
    with pytest.raises(ConfigError) as error:
        parse_config({**TOY, "detector_name": "t", "start_udp_port": 50000, "bit_depth": 16,
                      "module_positions": {"0": [0, 0, 10, 10], "1": [0, 66, 95, 129]}})
    message = str(error.value)
    assert "bit_depth: expected one of (8,) for toycam, got 16" in message


def test_a_bad_module_position_names_the_toy_sizes(toy_detector):
    with pytest.raises(ConfigError) as error:
        parse_config({**TOY, "detector_name": "t", "start_udp_port": 50000,
                      "module_positions": {"0": [0, 0, 10, 10], "1": [0, 66, 95, 129]}})
    assert ("module_positions[\"0\"]: a toycam module is 96x64 or 100x66 pixels "
            "(width x height), got 11x11") in str(error.value)


def test_a_detector_module_that_cannot_be_imported_is_named(tmp_path):
    config = tmp_path / "c.json"
    config.write_text('{"detector_type": "jungfrau"}')
    env = {PLUGINS_ENV: "no_such_detector_module", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "fastcore.sync", str(config)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert (f"{PLUGINS_ENV}: cannot import detector module 'no_such_detector_module'"
            in result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_toy_detector_end_to_end_pixel_exact(toy_detector, make_config, ipc_dir, tmp_path):
    """simulator -> udp-recv -> sync -> assembler -> h5 writer for the toy type: every image
    in the ImageBuffer and in the file equals the toy's documented content; pulse id and
    daq_rec come from the toy's own header fields."""
    path, raw = make_config(dict(TOY))
    config = load_config(path)
    n = 10
    out = str(tmp_path / f"toy_{uuid.uuid4().hex[:6]}.h5")
    with Pipeline(path, raw, ipc_dir, tmp_path) as pipeline:
        sub = pipeline.subscribe()
        writer = Proc(module_cmd("fastcore.h5_writer", str(path), "--ipc-dir", ipc_dir),
                      tmp_path / "writer.log")
        agent = WriterAgent(config, ipc_dir, image_timeout_s=30)
        try:
            writer.wait_for("ready")
            request = {"output_file": out, "n_images": n}
            agent.before_start("toy", request)
            sending = threading.Thread(target=DetectorSimulator(config).run, args=(n, 20))
            sending.start()
            result = agent.on_request("toy", request)
            sending.join(30)
            assert result["outcome"] == "success" and result["n_images"] == n, result
        finally:
            agent.close()
            assert writer.stop() == 0
        records = pipeline.collect(sub, n)
    assert [int(r["id"]) for r in records] == list(range(1, n + 1))
    assert [int(r["status"]) for r in records] == [0] * n
    assert [int(r["user_1"]) for r in records] == [toy_detector.toy_pulse_id(f)
                                                    for f in range(1, n + 1)]
    assert [int(r["user_2"]) for r in records] == [toy_detector.toy_status(f)
                                                    for f in range(1, n + 1)]
    with h5py.File(out, "r") as f:
        data = f[config.detector_name]["data"]
        assert data.shape == (n, 130, 100) and data.dtype == np.uint8
        for i in range(n):
            want = expected_image(raw, i + 1, np.uint8)
            assert want.any() and (want[:66, 96:] != 0).any()  # the pattern is not empty
            np.testing.assert_array_equal(data[i], want, err_msg=f"image {i + 1}")
        assert list(f[config.detector_name]["image_id"][:]) == list(range(1, n + 1))
        assert list(f[config.detector_name]["pulse_id"][:]) == [
            toy_detector.toy_pulse_id(f) for f in range(1, n + 1)]
