"""The IOC's record set without a network: names, docs, alarm groups, the phoebus screen."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ioc.server import IocSettings, StddaqIOC

BOB = Path(__file__).resolve().parent.parent / "ioc" / "stddaq.bob"


@pytest.fixture(scope="module")
def ioc():
    settings = IocSettings(detector_name="JF1M", ipc_dir="/tmp", writer_service="JF1M.writer",
                           epics_buffer_service=None, broker_host="127.0.0.1",
                           broker_port=5672, redis_host="127.0.0.1", redis_port=6379)
    return StddaqIOC(prefix="STDDAQ:", settings=settings)


def test_area_detector_names_are_served(ioc):
    names = set(ioc.pvdb)
    for suffix in ("BUF:DetectorState_RBV", "BUF:ArrayCounter_RBV", "BUF:ArrayRate_RBV",
                   "WRT:FilePath", "WRT:FileName", "WRT:FileTemplate", "WRT:FileNumber",
                   "WRT:AutoIncrement", "WRT:NumCapture", "WRT:Capture",
                   "WRT:NumCaptured_RBV", "WRT:FullFileName_RBV", "WRT:FilePathExists_RBV",
                   "WRT:WriteStatus", "WRT:WriteMessage", "EPB:State_RBV",
                   "EPB:Channels_RBV"):
        assert f"STDDAQ:{suffix}" in names


def test_every_record_has_a_doc_and_paths_are_long_char_waveforms(ioc):
    for group in (ioc.buf, ioc.wrt, ioc.epb):
        for attr, prop in type(group)._pvs_.items():
            assert prop.pvspec.doc and len(prop.pvspec.doc) > 10, attr
    for suffix, length in (("WRT:FilePath", 256), ("WRT:FullFileName_RBV", 512)):
        data = ioc.pvdb[f"STDDAQ:{suffix}"]
        assert data.max_length >= length and not getattr(data, "report_as_string", False)


def test_the_phoebus_screen_only_uses_served_pvs(ioc):
    root = ET.parse(BOB).getroot()
    used = {e.text.replace("$(P)", "STDDAQ:") for e in root.iter("pv_name")}
    assert used and used <= set(ioc.pvdb), used - set(ioc.pvdb)
    assert {"STDDAQ:WRT:Capture", "STDDAQ:WRT:FilePath", "STDDAQ:BUF:DetectorState_RBV"} <= used
