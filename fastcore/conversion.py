"""Jungfrau pedestal/gain calibration: raw uint16 (gain bits 14-15, ADC bits 0-13) -> float32.

``value = (adc - pedestal[stage]) / gain[stage]`` with stage 0, 1, 2 for gain bits 00, 01,
11 (the invalid 10 is treated as stage 2, as PSI's jungfrau_utils does). The calibration is
held per module as (2, 3, 512, 1024) float32: pedestals and 1/gain, each as three planes
(stages 0, 1, 2), so the kernel streams the stage-0 planes for every pixel and touches the
stage-1/2 planes only for rows that need them. The conversion itself is the numba kernel
``kernels.convert_rows``; ``convert_reference`` is the plain numpy version.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from fastcore.config import ConfigError, DetectorConfig

_STAGE = np.array([0, 1, 2, 2], np.int64)


def _load_array(path: str, field: str) -> np.ndarray:
    try:
        if path.endswith(".npy"):
            return np.load(path)
        with h5py.File(path, "r") as f:
            if "gains" not in f:
                raise ConfigError(f"{field}: {path} has no 'gains' dataset")
            return f["gains"][()]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc}") from None


def load_calibration(config: DetectorConfig) -> list[np.ndarray]:
    """Per-module (2, 3, 512, 1024) float32 arrays: pedestal and 1/gain per gain stage.

    ``pedestal_file`` and ``gain_file`` are .npy or HDF5 (dataset ``gains``) arrays of shape
    (3, n_modules * 512, 1024), modules stacked along the rows.
    """
    rows, cols = config.module_format.module_shape
    expected = (3, config.n_modules * rows, cols)
    arrays = {}
    for field in ("pedestal_file", "gain_file"):
        path = os.fspath(getattr(config, field))
        array = _load_array(path, field)
        if array.shape != expected:
            raise ConfigError(f"{field}: {path} has shape {array.shape}, expected {expected} "
                              "(3 gain stages, n_modules*512 rows, 1024 columns)")
        arrays[field] = array
    gain = arrays["gain_file"]
    if not np.all(np.isfinite(gain)) or np.any(gain == 0):
        raise ConfigError(f"gain_file: {config.gain_file} holds zero or non-finite gains")
    modules = []
    for m in range(config.n_modules):
        calibration = np.empty((2, 3, rows, cols), np.float32)
        calibration[0] = arrays["pedestal_file"][:, m * rows : (m + 1) * rows]
        calibration[1] = 1.0 / gain[:, m * rows : (m + 1) * rows]
        modules.append(calibration)
    return modules


def convert_reference(raw: np.ndarray, pedestal: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Plain numpy conversion of one module (for tests and benchmarks): float32 result."""
    stage = _STAGE[raw >> 14]
    adc = (raw & 0x3FFF).astype(np.float32)
    ped = np.take_along_axis(pedestal, stage[None], 0)[0]
    gains = np.take_along_axis(gain, stage[None], 0)[0]
    return ((adc - ped) * (1.0 / gains)).astype(np.float32)
