"""Detector types: one module each (jungfrau, eiger, gigafrost), found by name.

Everything that differs between detectors lives in its type (see
:class:`~fastcore.detectors.base.DetectorType`); the rest of stddaq looks a type up by the
config's ``detector_type`` with :func:`detector_type`. A type defined outside this package
is registered with :func:`register`, in a module that the operator names in
``$STDDAQ_DETECTOR_MODULES`` (comma-separated module names, imported at the first lookup by
every stddaq process), so a new detector needs no change to fastcore.
"""

from __future__ import annotations

import importlib
import os

from fastcore.detectors.base import CHIP_GAP, Block, Corners, DetectorType, ModuleFormat
from fastcore.detectors.eiger import Eiger
from fastcore.detectors.gigafrost import Gigafrost
from fastcore.detectors.jungfrau import Jungfrau

__all__ = ["CHIP_GAP", "PLUGINS_ENV", "Block", "Corners", "DetectorType",
           "DetectorTypeError", "ModuleFormat", "detector_type", "detector_type_names",
           "module_format", "register"]

PLUGINS_ENV = "STDDAQ_DETECTOR_MODULES"

_TYPES: dict[str, DetectorType] = {}
_plugins_loaded = False


class DetectorTypeError(ValueError):
    """An unknown detector type, or a detector module that cannot be imported."""


def register(kind: DetectorType) -> DetectorType:
    """Make ``kind`` known under ``kind.name`` (a second type of that name is refused)."""
    known = _TYPES.get(kind.name)
    if known is not None and type(known) is not type(kind):
        raise DetectorTypeError(f"detector type {kind.name!r} is already registered by "
                                f"{type(known).__module__}.{type(known).__qualname__}")
    _TYPES[kind.name] = kind
    return kind


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as exc:  # any import failure is the operator's to fix
            raise DetectorTypeError(f"{PLUGINS_ENV}: cannot import detector module {name!r}: "
                                    f"{type(exc).__name__}: {exc}") from None


def detector_type_names() -> tuple[str, ...]:
    """Names of every known detector type (the plugins' included)."""
    _load_plugins()
    return tuple(_TYPES)


def detector_type(name: str) -> DetectorType:
    """The detector type of a config's ``detector_type``; DetectorTypeError naming the
    known ones if there is none."""
    _load_plugins()
    try:
        return _TYPES[name]
    except (KeyError, TypeError):
        raise DetectorTypeError(f"unknown detector_type {name!r}; known: "
                                f"{', '.join(_TYPES)}") from None


def module_format(name: str, bit_depth: int, image_shape: tuple[int, int]) -> ModuleFormat:
    """The wire format of one module of a detector type (sizes from the detector config)."""
    return detector_type(name).module_format(bit_depth, image_shape)


for _kind in (Jungfrau(), Eiger(), Gigafrost()):
    register(_kind)
