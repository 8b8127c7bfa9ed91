"""Flat layouts: where each member of a ``Flat`` lies in the flat buffers the ranks hold.

Pure integer arithmetic over the members' (pre-flat) local sizes, then the pieces of each
member's window. Three layouts, one per ``Flat`` form (``ucp.plan.ops.Flat``):

* alone (``group is None``): the tensor padded to ``align * degree`` and split into
  ``degree`` equal partitions (ZeRO-3's ``ds_tensor``);
* ``partition="buffer"``: the members concatenated (in ``order``, each starting at a multiple
  of ``param_align``), optionally cut into buckets, each bucket padded to ``align * degree``
  and split into ``degree`` partitions (ZeRO-1/2, Megatron-Core's distributed optimizer);
* ``partition="each"``: every member partitioned on its own, rank r concatenating its
  partitions, optionally cut into sub-groups (ZeRO-3's fp32 partitions, ``sub_group_size``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ucp.plan.boxes import Box, contiguous_runs, flat_to_boxes, ravel
from ucp.plan.errors import PlanError
from ucp.plan.model import Piece
from ucp.plan.ops import Flat


@dataclass(frozen=True)
class Slot:
    """Where a member's flat window ``[lo, hi)`` (in its own flattened local tensor) lands:
    at ``offset`` of local tensor ``local_name``, which has ``length`` elements."""
    local_name: str
    length: int
    lo: int
    hi: int
    offset: int


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def member_order(count: int, flat: Flat, degree: int) -> list[int]:
    """Positions (in parameter order) of the members, in buffer order (``ops.ORDERS``)."""
    idx = list(range(count))
    if flat.order == "reverse":
        return idx[::-1]
    if flat.order == "round_robin":
        return [i for j in range(degree) for i in idx if i % degree == j]
    if flat.order != "model":
        raise PlanError(f"unknown flat order {flat.order!r}: expected model, reverse or round_robin")
    return idx


def _buckets(sizes: Sequence[int], flat: Flat) -> list[list[int]]:
    """Members (buffer positions) of each bucket: a bucket ends after the member that brings
    it to ``flat.bucket`` elements (one bucket when ``bucket == 0``)."""
    out, cur, total = [], [], 0
    for i, n in enumerate(sizes):
        cur.append(i)
        total += n
        if flat.bucket and total >= flat.bucket:
            out.append(cur)
            cur, total = [], 0
    if cur or not out:
        out.append(cur)
    return out


def _bucket_name(group: str, b: int, flat: Flat) -> str:
    return f"{group}.{b}" if flat.bucket else group


def _buffer_buckets(numels: Sequence[int], flat: Flat, degree: int, alone: Sequence[bool] = ()):
    """``(start, padded stop, unpadded stop, [(member, offset), ...])`` of every bucket of a
    ``buffer`` group, members in buffer order. A bucket ends after the member that brings it
    to ``flat.bucket`` elements counted from the bucket's start (alignment padding included,
    as Megatron-Core's ``_ParamAndGradBuffer`` counts) and is padded to ``align * degree``.
    A member with ``alone[i]`` (``with own_bucket``: Megatron's shared embedding) closes the
    bucket before it and its own bucket after it."""
    unit = int(flat.align) * degree
    out, members, pos, start = [], [], 0, 0
    for i in member_order(len(numels), flat, degree):
        pos = _round_up(pos, flat.param_align)
        own = bool(alone) and alone[i]
        if own and members:
            out.append((start, _round_up(pos, unit), pos, members))
            pos = start = _round_up(pos, unit)
            members = []
        members.append((i, pos))
        pos += numels[i]
        if own or (flat.bucket and pos - start >= flat.bucket):
            out.append((start, _round_up(pos, unit), pos, members))
            pos = start = _round_up(pos, unit)
            members = []
    if members or not out:
        out.append((start, _round_up(pos, unit), pos, members))
    return out


def buffer_slots(numels: Sequence[int], flat: Flat, degree: int, rank: int,
                 alone: Sequence[bool] = ()) -> list[Slot]:
    """``partition="buffer"``: the slot of every member (parameter order) on ``rank``."""
    slots: list = [None] * len(numels)
    buckets = _buffer_buckets(numels, flat, degree, alone)
    for b, (start, stop, unpadded, members) in enumerate(buckets):
        part = (stop - start) // degree
        lo, hi = start + rank * part, start + (rank + 1) * part
        length = max(0, min(hi, unpadded) - lo) if flat.strip else part
        name = f"{flat.group}.{b}" if flat.bucket or any(alone) else flat.group
        for i, off in members:
            a, z = max(lo, off), min(hi, off + numels[i])
            slots[i] = Slot(name, length, a - off, max(a, z) - off, a - lo)
    return slots


def each_slots(numels: Sequence[int], flat: Flat, degree: int, rank: int) -> list[Slot]:
    """``partition="each"``: the slot of every member (parameter order) on ``rank``."""
    order = member_order(len(numels), flat, degree)
    unit = int(flat.align) * degree
    parts = [_round_up(numels[i], unit) // degree for i in order]
    slots: list = [None] * len(numels)
    for b, members in enumerate(_buckets(parts, flat)):
        offs, pos = [], 0
        for j in members:
            pos = _round_up(pos, flat.param_align)
            offs.append(pos)
            pos += parts[j]
        name = _bucket_name(flat.group, b, flat)
        for j, off in zip(members, offs):
            i = order[j]
            a, z = rank * parts[j], min((rank + 1) * parts[j], numels[i])
            slots[i] = Slot(name, pos, a, max(a, z), off)
    return slots


def alone_slot(numel: int, flat: Flat, degree: int, rank: int) -> Slot:
    """A tensor partitioned on its own (``group is None``)."""
    part = _round_up(numel, int(flat.align) * degree) // degree
    lo = rank * part
    return Slot("", part, lo, max(lo, min(lo + part, numel)), 0)


def flatten(pieces: Sequence[Piece], shape: Sequence[int], slot: Slot) -> list[Piece]:
    """The pieces of the flat window ``[slot.lo, slot.hi)`` of a local tensor of ``shape``
    whose pre-flat pieces are ``pieces``; window element ``f`` lands at
    ``f - slot.lo + slot.offset``."""
    out = []
    if slot.hi <= slot.lo:
        return out
    shape = tuple(shape)
    full = Box.full(shape)
    windows = flat_to_boxes(slot.lo, slot.hi, shape)
    shift = slot.offset - slot.lo
    for p in pieces:
        delta = tuple(s - d for s, d in zip(p.src.start, p.dst.start))
        for w in windows:
            x = w.intersect(p.dst)
            if x.empty:
                continue
            for run in contiguous_runs(x, full):
                f = ravel(run.start, shape) + shift
                out.append(Piece(run.translate(delta), Box((f,), (f + run.numel,))))
    out.sort(key=lambda q: q.dst.start)
    return out


def group_slots(numels: Sequence[int], flat: Flat, degree: int, rank: int,
                alone: Sequence[bool] = ()) -> list[Slot]:
    """The slot of every member of a flat group (parameter order) on ``rank``; ``alone``:
    members in a bucket of their own (``partition="buffer"`` only)."""
    if flat.partition == "each":
        return each_slots(numels, flat, degree, rank)
    if flat.partition != "buffer":
        raise PlanError(f"unknown flat partition {flat.partition!r}: expected buffer or each")
    return buffer_slots(numels, flat, degree, rank, alone)
