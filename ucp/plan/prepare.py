"""One rule applied to one rank, up to (not including) ``Flat``: the local shape and the
pieces that map universal boxes to local boxes.

Until a ``Flat``, every op acts on one dimension, so the map from local to universal is a
product of 1-D maps, one per dimension: a sequence of *segments* (a run of local indices that
maps to a run of universal indices, or to padding). ``Pad`` appends a padding segment;
``Parts`` records part boundaries (``groups == 1``) or permutes the dimension into the
group-interleaved framework order (``groups > 1``); ``Shard`` keeps the rank's block: of
every part separately (``groups == 1`` parts), of whole groups (``groups > 1``), or of the
whole (padded) dimension. A second ``Shard`` on the same dimension splits the first one's
block again. ``Replicate`` / ``Average`` mark axes; axes no op mentions are replicated.

Each op is one small function in :data:`OP_RULES` (a table, not an ``isinstance`` chain). An
error in an op is raised at the op's source position when the rule carries it
(``PlanSpecError``: file:line:col and a caret).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

from ucp.plan.boxes import Box, split_range, split_sizes
from ucp.plan.errors import PlanError, PlanSpecError, Pos
from ucp.plan.model import Piece
from ucp.plan.ops import Average, BoundRule, Flat, Pad, Parts, Replicate, Shard
from ucp.plan.placement import axis_rank

Shape = tuple[int, ...]
Seg = tuple[int, Optional[int]]   # (length, universal start or None for padding)


# ==================================================================== 1-D maps
def norm(segs: Iterable[Seg]) -> list[Seg]:
    """Drop empty segments and merge neighbours that continue each other."""
    out: list[Seg] = []
    for n, u in segs:
        if n <= 0:
            continue
        if out:
            pn, pu = out[-1]
            if (pu is None and u is None) or (pu is not None and u is not None and pu + pn == u):
                out[-1] = (pn + n, pu)
                continue
        out.append((n, u))
    return out


def seg_len(segs: Sequence[Seg]) -> int:
    return sum(n for n, _ in segs)


def seg_slice(segs: Sequence[Seg], a: int, b: int) -> list[Seg]:
    """The segments of local indices ``[a, b)``."""
    out, pos = [], 0
    for n, u in segs:
        lo, hi = max(a, pos), min(b, pos + n)
        if lo < hi:
            out.append((hi - lo, None if u is None else u + lo - pos))
        pos += n
        if pos >= b:
            break
    return norm(out)


class DimState:
    """The 1-D map of one dimension while the ops are applied."""
    __slots__ = ("segs", "parts", "groups")

    def __init__(self, n: int):
        self.segs: list[Seg] = norm([(n, 0)])
        self.parts: Optional[list[int]] = None  # local lengths of parts (groups == 1)
        self.groups: int = 1                     # interleave groups still on this rank


# ==================================================================== the result
@dataclass
class Prepared:
    """A rule applied to one rank up to (not including) Flat."""
    local_shape: Shape
    pieces: list
    flat: Optional[Flat]
    replicated: tuple[str, ...]
    averaged: tuple[str, ...]
    coords: tuple[tuple[str, int], ...]
    replica: bool
    weight: float


@dataclass
class _Build:
    shape: Shape
    degrees: Mapping[str, int]
    coords: Mapping[str, int]
    dims: list
    flat: Optional[Flat] = None
    partitioned: set = field(default_factory=set)
    replicate: set = field(default_factory=set)
    average: set = field(default_factory=set)

    def dim(self, d: int, op) -> DimState:
        nd = len(self.shape)
        dd = d + nd if d < 0 else d
        if not 0 <= dd < nd:
            raise PlanError(f"{type(op).__name__.lower()} on dim {d} of a {nd}-d tensor of shape "
                            f"{self.shape}: expected dim < {nd}")
        return self.dims[dd]

    def rank(self, axis: str) -> tuple[int, int]:
        return axis_rank(self.degrees, self.coords, axis)


# ==================================================================== one function per op
def _shard_groups(b: _Build, op: Shard, st: DimState, k: int, r: int) -> None:
    L = seg_len(st.segs)
    G, glen = st.groups, L // st.groups
    if op.split == "sizes":
        rows = split_sizes(L, k, "sizes", op.sizes)
        if any(s % glen for s in rows):
            raise PlanError(f"shard sizes {tuple(rows)} on dim {op.dim} must be whole "
                            f"interleave groups of {glen}")
        a = sum(rows[:r])
        stop = a + rows[r]
    else:
        if G % k:
            raise PlanError(f"shard over {op.axis}={k}: {G} interleaved groups on dim {op.dim} "
                            f"are not divisible by the degree: expected groups % {op.axis} == 0")
        a, stop = r * (G // k) * glen, (r + 1) * (G // k) * glen
    st.segs = seg_slice(st.segs, a, stop)
    st.groups = max(1, (stop - a) // glen) if glen else 1


def _shard_parts(op: Shard, st: DimState, k: int, r: int) -> None:
    new, lens, pos = [], [], 0
    for n in st.parts:
        try:
            a, stop = split_range(n, k, r, op.split, op.sizes)
        except PlanError as e:
            raise PlanError(f"shard over {op.axis} of a part of size {n} on dim {op.dim}: {e}") from None
        new += seg_slice(st.segs, pos + a, pos + stop)
        lens.append(stop - a)
        pos += n
    st.segs, st.parts = norm(new), lens


def _shard(b: _Build, op: Shard) -> None:
    st = b.dim(op.dim, op)
    k, r = b.rank(op.axis)
    b.partitioned.add(op.axis)
    L = seg_len(st.segs)
    if st.groups > 1 and L > 0:
        _shard_groups(b, op, st, k, r)
    elif st.parts is not None:
        _shard_parts(op, st, k, r)
    else:
        try:
            a, stop = split_range(L, k, r, op.split, op.sizes)
        except PlanError as e:
            raise PlanError(f"shard of dim {op.dim} (size {L}) over {op.axis}={k}: {e}") from None
        st.segs = seg_slice(st.segs, a, stop)


def _pad(b: _Build, op: Pad) -> None:
    st = b.dim(op.dim, op)
    if op.multiple < 1:
        raise PlanError(f"pad multiple must be >= 1, got {op.multiple}")
    if st.parts is not None or st.groups > 1:
        raise PlanError(f"pad of dim {op.dim} after parts on the same dim is not supported")
    L = seg_len(st.segs)
    padded = -(-L // op.multiple) * op.multiple
    st.segs = norm(st.segs + [(padded - L, None)])


def _parts(b: _Build, op: Parts) -> None:
    st = b.dim(op.dim, op)
    if st.parts is not None or st.groups > 1:
        raise PlanError(f"parts on dim {op.dim} given twice")
    try:
        sizes = op.part_sizes(seg_len(st.segs))
    except ValueError as e:
        raise PlanError(str(e)) from None
    G = int(op.groups)
    if G == 1:
        st.parts = list(sizes)
        return
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    new = []
    for g in range(G):
        for off, s in zip(offs, sizes):
            q = s // G
            new += seg_slice(st.segs, off + g * q, off + (g + 1) * q)
    st.segs, st.groups = norm(new), G


def _flat(b: _Build, op: Flat) -> None:
    b.rank(op.axis)
    if op.align < 1 or op.param_align < 1:
        raise PlanError(f"flat align/param_align must be >= 1, got {op.align}/{op.param_align}")
    b.partitioned.add(op.axis)
    b.flat = op


def _replicate(b: _Build, op: Replicate) -> None:
    b.rank(op.axis)
    b.replicate.add(op.axis)


def _average(b: _Build, op: Average) -> None:
    b.rank(op.axis)
    b.average.add(op.axis)


#: The planner's meaning of each op type (LANGUAGE.md §5).
OP_RULES = {Shard: _shard, Pad: _pad, Parts: _parts, Flat: _flat, Replicate: _replicate,
            Average: _average}


# ==================================================================== driver
def _apply(b: _Build, ops: Sequence, positions: Sequence) -> None:
    for i, op in enumerate(ops):
        try:
            if b.flat is not None and not isinstance(op, (Replicate, Average)):
                raise PlanError(f"{type(op).__name__.lower()} after flat: flat must be the last "
                                "tensor op (only replicate/average may follow it)")
            handler = OP_RULES.get(type(op))
            if handler is None:
                raise PlanError(f"unknown layout op {op!r}")
            handler(b, op)
        except PlanError as e:
            pos = positions[i] if i < len(positions) else None
            if isinstance(pos, Pos) and not isinstance(e, PlanSpecError):
                raise PlanSpecError(pos, str(e)) from None
            raise


def _pieces(dims: Sequence[DimState]) -> list:
    """The product of the per-dim non-padding segments, as universal -> local pieces."""
    per_dim = []
    for st in dims:
        lst, pos = [], 0
        for n, u in st.segs:
            if u is not None:
                lst.append((pos, u, n))
            pos += n
        per_dim.append(lst)
    out = []
    for combo in itertools.product(*per_dim):
        dst = Box(tuple(c[0] for c in combo), tuple(c[0] + c[2] for c in combo))
        src = Box(tuple(c[1] for c in combo), tuple(c[1] + c[2] for c in combo))
        out.append(Piece(src, dst))
    return out


def rule_axes(rule: BoundRule, degrees: Mapping[str, int], coords: Mapping[str, int]) -> list[str]:
    """The axes the rule's ranks are indexed by: ``rule.axes`` or every axis given."""
    if rule.axes:
        return list(rule.axes)
    return list(degrees) + [a for a in coords if a not in degrees]


