"""ucp.plan.boxes: boxes, flat-range decomposition, chunk grids, split conventions."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from ucp.errors import UcpError
from ucp.plan import (Box, PlanError, chunks_intersecting, contiguous_runs, flat_to_boxes, ravel,
                      read_cost, split_sizes, unravel)

shapes = st.lists(st.integers(0, 6), min_size=1, max_size=4).map(tuple)


def test_box_basics():
    b = Box((1, 2), (4, 5))
    assert b.shape == (3, 3) and b.numel == 9 and not b.empty and b.ndim == 2
    assert b.intersect(Box((3, 0), (9, 3))) == Box((3, 2), (4, 3))
    assert b.intersect(Box((5, 5), (6, 6))).empty
    assert b.contains(Box((1, 2), (2, 3))) and not b.contains(Box((0, 2), (2, 3)))
    assert b.contains((3, 4)) and not b.contains((4, 4))
    assert b.translate((-1, -2)) == Box((0, 0), (3, 3))
    assert str(b) == "[1:4, 2:5]"
    assert Box((), ()).numel == 1 and not Box((), ()).empty
    assert Box.full((2, 0)).empty
    assert sum(x.numel for x in b.subtract(Box((2, 3), (3, 4)))) == 8


@given(shapes, st.data())
@settings(max_examples=200, deadline=None)
def test_flat_to_boxes_is_exact_and_minimal(shape, data):
    n = math.prod(shape)
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(a, n))
    boxes = flat_to_boxes(a, b, shape)
    idx = np.arange(n).reshape(shape)
    got = np.concatenate([idx[bx.slices()].reshape(-1) for bx in boxes]) if boxes else np.array([], int)
    assert got.tolist() == list(range(a, b))       # in order, each contiguous
    for bx in boxes:
        vals = idx[bx.slices()].reshape(-1)
        assert (np.diff(vals) == 1).all()
    # minimal: at most 2 * ndim - 1 boxes, and no two consecutive boxes merge into a box
    assert len(boxes) <= max(1, 2 * len(shape) - 1)
    for x, y in zip(boxes, boxes[1:]):
        lo = [min(p, q) for p, q in zip(x.start, y.start)]
        hi = [max(p, q) for p, q in zip(x.stop, y.stop)]
        assert math.prod(h - l for l, h in zip(lo, hi)) != x.numel + y.numel


@given(shapes, st.data())
@settings(max_examples=150, deadline=None)
def test_contiguous_runs(shape, data):
    within = Box.full(shape)
    st_ = tuple(data.draw(st.integers(0, s)) for s in shape)
    sp = tuple(data.draw(st.integers(a, s)) for a, s in zip(st_, shape))
    sub = Box(st_, sp)
    runs = contiguous_runs(sub, within)
    idx = np.arange(math.prod(shape)).reshape(shape)
    total = 0
    for r in runs:
        assert sub.contains(r)
        vals = idx[r.slices()].reshape(-1)
        assert (np.diff(vals) == 1).all()
        total += r.numel
    assert total == sub.numel


def test_ravel_unravel():
    for i in range(60):
        assert ravel(unravel(i, (3, 4, 5)), (3, 4, 5)) == i


@given(st.integers(0, 40), st.integers(1, 9))
@settings(deadline=None)
def test_split_sizes_match_torch(n, k):
    t = torch.arange(n)
    ch = [len(c) for c in torch.chunk(t, k)] if n else []
    assert split_sizes(n, k, "chunk") == ch + [0] * (k - len(ch))
    assert split_sizes(n, k, "tensor_split") == [len(c) for c in torch.tensor_split(t, k)]
    if n % k == 0:
        assert split_sizes(n, k, "even") == [n // k] * k
    else:
        with pytest.raises(PlanError):
            split_sizes(n, k, "even")


def test_split_sizes_errors():
    assert split_sizes(5, 2, "sizes", (1, 4)) == [1, 4]
    for bad in [(1, 3), (1, 2, 2), (6, -1)]:
        with pytest.raises(PlanError):
            split_sizes(5, 2, "sizes", bad)
    with pytest.raises(PlanError):
        split_sizes(5, 2, "sizes")
    with pytest.raises(PlanError, match="unknown split"):
        split_sizes(5, 2, "weird")
    assert issubclass(PlanError, UcpError)


def test_chunks_intersecting_and_read_cost():
    arr, ch = (10, 7), (4, 3)
    b = Box((3, 2), (9, 4))
    got = list(chunks_intersecting(b, ch, arr))
    assert [c for c, _, _ in got] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert sum(o.numel for _, _, o in got) == b.numel
    assert got[-1][1] == Box((8, 3), (10, 6))      # edge chunk clipped
    needed, read = read_cost([b], ch, arr, 4)
    assert needed == b.numel * 4 and read > needed
    # chunk-aligned boxes read exactly what they need; shared chunks count once
    needed, read = read_cost([Box((0, 0), (4, 7)), Box((4, 0), (8, 7))], (4, 7), arr, 2)
    assert needed == read == 56 * 2
    needed, read = read_cost([Box((0, 0), (1, 7)), Box((1, 0), (2, 7))], (4, 7), arr, 1)
    assert (needed, read) == (14, 28)


@given(shapes, st.data())
def test_chunk_grid_overlap_is_the_box_intersection(shape, data):
    """``ChunkGrid.overlap``, ``Box.intersect`` and the array writer all cut boxes by ``grid.intersect``."""
    from ucp.plan.grid import chunk_grid, intersect

    chunks = tuple(data.draw(st.integers(1, max(1, n))) for n in shape)
    grid = chunk_grid(shape, chunks)
    assert grid is chunk_grid(tuple(shape), tuple(chunks))  # one frozen grid per geometry, shared
    start = tuple(data.draw(st.integers(0, n)) for n in shape)
    stop = tuple(data.draw(st.integers(a, n)) for a, n in zip(start, shape))
    for idx in grid.indices():
        lo, hi = grid.overlap(idx, start, stop)
        assert (lo, hi) == intersect(start, stop, *grid.chunk_box(idx))
        got = Box(start, stop).intersect(Box(*grid.chunk_box(idx)))
        assert (got.start, got.stop) == (lo, hi)
        assert got.empty == any(
            b <= a or b <= s or e <= a for a, b, s, e in zip(start, stop, *grid.chunk_box(idx)))


def test_pieces_within_cuts_box_and_flat_pieces_to_a_box():
    from ucp.plan import Piece, pieces_within

    flat = Piece(Box((0, 0), (4, 5)), Box((7,), (27,)))          # rows 0..3 of a 5-wide tensor at local 7
    assert pieces_within(flat, Box((1, 0), (3, 5))) == [Piece(Box((1, 0), (3, 5)), Box((12,), (22,)))]
    assert pieces_within(flat, Box((1, 1), (3, 3))) == [Piece(Box((1, 1), (2, 3)), Box((13,), (15,))),
                                                         Piece(Box((2, 1), (3, 3)), Box((18,), (20,)))]
    assert pieces_within(flat, Box((4, 0), (6, 5))) == []
    box = Piece(Box((2, 3), (6, 8)), Box((0, 0), (4, 5)))         # a box copy into a local block
    assert pieces_within(box, Box((0, 0), (3, 4))) == [Piece(Box((2, 3), (3, 4)), Box((0, 0), (1, 1)))]


def test_an_empty_grid_lists_no_chunks_without_materialising_its_other_dims():
    """A grid with a zero-length dim has no chunks, however many the other dims have: ``indices``
    must not build a range of 2^40 first (a crafted manifest record, shape [0, 2^40] with chunks
    [1, 1], made the open raise MemoryError instead of checking it)."""
    from ucp.plan.grid import ChunkGrid

    g = ChunkGrid((0, 1 << 40), (1, 1))
    assert g.nchunks == 0 and list(g.indices()) == []
    assert list(ChunkGrid((2, 3), (1, 2)).indices()) == [(0, 0), (0, 1), (1, 0), (1, 1)]
