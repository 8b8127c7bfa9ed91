"""Cross-framework renames for targets: a target tensor as slices of checkpoint tensors.

A ``rename "T" from "S" [part P]`` rule of a spec (``converters/megatron_to_hf_llama.ucp``)
says that target-framework tensor ``T`` is source tensor ``S``, or part ``P`` of its fused
(part-major) dimension. Read one way (Megatron checkpoint -> HF files) a target tensor is one
slice of one checkpoint tensor; read the other way (HF checkpoint -> Megatron files) a fused
target tensor is the concatenation of several checkpoint tensors. Both are a list of
:class:`Segment` s, and :func:`translate` rewrites fragments planned over target names into
fragments over checkpoint names, so the engine reads the right boxes without knowing that a
rename happened. Pure: no I/O, no framework names.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

from ucp.errors import UcpError
from ucp.plan import Box, Fragment, Piece


class RenameError(UcpError):
    """A rename spec does not map the checkpoint's parameters onto the target's."""


@dataclass(frozen=True)
class Segment:
    """``target[offset:offset+length]`` along ``dim`` is ``name[start:start+length]`` along
    ``dim``; ``dim is None``: the whole target tensor is the whole tensor ``name``."""
    name: str
    dim: Optional[int] = None
    offset: int = 0
    start: int = 0
    length: int = 0


def parts_dim(bound, name: str) -> Optional[int]:
    """The fused dimension of ``name`` under ``bound`` (the dim of its ``parts`` op)."""
    m = bound.match(name)
    for op in (m.rule.ops if m else ()):
        if type(op).__name__ == "Parts":
            return op.dim
    return None


def slice_of(bound, fused: str, part: Optional[str], shape: Sequence[int]) -> tuple[Optional[int], int, int]:
    """(dim, start, stop) of ``part`` in the fused tensor ``fused`` of ``shape``; (None, 0, 0)
    for a plain rename."""
    if part is None:
        return None, 0, 0
    dim = parts_dim(bound, fused)
    if dim is None:
        raise RenameError(f"{fused}: the rename names part {part!r} but its rule has no parts")
    d, a, b = bound.part_range(fused, part, shape[dim])
    return d, a, b


def split_views(bound, names: Sequence[str], shapes: Mapping[str, Sequence[int]]
                ) -> dict[str, tuple[tuple[int, ...], Segment]]:
    """Fused checkpoint tensors -> target tensors that are slices of them.

    ``{target name: (target shape, Segment over the checkpoint tensor)}`` in checkpoint
    order; every checkpoint name must be the source of some rename rule."""
    out: dict[str, tuple[tuple[int, ...], Segment]] = {}
    missing = []
    for n in names:
        targets = bound.spec.unrename_parts(n)
        if not targets:
            missing.append(n)
        for part, t in targets.items():
            dim, a, b = slice_of(bound, n, part, shapes[n])
            shape = tuple(shapes[n])
            if dim is not None:
                shape = shape[:dim] + (b - a,) + shape[dim + 1:]
            out[t] = (shape, Segment(n, dim, 0, a, b - a))
    if missing:
        raise RenameError(f"spec {bound.spec.name}: no rename rule maps {len(missing)} parameter(s) of the "
                          f"checkpoint: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    return out


def fused_views(bound, fused_names: Sequence[str], shapes: Mapping[str, Sequence[int]]
                ) -> dict[str, tuple[tuple[int, ...], list[Segment]]]:
    """Target fused tensors built from several checkpoint tensors (the inverse direction).

    ``fused_names`` are the target's universal names (e.g. Megatron names derived from the
    rename rules); ``shapes`` the checkpoint's. -> ``{target name: (shape, segments)}``."""
    out = {}
    for t in fused_names:
        parts = bound.spec.unrename_parts(t)
        if None in parts:
            src = parts[None]
            out[t] = (tuple(shapes[src]), [Segment(src)])
            continue
        dim = parts_dim(bound, t)
        if dim is None:
            raise RenameError(f"{t}: renamed from parts {sorted(parts)} but its rule has no parts")
        first = tuple(shapes[next(iter(parts.values()))])
        total = sum(int(shapes[s][dim]) for s in parts.values())
        shape = first[:dim] + (total,) + first[dim + 1:]
        segs = []
        for part, src in parts.items():
            _, a, b = bound.part_range(t, part, total)
            if b - a != shapes[src][dim]:
                raise RenameError(f"{t}: part {part} spans {b - a} along dim {dim}, but {src} has "
                                  f"shape {tuple(shapes[src])}")
            segs.append(Segment(src, dim, a, 0, b - a))
        out[t] = (shape, sorted(segs, key=lambda s: s.offset))
    return out


def translate(fragment: Fragment, segments: Sequence[Segment],
              shapes: Mapping[str, Sequence[int]]) -> list[Fragment]:
    """Fragments over checkpoint names holding what ``fragment`` (over a target name) holds.

    Only box pieces can be split along a fused dimension (flat pieces have no dimension
    left to cut); a whole-tensor rename keeps every piece as it is. ``shapes``: the
    checkpoint's shapes (the new fragments' ``global_shape``)."""
    out = []
    for seg in segments:
        if seg.dim is None:
            out.append(replace(fragment, name=seg.name, global_shape=tuple(shapes[seg.name])))
            continue
        pieces = []
        for pc in fragment.pieces:
            if not pc.is_box:
                raise RenameError(f"{fragment.name}: a flat fragment cannot be renamed part by part")
            d, lo, hi = seg.dim, seg.offset, seg.offset + seg.length
            a, b = max(pc.src.start[d], lo), min(pc.src.stop[d], hi)
            if a >= b:
                continue
            shift = seg.start - seg.offset
            src = Box(_put(pc.src.start, d, a + shift), _put(pc.src.stop, d, b + shift))
            da = pc.dst.start[d] + (a - pc.src.start[d])
            dst = Box(_put(pc.dst.start, d, da), _put(pc.dst.stop, d, da + (b - a)))
            pieces.append(Piece(src, dst))
        if pieces:
            out.append(replace(fragment, name=seg.name, pieces=tuple(pieces),
                               global_shape=tuple(shapes[seg.name])))
    return out


def _put(t: tuple, i: int, v: int) -> tuple:
    return t[:i] + (v,) + t[i + 1:]
