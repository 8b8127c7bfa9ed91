"""Fragments: which part of a universal tensor one rank holds, and where in its local tensor.

Planning is pure: a ``BoundRule`` (``ucp.plan.ops``), the universal shape, the degrees and a
rank's coordinates give a :class:`Fragment`, a list of :class:`Piece` s mapping universal
boxes to local boxes. Everything else — splitting a tensor, assembling one, checking that a
set of fragments tiles a tensor, planning the copies that reshard one layout into another —
works on fragments only.

How the ops compose: ``ucp.plan.prepare`` applies the ops up to ``Flat`` (one function per
op); ``ucp.plan.flat`` lays flat partitions and groups out; ``ucp.plan.placement`` says which
rank holds a renumbered layer or expert and under which local index. This module puts them
together per rank (:func:`rank_fragments`), per state where a rule gives states their own
layouts, and holds the operations on fragments.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

from ucp.plan.boxes import Box, chunks_intersecting, contiguous_runs, flat_offset_in, fmt_boxes
from ucp.plan.errors import CoverageError, PlanError, PlanSpecError
from ucp.plan.flat import Slot, alone_slot, flatten, group_slots
from ucp.plan.model import Fragment, Piece, Read
from ucp.plan.ops import BoundRule, Flat, Renumber
from ucp.plan.placement import axis_rank, locate, place
from ucp.plan.prepare import Prepared, prepare
from ucp.plan.replicas import average_replicas, cast_average

Shape = tuple[int, ...]


# ==================================================================== public planning
def _ctx(name: str, rule: BoundRule, e: PlanError) -> PlanError:
    """``e`` with the parameter (and rule) named; located errors stay located."""
    if isinstance(e, PlanSpecError):
        return PlanSpecError(e.pos, f"{name}: {e.detail}")
    where = f" (rule {rule.origin})" if rule.origin else ""
    return PlanError(f"{name}{where}: {e}")


def _mk_fragment(name: str, local_name: str, prep: Prepared, rule: BoundRule, global_shape,
                 slot: Optional[Slot] = None, group: Optional[str] = None,
                 tied_from: Optional[str] = None) -> Fragment:
    """The fragment of a prepared rule: the pre-flat pieces, or those of a flat ``slot``."""
    if slot is None:
        shape, pieces = prep.local_shape, prep.pieces
    else:
        shape, pieces = (slot.length,), flatten(prep.pieces, prep.local_shape, slot)
    return Fragment(name=name, local_name=local_name, coords=prep.coords,
                    local_shape=tuple(shape), pieces=tuple(pieces), replica=prep.replica,
                    weight=prep.weight, global_shape=tuple(int(s) for s in global_shape),
                    replicated=prep.replicated, averaged=prep.averaged, group=group,
                    origin=rule.origin, tied_from=tied_from)


def _alone(prep: Prepared, degrees, coords) -> Slot:
    k, r = axis_rank(degrees, coords, prep.flat.axis)
    return alone_slot(math.prod(prep.local_shape), prep.flat, k, r)


def fragment(rule: BoundRule, global_shape: Sequence[int], degrees: Mapping[str, int],
             coords: Mapping[str, int], *, name: Optional[str] = None,
             local_name: Optional[str] = None, state: Optional[str] = None) -> Fragment:
    """The fragment of a rule without a grouped ``Flat`` on the rank at ``coords`` (the
    layout of ``state`` when the rule gives states their own).

    ``name`` defaults to ``rule.pattern`` and ``local_name`` to ``name``.
    Renumber ops are not consulted (see :func:`owner` / :func:`rank_fragments`)."""
    name = rule.pattern if name is None else name
    local_name = name if local_name is None else local_name
    try:
        prep = prepare(rule.for_state(state), global_shape, degrees, coords)
        if prep.flat is None:
            return _mk_fragment(name, local_name, prep, rule, global_shape)
        if prep.flat.group is not None:
            raise PlanError(f"flat group {prep.flat.group!r}: use rank_fragments for grouped flat")
        return _mk_fragment(name, local_name, prep, rule, global_shape, _alone(prep, degrees, coords))
    except PlanError as e:
        raise _ctx(name, rule, e) from None


def owner(renumber: Renumber, index: int, degrees: Union[Mapping[str, int], int, None] = None
          ) -> tuple[int, int]:
    """``(rank, local_index)`` along ``renumber.axis`` of global item ``index``
    (``ucp.plan.placement.locate`` has the model chunk too).

    ``degrees`` is the degrees mapping or the axis degree itself; it may be omitted when
    ``renumber.sizes`` gives the split."""
    if isinstance(degrees, int):
        k = degrees
    elif degrees is None:
        if renumber.sizes is None:
            raise PlanError(f"renumber of {{{renumber.capture}}} over {renumber.axis}: degree unknown")
        k = len(renumber.sizes) // max(1, renumber.chunks)
    else:
        k = axis_rank(degrees, {}, renumber.axis)[0]
    loc = locate(renumber, index, k)
    return loc.rank, loc.local


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
    """``pattern`` with every ``{capture}`` replaced by its value."""
    def rep(m):
        if m.group(1) not in captures:
            raise PlanError(f"local name {pattern!r}: capture {{{m.group(1)}}} has no value")
        return str(captures[m.group(1)])
    return _CAPTURE.sub(rep, pattern)


@dataclass
class _Member:
    """A parameter of a flat group on this rank, waiting for the group's layout."""
    slot: int
    name: str
    rule: BoundRule
    prep: Prepared
    shape: tuple


