"""The coordinator's plan of a ``dcp.save`` into the universal form, pure over DCP's save plans:
which arrays are saved and by which ranks, the chunk grid of each (aligned with the ranks' boxes,
so that no chunk is shared and nothing is staged) and which rank writes each array's document."""
from __future__ import annotations

import math
from typing import Optional

from torch.distributed.checkpoint.planner import SavePlan

from ucp.dcp.keys import is_array, parse_in_form
from ucp.format import aligned_chunks, default_chunks, layout


def saved_arrays(plans: list[SavePlan], form: str = "get_state_dict") -> dict:
    """``(name, state) -> (shape, dtype, [(start, stop)] boxes of all ranks, [the plans (parts)
    that write a box of it]))`` of every array saved."""
    out: dict[tuple, tuple] = {}
    for i, p in enumerate(plans):
        for item in p.items:
            td = item.tensor_data
            k = parse_in_form(item.index.fqn, form)
            if td is None or not is_array(k, td.size):
                continue
            start = tuple(int(o) for o in td.chunk.offsets)
            box = (start, tuple(a + int(s) for a, s in zip(start, td.chunk.sizes)))
            _, _, boxes, parts = out.setdefault((k.name, k.state), (tuple(td.size), td.properties.dtype, [], []))
            boxes.append(box)
            if not writes_nothing(td):
                parts.append(i)
    return out


def doc_writers(arrays: dict, world: int) -> dict:
    """``(name, state) -> the part that writes the array's zarr.json``: one of the parts writing
    a box of it, the fewest documents each (under FSDP every rank writes a box of every array, and
    the rank holding every first chunk, the default writer, would write them all while the others
    wait). An array no part writes a box of is left to the coordinator."""
    load = [0] * world
    out = {}
    # the arrays fewest parts write first, while those parts still have the fewest documents
    for key, (_, _, _, parts) in sorted(arrays.items(), key=lambda kv: len(kv[1][3])):
        if parts:
            out[key] = min(parts, key=lambda r: (load[r], r))
            load[out[key]] += 1
    return out


def chunk_grids(arrays: dict, chunk_bytes: Optional[int] = None) -> dict:
    """``(name, state) -> (chunks, shards)`` for every array of :func:`saved_arrays` (``(None,
    None)``: the writer's default layout). By default: shards aligned with every rank's boxes (one
    file per box, no chunk shared by two ranks, nothing staged) whose inner chunks cut the last dim
    in column blocks (:func:`_column_blocks`), so that a load reads only the inner chunks it needs:
    row-wise TP shards (o, down) split that dim, and the rows are already aligned with the
    boxes. Arrays of one dim, or too narrow to cut: plain chunks on the aligned grid.
    With ``chunk_bytes``: plain chunks of about that size,
    the last dim cut in :data:`COLUMN_BLOCKS` where no box splits it (so column-sliced
    reads, row-wise TP shards, read about what they need), and plain chunks of about that
    size when the aligned grid has none within 2x of it (the coordinator then assembles the
    chunks two ranks share: a slower save for finer-grained reads)."""
    memo: dict[tuple, tuple] = {}     # a parameter and its optimizer states share shape and boxes
    out = {}
    for key, (shape, dtype, bx, _) in arrays.items():
        if not shape:
            out[key] = (None, None)
            continue
        sig = (shape, dtype, tuple(sorted(bx)))
        if sig not in memo:
            memo[sig] = _grid(shape, dtype, bx, chunk_bytes)
        out[key] = memo[sig]
    return out


#: column blocks of the last dim of 2-D+ arrays when ``chunk_bytes`` is given
COLUMN_BLOCKS = 4


def _grid(shape, dtype, boxes, chunk_bytes):
    isz = dtype.itemsize
    if not chunk_bytes:
        grid = aligned_chunks(shape, boxes, isz)
        k = _column_blocks(grid, isz) if grid is not None else 1
        return (grid, None) if k == 1 else (tuple(grid[:-1]) + (grid[-1] // k,), grid)
    cols = shape[-1]
    split = len(shape) >= 2 and cols >= COLUMN_BLOCKS * 64 and \
        not any(0 < b[d][-1] < cols for b in boxes for d in (0, 1))
    target = chunk_bytes * (COLUMN_BLOCKS if split else 1)
    grid = aligned_chunks(shape, boxes, isz, target=target, min_bytes=min(64 << 10, chunk_bytes))
    if grid is None or math.prod(grid) * isz > 2 * target:
        grid = default_chunks(shape, isz, target)   # finer reads asked for: staging it is
    if split:
        grid = tuple(grid[:-1]) + (min(grid[-1], -(-cols // COLUMN_BLOCKS)),)
    return grid, None


def _column_blocks(shard, itemsize: int) -> int:
    """How many column blocks the inner chunks of an aligned shard cut its last dim into: the
    format's default split (``layout.DEFAULT_COL_SPLIT``) or the largest fewer that divides the
    shard's last dim into blocks of at least ``layout.MIN_COL_BYTES`` per row; 1 for 1-D."""
    if len(shard) < 2:
        return 1
    for k in range(layout.DEFAULT_COL_SPLIT, 1, -1):
        if shard[-1] % k == 0 and shard[-1] // k * itemsize >= layout.MIN_COL_BYTES:
            return k
    return 1


def writes_nothing(td) -> bool:
    """A rank's empty box of a non-empty array: nothing to write, and nothing to declare (the
    ranks holding the rest declare it; an empty shard cannot show a tie, so an alias is never
    declared by this rank alone)."""
    return 0 in td.chunk.sizes and math.prod(td.size) > 0
