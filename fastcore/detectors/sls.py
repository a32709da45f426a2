"""What the slsDetector-based types (Jungfrau, Eiger) share: the packet header fields the
simulator fills the same way (each type adds its own pulse id and daq_rec fields)."""

from __future__ import annotations

import numpy as np

from fastcore.detectors.base import ModuleFormat

HEADER_VERSION = 2


def sls_packet_headers(fmt: ModuleFormat, frame: int, module: int,
                       detector_type: int) -> np.ndarray:
    """Headers of all packets of one module frame with the common slsDetector fields set:
    frame and packet numbers, module id, header version, detector type byte."""
    headers = np.zeros(fmt.n_packets, fmt.header)
    headers["framenum"] = frame
    headers["packetnum"] = np.arange(fmt.n_packets)
    headers["module_id"] = module
    headers["header_version"] = HEADER_VERSION
    headers["detector_type"] = detector_type
    return headers