def _captures_of(captures) -> Optional[Callable[[str], Mapping[str, object]]]:
    if captures is None or callable(captures):
        return captures
    return lambda n: captures[n]


def _place_one(name: str, rule: BoundRule, degrees, coords, cap_of, local_name):
    """``(local name, local captures)`` of ``name`` on the rank at ``coords``, or None when
    it is not held there."""
    caps = cap_of(name) if cap_of is not None else match_captures(rule.pattern, name)
    try:
        local = place(rule, dict(caps or {}), degrees, coords)
    except PlanError as e:
        if rule.renumber_positions and not isinstance(e, PlanSpecError):
            raise PlanSpecError(rule.renumber_positions[0], str(e)) from None
        raise
    if local is None:
        return None
    if local_name is not None:
        return local_name(name, coords), local
    return (substitute(rule.local, local) if rule.local else name), local


def _grouped(rule: BoundRule, captures: Mapping[str, str]) -> BoundRule:
    """A flat group named after captures (``group="dense.{v}"``) with their local values."""
    ops = tuple(replace(op, group=substitute(op.group, captures))
                if isinstance(op, Flat) and op.group and "{" in op.group else op for op in rule.ops)
    return replace(rule, ops=ops) if ops != rule.ops else rule


def rank_fragments(rules: Mapping[str, BoundRule], shapes: Mapping[str, Sequence[int]],
                   degrees: Mapping[str, int], coords: Mapping[str, int], *,
                   local_name: Optional[Callable[[str, Mapping[str, int]], str]] = None,
                   captures: Union[Callable[[str], Mapping[str, object]],
                                   Mapping[str, Mapping[str, object]], None] = None,
                   state: Optional[str] = None, frozen: Iterable[str] = ()) -> list[Fragment]:
    """Every fragment the rank at ``coords`` holds of ``state`` (``None``: the rules' main
    pipelines), in parameter order (``shapes`` order, the order of flat groups' members).

    ``rules[name]`` is the bound rule of each parameter. Skipped parameters (``with skip``)
    have no fragments; frozen ones (``with frozen`` or listed in ``frozen``) are in no flat
    group; a tied parameter's fragments are copies named after the tensor it is tied to, and
    it has none under a flat layout. Parameters a ``Renumber`` (or ``first`` / ``last``)
    places on another rank are skipped; their capture values come from ``captures(name)``
    (or a mapping; default: matching ``rule.pattern``). ``local_name(name, coords)`` names
    the local tensor (default: ``rule.local`` with captures substituted, renumbered captures
    by their local index). Grouped-flat fragments are named by their group (bucket) key.
    """
    cap_of, frozen = _captures_of(captures), set(frozen)
    slots: list[Optional[Fragment]] = []
    groups: dict[str, list[_Member]] = {}
    for name, shape in shapes.items():
        if name not in rules:
            raise PlanError(f"{name}: no rule given for this parameter")
        rule = rules[name]
        try:
            made = _param_fragment(name, rule, tuple(shape), degrees, coords, cap_of, local_name,
                                   state, name in frozen)
        except PlanError as e:
            raise _ctx(name, rule, e) from None
        if isinstance(made, _Member):
            made.slot = len(slots)
            groups.setdefault(made.prep.flat.group, []).append(made)
            slots.append(None)
        elif made is not None:
            slots.append(made)
    for key, members in groups.items():
        for m, f in zip(members, _group_fragments(key, members, degrees, coords)):
            slots[m.slot] = f
    return [f for f in slots if f is not None]


