"""Which images of a run each of N writers takes, and where they go (pure arithmetic).

A run's images are indexed ``k = image_id - first_image_id`` (0 .. n_images-1) and cut into
blocks of ``frames_per_block`` consecutive images; block ``b`` goes to writer ``b % N``.
Each writer's file holds its images in order, one row per image, with a row (zeros, status
ABSENT) for an image of its share that never came, so row ``r`` of writer ``i`` is always
the same image of the run. That makes the master file's virtual datasets regular: per
writer, blocks of ``frames_per_block`` rows every ``N * frames_per_block`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_WRITERS = 64


@dataclass(frozen=True)
class Split:
    """Writer ``index`` of ``n_writers``, blocks of ``frames_per_block`` images."""

    index: int
    n_writers: int
    frames_per_block: int

    @property
    def cycle(self) -> int:
        """Images from one block of writer 0 to its next."""
        return self.n_writers * self.frames_per_block

    def owns(self, k: int) -> bool:
        """Image ``k`` of the run is this writer's."""
        return (k // self.frames_per_block) % self.n_writers == self.index

    def rows_before(self, k: int) -> int:
        """This writer's images among the run's images 0 .. k-1 (= the row of image k, if
        it is this writer's)."""
        q, r = divmod(k, self.cycle)
        start = self.index * self.frames_per_block
        return q * self.frames_per_block + min(max(r - start, 0), self.frames_per_block)

    def image_of_row(self, row: int | np.ndarray) -> int | np.ndarray:
        """The run index ``k`` of this writer's row ``row`` (vectorised)."""
        q, r = np.divmod(row, self.frames_per_block)
        k = q * self.cycle + self.index * self.frames_per_block + r
        return int(k) if np.ndim(k) == 0 else k

    def next_owned(self, k: int) -> int:
        """The first image index >= k that is this writer's."""
        if self.owns(k):
            return k
        q, r = divmod(k, self.cycle)
        start = self.index * self.frames_per_block
        return q * self.cycle + start + (self.cycle if r >= start else 0)


@dataclass(frozen=True)
class Mapping:
    """Rows of one writer's file shown in the master: ``count`` blocks (None: as many as the
    file grows to) of ``block`` rows, every ``stride`` master rows from ``master_start``,
    taken in order from the file's rows ``source_start`` on."""

    writer: int
    master_start: int
    stride: int
    block: int
    count: int | None
    source_start: int


def open_run_mappings(n_writers: int, frames_per_block: int, master_start: int,
                      bases: list[int]) -> list[Mapping]:
    """A run still being written: each writer's rows from ``bases[w]`` on, as they come."""
    cycle = n_writers * frames_per_block
    return [Mapping(w, master_start + w * frames_per_block, cycle, frames_per_block, None,
                    bases[w]) for w in range(n_writers)]


def closed_run_mappings(n_writers: int, frames_per_block: int, master_start: int,
                        bases: list[int], rows: list[int]) -> tuple[list[Mapping], int]:
    """A finished run whose writers wrote ``rows[w]`` rows from ``bases[w]`` on: its
    mappings, and its length in the master (through the last image written)."""
    fpb, cycle = frames_per_block, n_writers * frames_per_block
    mappings, length = [], 0
    for w in range(n_writers):
        full, rest = divmod(rows[w], fpb)
        if full:
            mappings.append(Mapping(w, master_start + w * fpb, cycle, fpb, full, bases[w]))
        if rest:
            mappings.append(Mapping(w, master_start + full * cycle + w * fpb, cycle, rest, 1,
                                    bases[w] + full * fpb))
        if rows[w]:
            split = Split(w, n_writers, fpb)
            length = max(length, split.image_of_row(rows[w] - 1) + 1)
    return mappings, length
