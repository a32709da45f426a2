"""Detector configuration: load and validate the std-daq detector JSON (DESIGN.md section 4).

An original std-daq config file loads unchanged; stddaq's optional fields have defaults.
Every problem is reported at once in one :class:`ConfigError` naming each bad field and the
value expected, so a beamline user can fix the file in one go.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fastcore.buffer_sizing import BufferPlan, plan_buffers
from fastcore.detectors import (
    DetectorType,
    DetectorTypeError,
    ModuleFormat,
    detector_type,
    detector_type_names,
)
from fastcore.writer_split import MAX_WRITERS

# Fields of original std-daq configs that stddaq accepts and does not use.
_IGNORED_FIELDS = {
    "submodule_info",
    "deactivate",
    "max_number_of_forwarders_spawned",
    "use_all_forwarders",
    "module_sync_queue_size",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(ValueError):
    """A detector config is missing fields or has values of the wrong kind."""


@dataclass(frozen=True)
class DetectorConfig:
    detector_name: str
    detector_type: str
    n_modules: int
    bit_depth: int
    image_pixel_height: int
    image_pixel_width: int
    start_udp_port: int
    writer_user_id: int
    module_positions: dict[int, tuple[int, int, int, int]]
    udp_host: str = "0.0.0.0"
    n_image_slots: int = 1000  # parse_config: 1 s at nominal_rate_hz unless the file says
    n_frame_slots: int = 100
    nominal_rate_hz: float | None = None  # None: the detector type's nominal_rate_hz
    pedestal_file: str | None = None
    gain_file: str | None = None
    output_root: str | None = None
    allow_request_user_id: bool = False  # may a write request choose the file owner?
    n_writers: int = 1  # h5 writer processes sharing each run (a master file joins them)
    frames_per_block: int = 100  # consecutive images per writer in a shared run
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> DetectorType:
        """The detector type (fastcore.detectors) of ``detector_type``."""
        return detector_type(self.detector_type)

    @property
    def module_format(self) -> ModuleFormat:
        """The wire format of one module of this detector."""
        return self.kind.module_format(self.bit_depth, self.image_shape)

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.image_pixel_height, self.image_pixel_width)

    @property
    def converts(self) -> bool:
        """True when pedestal/gain conversion (float32 output) is configured."""
        return self.pedestal_file is not None

    @property
    def image_dtype(self) -> np.dtype:
        if self.converts:
            return np.dtype("float32")
        return self.kind.image_dtype(self.bit_depth)

    def udp_port(self, module_id: int) -> int:
        return self.start_udp_port + module_id

    @property
    def rate_hz(self) -> float:
        """The nominal frame rate the buffers are sized for."""
        return self.nominal_rate_hz or self.kind.nominal_rate_hz

    def buffer_plan(self) -> BufferPlan:
        """This config's slots, their bytes and the seconds they hold at the nominal rate."""
        return self.plan_slots(self.n_frame_slots, self.n_image_slots)

    def plan_slots(self, n_frame_slots: int | None, n_image_slots: int | None) -> BufferPlan:
        """The buffers with these slots; None: the default for this detector (1 s of its
        nominal rate within the memory budget)."""
        return plan_buffers(
            self.rate_hz, self.n_modules, self.module_format.frame_bytes,
            self.image_shape, self.image_dtype, n_frame_slots, n_image_slots)


def _int_field(raw: dict, name: str, errors: list[str], minimum: int | None = None,
               maximum: int | None = None) -> int | None:
    if name not in raw:
        errors.append(f"{name}: missing (expected an integer)")
        return None
    value = raw[name]
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        errors.append(f"{name}: expected an integer, got {value!r}")
        return None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        errors.append(f"{name}: expected an integer {bounds}, got {number}")
        return None
    return number


def _positions(raw: Any, n_modules: int | None, errors: list[str]
               ) -> dict[int, tuple[int, int, int, int]]:
    if not isinstance(raw, dict):
        errors.append(
            "module_positions: expected an object {\"<module>\": [start_x, start_y, end_x, "
            f"end_y]}}, got {raw!r}"
        )
        return {}
    positions: dict[int, tuple[int, int, int, int]] = {}
    for key, corners in raw.items():
        try:
            module = int(key)
            values = [int(c) for c in corners]
            if len(values) != 4 or module < 0:
                raise ValueError
        except (TypeError, ValueError):
            errors.append(
                f"module_positions[{key!r}]: expected [start_x, start_y, end_x, end_y] "
                f"integers for a module index >= 0, got {corners!r}"
            )
            continue
        positions[module] = tuple(values)  # type: ignore[assignment]
    if n_modules is not None:
        missing = sorted(set(range(n_modules)) - set(positions))
        extra = sorted(set(positions) - set(range(n_modules)))
        if missing:
            errors.append(f"module_positions: no position for module(s) {missing}")
        if extra:
            errors.append(
                f"module_positions: module(s) {extra} outside 0..{n_modules - 1} (n_modules)"
            )
    return positions


