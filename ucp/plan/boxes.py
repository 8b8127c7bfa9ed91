"""Boxes (hyper-rectangles of a tensor), flat ranges and regular chunk grids.

Everything here is pure integer arithmetic over shapes; no tensors, no I/O.
A ``Box`` is half-open: ``start[d] <= i[d] < stop[d]`` on every dimension ``d``. A 0-d
tensor has the single box ``Box((), ())`` of one element.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

from ucp.plan.errors import PlanError
from ucp.plan.grid import ChunkGrid, intersect

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Box:
    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self):
        if len(self.start) != len(self.stop):
            raise ValueError(f"box start {self.start} and stop {self.stop} differ in rank")
        # Normalise to plain int tuples (hashable, comparable, JSON friendly).
        object.__setattr__(self, "start", tuple(int(x) for x in self.start))
        object.__setattr__(self, "stop", tuple(int(x) for x in self.stop))

    # ---------------------------------------------------------------- constructors
    @staticmethod
    def full(shape: Sequence[int]) -> "Box":
        return Box(tuple(0 for _ in shape), tuple(int(s) for s in shape))

    @staticmethod
    def from_slices(slices: Sequence[slice], shape: Sequence[int]) -> "Box":
        st, sp = [], []
        for s, n in zip(slices, shape):
            a, b, step = s.indices(n)
            if step != 1:
                raise ValueError("boxes need unit steps")
            st.append(a)
            sp.append(max(a, b))
        return Box(tuple(st), tuple(sp))

    # ---------------------------------------------------------------- properties
    @property
    def ndim(self) -> int:
        return len(self.start)

    @property
    def shape(self) -> Shape:
        return tuple(max(0, b - a) for a, b in zip(self.start, self.stop))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def empty(self) -> bool:
        return any(b <= a for a, b in zip(self.start, self.stop))

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))

    # ---------------------------------------------------------------- algebra
    def intersect(self, other: "Box") -> "Box":
        """The common box (possibly ``empty``)."""
        if self.ndim != other.ndim:
            raise ValueError(f"cannot intersect boxes of rank {self.ndim} and {other.ndim}")
        return Box(*intersect(self.start, self.stop, other.start, other.stop))

    def overlaps(self, other: "Box") -> bool:
        return not self.intersect(other).empty

    def contains(self, other) -> bool:
        """``other`` is a Box (an empty box is contained everywhere) or a point."""
        if isinstance(other, Box):
            if other.empty:
                return True
            return all(a <= c and d <= b for a, b, c, d in
                       zip(self.start, self.stop, other.start, other.stop))
        pt = tuple(other)
        return all(a <= p < b for a, b, p in zip(self.start, self.stop, pt))

    def translate(self, offset: Sequence[int]) -> "Box":
        return Box(tuple(a + o for a, o in zip(self.start, offset)),
                   tuple(b + o for b, o in zip(self.stop, offset)))

    def relative_to(self, origin: "Box") -> "Box":
        """This box in the coordinates of ``origin`` (``origin.start`` becomes 0)."""
        return self.translate(tuple(-a for a in origin.start))

    def subtract(self, other: "Box") -> list["Box"]:
        """``self`` minus ``other`` as at most ``2 * ndim`` disjoint boxes."""
        inter = self.intersect(other)
        if inter.empty:
            return [] if self.empty else [self]
        out = []
        st, sp = list(self.start), list(self.stop)
        for d in range(self.ndim):
            if st[d] < inter.start[d]:
                lo = Box(tuple(st), tuple(sp[:d] + [inter.start[d]] + sp[d + 1:]))
                out.append(lo)
            if inter.stop[d] < sp[d]:
                hi = Box(tuple(st[:d] + [inter.stop[d]] + st[d + 1:]), tuple(sp))
                out.append(hi)
            st[d], sp[d] = inter.start[d], inter.stop[d]
        return out

    def __str__(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in zip(self.start, self.stop)) + "]"


def fmt_boxes(boxes: Sequence[Box], limit: int = 4) -> str:
    s = ", ".join(str(b) for b in boxes[:limit])
    if len(boxes) > limit:
        s += f" and {len(boxes) - limit} more"
    return s


# -------------------------------------------------------------------- flat order
def ravel(index: Sequence[int], shape: Sequence[int]) -> int:
    """Row-major flat offset of ``index`` in ``shape``."""
    off = 0
    for i, n in zip(index, shape):
        off = off * n + i
    return off


def unravel(offset: int, shape: Sequence[int]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        if n == 0:
            out.append(0)
            continue
        out.append(offset % n)
        offset //= n
    return tuple(reversed(out))


def flat_to_boxes(a: int, b: int, shape: Sequence[int]) -> list[Box]:
    """The flat range ``[a, b)`` of a row-major tensor of ``shape`` as the minimal list of
    boxes, in order, each contiguous in row-major order (partial row, full rows, partial row,
    recursively per dimension)."""
    shape = tuple(int(s) for s in shape)
    total = math.prod(shape)
    a, b = max(0, int(a)), min(int(b), total)
    if a >= b:
        return []
    if not shape:
        return [Box((), ())]
    return _flat_rec(a, b, shape, ())


def _flat_rec(a: int, b: int, shape: Shape, prefix: tuple[int, ...]) -> list[Box]:
    pstop = tuple(i + 1 for i in prefix)
    if len(shape) == 1:
        return [Box(prefix + (a,), pstop + (b,))]
    inner = math.prod(shape[1:])
    tail = tuple(shape[1:])
    full_st = tuple(0 for _ in tail)
    r0, r1 = a // inner, b // inner
    if r0 == r1 or (r1 == r0 + 1 and b % inner == 0 and a % inner):
        # within one row (b may end exactly at the row's end)
        return _flat_rec(a - r0 * inner, b - r0 * inner, tail, prefix + (r0,))
    out = []
    if a % inner:
        out += _flat_rec(a % inner, inner, tail, prefix + (r0,))
        r0 += 1
    if r0 < r1:
        out.append(Box(prefix + (r0,) + full_st, pstop + (r1,) + tail))
    if b % inner:
        out += _flat_rec(0, b % inner, tail, prefix + (r1,))
    return out


def box_flat_range(box: Box, shape: Sequence[int]) -> Optional[tuple[int, int]]:
    """``(a, b)`` when ``box`` is one contiguous flat range of ``shape``, else None."""
    if box.empty:
        return None
    runs = contiguous_runs(box, Box.full(shape))
    if len(runs) != 1:
        return None
    a = ravel(box.start, shape)
    return a, a + box.numel


def contiguous_runs(sub: Box, within: Box) -> list[Box]:
    """Split ``sub`` (a box inside ``within``) into boxes each contiguous in the row-major
    order of ``within``: trailing dimensions on which ``sub`` spans ``within`` fully are
    kept whole, one more dimension keeps its range, the leading ones are enumerated."""
    if sub.empty:
        return []
    n = sub.ndim
    k = n  # dims k.. are full
    while k > 0 and sub.start[k - 1] == within.start[k - 1] and sub.stop[k - 1] == within.stop[k - 1]:
        k -= 1
    if k <= 1:
        return [sub]
    # dim k-1 keeps its range; dims 0..k-2 are enumerated
    lead = [range(sub.start[d], sub.stop[d]) for d in range(k - 1)]
    out = []
    for idx in itertools.product(*lead):
        out.append(Box(tuple(idx) + sub.start[k - 1:], tuple(i + 1 for i in idx) + sub.stop[k - 1:]))
    return out


def flat_offset_in(point: Sequence[int], within: Box) -> int:
    """Row-major offset of ``point`` inside box ``within``."""
    return ravel(tuple(p - a for p, a in zip(point, within.start)), within.shape)


# -------------------------------------------------------------------- chunk grids
def chunks_intersecting(box: Box, chunk_shape: Sequence[int], array_shape: Sequence[int]
                        ) -> Iterator[tuple[tuple[int, ...], Box, Box]]:
    """Chunks of a regular grid that ``box`` touches: ``(chunk_index, chunk_box, overlap)``,
    the chunk box clipped to the array (edge chunks), ``overlap = box ∩ chunk_box``."""
    if box.empty:
        return
    if len(chunk_shape) != box.ndim or len(array_shape) != box.ndim:
        raise ValueError("box, chunk_shape and array_shape differ in rank")
    if any(int(c) <= 0 for c in chunk_shape):
        raise ValueError(f"chunk sizes must be positive, got {tuple(chunk_shape)}")
    grid = ChunkGrid(tuple(array_shape), tuple(chunk_shape))
    for idx in grid.indices_for(box.start, box.stop):
        cb = Box(*grid.chunk_box(idx))
        yield tuple(idx), cb, box.intersect(cb)


# -------------------------------------------------------------------- splits
def split_sizes(n: int, k: int, split: str = "chunk", sizes: Optional[Sequence[int]] = None
                ) -> list[int]:
    """Sizes of ``k`` consecutive blocks of ``n`` items under a convention of ``ops.SPLITS``.

    ``chunk``: torch.chunk / DTensor: ``ceil(n/k)`` each, the last ranks may get fewer or none;
    ``tensor_split``: the first ``n % k`` ranks get one more; ``even``: must divide;
    ``sizes``: explicit sizes, ``len == k`` and ``sum == n``.
    """
    n, k = int(n), int(k)
    if k < 1:
        raise PlanError(f"degree must be >= 1, got {k}")
    if n < 0:
        raise PlanError(f"cannot split a negative size {n}")
    if split == "chunk":
        c = -(-n // k)
        return [max(0, min(c, n - i * c)) for i in range(k)]
    if split == "tensor_split":
        q, r = divmod(n, k)
        return [q + (1 if i < r else 0) for i in range(k)]
    if split == "even":
        if n % k:
            raise PlanError(f"even split of {n} over {k} ranks does not divide")
        return [n // k] * k
    if split == "sizes":
        if sizes is None:
            raise PlanError("split 'sizes' needs explicit sizes")
        sizes = [int(s) for s in sizes]
        if len(sizes) != k:
            raise PlanError(f"{len(sizes)} sizes {tuple(sizes)} given for degree {k}")
        if any(s < 0 for s in sizes) or sum(sizes) != n:
            raise PlanError(f"sizes {tuple(sizes)} do not add up to {n}")
        return sizes
    raise PlanError(f"unknown split convention {split!r} (known: chunk, tensor_split, even, sizes)")


def split_range(n: int, k: int, rank: int, split: str = "chunk",
                sizes: Optional[Sequence[int]] = None) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s block under :func:`split_sizes`."""
    sz = split_sizes(n, k, split, sizes)
    if not 0 <= rank < k:
        raise PlanError(f"rank {rank} out of range for degree {k}")
    a = sum(sz[:rank])
    return a, a + sz[rank]


def union_numel(boxes: Iterable[Box]) -> int:
    """Number of distinct elements covered by ``boxes`` (exact, by subtraction)."""
    disjoint: list[Box] = []
    for b in boxes:
        pieces = [b]
        for d in disjoint:
            nxt = []
            for p in pieces:
                nxt += p.subtract(d)
            pieces = nxt
            if not pieces:
                break
        disjoint += pieces
    return sum(p.numel for p in disjoint)
