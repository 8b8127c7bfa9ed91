"""Boxes of torch.chunk / tensor_split splits and chunk grids aligned to them, for several writers
(each writer then writes whole chunks only, nothing is staged; spec/FORMAT.md §13)."""
from __future__ import annotations

import math

from ucp.errors import UcpError
from ucp.format import layout
from ucp.plan.grid import volume


def split_boxes(shape, k, dim=0, mode="chunk"):
    """The ``k`` boxes ``(start, stop)`` of ``torch.chunk`` (``mode="chunk"``: ceil(n/k) per piece,
    trailing pieces may be empty) or ``torch.tensor_split`` (``mode="tensor_split"``: the first n % k
    pieces one longer) of ``shape`` along ``dim``."""
    from ucp.plan.boxes import split_sizes  # the one rule for splits, shared with the planner

    shape = tuple(int(s) for s in shape)
    n, k = shape[dim], int(k)
    if mode not in ("chunk", "tensor_split"):
        raise UcpError(f"split_boxes: mode must be 'chunk' or 'tensor_split', got {mode!r}")
    cuts = [0]
    for size in split_sizes(n, k, mode):
        cuts.append(cuts[-1] + size)
    out = []
    for i in range(k):
        st = [0] * len(shape)
        sp = list(shape)
        st[dim], sp[dim] = cuts[i], cuts[i + 1]
        out.append((tuple(st), tuple(sp)))
    return out


def _closest_divisor(g, m):
    """The divisor of ``g`` closest to ``m`` on a log scale (ties: the smaller)."""
    divs = set()
    i = 1
    while i * i <= g:
        if g % i == 0:
            divs.update((i, g // i))
        i += 1
    return min(sorted(divs), key=lambda d: abs(math.log(d / max(m, 1))))


def aligned_chunks(shape, boxes, itemsize, target=None, min_bytes=64 << 10):
    """A plain chunk shape whose regular grid has every face of every box on a chunk boundary, so each
    writer of those boxes writes whole chunks only (nothing staged), or None where no such grid keeps
    chunks of at least ``min(min_bytes, the smallest box's bytes)``.

    Along each dim with box boundaries inside the array the chunk extent is the divisor of their gcd
    closest to the default extent for ``target`` bytes (default chunk size); the other dims then take
    the default layout of the array cut down to those extents. ``torch.chunk`` row splits (ceil(n/k) rows each) always have one; uneven
    ``torch.tensor_split`` splits usually do not. Pass the result as ``add_array(..., chunks=)``."""
    shape = tuple(int(s) for s in shape)
    default = layout.default_chunks(shape, itemsize, target)
    fixed = {}
    for d, n in enumerate(shape):
        bounds = {int(b[d]) for box in boxes for b in box if 0 < int(b[d]) < n}
        if bounds:
            fixed[d] = _closest_divisor(math.gcd(*bounds), default[d])
    # the other dims: the default layout of the array as cut down to the aligned extents
    sub = layout.default_chunks(tuple(fixed.get(d, n) for d, n in enumerate(shape)), itemsize, target)
    out = [fixed.get(d, sub[d]) for d in range(len(shape))]
    nonempty = [b for b in boxes if volume(b[0], b[1]) > 0]
    if not shape or not nonempty:
        return tuple(out)
    floor = min(int(min_bytes), min(volume(*b) for b in nonempty) * itemsize)
    if math.prod(out) * itemsize < floor:
        return None
    return tuple(out)
