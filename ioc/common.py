"""Small helpers shared by the IOC's record groups."""

from __future__ import annotations


async def write_if_changed(prop, value, **metadata) -> None:
    """Write only when the value or the alarm severity changes (no needless monitors)."""
    severity = metadata.get("severity")
    if prop.value != value or (severity is not None and prop.alarm.severity != severity):
        await prop.write(value, **metadata)
