"""Detector config loading and validation (fastcore.config)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fastcore.buffer_sizing import MIN_SLOTS, plan_buffers
from fastcore.config import ConfigError, DetectorConfig, load_config, parse_config
from fastcore.detectors import module_format

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# An original std-daq gigafrost config, as deployed at PSI (no stddaq-only fields).
ORIGINAL_GIGAFROST = {
    "detector_name": "GF2",
    "detector_type": "gigafrost",
    "n_modules": 8,
    "bit_depth": 16,
    "image_pixel_height": 2016,
    "image_pixel_width": 2016,
    "start_udp_port": 2000,
    "writer_user_id": 0,
    "module_positions": {},
}

# An original std-daq Jungfrau config of two modules with chip gaps and the fields stddaq
# accepts without using.
ORIGINAL_JUNGFRAU = {
    "detector_name": "JF07T32V02",
    "detector_type": "jungfrau",
    "n_modules": 2,
    "bit_depth": 16,
    "image_pixel_height": 1030,
    "image_pixel_width": 1030,
    "start_udp_port": 50020,
    "writer_user_id": 12345,
    "submodule_info": {},
    "max_number_of_forwarders_spawned": 8,
    "use_all_forwarders": True,
    "module_sync_queue_size": 4096,
    "module_positions": {"0": [0, 513, 1029, 0], "1": [0, 1029, 1029, 516]},
}


def jungfrau(**changes) -> dict:
    raw = {
        "detector_name": "JF",
        "detector_type": "jungfrau",
        "n_modules": 1,
        "bit_depth": 16,
        "image_pixel_height": 512,
        "image_pixel_width": 1024,
        "start_udp_port": 50000,
        "writer_user_id": 0,
        "module_positions": {"0": [0, 511, 1023, 0]},
    }
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not ...}


def error_of(raw, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, **kwargs)
    return str(info.value)


def error_lines(message: str) -> list[str]:
    return [line.strip()[2:] for line in message.splitlines()[1:]]


# --- good configs ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("file", "name", "det_type", "n_modules", "shape", "dtype"),
    [
        ("jungfrau_1m.json", "JF1M", "jungfrau", 2, (1030, 1030), "uint16"),
        ("eiger_500k.json", "EG500K", "eiger", 4, (514, 1030), "uint16"),
        ("gigafrost.json", "GF2", "gigafrost", 8, (2016, 2016), "uint16"),
    ],
)
def test_example_configs_load(file, name, det_type, n_modules, shape, dtype):
    config = load_config(CONFIGS / file)
    raw = json.loads((CONFIGS / file).read_text())
    assert isinstance(config, DetectorConfig)
    assert config.detector_name == name
    assert config.detector_type == det_type
    assert config.n_modules == n_modules
    assert config.image_shape == shape
    assert config.image_dtype == np.dtype(dtype)
    assert config.udp_host == raw["udp_host"]
    plan = config.buffer_plan()  # 1 s of the nominal rate in both buffers where memory allows
    assert (config.n_frame_slots, config.n_image_slots) == (plan.n_frame_slots,
                                                             plan.n_image_slots)
    assert not plan.short or plan.total_bytes > 0.95 * plan.budget_bytes
    assert plan.total_bytes <= plan.budget_bytes
    assert config.udp_port(1) == raw["start_udp_port"] + 1
    assert not config.converts
    if det_type != "gigafrost":
        assert config.module_positions == {
            int(k): tuple(v) for k, v in raw["module_positions"].items()
        }


def test_original_std_daq_gigafrost_config_loads_unchanged(tmp_path):
    path = tmp_path / "gf.json"
    path.write_text(json.dumps(ORIGINAL_GIGAFROST))
    config = load_config(path)
    for key, value in ORIGINAL_GIGAFROST.items():
        if key != "module_positions":
            assert getattr(config, key) == value, key
    assert config.module_positions == {}
    # stddaq defaults for what the original does not have
    assert config.udp_host == "0.0.0.0"
    plan = plan_buffers(1000.0, 8, module_format("gigafrost", 16, (2016, 2016)).frame_bytes,
                        (2016, 2016), "uint16")
    assert (config.n_image_slots, config.n_frame_slots) == (plan.n_image_slots,
                                                             plan.n_frame_slots)
    assert config.pedestal_file is None and config.gain_file is None
    assert config.extra == {}


def test_original_std_daq_jungfrau_config_loads(caplog):
    config = parse_config(ORIGINAL_JUNGFRAU)
    assert config.detector_name == "JF07T32V02"
    assert config.writer_user_id == 12345
    assert config.module_positions == {0: (0, 513, 1029, 0), 1: (0, 1029, 1029, 516)}
    # fields of the original that stddaq does not use are kept, and not warned about
    assert config.extra["module_sync_queue_size"] == 4096
    assert "unknown field" not in caplog.text


def test_unknown_field_is_an_error_naming_it():
    with pytest.raises(ConfigError, match=r"my_beamline_field: unknown field \(not a field of "
                       r"stddaq or of the original std-daq\)"):
        parse_config(jungfrau(my_beamline_field=3), source="x.json")
    with pytest.raises(ConfigError, match=r"n_image_slot: unknown field \(did you mean "
                       r"n_image_slots\?\)"):
        parse_config(jungfrau(n_image_slot=300), source="x.json")


def test_integer_strings_are_coerced_like_the_original():
    raw = jungfrau(n_modules="1", bit_depth="16", image_pixel_height="512",
                   image_pixel_width="1024", start_udp_port="50000", writer_user_id="7",
                   module_positions={"0": ["0", "511", "1023", "0"]})
    config = parse_config(raw)
    assert config.bit_depth == 16 and isinstance(config.bit_depth, int)
    assert config.n_modules == 1 and isinstance(config.n_modules, int)
    assert config.image_shape == (512, 1024)
    assert config.start_udp_port == 50000 and config.writer_user_id == 7
    assert config.module_positions == {0: (0, 511, 1023, 0)}


def test_integral_floats_are_accepted_fractional_ones_not():
    assert parse_config(jungfrau(bit_depth=16.0)).bit_depth == 16
    message = error_of(jungfrau(bit_depth=16.5, writer_user_id=True))
    assert "bit_depth: expected an integer, got 16.5" in message
    assert "writer_user_id: expected an integer, got True" in message


@pytest.mark.parametrize("bit_depth", [4, 8, 16, 32])
def test_eiger_bit_depths(bit_depth):
    raw = json.loads((CONFIGS / "eiger_500k.json").read_text())
    raw["bit_depth"] = bit_depth
    config = parse_config(raw)
    assert config.image_dtype == np.dtype(f"uint{max(8, bit_depth)}")


def test_jungfrau_module_without_gaps_and_flipped_x():
    config = parse_config(jungfrau(module_positions={"0": [1023, 0, 0, 511]}))
    assert config.module_positions[0] == (1023, 0, 0, 511)


# --- errors ------------------------------------------------------------------------------

def test_several_bad_fields_are_all_named_in_one_error():
    raw = {
        "detector_name": "bad name!",
        "detector_type": "jungfrau",
        "n_modules": "two",
        "bit_depth": 12,
        # image_pixel_height missing
        "image_pixel_width": 0,
        "start_udp_port": 70000,
        "writer_user_id": None,
        "module_positions": [],
        "n_image_slots": 1,
        "udp_host": "",
    }
    message = error_of(raw, source="beamline.json")
    assert message.startswith("beamline.json: invalid detector config")
    lines = error_lines(message)
    expected = {
        "detector_name": "expected 1-64 characters",
        "n_modules": "expected an integer, got 'two'",
        "bit_depth": "expected one of (16,) for jungfrau, got 12",
        "image_pixel_height": "missing (expected an integer)",
        "image_pixel_width": "expected an integer in [1, 65535], got 0",
        "start_udp_port": "expected an integer in [1, 65535], got 70000",
        "writer_user_id": "expected an integer, got None",
        "module_positions": "expected an object",
        "n_image_slots": "expected an integer in [2, 1000000], got 1",
        "udp_host": "expected an IP address string",
    }
    for field_name, text in expected.items():
        matching = [line for line in lines if line.startswith(f"{field_name}:")]
        assert matching, f"{field_name} not reported in:\n{message}"
        assert any(text in line for line in matching), (field_name, matching)
    assert len(lines) == len(expected), message


def test_missing_fields_are_each_named():
    message = error_of({})
    for name in ["detector_name", "detector_type", "n_modules", "bit_depth",
                 "image_pixel_height", "image_pixel_width", "start_udp_port",
                 "writer_user_id", "module_positions"]:
        assert re.search(rf"^  - {name}: missing", message, re.M), name


def test_unknown_detector_type_lists_the_known_ones():
    message = error_of(jungfrau(detector_type="pilatus"))
    assert "detector_type: expected one of jungfrau, eiger, gigafrost, got 'pilatus'" in message


@pytest.mark.parametrize("raw", [[1, 2], "text", 3, None])
def test_non_object_config(raw):
    assert "expected a JSON object" in error_of(raw, source="c.json")


def test_port_range_must_fit_all_modules():
    raw = dict(ORIGINAL_JUNGFRAU, start_udp_port=65535)
    assert "start_udp_port: 65535 + n_modules 2 passes port 65535" in error_of(raw)


def test_module_positions_errors():
    raw = jungfrau(n_modules=3, image_pixel_height=1024,
                   module_positions={"0": [0, 0, 1023, 511], "1": [0, 1], "5": [0, 0, 1, 1],
                                     "x": [0, 0, 1023, 511]})
    message = error_of(raw)
    assert "module_positions['1']: expected [start_x, start_y, end_x, end_y]" in message
    assert "module_positions['x']: expected [start_x, start_y, end_x, end_y]" in message
    assert "module_positions: no position for module(s) [1, 2]" in message
    assert "module_positions: module(s) [5] outside 0..2 (n_modules)" in message


def test_module_position_of_wrong_size():
    message = error_of(jungfrau(image_pixel_height=1024,
                                module_positions={"0": [0, 0, 1023, 599]}))
    assert ('module_positions["0"]: a jungfrau module is 1024x512 or 1030x514 pixels '
            "(width x height), got 1024x600") in message


def test_module_position_out_of_image():
    message = error_of(jungfrau(module_positions={"0": [10, 0, 1033, 511]}))
    assert 'module_positions["0"]: corners [10, 0, 1033, 511] outside the 1024x512 image' \
        in message
    assert "got 1024x512" not in message  # the size itself is right


def test_module_position_out_of_image_negative():
    message = error_of(jungfrau(module_positions={"0": [0, -1, 1023, 510]}))
    assert "outside the 1024x512 image" in message


def test_geometry_errors_reported_with_the_other_errors():
    """A beamline user fixes the file in one go: geometry problems are not hidden behind
    errors of unrelated fields."""
    message = error_of(jungfrau(writer_user_id=..., module_positions={"0": [0, 0, 1023, 600]}))
    assert "writer_user_id: missing" in message
    assert 'module_positions["0"]: a jungfrau module is' in message
    assert "outside the 1024x512 image" in message


def test_eiger_half_module_size():
    raw = json.loads((CONFIGS / "eiger_500k.json").read_text())
    raw["module_positions"]["0"] = [0, 0, 1023, 255]  # a Jungfrau-wide module
    message = error_of(raw)
    assert 'module_positions["0"]: a eiger module is 512x256 or 514x256 pixels' in message


def test_gigafrost_geometry_errors():
    message = error_of(dict(ORIGINAL_GIGAFROST, n_modules=4, image_pixel_width=2000,
                            image_pixel_height=2014))
    assert "n_modules: gigafrost has 8 modules (4 quadrants x 2 links), got 4" in message
    assert "divisible by 24 and a height divisible by 4, got 2000x2014" in message


def test_gigafrost_bit_depths():
    assert parse_config(dict(ORIGINAL_GIGAFROST, bit_depth=12)).bit_depth == 12
    message = error_of(dict(ORIGINAL_GIGAFROST, bit_depth=8))
    assert "bit_depth: expected one of (12, 16) for gigafrost, got 8" in message


def test_pedestal_without_gain(tmp_path):
    pedestal = tmp_path / "pedestal.npy"
    np.save(pedestal, np.zeros((3, 512, 1024), np.float32))
    message = error_of(jungfrau(pedestal_file=str(pedestal)))
    assert "pedestal_file, gain_file: give both or neither" in message


def test_pedestal_and_gain_files_must_exist(tmp_path):
    missing = str(tmp_path / "nope.h5")
    message = error_of(jungfrau(pedestal_file=missing, gain_file=5))
    assert f"pedestal_file: file {missing!r} does not exist" in message
    assert "gain_file: expected a file path string, got 5" in message


def test_conversion_config(tmp_path):
    for name in ("p.npy", "g.npy"):
        (tmp_path / name).write_bytes(b"")
    config = parse_config(jungfrau(pedestal_file=str(tmp_path / "p.npy"),
                                   gain_file=str(tmp_path / "g.npy")))
    assert config.converts
    assert config.image_dtype == np.dtype("float32")


def test_pedestal_only_for_jungfrau(tmp_path):
    for name in ("p.npy", "g.npy"):
        (tmp_path / name).write_bytes(b"")
    raw = dict(ORIGINAL_GIGAFROST, pedestal_file=str(tmp_path / "p.npy"),
               gain_file=str(tmp_path / "g.npy"))
    assert "pedestal_file: conversion is only for jungfrau, not gigafrost" in error_of(raw)


# --- files -------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match=re.escape(str(path))) as info:
        load_config(path)
    assert "No such file" in str(info.value)


def test_non_json_file_names_the_path_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "detector_name": "JF",\n  oops\n}')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: not valid JSON at line 3")


def test_invalid_file_error_names_the_path(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(jungfrau(bit_depth=8)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid detector config")
    assert "bit_depth" in str(info.value)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


JF1M_FRAME = module_format("jungfrau", 16, (1030, 1030)).frame_bytes


def test_buffers_hold_one_second_of_the_nominal_rate_by_default():
    plan = plan_buffers(2000.0, 2, JF1M_FRAME, (1030, 1030), "uint16", budget_bytes=2**40)
    assert (plan.n_frame_slots, plan.n_image_slots, plan.clamped) == (2000, 2000, False)
    assert plan.seconds(plan.n_frame_slots) == 1.0 and not plan.short
    assert plan.frame_buffer_bytes == 2000 * 2 * (2**20 + 4096)  # metadata page + 1 MiB frame
    # a metadata page, then the image rounded up to whole pages (O_DIRECT writes from it)
    assert plan.image_buffer_bytes == 2000 * (4096 + -(-1030 * 1030 * 2 // 4096) * 4096)


def test_buffers_are_cut_to_the_memory_budget_in_proportion():
    budget = 3 * 10**9
    plan = plan_buffers(2000.0, 2, JF1M_FRAME, (1030, 1030), "uint16", budget_bytes=budget)
    assert plan.clamped and plan.short
    assert plan.n_frame_slots == plan.n_image_slots < 2000
    assert 0.99 * budget < plan.total_bytes <= budget
    assert "budget 3.00 GB" in plan.describe() and "0.35 s at 2000 Hz" in plan.describe()
    # explicit slots are the operator's: kept, the rest shares what is left
    kept = plan_buffers(2000.0, 2, JF1M_FRAME, (1030, 1030), "uint16", n_frame_slots=500,
                        budget_bytes=budget)
    assert kept.n_frame_slots == 500 and kept.total_bytes <= budget
    assert kept.n_image_slots > plan.n_image_slots
    tiny = plan_buffers(2000.0, 2, JF1M_FRAME, (1030, 1030), "uint16", budget_bytes=1)
    assert (tiny.n_frame_slots, tiny.n_image_slots) == (MIN_SLOTS, MIN_SLOTS)


def test_nominal_rate_sets_the_default_slots(tmp_path):
    raw = {**json.loads((CONFIGS / "jungfrau_1m.json").read_text()), "nominal_rate_hz": 250}
    config = parse_config(raw)
    assert (config.rate_hz, config.n_frame_slots, config.n_image_slots) == (250.0, 250, 250)
    assert parse_config({**raw, "n_image_slots": 40}).n_image_slots == 40
    for bad in (0, -5, "fast", True, 1e7):
        with pytest.raises(ConfigError, match=r"nominal_rate_hz: expected a frame rate in "
                           rf"\(0, 1000000\] Hz, got {re.escape(repr(bad))}"):
            parse_config({**raw, "nominal_rate_hz": bad})
