"""Fragments: which part of a universal tensor one rank holds, and where in its local tensor.

Planning is pure: a ``BoundRule`` (``ucp.plan.ops``), the universal shape, the degrees and a
rank's coordinates give a :class:`Fragment`, a list of :class:`Piece` s mapping universal
boxes to local boxes. Everything else — splitting a tensor, assembling one, checking that a
set of fragments tiles a tensor, planning the copies that reshard one layout into another —
works on fragments only.

How the ops compose (left to right), in this implementation:

* Until a ``Flat``, every op acts on one dimension, so the map from local to universal is a
  product of 1-D maps, one per dimension: a sequence of *segments* (a run of local indices
  that maps to a run of universal indices, or to padding). ``Pad`` appends a padding
  segment; ``Parts`` records part boundaries (``groups == 1``) or permutes the dimension
  into the group-interleaved framework order (``groups > 1``); ``Shard`` keeps the rank's
  block: of every part separately (``groups == 1`` parts), of whole groups (``groups > 1``),
  or of the whole (padded) dimension. A second ``Shard`` on the same dimension splits the
  first one's block again (of each part again, when the dimension has parts).
* ``Flat`` flattens the resulting local tensor (padding included, as the framework holds
  it), pads it to ``align * degree`` and keeps the rank's contiguous partition, or lays a
  group of such tensors out in one buffer. Each flat piece lies inside one pre-flat piece.
* ``Replicate`` / ``Average`` mark axes; axes no op mentions are replicated too.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

from ucp.plan.boxes import (Box, chunks_intersecting, contiguous_runs, flat_offset_in, flat_to_boxes,
                            fmt_boxes, ravel, split_range, split_sizes)
from ucp.plan.errors import CoverageError, PlanError
from ucp.plan.replicas import average_replicas, cast_average
from ucp.plan.ops import Average, BoundRule, Flat, Pad, Parts, Renumber, Replicate, Shard

Shape = tuple[int, ...]


# ==================================================================== data model
@dataclass(frozen=True)
class Piece:
    """``universal[src]`` in row-major order equals ``local[dst]`` in row-major order.

    Same shapes: a plain box copy. Flat partitions: ``dst`` is a 1-D range of the local
    buffer and ``src`` a box of the universal tensor.
    """
    src: Box
    dst: Box

    def __post_init__(self):
        if self.src.numel != self.dst.numel:
            raise ValueError(f"piece {self.src} -> {self.dst}: sizes differ")

    @property
    def is_box(self) -> bool:
        return self.src.shape == self.dst.shape

    @property
    def numel(self) -> int:
        return self.src.numel


@dataclass(frozen=True)
class Fragment:
    """One rank's share of one universal tensor.

    ``local_shape`` is the whole local tensor (for grouped ``Flat``: the rank's partition of
    the group buffer ``local_name``); positions no piece covers are padding. ``replica``:
    a Replicate / Average / unmentioned axis has a coordinate other than 0. ``weight`` is
    ``1 / n`` over the Average axes (1.0 otherwise).
    """
    name: str
    local_name: str
    coords: tuple[tuple[str, int], ...]
    local_shape: Shape
    pieces: tuple[Piece, ...]
    replica: bool = False
    weight: float = 1.0
    global_shape: Shape = ()
    replicated: tuple[str, ...] = ()   # axes whose ranks hold the same data
    averaged: tuple[str, ...] = ()     # axes whose ranks hold data to be averaged
    group: Optional[str] = None        # Flat group key (== local_name) or None
    origin: str = ""                   # the rule that produced it ("file:line:col")

    def coord(self, axis: str) -> int:
        return dict(self.coords).get(axis, 0)

    @property
    def numel(self) -> int:
        """Universal elements held (padding excluded)."""
        return sum(p.numel for p in self.pieces)

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)

    @property
    def partition_key(self) -> tuple:
        """Identifies the data held up to replication: name and partitioning coordinates."""
        skip = set(self.replicated) | set(self.averaged)
        return (self.name, tuple((a, c) for a, c in self.coords if a not in skip))

    def describe(self) -> str:
        cs = ", ".join(f"{a}={c}" for a, c in self.coords)
        return f"{self.local_name} ({cs or 'single rank'})"

    def to_dict(self) -> dict:
        """JSON-ready form (metadata of the source fragmentation); :meth:`from_dict` inverts it."""
        return {"name": self.name, "local_name": self.local_name, "coords": dict(self.coords),
                "local_shape": list(self.local_shape),
                "pieces": [[list(p.src.start), list(p.src.stop), list(p.dst.start), list(p.dst.stop)]
                           for p in self.pieces],
                "replica": self.replica, "weight": self.weight, "global_shape": list(self.global_shape),
                "replicated": list(self.replicated), "averaged": list(self.averaged),
                "group": self.group, "origin": self.origin}

    @staticmethod
    def from_dict(d: Mapping) -> "Fragment":
        return Fragment(name=d["name"], local_name=d.get("local_name", d["name"]),
                        coords=tuple((str(a), int(c)) for a, c in dict(d.get("coords", {})).items()),
                        local_shape=tuple(d["local_shape"]),
                        pieces=tuple(Piece(Box(tuple(a), tuple(b)), Box(tuple(c), tuple(e)))
                                     for a, b, c, e in d.get("pieces", ())),
                        replica=bool(d.get("replica", False)), weight=float(d.get("weight", 1.0)),
                        global_shape=tuple(d.get("global_shape", ())),
                        replicated=tuple(d.get("replicated", ())), averaged=tuple(d.get("averaged", ())),
                        group=d.get("group"), origin=d.get("origin", ""))


@dataclass(frozen=True)
class Read:
    """Copy ``saved[saved_index][saved_dst]`` into ``want[want_dst]`` (row-major order,
    equal sizes); both hold the universal region ``src``. ``weight != 1`` for Average
    replicas: accumulate ``want[want_dst] += weight * saved[...]``. ``saved_index == -1``
    reads the universal tensor itself (``saved_dst == src``)."""
    saved_index: int
    saved_dst: Box
    want_dst: Box
    src: Box
    weight: float = 1.0

    @property
    def numel(self) -> int:
        return self.src.numel


# ==================================================================== 1-D maps
# A 1-D map is a list of segments (length, universal_start or None for padding).
Seg = tuple[int, Optional[int]]


def _norm(segs: Iterable[Seg]) -> list[Seg]:
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


def _len(segs: Sequence[Seg]) -> int:
    return sum(n for n, _ in segs)


def _slice(segs: Sequence[Seg], a: int, b: int) -> list[Seg]:
    out = []
    pos = 0
    for n, u in segs:
        lo, hi = max(a, pos), min(b, pos + n)
        if lo < hi:
            out.append((hi - lo, None if u is None else u + lo - pos))
        pos += n
        if pos >= b:
            break
    return _norm(out)


class _DimState:
    __slots__ = ("segs", "parts", "groups")

    def __init__(self, n: int):
        self.segs: list[Seg] = _norm([(n, 0)])
        self.parts: Optional[list[int]] = None  # local lengths of parts (groups == 1)
        self.groups: int = 1                     # interleave groups still on this rank


@dataclass
class _Prepared:
    """A rule applied to one rank up to (not including) Flat."""
    local_shape: Shape
    pieces: list[Piece]
    flat: Optional[Flat]
    replicated: tuple[str, ...]
    averaged: tuple[str, ...]
    coords: tuple[tuple[str, int], ...]
    replica: bool
    weight: float


def _degree(degrees: Mapping[str, int], axis: str) -> int:
    k = int(degrees.get(axis, 1))
    if k < 1:
        raise PlanError(f"degree of {axis!r} must be >= 1, got {k}")
    return k


def _coord(degrees, coords, axis) -> tuple[int, int]:
    k = _degree(degrees, axis)
    r = int(coords.get(axis, 0))
    if not 0 <= r < k:
        raise PlanError(f"coordinate {axis}={r} out of range for degree {k}")
    return k, r


def _all_axes(degrees: Mapping[str, int], coords: Mapping[str, int]) -> list[str]:
    axes = list(degrees)
    axes += [a for a in coords if a not in degrees]
    return axes


def _prepare(rule: BoundRule, shape: Sequence[int], degrees: Mapping[str, int],
             coords: Mapping[str, int]) -> _Prepared:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise PlanError(f"negative size in shape {shape}")
    nd = len(shape)
    dims = [_DimState(n) for n in shape]
    flat: Optional[Flat] = None
    partitioned: set[str] = {rn.axis for rn in rule.renumber}
    replicate: set[str] = set()
    average: set[str] = set()

    def dim_of(d: int, op) -> int:
        dd = d + nd if d < 0 else d
        if not 0 <= dd < nd:
            raise PlanError(f"{type(op).__name__.lower()}: dimension {d} out of range for a "
                            f"{nd}-d tensor of shape {shape}")
        return dd

    for op in rule.ops:
        if flat is not None and not isinstance(op, (Replicate, Average)):
            raise PlanError(f"{type(op).__name__.lower()} after flat: flat must be the last "
                            "tensor op (only replicate/average may follow it)")
        if isinstance(op, Shard):
            d = dim_of(op.dim, op)
            k, r = _coord(degrees, coords, op.axis)
            partitioned.add(op.axis)
            st = dims[d]
            L = _len(st.segs)
            if st.groups > 1 and L > 0:
                G = st.groups
                glen = L // G
                if op.split == "sizes":
                    rows = split_sizes(L, k, "sizes", op.sizes)
                    if any(s % glen for s in rows):
                        raise PlanError(f"shard sizes {tuple(rows)} on dim {d} must be whole "
                                        f"interleave groups of {glen}")
                    a = sum(rows[:r])
                    b = a + rows[r]
                else:
                    if G % k:
                        raise PlanError(f"shard over {op.axis}={k}: {G} interleave groups on dim "
                                        f"{d} are not divisible by the degree")
                    per = G // k
                    a, b = r * per * glen, (r + 1) * per * glen
                st.segs = _slice(st.segs, a, b)
                st.groups = max(1, (b - a) // glen) if glen else 1
            elif st.parts is not None:
                new, lens, pos = [], [], 0
                for n in st.parts:
                    try:
                        a, b = split_range(n, k, r, op.split, op.sizes)
                    except PlanError as e:
                        raise PlanError(f"shard of a part of size {n} on dim {d}: {e}") from None
                    new += _slice(st.segs, pos + a, pos + b)
                    lens.append(b - a)
                    pos += n
                st.segs, st.parts = _norm(new), lens
            else:
                try:
                    a, b = split_range(L, k, r, op.split, op.sizes)
                except PlanError as e:
                    raise PlanError(f"shard of dim {d} (size {L}) over {op.axis}: {e}") from None
                st.segs = _slice(st.segs, a, b)
        elif isinstance(op, Pad):
            d = dim_of(op.dim, op)
            if op.multiple < 1:
                raise PlanError(f"pad multiple must be >= 1, got {op.multiple}")
            st = dims[d]
            if st.parts is not None or st.groups > 1:
                raise PlanError(f"pad of dim {d} after parts on the same dim is not supported")
            L = _len(st.segs)
            padded = -(-L // op.multiple) * op.multiple
            st.segs = _norm(st.segs + [(padded - L, None)])
        elif isinstance(op, Parts):
            d = dim_of(op.dim, op)
            st = dims[d]
            if st.parts is not None or st.groups > 1:
                raise PlanError(f"parts on dim {d} given twice")
            L = _len(st.segs)
            m = len(op.names)
            if m == 0:
                raise PlanError("parts needs at least one name")
            if op.sizes is None:
                if L % m:
                    raise PlanError(f"parts {op.names}: dim {d} of size {L} does not split into "
                                    f"{m} equal parts")
                sizes = [L // m] * m
            else:
                sizes = [int(s) for s in op.sizes]
                if len(sizes) != m:
                    raise PlanError(f"parts {op.names}: {len(sizes)} sizes for {m} names")
                if sum(sizes) != L or any(s < 0 for s in sizes):
                    raise PlanError(f"parts {op.names}: sizes {tuple(sizes)} do not add up to "
                                    f"dim {d} of size {L}")
            G = int(op.groups)
            if G < 1:
                raise PlanError(f"parts groups must be >= 1, got {G}")
            if G == 1:
                st.parts = sizes
            else:
                bad = [(nm, s) for nm, s in zip(op.names, sizes) if s % G]
                if bad:
                    raise PlanError(f"parts {op.names}: sizes {tuple(sizes)} are not divisible "
                                    f"by groups={G}")
                offs = [sum(sizes[:i]) for i in range(m)]
                new = []
                for g in range(G):
                    for off, s in zip(offs, sizes):
                        q = s // G
                        new += _slice(st.segs, off + g * q, off + (g + 1) * q)
                st.segs, st.groups = _norm(new), G
        elif isinstance(op, Flat):
            _coord(degrees, coords, op.axis)
            if op.align < 1 or op.param_align < 1:
                raise PlanError(f"flat align/param_align must be >= 1, got {op.align}/{op.param_align}")
            partitioned.add(op.axis)
            flat = op
        elif isinstance(op, Replicate):
            _coord(degrees, coords, op.axis)
            replicate.add(op.axis)
        elif isinstance(op, Average):
            _coord(degrees, coords, op.axis)
            average.add(op.axis)
        else:
            raise PlanError(f"unknown layout op {op!r}")

    clash = (replicate | average) & partitioned
    if clash:
        raise PlanError(f"axes {sorted(clash)} are both partitioned and replicated/averaged")
    if replicate & average:
        raise PlanError(f"axes {sorted(replicate & average)} are both replicated and averaged")
    axes = _all_axes(degrees, coords)
    for a in axes:
        _coord(degrees, coords, a)
    cs = tuple((a, int(coords.get(a, 0))) for a in axes)
    repl = tuple(a for a in axes if a not in partitioned and a not in average)
    avg = tuple(a for a in axes if a in average)
    replica = any(coords.get(a, 0) != 0 for a in repl + avg)
    weight = 1.0 / math.prod(_degree(degrees, a) for a in avg) if avg else 1.0

    local_shape = tuple(_len(st.segs) for st in dims)
    # pieces: product of the per-dim non-padding segments
    per_dim = []
    for st in dims:
        lst, pos = [], 0
        for n, u in st.segs:
            if u is not None:
                lst.append((pos, u, n))
            pos += n
        per_dim.append(lst)
    pieces = []
    for combo in itertools.product(*per_dim):
        dst = Box(tuple(c[0] for c in combo), tuple(c[0] + c[2] for c in combo))
        src = Box(tuple(c[1] for c in combo), tuple(c[1] + c[2] for c in combo))
        pieces.append(Piece(src, dst))
    return _Prepared(local_shape, pieces, flat, repl, avg, cs, replica, weight)


def _flatten(pieces: Sequence[Piece], shape: Shape, lo: int, hi: int, out_offset: int) -> list[Piece]:
    """Pieces of the flat window ``[lo, hi)`` of a local tensor of ``shape`` whose pre-flat
    pieces are ``pieces``; the window's element ``f`` lands at ``f + out_offset``."""
    out = []
    full = Box.full(shape)
    windows = flat_to_boxes(lo, hi, shape)
    for p in pieces:
        delta = tuple(s - d for s, d in zip(p.src.start, p.dst.start))
        for w in windows:
            x = w.intersect(p.dst)
            if x.empty:
                continue
            for run in contiguous_runs(x, full):
                f = ravel(run.start, shape) + out_offset
                out.append(Piece(run.translate(delta), Box((f,), (f + run.numel,))))
    out.sort(key=lambda q: q.dst.start)
    return out


