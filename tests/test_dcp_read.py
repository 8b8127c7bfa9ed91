"""The UniversalReader read path: many boxes read at once on one pool (``Checkpoint.read_boxes``),
inner column blocks copied out a run at a time, DCP destinations filled in place or staged, the
reader's thread count. The distributed cross-layout loads are in ``test_dcp_dist.py``."""
from __future__ import annotations

import os
import random
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings, strategies as st

from ucp.dcp import MAX_RANK_THREADS, UniversalReader, rank_threads
from ucp.errors import CorruptChunkError
from ucp.format import create_checkpoint, open_checkpoint
from ucp.format.staging import _pieces, read_regions

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: equal means bit-exact (NaN and -0.0 included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def column_block_checkpoint(path, tensors: dict, shard_rows: int, cols: int):
    """Arrays sharded like UniversalWriter's default: shards of ``shard_rows`` whole rows, inner
    chunks of ``cols`` columns (the last dim need not divide: the edge block is clipped)."""
    w = create_checkpoint(path, durable=False)
    for name, t in tensors.items():
        shard = (shard_rows,) + tuple(t.shape[1:-1]) + (-(-t.shape[-1] // cols) * cols,)
        inner = (shard_rows,) + tuple(t.shape[1:-1]) + (cols,)
        a = w.add_array(name, "param", tuple(t.shape), t.dtype, chunks=inner, shards=shard)
        a.write((0,) * t.dim(), t)
        w.add_param(name)
    w.commit()


def random_box(shape, rnd):
    start = [rnd.randrange(n) for n in shape]
    stop = [rnd.randint(s + 1, n) for s, n in zip(start, shape)]
    return start, stop


def select(t, start, stop):
    return t[tuple(slice(a, b) for a, b in zip(start, stop))]


@SETTINGS
@given(rows=st.integers(2, 30), cols=st.integers(3, 40), depth=st.sampled_from([0, 3]),
       block=st.integers(1, 9), shard_rows=st.integers(1, 12), workers=st.sampled_from([1, 3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), seed=st.integers(0, 2**31))
def test_read_boxes_equal_the_source_bit_for_bit(tmp_path_factory, rows, cols, depth, block, shard_rows, workers,
                                                 dtype, seed):
    """Random boxes of column-block sharded arrays (2-D and 3-D, clipped edge blocks, boxes that
    cut blocks or cover runs of them, several at once, two arrays in one call) read by
    ``read_boxes`` equal the written tensor's bytes; the stats count exactly the boxes' bytes."""
    rnd = random.Random(seed)
    shape = (rows, depth, cols) if depth else (rows, cols)
    g = torch.Generator().manual_seed(seed)
    src = {f"w{i}": torch.randn(shape, generator=g).to(dtype) for i in range(2)}
    path = tmp_path_factory.mktemp("boxes") / "ck"
    column_block_checkpoint(path, src, min(shard_rows, rows), min(block, cols))
    ck = open_checkpoint(path, workers=workers)
    boxes = [(name, "param", *random_box(shape, rnd)) for name in src for _ in range(3)]
    boxes.append(("w0", "param", [0] * len(shape), list(shape)))           # whole array: every run whole
    outs = [torch.empty([b - a for a, b in zip(st_, sp)], dtype=dtype) for _, _, st_, sp in boxes]
    ck.read_boxes([(n, s, a, b, o) for (n, s, a, b), o in zip(boxes, outs)])
    for (name, _, a, b), out in zip(boxes, outs):
        assert torch.equal(bits(out), bits(select(src[name], a, b))), (name, a, b)
    assert ck.last_read_stats["bytes_needed"] == sum(o.numel() * o.element_size() for o in outs)
    assert ck.last_read_stats["bytes_read"] >= ck.last_read_stats["bytes_needed"]
    ck.close()


def test_read_boxes_reports_a_corrupt_inner_chunk_and_reads_the_others(tmp_path):
    """One byte flipped in the second column block of an array: ``read_boxes`` with a box touching
    it fails naming the inner chunk and the file; boxes of the intact blocks still read exactly."""
    t = torch.arange(8 * 24, dtype=torch.float32).reshape(8, 24)
    column_block_checkpoint(tmp_path / "ck", {"w": t, "v": t + 1}, 8, 6)
    ck = open_checkpoint(tmp_path / "ck")
    rel = ck.array_info("w").path
    shard = next(p for p in (tmp_path / "ck" / rel).rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(shard.read_bytes())
    raw[8 * 6 * 4 + 5] ^= 0x10               # inside inner chunk [0, 1] (columns 6..11)
    shard.write_bytes(bytes(raw))
    ck = open_checkpoint(tmp_path / "ck")
    outs = [torch.empty(8, 24), torch.empty(8, 12)]
    with pytest.raises(CorruptChunkError, match=r"inner chunk \[0, 1\] crc32c mismatch") as e:
        ck.read_boxes([("v", "param", [0, 0], [8, 24], outs[0]), ("w", "param", [0, 0], [8, 12], outs[1])])
    assert str(shard.relative_to(tmp_path / "ck")) in str(e.value) or rel in str(e.value)
    ck = open_checkpoint(tmp_path / "ck")
    good = torch.empty(8, 12)
    ck.read_boxes([("w", "param", [0, 12], [8, 24], good)])
    assert torch.equal(good, t[:, 12:])


def test_failed_pooled_read_leaves_no_read_running(tmp_path):
    """A chunk read that fails on the pool: ``read_boxes`` raises only once no other read of the
    call is still writing into the caller's tensors (the ones already running finish, the ones not
    started never start). Otherwise a caller that catches the error and reuses or frees its
    buffers would have them overwritten behind its back. The good reads wait until the bad one has
    failed, so the failure always comes first with a read running beside it."""
    rows = 256                       # 8 boxes of 1 MiB: enough for read_boxes to use its pool
    t = torch.arange(8 * rows * 1024, dtype=torch.float32).reshape(8 * rows, 1024)
    column_block_checkpoint(tmp_path / "ck", {"bad": t[:rows], "good": t}, rows, 256)
    shard = tmp_path / "ck" / open_checkpoint(tmp_path / "ck").array_info("bad").path / "c" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0x01
    shard.write_bytes(bytes(raw))

    ck = open_checkpoint(tmp_path / "ck", workers=2)
    failed, events, lock = threading.Event(), [], threading.Lock()
    read_shard = ck._read_shard

    def watched(a, sidx, start, stop, onp):
        if a.info.name == "bad":
            try:
                return read_shard(a, sidx, start, stop, onp)
            finally:
                failed.set()
        assert failed.wait(timeout=60)
        try:
            return read_shard(a, sidx, start, stop, onp)
        finally:
            with lock:
                events.append("read done")

    ck._read_shard = watched
    boxes = [("bad", "param", [0, 0], [rows, 1024], torch.empty(rows, 1024))] + [
        ("good", "param", [rows * i, 0], [rows * i + rows, 1024], torch.empty(rows, 1024)) for i in range(7)]
    with pytest.raises(CorruptChunkError, match="crc32c mismatch"):
        ck.read_boxes(boxes)
    with lock:
        events.append("raised")
    ck.close()                       # joins the pool: every read that was going to run has run
    assert events[-1] == "raised", events
    assert events.count("read done") >= 1       # one good read ran beside the failing one


def test_dcp_load_fills_in_place_and_stages_the_rest(tmp_path):
    """One-process ``dcp.load``: a contiguous destination of the stored dtype is read into in
    place (same storage after the load), a transposed (non-contiguous) one and one of another
    dtype through a staging buffer; all equal the stored values."""
    a = torch.randn(12, 40, generator=torch.Generator().manual_seed(3))
    b = torch.randn(40, 12, generator=torch.Generator().manual_seed(4))
    c = torch.randn(6, 20, generator=torch.Generator().manual_seed(5))
    column_block_checkpoint(tmp_path / "ck", {"a": a, "b": b, "c": c}, 4, 8)
    inplace = torch.zeros(12, 40)
    ptr = inplace.data_ptr()
    transposed = torch.zeros(12, 40).T                          # (40, 12), not contiguous
    other = torch.zeros(6, 20, dtype=torch.float64)
    sd = {"model.a": inplace, "model.b": transposed, "model.c": other}
    reader = UniversalReader(tmp_path / "ck")
    dcp.load(sd, storage_reader=reader, no_dist=True)
    assert sd["model.a"].data_ptr() == ptr and torch.equal(bits(sd["model.a"]), bits(a))
    assert not sd["model.b"].is_contiguous() and torch.equal(bits(sd["model.b"]), bits(b))
    assert sd["model.c"].dtype == torch.float64 and torch.equal(sd["model.c"], c.double())
    need = (a.numel() + b.numel()) * 4 + c.numel() * 8
    assert reader.bytes_needed == need


@SETTINGS
@given(rows=st.integers(1, 30), cols=st.integers(1, 20), stage=st.integers(1, 600), seed=st.integers(0, 2**31))
def test_read_regions_fills_any_destination_through_small_buffers(tmp_path_factory, rows, cols, stage, seed):
    """``read_regions`` with host buffers of a few bytes to a few hundred (regions split by rows,
    single rows larger than a buffer, batches of many pieces): destinations of the stored dtype
    read in place, transposed views, another dtype and slices of a larger tensor all end equal to
    the boxes of the source (a cast where the destination's dtype differs)."""
    _read_regions_case(tmp_path_factory, rows, cols, stage, seed)


def _read_regions_case(tmp_path_factory, rows, cols, stage, seed):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    src = {"w": torch.randn(rows, cols, generator=g), "v": torch.randn(rows, 2, cols, generator=g).bfloat16()}
    path = tmp_path_factory.mktemp("regions") / "ck"
    column_block_checkpoint(path, src, max(1, rows // 3), max(1, cols // 2))
    ck = open_checkpoint(path, workers=2)
    regions, want = [], []
    for _ in range(6):
        name = rnd.choice(sorted(src))
        a, b = random_box(src[name].shape, rnd)
        shape = [e - s for s, e in zip(a, b)]
        kind = rnd.choice(["inplace", "transposed", "cast", "slice"])
        if kind == "transposed" and len(shape) == 2:
            target = torch.zeros(shape[::-1], dtype=src[name].dtype).T
        elif kind == "cast":
            target = torch.zeros(shape, dtype=torch.float64)
        elif kind == "slice":
            target = torch.zeros([n + 2 for n in shape], dtype=src[name].dtype)[(slice(1, -1),) * len(shape)]
        else:
            target = torch.zeros(shape, dtype=src[name].dtype)
        regions.append((name, "param", a, b, target))
        want.append(select(src[name], a, b).to(target.dtype))
    read_regions(ck, regions, stage_bytes=stage)
    for (name, _, a, b, target), w in zip(regions, want):
        assert torch.equal(bits(target), bits(w)), (name, a, b, target.dtype, target.stride())
    ck.close()


@given(shape=st.tuples(st.integers(1, 40), st.integers(1, 600)), chunk=st.tuples(st.integers(1, 9), st.integers(1, 700)),
       limit=st.integers(1, 40000), data=st.data())
def test_pieces_tile_the_region_along_chunk_rows(shape, chunk, limit, data):
    """A staged region's pieces are bands of whole rows that tile it exactly; every row edge inside
    the region is a multiple of the chunk's rows; a piece exceeds ``limit`` only when it is one
    chunk row high; each piece's target is its part of the region's target."""
    from types import SimpleNamespace

    start = [data.draw(st.integers(0, n - 1)) for n in shape]
    stop = [data.draw(st.integers(a + 1, n)) for a, n in zip(start, shape)]
    chunk = tuple(min(c, n) for c, n in zip(chunk, shape))
    info = SimpleNamespace(dtype=torch.float32, shape=shape, chunks=(chunk[0], shape[1]), inner_chunks=chunk)
    target = torch.zeros([b - a for a, b in zip(start, stop)])
    cover = torch.zeros_like(target, dtype=torch.int32)
    for _n, _s, a, b, part, _d in _pieces("n", "param", start, stop, target, info, limit):
        assert a[1] == start[1] and b[1] == stop[1]
        assert part.data_ptr() == target[a[0] - start[0]].data_ptr() and tuple(part.shape) == (b[0] - a[0], b[1] - a[1])
        cover[a[0] - start[0]:b[0] - start[0]] += 1
        for r in (a[0], b[0]):
            assert r in (start[0], stop[0]) or r % chunk[0] == 0
        assert (b[0] - a[0]) * (b[1] - a[1]) * 4 <= limit or b[0] - a[0] <= chunk[0]
    assert bool((cover == 1).all())


def test_a_column_block_read_on_its_own_goes_straight_to_the_output(tmp_path):
    """Boxes of whole inner chunks one column block wide (a tensor-parallel rank's columns where its
    share is one block) are read
    into the output with no scratch copy (``chunks_direct``) and equal the source; a flipped byte in
    such a chunk is still reported by its crc32c."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(12, 40, generator=g)
    column_block_checkpoint(tmp_path / "ck", {"w": w}, 4, 8)
    ck = open_checkpoint(tmp_path / "ck", workers=1)
    outs = [torch.empty(8, 8) for _ in range(5)]
    ck.read_boxes([("w", "param", [4, c], [12, c + 8], o) for c, o in zip(range(0, 40, 8), outs)])
    for c, o in zip(range(0, 40, 8), outs):
        assert torch.equal(bits(o), bits(w[4:12, c:c + 8]))
    assert ck.chunks_direct == 10
    ck.close()
    shard = tmp_path / "ck" / "w" / "param" / "c" / "1" / "0"
    raw = bytearray(shard.read_bytes())
    raw[8 * 4 * 4 + 5] ^= 0xFF            # in the second inner chunk's data (4 rows x 8 cols x 4 bytes each)
    shard.write_bytes(bytes(raw))
    ck = open_checkpoint(tmp_path / "ck", workers=1)
    with pytest.raises(CorruptChunkError, match="inner chunk"):
        ck.read_boxes([("w", "param", [4, 0], [8, 8], torch.empty(4, 8)), ("w", "param", [4, 8], [8, 16],
                                                                            torch.empty(4, 8))])
    ck.close()


def test_reader_threads_share_the_cores_among_local_ranks(monkeypatch, tmp_path):
    """Local files: the cores this process may use divided among the node's ranks (at least 1,
    at most MAX_RANK_THREADS); an object store: MAX_RANK_THREADS whatever the ranks."""
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert rank_threads(tmp_path) == max(1, min(MAX_RANK_THREADS, cores))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))
    assert rank_threads(tmp_path) == 1
    assert rank_threads("memory://ucp-test-threads/ck") == MAX_RANK_THREADS
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert rank_threads(tmp_path) == max(1, min(MAX_RANK_THREADS, cores))
