"""Ophyd devices for std-daq detectors (Bluesky RunEngine, BEC, IPython): the classic
``StdDaqDetector`` (ophyd) and ``StdDaqAsyncDetector`` (ophyd-async), sharing one
implementation of requests, progress and documents."""

from stddaq_ophyd._acquisition import Acquisition, StreamDocuments
from stddaq_ophyd._async_detector import StdDaqAsyncDetector
from stddaq_ophyd.device import StdDaqDetector, StdDaqError

__all__ = ["Acquisition", "StdDaqAsyncDetector", "StdDaqDetector", "StdDaqError",
           "StreamDocuments"]
