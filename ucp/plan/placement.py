"""Placement: which rank holds a renumbered item (a layer, an expert) and under which local
index, and which ranks a ``first(axis)`` / ``last(axis)`` attribute admits.

THE one home of this rule: the language (``BoundSpec.local_name`` / ``global_name`` /
``holds`` / ``placement``) and the planner (``rank_fragments``) both call these functions, so
names and tensors can never disagree on where an item lives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from ucp.plan.boxes import split_sizes
from ucp.plan.errors import PlanError
from ucp.plan.ops import BoundRule, Renumber


@dataclass(frozen=True)
class Location:
    """Where global item ``index`` of a ``Renumber`` lives: ``rank`` along its axis, model
    ``chunk`` (virtual pipeline stage; 0 without ``chunks``) and ``local`` index there."""
    rank: int
    chunk: int
    local: int


def chunk_sizes(r: Renumber, degree: int) -> list[int]:
    """Items per chunk, chunk ``c`` on rank ``c % degree`` as its model chunk ``c // degree``
    (one chunk per rank without virtual stages)."""
    return split_sizes(r.count, int(degree) * max(1, r.chunks), r.split, r.sizes)


def locate(r: Renumber, index: int, degree: int) -> Location:
    """The location of global item ``index``; ``PlanError`` outside ``0 .. count - 1``."""
    index = int(index)
    if not 0 <= index < r.count:
        raise PlanError(f"{{{r.capture}}} = {index} is outside {r.axis} renumbering "
                        f"(count={r.count}): expected 0 <= {r.capture} < {r.count}")
    start = 0
    for c, size in enumerate(chunk_sizes(r, degree)):
        if index < start + size:
            return Location(c % degree, c // degree, index - start)
        start += size
    raise PlanError(f"{{{r.capture}}} = {index} has no owner")  # pragma: no cover


def global_index(r: Renumber, degree: int, rank: int, chunk: int, local: int) -> Optional[int]:
    """Inverse of :func:`locate`: the global index, or None when that rank and model chunk
    hold fewer items."""
    sizes = chunk_sizes(r, degree)
    c = int(chunk) * degree + int(rank)
    if not 0 <= c < len(sizes) or not 0 <= int(local) < sizes[c]:
        return None
    return sum(sizes[:c]) + int(local)


def axis_rank(degrees: Mapping[str, int], coords: Mapping[str, int], axis: str) -> tuple[int, int]:
    """``(degree, coordinate)`` of ``axis``; a coordinate outside the degree is an error."""
    k = int(degrees.get(axis, 1))
    rank = int(coords.get(axis, 0)) if coords else 0
    if k < 1:
        raise PlanError(f"degree of {axis!r} must be >= 1, got {k}")
    if not 0 <= rank < k:
        raise PlanError(f"coordinate {axis}={rank} out of range for degree {axis}={k}")
    return k, rank


def ends_admit(rule: BoundRule, degrees: Mapping[str, int], coords: Mapping[str, int]) -> bool:
    """Whether ``first(axis)`` / ``last(axis)`` attributes admit the rank at ``coords``. Several
    such attributes on one axis are alternatives: ``first(pp), last(pp)`` is held on both
    ends (Megatron's word embeddings with tied output on the last stage)."""
    allowed: dict[str, set[int]] = {}
    for key, axis in rule.attrs:
        if key in ("first", "last"):
            k = int(degrees.get(axis, 1))
            allowed.setdefault(axis, set()).add(0 if key == "first" else k - 1)
    return all(axis_rank(degrees, coords, a)[1] in ranks for a, ranks in allowed.items())


def place(rule: BoundRule, captures: Mapping[str, object], degrees: Mapping[str, int],
          coords: Mapping[str, int]) -> Optional[dict[str, str]]:
    """The local captures of a universal name on the rank at ``coords`` (renumbered captures
    by their local index, a ``chunk`` capture by the model chunk), or None when the rank does
    not hold it (another stage or expert rank, or excluded by ``first`` / ``last``)."""
    if not ends_admit(rule, degrees, coords):
        return None
    local = {k: str(v) for k, v in captures.items()}
    for r in rule.renumber:
        if r.capture not in captures:
            raise PlanError(f"renumber of {{{r.capture}}}: the name has no such capture")
        try:
            index = int(captures[r.capture])
        except (TypeError, ValueError):
            raise PlanError(f"renumber of {{{r.capture}}}: {captures[r.capture]!r} is not an "
                            f"integer") from None
        k, rank = axis_rank(degrees, coords, r.axis)
        loc = locate(r, index, k)
        if loc.rank != rank:
            return None
        local[r.capture] = str(loc.local)
        if r.chunk:
            local[r.chunk] = str(loc.chunk)
    return local


def unplace(rule: BoundRule, local: Mapping[str, str], degrees: Mapping[str, int],
            coords: Mapping[str, int]) -> Optional[dict[str, str]]:
    """Inverse of :func:`place`: universal captures from the captures of a local name on the
    rank at ``coords``, or None when no item of that rank has this local name."""
    if not ends_admit(rule, degrees, coords):
        return None
    out = dict(local)
    for r in rule.renumber:
        k, rank = axis_rank(degrees, coords, r.axis)
        chunk = int(local[r.chunk]) if r.chunk else 0
        g = global_index(r, k, rank, chunk, int(local[r.capture]))
        if g is None:
            return None
        out[r.capture] = str(g)
        if r.chunk:
            del out[r.chunk]
    return out


def placement(rule: BoundRule, captures: Mapping[str, object], degrees: Mapping[str, int]
              ) -> dict[str, int]:
    """``{axis: rank}`` along every renumbering axis, for the item the captures name."""
    return {r.axis: locate(r, int(captures[r.capture]), int(degrees.get(r.axis, 1))).rank
            for r in rule.renumber}
