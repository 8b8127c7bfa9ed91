"""The regular chunk grid: the one home of chunk-box arithmetic (modelled on zarr's ``FixedDimension``).

An array of ``shape`` is cut into chunks of ``chunks`` elements per dimension; chunk ``idx`` covers
``[idx[d] * chunks[d], min((idx[d] + 1) * chunks[d], shape[d]))`` on every dimension ``d`` (edge chunks
are clipped to the array). The format's writer, reader, shard codec and several-writer commit, and the
planner's ``chunks_intersecting``, all ask this type instead of spelling the products out again.
Pure integer arithmetic, no I/O.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

Index = tuple[int, ...]


@dataclass(frozen=True)
class ChunkGrid:
    """A regular grid of ``chunks``-shaped chunks over an array of ``shape`` (both int tuples)."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "chunks", tuple(int(c) for c in self.chunks))
        if len(self.shape) != len(self.chunks):
            raise ValueError(f"chunks {self.chunks} and shape {self.shape} differ in rank")
        if any(c < 1 for c in self.chunks):
            raise ValueError(f"chunk extents must be positive, got {self.chunks}")

    @functools.cached_property
    def grid(self) -> tuple[int, ...]:
        """Number of chunks along each dimension."""
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))

    @functools.cached_property
    def nchunks(self) -> int:
        return math.prod(self.grid)

    def chunk_start(self, idx: Sequence[int]) -> Index:
        """First element of chunk ``idx`` on every dimension."""
        return tuple(i * c for i, c in zip(idx, self.chunks))

    def chunk_stop(self, idx: Sequence[int]) -> Index:
        """One past the last element of chunk ``idx`` inside the array (edge chunks are clipped)."""
        return tuple(min((i + 1) * c, n) for i, c, n in zip(idx, self.chunks, self.shape))

    def chunk_box(self, idx: Sequence[int]) -> tuple[Index, Index]:
        """``(start, stop)`` of chunk ``idx`` clipped to the array."""
        return self.chunk_start(idx), self.chunk_stop(idx)

    def valid_shape(self, idx: Sequence[int]) -> Index:
        """Extent of chunk ``idx`` inside the array (smaller than ``chunks`` at the far edges)."""
        return tuple(b - a for a, b in zip(*self.chunk_box(idx)))

    def indices(self) -> Iterator[Index]:
        """Every chunk index, in C order. ``itertools.product`` turns every range into a tuple first:
        a grid with no chunks (a zero-length dim) returns at once, whatever its other dims."""
        if self.nchunks == 0:
            return iter(())
        return itertools.product(*(range(g) for g in self.grid))

    def ranges(self, start: Sequence[int], stop: Sequence[int]) -> list[range]:
        """Per dimension, the chunk indices that the box ``[start, stop)`` touches."""
        return [range(a // c, -(-b // c)) if b > a else range(0)
                for a, b, c in zip(start, stop, self.chunks)]

    def indices_for(self, start: Sequence[int], stop: Sequence[int]) -> Iterator[Index]:
        """The chunk indices that the box ``[start, stop)`` touches, in C order."""
        return itertools.product(*self.ranges(start, stop))

    def overlap(self, idx: Sequence[int], start: Sequence[int], stop: Sequence[int]) -> tuple[Index, Index]:
        """``box ∩ chunk idx`` as ``(start, stop)`` in array coordinates (empty where they miss)."""
        return intersect(start, stop, *self.chunk_box(idx))


@functools.lru_cache(maxsize=1024)
def chunk_grid(shape: Index, chunks: Index) -> ChunkGrid:
    """The ``ChunkGrid`` of a geometry (int tuples), one per geometry: a frozen value, so the records and
    writers of arrays of the same shape and chunks (layers repeat) share it and its cached ``grid``."""
    return ChunkGrid(shape, chunks)


def intersect(start: Sequence[int], stop: Sequence[int], box_start: Sequence[int],
              box_stop: Sequence[int]) -> tuple[Index, Index]:
    """``[start, stop) ∩ [box_start, box_stop)`` as ``(start, stop)`` (empty where they miss)."""
    lo = tuple(max(a, b) for a, b in zip(start, box_start))
    hi = tuple(max(x, min(a, b)) for x, a, b in zip(lo, stop, box_stop))
    return lo, hi


def box_slices(start: Sequence[int], stop: Sequence[int], origin: Sequence[int] | None = None) -> tuple:
    """Slices selecting ``[start, stop)`` in an array whose element 0 sits at ``origin`` (default 0)."""
    if origin is None:
        return tuple(slice(a, b) for a, b in zip(start, stop))
    return tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, origin))


def volume(start: Sequence[int], stop: Sequence[int]) -> int:
    """Number of elements of the box ``[start, stop)``."""
    return math.prod(max(0, b - a) for a, b in zip(start, stop))