def _flat_layout(numels: Sequence[int], flat: Flat, k: int) -> tuple[list[int], int]:
    """Offsets of the tensors in the flat buffer and the partition length."""
    offs, pos = [], 0
    pa = int(flat.param_align)
    for n in numels:
        pos = -(-pos // pa) * pa
        offs.append(pos)
        pos += n
    unit = int(flat.align) * k
    total = -(-pos // unit) * unit
    return offs, total // k


def _mk_fragment(name, local_name, prep: _Prepared, local_shape, pieces, rule, global_shape,
                 group=None) -> Fragment:
    return Fragment(name=name, local_name=local_name, coords=prep.coords,
                    local_shape=tuple(local_shape), pieces=tuple(pieces), replica=prep.replica,
                    weight=prep.weight, global_shape=tuple(int(s) for s in global_shape),
                    replicated=prep.replicated, averaged=prep.averaged, group=group,
                    origin=rule.origin)


def _ctx(name: str, rule: BoundRule, e: Exception) -> PlanError:
    where = f" (rule {rule.origin})" if rule.origin else ""
    return PlanError(f"{name}{where}: {e}")


# ==================================================================== public planning
def fragment(rule: BoundRule, global_shape: Sequence[int], degrees: Mapping[str, int],
             coords: Mapping[str, int], *, name: Optional[str] = None,
             local_name: Optional[str] = None) -> Fragment:
    """The fragment of a rule without a grouped ``Flat`` on the rank at ``coords``.

    ``name`` defaults to ``rule.pattern`` and ``local_name`` to ``name``.
    Renumber ops are not consulted (see :func:`owner` / :func:`rank_fragments`)."""
    name = rule.pattern if name is None else name
    local_name = name if local_name is None else local_name
    try:
        prep = _prepare(rule, global_shape, degrees, coords)
        if prep.flat is None:
            return _mk_fragment(name, local_name, prep, prep.local_shape, prep.pieces, rule,
                                global_shape)
        if prep.flat.group is not None:
            raise PlanError(f"flat group {prep.flat.group!r}: use rank_fragments for grouped flat")
        return _flat_single(name, local_name, prep, rule, global_shape, degrees, coords)
    except PlanError as e:
        raise _ctx(name, rule, e) from None


def _flat_single(name, local_name, prep, rule, global_shape, degrees, coords) -> Fragment:
    k, r = _coord(degrees, coords, prep.flat.axis)
    n = math.prod(prep.local_shape)
    _, part = _flat_layout([n], prep.flat, k)
    lo, hi = r * part, (r + 1) * part
    pieces = _flatten(prep.pieces, prep.local_shape, lo, min(hi, n), -lo)
    return _mk_fragment(name, local_name, prep, (part,), pieces, rule, global_shape)


def owner(renumber: Renumber, index: int, degrees: Union[Mapping[str, int], int, None] = None
          ) -> tuple[int, int]:
    """``(rank, local_index)`` along ``renumber.axis`` of global item ``index``.

    ``degrees`` is the degrees mapping or the axis degree itself; it may be omitted when
    ``renumber.sizes`` gives the split."""
    if isinstance(degrees, int):
        k = degrees
    elif degrees is None:
        if renumber.sizes is None:
            raise PlanError(f"renumber of {{{renumber.capture}}} over {renumber.axis}: degree unknown")
        k = len(renumber.sizes)
    else:
        k = _degree(degrees, renumber.axis)
    index = int(index)
    if not 0 <= index < renumber.count:
        raise PlanError(f"{{{renumber.capture}}} = {index} out of range 0..{renumber.count - 1}")
    sizes = split_sizes(renumber.count, k, renumber.split, renumber.sizes)
    start = 0
    for rank, s in enumerate(sizes):
        if index < start + s:
            return rank, index - start
        start += s
    raise PlanError(f"{{{renumber.capture}}} = {index} has no owner")  # pragma: no cover


_CAPTURE = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def match_captures(pattern: str, name: str) -> Optional[dict[str, str]]:
    """Captures of ``name`` against a ``{capture}`` pattern (each capture one name segment,
    without dots), or None when it does not match. A fallback: the language resolves names."""
    rx, pos = "", 0
    for m in _CAPTURE.finditer(pattern):
        rx += re.escape(pattern[pos:m.start()]) + f"(?P<{m.group(1)}>[^.]+)"
        pos = m.end()
    rx += re.escape(pattern[pos:])
    m = re.fullmatch(rx, name)
    return m.groupdict() if m else None


def substitute(pattern: str, captures: Mapping[str, object]) -> str:
    def rep(m):
        if m.group(1) not in captures:
            raise PlanError(f"local name {pattern!r}: capture {{{m.group(1)}}} has no value")
        return str(captures[m.group(1)])
    return _CAPTURE.sub(rep, pattern)


def _placed_here(rule: BoundRule, degrees: Mapping[str, int], coords: Mapping[str, int]) -> bool:
    """``first(axis)`` / ``last(axis)`` attributes pin a tensor to one end of an axis
    (Megatron's embedding on the first pipeline stage, the output layer on the last)."""
    for key, axis in rule.attrs:
        if key == "first" and int(coords.get(axis, 0)) != 0:
            return False
        if key == "last" and int(coords.get(axis, 0)) != int(degrees.get(axis, 1)) - 1:
            return False
    return True


def rank_fragments(rules: Mapping[str, BoundRule], shapes: Mapping[str, Sequence[int]],
                   degrees: Mapping[str, int], coords: Mapping[str, int], *,
                   local_name: Optional[Callable[[str, Mapping[str, int]], str]] = None,
                   captures: Union[Callable[[str], Mapping[str, object]],
                                   Mapping[str, Mapping[str, object]], None] = None
                   ) -> list[Fragment]:
    """Every fragment the rank at ``coords`` holds, in parameter order (``shapes`` order,
    which is also the concatenation order of flat groups).

    ``rules[name]`` is the bound rule of each parameter. Parameters a ``Renumber`` places on
    another rank are skipped; their capture values come from ``captures(name)`` (or a
    mapping; default: matching ``rule.pattern``). ``local_name(name, coords)`` names the
    local tensor (default: ``rule.local`` with captures substituted, renumbered captures by
    their local index; identity when the rule has no local pattern). Grouped-flat fragments
    are named by their group key instead.
    """
    if captures is None:
        cap_of = None
    elif callable(captures):
        cap_of = captures
    else:
        cap_of = lambda n: captures[n]  # noqa: E731

    slots: list[Optional[Fragment]] = []
    groups: dict[str, list[tuple[int, str, BoundRule, _Prepared, Shape]]] = {}
    for name, shape in shapes.items():
        if name not in rules:
            raise PlanError(f"{name}: no rule given for this parameter")
        rule = rules[name]
        try:
            caps = None
            if rule.renumber or local_name is None:
                caps = cap_of(name) if cap_of is not None else match_captures(rule.pattern, name)
                caps = dict(caps) if caps else {}
            here = True
            local_caps = dict(caps or {})
            for rn in rule.renumber:
                if rn.capture not in caps:
                    raise PlanError(f"renumber of {{{rn.capture}}}: the name has no such capture")
                try:
                    idx = int(caps[rn.capture])
                except (TypeError, ValueError):
                    raise PlanError(f"renumber of {{{rn.capture}}}: {caps[rn.capture]!r} is not an "
                                    "integer") from None
                rank, li = owner(rn, idx, degrees)
                local_caps[rn.capture] = li
                if int(coords.get(rn.axis, 0)) != rank:
                    here = False
            if here and not _placed_here(rule, degrees, coords):
                here = False
            if not here:
                continue
            if local_name is not None:
                ln = local_name(name, coords)
            elif rule.local:
                ln = substitute(rule.local, local_caps)
            else:
                ln = name
            prep = _prepare(rule, shape, degrees, coords)
            if prep.flat is None:
                slots.append(_mk_fragment(name, ln, prep, prep.local_shape, prep.pieces, rule, shape))
            elif prep.flat.group is None:
                slots.append(_flat_single(name, ln, prep, rule, shape, degrees, coords))
            else:
                groups.setdefault(prep.flat.group, []).append((len(slots), name, rule, prep, tuple(shape)))
                slots.append(None)
        except PlanError as e:
            raise _ctx(name, rule, e) from None

    for key, members in groups.items():
        f0 = members[0][3].flat
        for _, nm, rule, prep, _ in members[1:]:
            f = prep.flat
            if (f.axis, f.align, f.param_align) != (f0.axis, f0.align, f0.param_align):
                raise PlanError(f"flat group {key!r}: {nm} has flat(over={f.axis}, align={f.align}, "
                                f"param_align={f.param_align}) but {members[0][1]} has "
                                f"flat(over={f0.axis}, align={f0.align}, param_align={f0.param_align})")
        k, r = _coord(degrees, coords, f0.axis)
        numels = [math.prod(m[3].local_shape) for m in members]
        offs, part = _flat_layout(numels, f0, k)
        lo, hi = r * part, (r + 1) * part
        for (slot, nm, rule, prep, shape), off, n in zip(members, offs, numels):
            a, b = max(lo, off), min(hi, off + n)
            pieces = _flatten(prep.pieces, prep.local_shape, a - off, b - off, off - lo) if a < b else []
            slots[slot] = _mk_fragment(nm, key, prep, (part,), pieces, rule, shape, group=key)
    return [f for f in slots if f is not None]


def mesh_coords(degrees: Mapping[str, int]) -> list[dict[str, int]]:
    """Every rank of a mesh as a coordinate dict, row-major in the order of ``degrees``."""
    axes = list(degrees)
    return [dict(zip(axes, c)) for c in itertools.product(*(range(int(degrees[a])) for a in axes))]


def layout_fragments(rules, shapes, degrees, **kwargs) -> dict[str, list[Fragment]]:
    """Fragments of every rank of the mesh, grouped by parameter name (rank order)."""
    out: dict[str, list[Fragment]] = {n: [] for n in shapes}
    for c in mesh_coords(degrees):
        for f in rank_fragments(rules, shapes, degrees, c, **kwargs):
            out[f.name].append(f)
    return out


# ==================================================================== replicas
def dedupe(fragments: Sequence[Fragment]) -> list[list[tuple[Fragment, float]]]:
    """Fragments to read on import, as groups of ``(fragment, weight)``.

    For every distinct partition (name and partitioning coordinates) one group: a single
    ``(fragment, 1.0)`` — the replica with the lowest replicated coordinates, normally 0 —
    or, with Average axes, one fragment per averaged coordinate, each with weight ``1/n``
    (``n`` present), whose weighted sum is the universal value. Groups come in order of
    first appearance; every fragment of a group has the same pieces. The fragments are the
    objects given (not copies), so callers may key on ``id``.
    """
    order: list[tuple] = []
    by_key: dict[tuple, dict[tuple, Fragment]] = {}
    for f in fragments:
        key = f.partition_key
        if key not in by_key:
            by_key[key] = {}
            order.append(key)
        cd = dict(f.coords)
        sub = tuple(cd.get(a, 0) for a in f.averaged)
        rank_key = tuple(cd.get(a, 0) for a in f.replicated)
        cur = by_key[key].get(sub)
        if cur is None or rank_key < tuple(dict(cur.coords).get(a, 0) for a in cur.replicated):
            by_key[key][sub] = f
    out = []
    for key in order:
        reps = [by_key[key][s] for s in sorted(by_key[key])]
        w = 1.0 / len(reps)
        out.append([(f, w) for f in reps])
    return out


def representatives(fragments: Sequence[Fragment]) -> list[Fragment]:
    """One fragment per distinct partition (the first of each :func:`dedupe` group)."""
    return [g[0][0] for g in dedupe(fragments)]


# ==================================================================== coverage
def _check_pieces(name: str, f: Fragment, full: Box):
    lb = Box.full(f.local_shape)
    for p in f.pieces:
        if not full.contains(p.src) or p.src.ndim != full.ndim:
            raise CoverageError(f"{name}: fragment {f.describe()} holds universal region {p.src} "
                                f"outside the tensor of shape {full.shape}", name=name)
        if not lb.contains(p.dst) or p.dst.ndim != lb.ndim:
            raise CoverageError(f"{name}: fragment {f.describe()} maps to local region {p.dst} "
                                f"outside its local tensor of shape {f.local_shape}", name=name)


def _find_overlap(items: list[tuple[Box, int]]) -> Optional[tuple[Box, int, int]]:
    """First overlap among boxes (with owner ids), by a sweep over the most spread dim."""
    live = [(b, o) for b, o in items if not b.empty]
    if len(live) < 2:
        return None
    nd = live[0][0].ndim
    if nd == 0:
        return live[0][0], live[0][1], live[1][1]
    d = max(range(nd), key=lambda i: len({b.start[i] for b, _ in live}))
    live.sort(key=lambda t: t[0].start[d])
    active: list[tuple[Box, int]] = []
    for b, o in live:
        active = [(a, oa) for a, oa in active if a.stop[d] > b.start[d]]
        for a, oa in active:
            x = a.intersect(b)
            if not x.empty:
                return x, oa, o
        active.append((b, o))
    return None


def _holes(full: Box, boxes: Iterable[Box]) -> list[Box]:
    holes = [full] if not full.empty else []
    for b in boxes:
        if b.empty:
            continue
        nxt = []
        for h in holes:
            nxt += h.subtract(b)
        holes = nxt
        if not holes:
            break
    return _merge_boxes(holes)


def _merge_boxes(boxes: list[Box]) -> list[Box]:
    """Greedily merge boxes that are adjacent along one dim and equal on the others."""
    boxes = list(boxes)
    changed = True
    while changed and len(boxes) > 1:
        changed = False
        boxes.sort(key=lambda b: b.start)
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                diff = [d for d in range(a.ndim) if (a.start[d], a.stop[d]) != (b.start[d], b.stop[d])]
                if len(diff) == 1:
                    d = diff[0]
                    if a.stop[d] == b.start[d] or b.stop[d] == a.start[d]:
                        st = list(a.start)
                        sp = list(a.stop)
                        st[d], sp[d] = min(a.start[d], b.start[d]), max(a.stop[d], b.stop[d])
                        boxes[i] = Box(tuple(st), tuple(sp))
                        del boxes[j]
                        changed = True
                        break
            if changed:
                break
    return sorted(boxes, key=lambda b: b.start)


def check_coverage(name: str, global_shape: Sequence[int], fragments: Sequence[Fragment]) -> None:
    """Raise :class:`CoverageError` unless the non-replica fragments of ``name`` tile the
    universal tensor exactly: no hole, no element held by two fragments that are not
    replicas of each other. Replicas (Replicate / Average / unmentioned axes) are recognised
    through :func:`dedupe`."""
    global_shape = tuple(int(s) for s in global_shape)
    full = Box.full(global_shape)
    others = sorted({f.name for f in fragments if f.name != name})
    if others:
        raise CoverageError(f"{name}: fragments of other parameters given ({', '.join(others[:3])})",
                            name=name)
    reps = representatives(fragments)
    items = []
    for i, f in enumerate(reps):
        _check_pieces(name, f, full)
        items += [(p.src, i) for p in f.pieces]
    ov = _find_overlap(items)
    if ov is not None:
        x, a, b = ov
        who = (f"fragment {reps[a].describe()}" if a == b else
               f"fragments {reps[a].describe()} and {reps[b].describe()}")
        raise CoverageError(f"{name}: universal region {x} is covered by {who}, which are not "
                            "replicas of each other", name=name, overlaps=[x])
    covered = sum(b.numel for b, _ in items)
    if covered != full.numel:
        holes = _holes(full, [b for b, _ in items])
        raise CoverageError(f"{name}: universal region {fmt_boxes(holes)} of the tensor of shape "
                            f"{global_shape} is not covered by any fragment "
                            f"({full.numel - covered} of {full.numel} elements missing)",
                            name=name, holes=holes)


# ==================================================================== tensors (torch, no I/O)
def _view(t, box: Box):
    return t[box.slices()] if box.ndim else t


def split(tensor, fragment: Fragment):
    """The local tensor of ``fragment`` cut from the universal ``tensor`` (padding zeros)."""
    import torch

    if fragment.global_shape and tuple(tensor.shape) != tuple(fragment.global_shape):
        raise PlanError(f"{fragment.name}: tensor of shape {tuple(tensor.shape)} given, the fragment "
                        f"is of a tensor of shape {fragment.global_shape}")
    out = torch.zeros(fragment.local_shape, dtype=tensor.dtype, device=tensor.device)
    for p in fragment.pieces:
        v = _view(out, p.dst)
        v.copy_(_view(tensor, p.src).reshape(v.shape))
    return out


def split_group(tensors: Mapping[str, object], fragments: Sequence[Fragment]):
    """The shared local buffer of a grouped flat: every fragment (one per parameter of the
    group on this rank) copies its pieces of ``tensors[fragment.name]`` into it."""
    import torch

    if not fragments:
        raise PlanError("split_group: no fragments")
    f0 = fragments[0]
    for f in fragments:
        if (f.local_name, f.local_shape) != (f0.local_name, f0.local_shape):
            raise PlanError(f"split_group: {f.name} is in buffer {f.local_name}{f.local_shape}, "
                            f"{f0.name} in {f0.local_name}{f0.local_shape}")
    t0 = tensors[f0.name]
    out = torch.zeros(f0.local_shape, dtype=t0.dtype, device=t0.device)
    for f in fragments:
        t = tensors[f.name]
        for p in f.pieces:
            v = _view(out, p.dst)
            v.copy_(_view(t, p.src).reshape(v.shape))
    return out


def assemble(global_shape: Sequence[int], dtype, items: Sequence[tuple[Fragment, object]], *,
             check: bool = True):
    """The universal tensor from ``(fragment, local_tensor)`` pairs (for grouped flat the local
    tensor is the group buffer). Replicas are skipped; Average replicas are averaged (in
    float64, then cast). ``check`` runs :func:`check_coverage` first."""
    import torch

    global_shape = tuple(int(s) for s in global_shape)
    frs = [f for f, _ in items]
    if check:
        if not frs:
            if math.prod(global_shape):
                raise CoverageError(f"assemble: no fragments for a tensor of shape {global_shape}")
        else:
            check_coverage(frs[0].name, global_shape, frs)
    local_of = {id(f): t for f, t in items}
    out = torch.zeros(global_shape, dtype=dtype)
    for grp in dedupe(frs):
        f0 = grp[0][0]
        if len(grp) == 1:
            t = local_of[id(f0)]
            _check_local(f0, t)
            for p in f0.pieces:
                v = _view(out, p.src)
                v.copy_(_view(t, p.dst).reshape(v.shape))
            continue
        # averaged replicas: the same pieces on every member
        members = []
        for f, w in grp:
            t = local_of[id(f)]
            _check_local(f, t)
            members.append((f, t, w))
        for i, p in enumerate(f0.pieces):
            o = _view(out, p.src)
            avg = average_replicas((_view(t, f.pieces[i].dst) for f, t, _ in members),
                                   (w for _, _, w in members), dtype)
            o.copy_(avg.reshape(o.shape))
    return out


def _check_local(f: Fragment, t) -> None:
    if tuple(t.shape) != tuple(f.local_shape):
        raise PlanError(f"{f.name}: local tensor {f.local_name} has shape {tuple(t.shape)}, the "
                        f"fragment expects {f.local_shape}")


# ==================================================================== resharding reads
def _dst_of(piece: Piece, sub: Box) -> Box:
    """Local box of ``sub`` (inside ``piece.src``; contiguous in it for flat pieces)."""
    if piece.is_box:
        return sub.translate(tuple(d - s for d, s in zip(piece.dst.start, piece.src.start)))
    if piece.dst.ndim != 1:
        raise PlanError(f"piece {piece.src} -> {piece.dst}: neither a box copy nor a flat range")
    f = piece.dst.start[0] + flat_offset_in(sub.start, piece.src)
    return Box((f,), (f + sub.numel,))


def _runs(piece: Piece, sub: Box) -> list[Box]:
    return [sub] if piece.is_box else contiguous_runs(sub, piece.src)


class _PieceIndex:
    """Pieces sorted by their universal start on dim 0; a query scans only the pieces whose
    dim-0 range can meet the box (starts in ``[box.start - longest, box.stop)``)."""

    def __init__(self, items):
        import bisect
        self._bisect = bisect
        self.items = sorted(items, key=lambda t: t[2].src.start[:1])
        self.starts = [t[2].src.start[0] if t[2].src.ndim else 0 for t in self.items]
        self.longest = max((t[2].src.shape[0] if t[2].src.ndim else 1 for t in self.items), default=0)

    def query(self, box: Box):
        if not self.items:
            return
        if box.ndim == 0:
            yield from self.items
            return
        lo = self._bisect.bisect_left(self.starts, box.start[0] - self.longest + 1)
        hi = self._bisect.bisect_left(self.starts, box.stop[0])
        for t in self.items[lo:hi]:
            if t[2].src.stop[0] > box.start[0]:
                yield t


def plan_reads(saved: Sequence[Fragment], want: Fragment) -> list[Read]:
    """The copies that fill ``want``'s local tensor from saved local tensors.

    Intersections are taken in universal space; every universal element is read from one
    saved fragment (replicas skipped), or from every Average replica with its weight.
    ``saved`` may hold fragments of other parameters (ignored); ``saved_index`` indexes it.
    Raises :class:`CoverageError` when the saved fragments do not hold all ``want`` needs."""
    idx = {id(f): i for i, f in enumerate(saved)}
    mine = [f for f in saved if f.name == want.name]
    groups = dedupe(mine)
    reads: list[Read] = []
    covered = 0
    index = _PieceIndex([(gi, si, sp) for gi, grp in enumerate(groups)
                         for si, sp in enumerate(grp[0][0].pieces)])
    members_of = [[(idx[id(f)], f, w) for f, w in grp] for grp in groups]
    for wp in want.pieces:
        for gi, si, sp in index.query(wp.src):
            members = members_of[gi]
            x = wp.src.intersect(sp.src)
            if x.empty:
                continue
            covered += x.numel
            for xi in _runs(wp, x):
                for xij in _runs(sp, xi):
                    wd = _dst_of(wp, xij)
                    for sidx, f, w in members:
                        reads.append(Read(sidx, _dst_of(f.pieces[si], xij), wd, xij, w))
    need = want.numel
    if covered != need:
        if covered > need:
            raise CoverageError(f"{want.name}: saved fragments overlap inside the region wanted by "
                                f"{want.describe()} (not replicas of each other)", name=want.name)
        have = [sp.src for grp in groups for sp in grp[0][0].pieces]
        holes = []
        for wp in want.pieces:
            holes += _holes(wp.src, [h.intersect(wp.src) for h in have])
        raise CoverageError(f"{want.name}: universal region {fmt_boxes(holes)} wanted by "
                            f"{want.describe()} is in no saved fragment", name=want.name, holes=holes)
    return reads


def plan_universal_reads(want: Fragment) -> list[Read]:
    """Reads from the universal tensor itself: one per piece (``saved_index == -1``)."""
    return [Read(-1, p.src, p.dst, p.src) for p in want.pieces]


def apply_reads(reads: Sequence[Read], want: Fragment, saved_locals: Sequence[object] = (),
                universal=None, dtype=None):
    """Execute reads in memory: the local tensor of ``want`` (tests and small tools; the
    engine streams the same plan). ``universal`` serves reads with ``saved_index == -1``."""
    import torch

    def src_t(i):
        return universal if i == -1 else saved_locals[i]

    if dtype is None:
        dtype = src_t(reads[0].saved_index).dtype if reads else torch.float32
    out = torch.zeros(want.local_shape, dtype=dtype)
    acc = None
    for r in reads:
        v = _view(src_t(r.saved_index), r.saved_dst)
        o = _view(out, r.want_dst)
        if r.weight == 1.0:
            o.copy_(v.reshape(o.shape))
        else:
            if acc is None:
                acc = torch.zeros(want.local_shape, dtype=torch.float64)
            _view(acc, r.want_dst).add_(v.reshape(o.shape).to(torch.float64) * r.weight)
    if acc is not None:
        mask = torch.zeros(want.local_shape, dtype=torch.bool)
        for r in reads:
            if r.weight != 1.0:
                _view(mask, r.want_dst).fill_(True)
        out[mask] = cast_average(acc[mask], dtype)
    return out


def read_cost(boxes: Iterable[Box], chunk_shape: Sequence[int], array_shape: Sequence[int],
              itemsize: int) -> tuple[int, int]:
    """``(needed_bytes, chunk_bytes_read)``: the bytes of ``boxes`` and the bytes of the
    distinct chunks of a regular grid they touch (edge chunks clipped to the array)."""
    boxes = list(boxes)
    needed = sum(b.numel for b in boxes) * itemsize
    seen: dict[tuple, int] = {}
    for b in boxes:
        for ci, cb, _ in chunks_intersecting(b, chunk_shape, array_shape):
            seen[ci] = cb.numel
    return needed, sum(seen.values()) * itemsize
