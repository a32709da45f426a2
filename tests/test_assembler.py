"""The assembler's batch step (fastcore.assembler.Assembler.assemble) on real buffers."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from fastcore.assembler import Assembler, ImageAssembler
from fastcore.buffers import FrameBuffer, shm_name
from fastcore.config import load_config
from fastcore.conversion import convert_reference
from fastcore.detectors.jungfrau import MODULE_SHAPE as JUNGFRAU_MODULE_SHAPE
from fastcore.formats import INVALID_ID, RAW_METADATA, ImageStatus
from fastcore.names import Segment
from fastcore.simulator import simulated_pixels


@pytest.fixture
def calibration_files(tmp_path):
    rng = np.random.default_rng(3)
    rows = 2 * JUNGFRAU_MODULE_SHAPE[0]
    pedestal = rng.uniform(500, 3000, (3, rows, 1024)).astype(np.float32)
    gain = rng.uniform(1, 60, (3, rows, 1024)).astype(np.float32)
    gain[1:] *= -1
    np.save(tmp_path / "pedestal.npy", pedestal)
    np.save(tmp_path / "gain.npy", gain)
    return pedestal, gain, {"pedestal_file": str(tmp_path / "pedestal.npy"),
                            "gain_file": str(tmp_path / "gain.npy")}


@contextlib.contextmanager
def assembler_on_buffers(config, ipc_dir):
    """An Assembler with its buffers open over a FrameBuffer the test fills itself."""
    frames = FrameBuffer.create(shm_name(config.detector_name, Segment.FRAMES),
                                config.n_frame_slots, config.n_modules,
                                ImageAssembler(config).fmt.frame_bytes)
    assembler = Assembler(config, str(ipc_dir))
    assembler.open_buffers()
    try:
        yield frames, assembler
    finally:
        assembler.close_buffers()
        frames.close()


def store_frames(frames, config, image_id: int) -> None:
    """What the receivers do: every module's frame (simulator content) and its record."""
    for module in range(config.n_modules):
        pixels = simulated_pixels("jungfrau", 16, JUNGFRAU_MODULE_SHAPE, image_id, module)
        frames.frame(image_id, module)[:] = pixels.view(np.uint8).ravel()
        record = frames._meta[frames.slot(image_id), module]
        record["id"], record["n_recv_packets"] = image_id, 128


@pytest.mark.parametrize("converts", [False, True], ids=["raw", "converted"])
def test_a_batch_equals_images_assembled_one_by_one(make_config, tmp_path, calibration_files,
                                                    converts):
    """Five images in one batch: complete, missing packets, a module that never came, a
    module already overwritten by a newer frame; images and statuses as one by one."""
    pedestal, gain, files = calibration_files
    path, _ = make_config("jungfrau_1m.json", **(files if converts else {}))
    config = load_config(path)
    assert config.converts is converts
    with assembler_on_buffers(config, tmp_path) as (frames, assembler):
        ids = [40, 41, 42, 43, 44]
        for image_id in ids:
            store_frames(frames, config, image_id)
        meta = frames._meta  # the receivers' side of the FrameBuffer
        meta[frames.slot(41), 1]["n_recv_packets"] = 100
        meta[frames.slot(42), 0]["id"] = INVALID_ID  # module 0 of image 42 never came
        meta[frames.slot(43), 1]["id"] = 43 + config.n_frame_slots  # already overwritten
        raws = np.zeros(len(ids), RAW_METADATA)
        raws["id"], raws["pulse_id"] = ids, [1000 + i for i in ids]
        published = assembler.assemble(raws)
        assert len(published) == len(ids) == assembler.images
        expected_status = {40: 0, 41: ImageStatus.MISSING_PACKETS,
                           42: ImageStatus.MISSING_MODULES, 43: ImageStatus.ID_MISMATCH, 44: 0}
        single = ImageAssembler(config, assembler.assembler.calibration)
        images = assembler.image_buffer
        for image_id, message in zip(ids, published, strict=True):
            record = np.frombuffer(message, images.metadata(image_id).dtype)[0]
            assert int(record["id"]) == image_id and int(record["user_1"]) == 1000 + image_id
            assert int(record["status"]) == expected_status[image_id]
            assert images.holds(image_id)
            expected = np.zeros(config.image_shape, config.image_dtype)
            for module in range(config.n_modules):
                if (image_id, module) in ((42, 0), (43, 1)):
                    continue  # cleared
                single.place_module(module, frames.frame(image_id, module), expected)
            np.testing.assert_array_equal(images.image(image_id), expected)
        if converts:  # and the one-by-one path agrees with the numpy reference
            source, dest = single.blocks[0][0]
            raw = simulated_pixels("jungfrau", 16, JUNGFRAU_MODULE_SHAPE, 44, 0)
            np.testing.assert_array_equal(
                images.image(44)[dest],
                convert_reference(raw, pedestal[:, :512], gain[:, :512])[source])


def test_ids_sharing_a_slot_are_assembled_one_after_the_other(make_config, tmp_path):
    """A batch never writes two images into one ImageBuffer slot at once: such a batch is
    assembled image by image, the older image flagged as overwritten in the FrameBuffer."""
    path, _ = make_config("jungfrau_1m.json")
    config = load_config(path)
    with assembler_on_buffers(config, tmp_path) as (frames, assembler):
        old, new = 7, 7 + config.n_image_slots  # one image slot, one frame slot
        assert old % config.n_frame_slots == new % config.n_frame_slots
        store_frames(frames, config, new)
        raws = np.zeros(2, RAW_METADATA)
        raws["id"] = [old, new]
        published = assembler.assemble(raws)
        records = [np.frombuffer(m, assembler.image_buffer.metadata(new).dtype)[0]
                   for m in published]
        assert [int(r["id"]) for r in records] == [old, new]
        assert [int(r["status"]) for r in records] == [ImageStatus.ID_MISMATCH, 0]
        images = assembler.image_buffer
        assert images.holds(new) and not images.holds(old)
        expected = np.zeros(config.image_shape, config.image_dtype)
        single = ImageAssembler(config)
        for module in range(config.n_modules):
            single.place_module(module, frames.frame(new, module), expected)
        np.testing.assert_array_equal(images.image(new), expected)
