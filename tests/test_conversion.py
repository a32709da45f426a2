"""Jungfrau pedestal/gain conversion (fastcore.conversion)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from fastcore.config import ConfigError, parse_config
from fastcore.conversion import convert_reference, load_calibration
from fastcore.geometry import row_plan
from fastcore.kernels import convert_rows, place_rows

RNG = np.random.default_rng(7)
STAGE_OF_CODE = {0: 0, 1: 1, 2: 2, 3: 2}  # gain bits 00 -> G0, 01 -> G1, 11 -> G2, 10 -> G2


def random_raw(shape) -> np.ndarray:
    adc = RNG.integers(0, 2**14, shape, dtype=np.uint16)
    codes = RNG.integers(0, 4, shape, dtype=np.uint16)
    return adc | (codes << 14)


def random_calibration(shape) -> tuple[np.ndarray, np.ndarray]:
    pedestal = RNG.uniform(500, 3000, (3, *shape)).astype(np.float32)
    gain = RNG.uniform(0.5, 60, (3, *shape)).astype(np.float32)
    gain[1:] *= -1  # G1 and G2 gains are negative on real detectors
    return pedestal, gain


def packed(pedestal: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """(2, 3, rows, cols) float32: pedestal and 1/gain, as load_calibration holds them."""
    return np.stack([pedestal, 1.0 / gain]).astype(np.float32)


ONE = np.zeros(1, np.intp)


def place(raw, image, blocks):
    """Run the raw placement kernel for one frame over ``blocks``."""
    place_rows(raw.reshape(1, -1), ONE, 0, raw.shape[1], image.reshape(1, -1), ONE, 0,
               image.shape[1], row_plan(blocks, image.shape))


def test_reference_follows_the_documented_formula():
    raw = random_raw((6, 8))
    raw[0, :4] = np.array([0, 1, 2, 3], np.uint16) << 14 | 100  # every gain code
    pedestal, gain = random_calibration(raw.shape)
    result = convert_reference(raw, pedestal, gain)
    assert result.dtype == np.float32
    for i in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            stage = STAGE_OF_CODE[int(raw[i, j]) >> 14]
            adc = int(raw[i, j]) & 0x3FFF
            expected = (adc - float(pedestal[stage, i, j])) / float(gain[stage, i, j])
            assert result[i, j] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def convert(raw, calibration, image, blocks):
    """Run the assembler's numba kernel for one frame over ``blocks`` of (source,
    destination) slices."""
    convert_rows(raw.reshape(1, -1), ONE, 0, raw.shape[1], calibration, image.reshape(1, -1),
                 ONE, 0, image.shape[1], row_plan(blocks, image.shape))


FULL = (slice(0, 512), slice(0, 1024))


def test_numba_kernel_equals_reference():
    raw = random_raw((512, 1024))
    assert set(np.unique(raw >> 14).tolist()) == {0, 1, 2, 3}
    pedestal, gain = random_calibration(raw.shape)
    out = np.full(raw.shape, np.nan, np.float32)
    convert(raw, packed(pedestal, gain), out, [(FULL, FULL)])
    expected = convert_reference(raw, pedestal, gain)
    np.testing.assert_array_equal(out, expected)  # the same float32 operations
    # and the exact stage selection: the invalid code 10 uses G2
    code2 = (raw >> 14) == 2
    adc = (raw & 0x3FFF).astype(np.float64)
    g2 = (adc - pedestal[2]) / gain[2]
    np.testing.assert_allclose(out[code2], g2[code2], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "dest",
    [(slice(511, None, -1), slice(0, 1024)),
     (slice(511, None, -1), slice(1023, None, -1)),
     (slice(600, 88, -1), slice(3, 1027))],
    ids=["flipped_rows", "rotated", "offset_flipped"],
)
def test_numba_kernels_into_flipped_destinations(dest):
    image = np.full((700, 1100), -7.0, np.float32)
    raw = random_raw((512, 1024))
    pedestal, gain = random_calibration(raw.shape)
    convert(raw, packed(pedestal, gain), image, [(FULL, dest)])
    np.testing.assert_array_equal(image[dest], convert_reference(raw, pedestal, gain))
    untouched = np.ones(image.shape, bool)
    untouched[dest] = False
    assert (image[untouched] == -7.0).all()
    raw_image = np.zeros(image.shape, np.uint16)
    place(raw, raw_image, [(FULL, dest)])
    np.testing.assert_array_equal(raw_image[dest], raw)
    assert not raw_image[untouched].any()


def test_numba_kernel_on_chips_with_gaps():
    """The assembler converts chip by chip into a gapped, flipped module area: a module row
    is streamed whole, so the gaps between its chips are written as zero; the gap rows
    between the chip rows are not touched."""
    raw = random_raw((512, 1024))
    pedestal, gain = random_calibration(raw.shape)
    expected = convert_reference(raw, pedestal, gain)
    out = np.full((514, 1030), -7.0, np.float32)
    blocks = []
    for cy in range(2):
        for cx in range(4):
            rows, cols = slice(cy * 256, (cy + 1) * 256), slice(cx * 256, (cx + 1) * 256)
            top = 513 - cy * 258
            blocks.append(((rows, cols), (slice(top, top - 256 if top >= 256 else None, -1),
                                          slice(cx * 258, cx * 258 + 256))))
    convert(raw, packed(pedestal, gain), out, blocks)
    for source, dest in blocks:
        np.testing.assert_array_equal(out[dest], expected[source])
    chip_rows = np.r_[0:256, 258:514]
    for gap in (256, 514, 772):
        assert not out[chip_rows, gap:gap + 2].any()
    assert (out[256:258] == -7.0).all()


def test_batch_of_frames_into_ring_rows():
    """One kernel call places several frames, each from its own row of a frame ring (after
    a metadata prefix) into its own row of an image ring, flipped, in any order."""
    frames = [random_raw((512, 1024)) for _ in range(3)]
    frames[1] &= np.uint16(0x3FFF)  # a frame with every pixel in gain stage 0
    offset = 32  # pixels before each frame: the ModuleFrame record
    ring = np.zeros((5, offset + 512 * 1024), np.uint16)
    for row, frame in zip((4, 0, 2), frames, strict=True):
        ring[row, offset:] = frame.ravel()
    image_offset, shape = 64, (520, 1030)
    images = np.full((4, image_offset + shape[0] * shape[1]), -5.0, np.float32)
    raw_images = np.zeros((4, image_offset + shape[0] * shape[1]), np.uint16)
    pedestal, gain = random_calibration((512, 1024))
    dest = (slice(515, 3, -1), slice(2, 1026))
    plan = row_plan([(FULL, dest)], shape)
    src_rows, dst_rows = np.array([4, 0, 2], np.intp), np.array([3, 1, 0], np.intp)
    convert_rows(ring, src_rows, offset, 1024, packed(pedestal, gain), images, dst_rows,
                 image_offset, shape[1], plan)
    place_rows(ring, src_rows, offset, 1024, raw_images, dst_rows, image_offset, shape[1],
               plan)
    for frame, row in zip(frames, dst_rows, strict=True):
        image = images[row, image_offset:].reshape(shape)
        np.testing.assert_array_equal(image[dest], convert_reference(frame, pedestal, gain))
        outside = np.ones(shape, bool)
        outside[dest] = False
        assert (image[outside] == -5.0).all()
        np.testing.assert_array_equal(raw_images[row, image_offset:].reshape(shape)[dest],
                                      frame)
    assert (images[2] == -5.0).all() and (images[:, :image_offset] == -5.0).all()


# --- load_calibration --------------------------------------------------------------------

def conversion_config(pedestal_path, gain_path, n_modules=1):
    return parse_config({
        "detector_name": "JFC", "detector_type": "jungfrau", "n_modules": n_modules,
        "bit_depth": 16, "image_pixel_height": 512 * n_modules, "image_pixel_width": 1024,
        "start_udp_port": 40000, "writer_user_id": 0,
        "module_positions": {str(m): [0, 512 * m, 1023, 512 * m + 511]
                             for m in range(n_modules)},
        "pedestal_file": str(pedestal_path), "gain_file": str(gain_path),
    })


def save(path, array):
    if str(path).endswith(".npy"):
        np.save(path, array)
    else:
        with h5py.File(path, "w") as f:
            f["gains"] = array


@pytest.mark.parametrize("ext", ["npy", "h5"])
def test_load_calibration(tmp_path, ext):
    n_modules = 2
    pedestal, gain = random_calibration((n_modules * 512, 1024))
    save(tmp_path / f"pedestal.{ext}", pedestal)
    save(tmp_path / f"gain.{ext}", gain)
    config = conversion_config(tmp_path / f"pedestal.{ext}", tmp_path / f"gain.{ext}",
                               n_modules)
    modules = load_calibration(config)
    assert len(modules) == n_modules
    for m, calibration in enumerate(modules):
        assert calibration.shape == (2, 3, 512, 1024)
        assert calibration.dtype == np.float32
        rows = slice(m * 512, (m + 1) * 512)
        np.testing.assert_array_equal(calibration[0], pedestal[:, rows])
        np.testing.assert_allclose(calibration[1], 1.0 / gain[:, rows], rtol=1e-6)
    # the loaded calibration converts like the reference
    raw = random_raw((512, 1024))
    out = np.empty(raw.shape, np.float32)
    convert(raw, modules[1], out, [(FULL, FULL)])
    np.testing.assert_allclose(out, convert_reference(raw, pedestal[:, 512:], gain[:, 512:]),
                               rtol=1e-5, atol=1e-5)


def test_load_calibration_wrong_shape(tmp_path):
    pedestal, gain = random_calibration((512, 1024))
    save(tmp_path / "pedestal.npy", pedestal[:2])
    save(tmp_path / "gain.npy", gain)
    config = conversion_config(tmp_path / "pedestal.npy", tmp_path / "gain.npy")
    with pytest.raises(ConfigError) as info:
        load_calibration(config)
    message = str(info.value)
    assert message.startswith("pedestal_file:")
    assert "shape (2, 512, 1024), expected (3, 512, 1024)" in message


def test_load_calibration_wrong_shape_for_module_count(tmp_path):
    pedestal, gain = random_calibration((512, 1024))
    save(tmp_path / "pedestal.h5", pedestal)
    save(tmp_path / "gain.h5", gain)
    config = conversion_config(tmp_path / "pedestal.h5", tmp_path / "gain.h5", n_modules=2)
    with pytest.raises(ConfigError, match=r"pedestal_file: .* expected \(3, 1024, 1024\)"):
        load_calibration(config)


@pytest.mark.parametrize("bad", [0.0, np.inf, np.nan])
def test_load_calibration_bad_gain(tmp_path, bad):
    pedestal, gain = random_calibration((512, 1024))
    gain[1, 100, 200] = bad
    save(tmp_path / "pedestal.npy", pedestal)
    save(tmp_path / "gain.npy", gain)
    config = conversion_config(tmp_path / "pedestal.npy", tmp_path / "gain.npy")
    with pytest.raises(ConfigError, match=r"gain_file: .* holds zero or non-finite gains"):
        load_calibration(config)


def test_load_calibration_h5_without_gains_dataset(tmp_path):
    pedestal, gain = random_calibration((512, 1024))
    save(tmp_path / "pedestal.npy", pedestal)
    with h5py.File(tmp_path / "gain.h5", "w") as f:
        f["data"] = gain
    config = conversion_config(tmp_path / "pedestal.npy", tmp_path / "gain.h5")
    with pytest.raises(ConfigError, match=r"gain_file: .*gain\.h5 has no 'gains' dataset"):
        load_calibration(config)


def test_load_calibration_unreadable_file(tmp_path):
    pedestal, _ = random_calibration((512, 1024))
    save(tmp_path / "pedestal.npy", pedestal)
    (tmp_path / "gain.h5").write_text("not hdf5")
    config = conversion_config(tmp_path / "pedestal.npy", tmp_path / "gain.h5")
    with pytest.raises(ConfigError, match=r"gain_file: cannot read .*gain\.h5"):
        load_calibration(config)
