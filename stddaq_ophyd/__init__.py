"""Ophyd devices for std-daq detectors (Bluesky RunEngine, BEC, IPython)."""

from stddaq_ophyd.device import StdDaqDetector, StdDaqError

__all__ = ["StdDaqDetector", "StdDaqError"]