def prepare(rule: BoundRule, shape: Sequence[int], degrees: Mapping[str, int],
            coords: Mapping[str, int]) -> Prepared:
    """Apply ``rule.ops`` (already the pipeline of one state) to the rank at ``coords``."""
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise PlanError(f"negative size in shape {shape}")
    b = _Build(shape, degrees, coords, [DimState(n) for n in shape])
    b.partitioned |= {rn.axis for rn in rule.renumber}
    _apply(b, rule.ops, rule.positions)
    clash = (b.replicate | b.average) & b.partitioned
    if clash:
        raise PlanError(f"axes {sorted(clash)} are both partitioned and replicated/averaged")
    if b.replicate & b.average:
        raise PlanError(f"axes {sorted(b.replicate & b.average)} are both replicated and averaged")
    axes = rule_axes(rule, degrees, coords)
    for a in axes:
        b.rank(a)
    cs = tuple((a, int(coords.get(a, 0))) for a in axes)
    repl = tuple(a for a in axes if a not in b.partitioned and a not in b.average)
    avg = tuple(a for a in axes if a in b.average)
    replica = any(coords.get(a, 0) != 0 for a in repl + avg)
    weight = 1.0 / math.prod(int(degrees.get(a, 1)) for a in avg) if avg else 1.0
    local_shape = tuple(seg_len(st.segs) for st in b.dims)
    return Prepared(local_shape, _pieces(b.dims), b.flat, repl, avg, cs, replica, weight)