def parse_config(raw: Any, source: str = "config") -> DetectorConfig:
    """Validate a config dict; raises ConfigError naming every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    errors: list[str] = []

    name = raw.get("detector_name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        errors.append(
            "detector_name: expected 1-64 characters of letters, digits, '_', '.', '-', "
            f"got {name!r}" if "detector_name" in raw else "detector_name: missing"
        )
    det_type = raw.get("detector_type")
    kind: DetectorType | None = None
    try:
        names = detector_type_names()
    except DetectorTypeError as exc:  # a detector module of $STDDAQ_DETECTOR_MODULES
        errors.append(str(exc))
        names = ()
    if isinstance(det_type, str) and det_type in names:
        kind = detector_type(det_type)
    else:
        errors.append(
            f"detector_type: expected one of {', '.join(names)}, got {det_type!r}"
            if "detector_type" in raw else "detector_type: missing"
        )
        det_type = None

    n_modules = _int_field(raw, "n_modules", errors, 1, 64)
    bit_depth = _int_field(raw, "bit_depth", errors)
    if bit_depth is not None and kind and bit_depth not in kind.bit_depths:
        errors.append(f"bit_depth: expected one of {kind.bit_depths} for {det_type}, "
                      f"got {bit_depth}")
    height = _int_field(raw, "image_pixel_height", errors, 1, 65535)
    width = _int_field(raw, "image_pixel_width", errors, 1, 65535)
    port = _int_field(raw, "start_udp_port", errors, 1, 65535)
    if port is not None and n_modules is not None and port + n_modules - 1 > 65535:
        errors.append(f"start_udp_port: {port} + n_modules {n_modules} passes port 65535")
    user = _int_field(raw, "writer_user_id", errors)
    if "module_positions" not in raw:
        errors.append("module_positions: missing (use {} for a detector type that places "
                      "its modules itself, e.g. gigafrost)")
        positions: dict[int, tuple[int, int, int, int]] = {}
    elif kind is not None and not kind.uses_module_positions:
        positions = {}
    else:
        positions = _positions(raw["module_positions"], n_modules, errors)

    optional: dict[str, Any] = {}
    if "udp_host" in raw:
        if isinstance(raw["udp_host"], str) and raw["udp_host"]:
            optional["udp_host"] = raw["udp_host"]
        else:
            errors.append(f"udp_host: expected an IP address string, got {raw['udp_host']!r}")
    for count_field, top in (("n_writers", MAX_WRITERS), ("frames_per_block", 1_000_000)):
        if count_field in raw:
            value = _int_field(raw, count_field, errors, 1, top)
            if value is not None:
                optional[count_field] = value
    for slots in ("n_image_slots", "n_frame_slots"):
        if slots in raw:
            value = _int_field(raw, slots, errors, 2, 1_000_000)
            if value is not None:
                optional[slots] = value
    if raw.get("nominal_rate_hz") is not None:
        rate = raw["nominal_rate_hz"]
        if (isinstance(rate, bool) or not isinstance(rate, (int, float))
                or not 0 < rate <= 1_000_000):
            errors.append(f"nominal_rate_hz: expected a frame rate in (0, 1000000] Hz, "
                          f"got {rate!r}")
        else:
            optional["nominal_rate_hz"] = float(rate)
    if "allow_request_user_id" in raw:
        if isinstance(raw["allow_request_user_id"], bool):
            optional["allow_request_user_id"] = raw["allow_request_user_id"]
        else:
            errors.append("allow_request_user_id: expected true or false, got "
                          f"{raw['allow_request_user_id']!r}")
    for path_field in ("pedestal_file", "gain_file", "output_root"):
        value = raw.get(path_field)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            errors.append(f"{path_field}: expected a file path string, got {value!r}")
        elif path_field != "output_root" and not os.path.isfile(value):
            errors.append(f"{path_field}: file {value!r} does not exist")
        else:
            optional[path_field] = value
    if ("pedestal_file" in optional) != ("gain_file" in optional):
        errors.append("pedestal_file, gain_file: give both or neither")
    if "pedestal_file" in optional and kind is not None and not kind.converts:
        converting = ", ".join(n for n in names if detector_type(n).converts)
        errors.append(f"pedestal_file: conversion is only for {converting}, not {det_type}")

    known = {f for f in DetectorConfig.__dataclass_fields__ if f != "extra"}
    extra = {k: v for k, v in raw.items() if k not in known}
    for key in sorted(set(extra) - _IGNORED_FIELDS):
        close = difflib.get_close_matches(key, sorted(known | _IGNORED_FIELDS), n=1)
        errors.append(f"{key}: unknown field" + (f" (did you mean {close[0]}?)" if close else
                      " (not a field of stddaq or of the original std-daq)"))

    if (kind and bit_depth in kind.bit_depths and n_modules is not None
            and height is not None and width is not None):  # geometry errors come too
        errors.extend(kind.geometry_errors(bit_depth, n_modules, (height, width), positions))
    if not errors:
        config = DetectorConfig(
            detector_name=name, detector_type=det_type, n_modules=n_modules,  # type: ignore[arg-type]
            bit_depth=bit_depth, image_pixel_height=height, image_pixel_width=width,  # type: ignore[arg-type]
            start_udp_port=port, writer_user_id=user, module_positions=positions,  # type: ignore[arg-type]
            extra=extra, **optional,
        )
        if "n_image_slots" not in optional or "n_frame_slots" not in optional:
            plan = config.plan_slots(optional.get("n_frame_slots"),
                                     optional.get("n_image_slots"))
            config = replace(config, n_frame_slots=plan.n_frame_slots,
                             n_image_slots=plan.n_image_slots)
    if errors:
        raise ConfigError(f"{source}: invalid detector config:\n  - " + "\n  - ".join(errors))
    return config


def load_config(path: str | os.PathLike) -> DetectorConfig:
    """Load and validate a detector config JSON file."""
    return parse_config(read_config_json(path), source=str(path))


def read_config_json(path: str | os.PathLike) -> Any:
    """A detector config file's JSON, not yet validated (ConfigError naming the file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read detector config {path}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
