"""Size the FrameBuffer and the ImageBuffer in time: slots for ``BUFFER_SECONDS`` of the
detector's nominal rate, within a memory budget.

Pure arithmetic over the config's numbers and two machine constants (RAM and the size of
the shared-memory file system), so every process that reads a config derives the same
slots. A config's explicit ``n_frame_slots`` / ``n_image_slots`` are kept as they are.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np

from fastcore.buffers import FrameBuffer, ImageBuffer, shm_dir

BUFFER_SECONDS = 1.0  # what the default slots hold at the nominal rate
MEMORY_FRACTION = 0.5  # of min(RAM, shm file system) that one detector's buffers may take
MIN_SLOTS = 16


def memory_budget_bytes() -> int:
    """Half of the smaller of RAM and the shared-memory file system's size."""
    sizes = []
    with contextlib.suppress(ValueError, OSError):
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    with contextlib.suppress(OSError):
        stat = os.statvfs(shm_dir())
        sizes.append(stat.f_frsize * stat.f_blocks)
    return int(MEMORY_FRACTION * min(sizes)) if sizes else 4 * 2**30


@dataclass(frozen=True)
class BufferPlan:
    """Slots and bytes of both buffers, and the time they hold at the nominal rate."""

    nominal_rate_hz: float
    n_frame_slots: int
    n_image_slots: int
    frame_slot_bytes: int
    image_slot_bytes: int
    budget_bytes: int
    clamped: bool  # the default slots were cut to fit the budget

    @property
    def frame_buffer_bytes(self) -> int:
        return self.n_frame_slots * self.frame_slot_bytes

    @property
    def image_buffer_bytes(self) -> int:
        return self.n_image_slots * self.image_slot_bytes

    @property
    def total_bytes(self) -> int:
        return self.frame_buffer_bytes + self.image_buffer_bytes

    def seconds(self, slots: int) -> float:
        return slots / self.nominal_rate_hz

    @property
    def short(self) -> bool:
        """Either buffer holds less than BUFFER_SECONDS at the nominal rate."""
        return min(self.n_frame_slots, self.n_image_slots) < round(
            BUFFER_SECONDS * self.nominal_rate_hz)

    def describe(self) -> str:
        gb = 1e9
        return (f"FrameBuffer {self.n_frame_slots} slots ({self.seconds(self.n_frame_slots):.2f}"
                f" s at {self.nominal_rate_hz:g} Hz, {self.frame_buffer_bytes / gb:.2f} GB), "
                f"ImageBuffer {self.n_image_slots} slots "
                f"({self.seconds(self.n_image_slots):.2f} s, "
                f"{self.image_buffer_bytes / gb:.2f} GB): {self.total_bytes / gb:.2f} GB of "
                f"shared memory (budget {self.budget_bytes / gb:.2f} GB)")


def plan_buffers(nominal_rate_hz: float, n_modules: int, frame_bytes: int,
                 image_shape: tuple[int, int], image_dtype: np.dtype | str,
                 n_frame_slots: int | None = None, n_image_slots: int | None = None,
                 budget_bytes: int | None = None) -> BufferPlan:
    """Slots for BUFFER_SECONDS at ``nominal_rate_hz`` where not given, both cut in the same
    proportion (never below MIN_SLOTS) when they would pass the memory budget."""
    frame_slot = FrameBuffer.slot_bytes_for(n_modules, frame_bytes)
    image_slot = ImageBuffer.slot_bytes_for(image_shape, image_dtype)
    budget = memory_budget_bytes() if budget_bytes is None else budget_bytes
    wanted = max(MIN_SLOTS, math.ceil(BUFFER_SECONDS * nominal_rate_hz))
    frames = n_frame_slots if n_frame_slots is not None else wanted
    images = n_image_slots if n_image_slots is not None else wanted
    fixed = (n_frame_slots or 0) * frame_slot + (n_image_slots or 0) * image_slot
    flexible = ((wanted * frame_slot if n_frame_slots is None else 0)
                + (wanted * image_slot if n_image_slots is None else 0))
    clamped = False
    if flexible and fixed + flexible > budget:
        scale = max(0.0, budget - fixed) / flexible
        slots = max(MIN_SLOTS, int(wanted * scale))
        clamped = True
        frames = slots if n_frame_slots is None else frames
        images = slots if n_image_slots is None else images
    return BufferPlan(float(nominal_rate_hz), frames, images, frame_slot, image_slot, budget,
                      clamped)