def _param_fragment(name, rule, shape, degrees, coords, cap_of, local_name, state, frozen):
    """One parameter on one rank: a Fragment, a grouped-flat ``_Member``, or None."""
    if rule.skip:
        return None
    eff = rule.for_state(state, frozen=frozen)
    if rule.tied and any(isinstance(op, Flat) for op in eff.ops):
        return None
    tied = rule.tied or rule.copy_of
    placed = _place_one(name, rule, degrees, coords, cap_of, local_name)
    if placed is None:
        return None
    ln, local_caps = placed
    eff = _grouped(eff, local_caps)
    prep = prepare(eff, shape, degrees, coords)
    uname = tied or name
    if prep.flat is None:
        return _mk_fragment(uname, ln, prep, eff, shape, tied_from=name if tied else None)
    if prep.flat.group is None:
        return _mk_fragment(uname, ln, prep, eff, shape, _alone(prep, degrees, coords),
                            tied_from=name if tied else None)
    return _Member(-1, name, eff, prep, shape)


def _group_fragments(key: str, members: list[_Member], degrees, coords) -> list[Fragment]:
    """The fragments of one flat group's members on the rank at ``coords``."""
    f0 = members[0].prep.flat
    for m in members[1:]:
        f = m.prep.flat
        if f != f0:
            err = PlanError(f"flat group {key!r}: {m.name} has flat({_flat_args(f)}) but "
                            f"{members[0].name} has flat({_flat_args(f0)}): expected the same "
                            f"arguments for every member of a group")
            pos = _flat_pos(m.rule)
            raise (PlanSpecError(pos, str(err)) if pos is not None else err)
    k, r = axis_rank(degrees, coords, f0.axis)
    slots = group_slots([math.prod(m.prep.local_shape) for m in members], f0, k, r,
                        [bool(m.rule.attr("own_bucket")) for m in members])
    return [_mk_fragment(m.rule.copy_of or m.name, s.local_name, m.prep, m.rule, m.shape, s,
                         group=s.local_name, tied_from=m.name if m.rule.copy_of else None)
            for m, s in zip(members, slots)]


def _flat_args(f: Flat) -> str:
    return ", ".join(f"{k}={v}" for k, v in vars(f).items())


def _flat_pos(rule: BoundRule):
    for op, pos in zip(rule.ops, rule.positions):
        if isinstance(op, Flat):
            return pos
    return None


def state_fragments(rules: Mapping[str, BoundRule], shapes: Mapping[str, Sequence[int]],
                    degrees: Mapping[str, int], coords: Mapping[str, int],
                    states: Iterable[str], **kwargs) -> dict[str, list[Fragment]]:
    """``{state: rank_fragments(..., state=state)}`` for every state in ``states``."""
    return {st: rank_fragments(rules, shapes, degrees, coords, state=st, **kwargs) for st in states}


def mesh_coords(degrees: Mapping[str, int]) -> list[dict[str, int]]:
    """Every rank of a mesh as a coordinate dict, row-major in the order of ``degrees``."""
    axes = list(degrees)
    return [dict(zip(axes, c)) for c in itertools.product(*(range(int(degrees[a])) for a in axes))]


def layout_fragments(rules, shapes, degrees, **kwargs) -> dict[str, list[Fragment]]:
    """Fragments of every rank of the mesh, grouped by parameter name (rank order)."""
    out: dict[str, list[Fragment]] = {n: [] for n in shapes}
    for c in mesh_coords(degrees):
        for f in rank_fragments(rules, shapes, degrees, c, **kwargs):
            out.setdefault(f.name, []).append(f)
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


def pieces_within(piece: Piece, box: Box) -> list[Piece]:
    """The part of ``piece`` whose universal boxes lie in ``box``, as pieces (a flat piece's
    part cut into runs contiguous in its local range); none when they do not meet."""
    common = piece.src.intersect(box)
    if common.empty:
        return []
    return [Piece(run, _dst_of(piece, run)) for run in _runs(piece, common)]


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
