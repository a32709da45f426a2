"""End to end on loopback: simulator -> udp_recv -> sync -> assembler -> ImageBuffer.

Every assembled image is compared pixel for pixel with the image computed from the
simulator's documented content; metadata (id, pulse id, status) as sent.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastcore.buffers import FrameBuffer, ImageBuffer, shm_name
from fastcore.config import load_config
from fastcore.formats import ImageStatus, code_dtype
from fastcore.names import Segment
from fastcore.simulator import DetectorSimulator, Faults, daq_rec_of, pulse_id_of
from tests.pipeline import Pipeline, expected_image


def run_and_check(config_path, raw, ipc_dir, log_dir, n_frames=12, rate=50.0,
                  faults=None, expect=None, sync_timeout=0.5):
    """Run the pipeline over ``n_frames`` frames; check every image; return the metadata."""
    config = load_config(config_path)
    expect = expect or (lambda frame: (ImageStatus.GOOD, {}, set()))
    with Pipeline(config_path, raw, ipc_dir, log_dir, sync_timeout) as pipeline:
        sub = pipeline.subscribe()
        simulator = DetectorSimulator(config, "127.0.0.1", faults)
        assert simulator.run(n_frames, rate) == n_frames
        records = pipeline.collect(sub, n_frames)
        assert [int(r["id"]) for r in records] == list(range(1, n_frames + 1)), \
            pipeline.assembler.output
        images = ImageBuffer.attach(shm_name(config.detector_name, Segment.IMAGE))
        frames = FrameBuffer.attach(shm_name(config.detector_name, Segment.FRAMES))
        try:
            assert images.shape == config.image_shape and images.dtype == config.image_dtype
            for record in records:
                frame = int(record["id"])
                status, lost, missing = expect(frame)
                assert ImageStatus(int(record["status"])) == status, f"frame {frame}"
                assert int(record["height"]) == config.image_pixel_height
                assert code_dtype(int(record["dtype"])) == config.image_dtype
                meta, image = images.read(frame)
                assert int(meta["status"]) == int(status)
                calibration = getattr(run_and_check, "calibration", None)
                want = expected_image(raw, frame, config.image_dtype, calibration, lost, missing)
                np.testing.assert_array_equal(image, want, err_msg=f"frame {frame}")
                if config.detector_type == "jungfrau":
                    assert int(record["user_1"]) == pulse_id_of(frame)
                    assert int(record["user_2"]) == daq_rec_of(frame)
                for module in range(config.n_modules):
                    module_frame = frames.module_frame(frame, module)
                    if module in missing:
                        continue
                    n_lost = len(lost.get(module, []))
                    assert int(module_frame["n_recv_packets"]) == (
                        simulator.fmt.n_packets - n_lost), (frame, module)
                    assert int(module_frame["module_id"]) == module
        finally:
            images.close()
            frames.close()
    return records


@pytest.mark.parametrize("example", ["jungfrau_1m.json", "gigafrost.json"])
def test_pipeline_exact_images(example, make_config, ipc_dir, tmp_path):
    path, raw = make_config(example)
    run_and_check(path, raw, ipc_dir, tmp_path, n_frames=10, rate=30)


@pytest.mark.parametrize("bit_depth", [4, 8, 16, 32])
def test_pipeline_eiger_bit_depths(bit_depth, make_config, ipc_dir, tmp_path):
    path, raw = make_config("eiger_500k.json", bit_depth=bit_depth)
    run_and_check(path, raw, ipc_dir, tmp_path, n_frames=8, rate=40)


def test_pipeline_jungfrau_without_gaps_unflipped(make_config, ipc_dir, tmp_path):
    positions = {"0": [0, 0, 1023, 511], "1": [0, 512, 1023, 1023], "2": [1024, 1023, 2047, 512]}
    path, raw = make_config("jungfrau_1m.json", n_modules=3, image_pixel_height=1024,
                            image_pixel_width=2048, module_positions=positions)
    run_and_check(path, raw, ipc_dir, tmp_path, n_frames=6, rate=30)


def test_pipeline_jungfrau_conversion(make_config, ipc_dir, tmp_path):
    rng = np.random.default_rng(3)
    shape = (3, 2 * 512, 1024)
    pedestal = rng.uniform(500, 3000, shape).astype(np.float32)
    gain = np.stack([rng.uniform(30, 50, shape[1:]), rng.uniform(-2, -1, shape[1:]),
                     rng.uniform(-0.2, -0.1, shape[1:])]).astype(np.float32)
    np.save(tmp_path / "pedestal.npy", pedestal)
    np.save(tmp_path / "gain.npy", gain)
    path, raw = make_config("jungfrau_1m.json", pedestal_file=str(tmp_path / "pedestal.npy"),
                            gain_file=str(tmp_path / "gain.npy"))
    run_and_check.calibration = (pedestal, gain)
    try:
        run_and_check(path, raw, ipc_dir, tmp_path, n_frames=6, rate=20)
    finally:
        del run_and_check.calibration


def test_lost_packets_flag_the_image(make_config, ipc_dir, tmp_path):
    path, raw = make_config("jungfrau_1m.json")
    n_frames = 8
    # packet 5 of module 1 in frame 3; the last packet of module 0 in the last frame
    # (committed only when the stream goes quiet).
    drops = {(3, 1, 5), (n_frames, 0, 127)}
    lost = {3: {1: [5]}, n_frames: {0: [127]}}

    def expect(frame):
        if frame in lost:
            return ImageStatus.MISSING_PACKETS, lost[frame], set()
        return ImageStatus.GOOD, {}, set()

    run_and_check(path, raw, ipc_dir, tmp_path, n_frames, 30, Faults(drop=drops),
                  expect=expect)


@pytest.mark.parametrize("example", ["jungfrau_1m.json", "eiger_500k.json"])
def test_reordered_and_duplicated_packets_still_exact(example, make_config, ipc_dir, tmp_path):
    path, raw = make_config(example)
    run_and_check(path, raw, ipc_dir, tmp_path, 8, 30,
                  Faults(reorder=True, duplicate_fraction=0.1, seed=7))


def test_silent_module_does_not_stall_the_stream(make_config, ipc_dir, tmp_path):
    path, raw = make_config("jungfrau_1m.json")

    def expect(frame):
        return ImageStatus.MISSING_MODULES, {}, {1}

    run_and_check(path, raw, ipc_dir, tmp_path, 6, 20, Faults(silent_modules={1}),
                  expect=expect, sync_timeout=0.2)
