"""Sharded arrays (zarr v3 sharding_indexed): round trips, partial reads, corruption, resume, interop."""
import math
import pathlib
import random
import tempfile
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import validate_manifest
from ucp.errors import CorruptChunkError, UcpError
from ucp.format import create_checkpoint, dtypes, layout, open_checkpoint, verify
from ucp.format import shard as _shard

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
SMALL = dict(shard_bytes=2048, inner_bytes=256)  # tiny targets: small tensors still shard


def bits(t):
    return dtypes.to_storage_numpy(t.contiguous()).tobytes()


def cuts(n, rnd):
    k = rnd.randint(0, min(n, 3))
    pts = sorted(set(rnd.randint(1, n - 1) for _ in range(k))) if n > 1 else []
    edges = [0] + pts + [n]
    return list(zip(edges[:-1], edges[1:]))


def test_default_layout_figures():
    assert layout.default_sharding((4096, 4096), 4) == ((2048, 4096), (128, 512))
    assert layout.default_sharding((1000,), 4) is None  # small: plain single chunk
    sh, inner = layout.default_sharding((10, 4 << 20), 4)
    assert all(s % c == 0 for s, c in zip(sh, inner))
    with tempfile.TemporaryDirectory() as d:
        w = create_checkpoint(d + "/ck", durable=False)
        assert w.add_array("small", "param", (256, 256), torch.float32).inner is None  # exactly 256 KiB
        a = w.add_array("big", "param", (4096, 4096), torch.float32)
        assert (a.chunks, a.inner) == ((2048, 4096), (128, 512))
        w.abort()


@SETTINGS
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.uint8, torch.float64]),
       threads=st.sampled_from([1, 3]))
def test_sharded_roundtrip_boxes_any_order(shape, seed, dtype, threads):
    rnd = random.Random(seed)
    t = torch.randint(0, 255, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed % 1000))
    t = t.to(torch.float32).to(dtype) if dtype != torch.uint8 else t
    import itertools

    bl = [tuple(zip(*b)) for b in itertools.product(*(cuts(n, rnd) for n in shape))]
    rnd.shuffle(bl)
    with tempfile.TemporaryDirectory() as d:
        w = create_checkpoint(d + "/ck", durable=False, **SMALL)
        a = w.add_array("m.w", "exp_avg", shape, dtype)

        def run(part):
            for start, stop in part:
                a.write(start, t[tuple(slice(x, y) for x, y in zip(start, stop))])

        ths = [threading.Thread(target=run, args=(bl[i::threads],)) for i in range(threads)]
        [th.start() for th in ths]
        [th.join() for th in ths]
        assert not a._staged
        w.commit()
        ck = open_checkpoint(d + "/ck")
        assert bits(ck.read("m.w", "exp_avg")) == bits(t)
        assert verify(d + "/ck") == []
        validate_manifest(d + "/ck")
        for _ in range(4):
            idx = tuple(slice(a_, rnd.randint(a_, n)) for n in shape for a_ in [rnd.randint(0, n)])
            want = t[idx]
            got = ck.read("m.w", "exp_avg", index=idx)
            assert bits(got) == bits(want)
            s = ck.last_read_stats
            assert s["bytes_needed"] == want.numel() * t.element_size()
            if want.numel():
                assert s["bytes_read"] >= s["bytes_needed"]


def test_explicit_shards_and_zarr_python_reads(tmp_path):
    import warnings

    import zarr

    t = torch.randn(50, 36)
    b = torch.randn(70, 9).bfloat16()
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("w", "param", t, chunks=(4, 9), shards=(16, 36))
        w.write_tensor("w", "exp_avg", b, chunks=(7, 3), shards=(21, 9))
        with pytest.raises(UcpError, match="multiple"):
            w.add_array("x", "param", (10, 10), torch.float32, chunks=(3, 3), shards=(4, 4))
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.array_info("w").inner_chunks == (4, 9) and ck.array_info("w").chunks == (16, 36)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = zarr.open_group(str(tmp_path / "ck"), mode="r")
        arr = g["w"]["param"]
        assert arr.shards == (16, 36) and arr.chunks == (4, 9)
        assert np.array_equal(arr[...], t.numpy())
        assert np.array_equal(g["w"]["exp_avg"][5:40, 2:8], b.view(torch.uint16).numpy()[5:40, 2:8])


def col_matrix(path, rows=256, cols=128):
    t = torch.randn(rows, cols)
    # inner 4 KiB target: 8 column blocks of 16 columns, 64-row inner chunks; 128 KiB shards
    with create_checkpoint(path, shard_bytes=128 << 10, inner_bytes=4 << 10, durable=False) as w:
        a = w.write_tensor("w", "param", t)
    return t, a


def test_column_slices_read_only_what_they_need(tmp_path):
    t, a = col_matrix(tmp_path / "ck")
    assert a.inner[1] == 16 and a.chunks[1] == 128 and a.inner[0] < 256
    ck = open_checkpoint(tmp_path / "ck")
    for tp in (2, 4, 8):
        w = 128 // tp
        for r in range(tp):
            got = ck.read("w", index=(slice(None), slice(r * w, (r + 1) * w)))
            assert torch.equal(got, t[:, r * w:(r + 1) * w])
            s = ck.last_read_stats
            assert s["bytes_read"] <= 1.1 * s["bytes_needed"], (tp, r, s)
    # a 1% ... here ~6% row slice aligned to inner rows reads close to what it needs
    ck = open_checkpoint(tmp_path / "ck")
    r0 = a.inner[0]
    got = ck.read("w", index=slice(r0, 2 * r0))
    assert torch.equal(got, t[r0:2 * r0])
    s = ck.last_read_stats
    assert s["bytes_read"] <= 1.1 * s["bytes_needed"], s
    # read_flat keeps working and reports the bytes
    got = ck.read_flat("w", "param", 1000, 5000)
    assert torch.equal(got, t.reshape(-1)[1000:5000])
    assert ck.last_read_stats["bytes_needed"] == 4000 * 4


def test_index_read_once_per_checkpoint(tmp_path):
    t, a = col_matrix(tmp_path / "ck")
    ck = open_checkpoint(tmp_path / "ck")
    ck.read("w", index=(slice(0, 3), slice(0, 16)))
    first = ck.last_read_stats["bytes_read"]
    ck.read("w", index=(slice(0, 3), slice(16, 32)))
    second = ck.last_read_stats["bytes_read"]
    # the first read of a shard also reads its index and every inner chunk's crc32c word (the content
    # crc32c the manifest records binds them to this shard); later reads of it read only data
    present = len(_shard.present_positions(a.shape, a.chunks, a.inner, (0, 0)))
    assert first - second == _shard.index_nbytes(a.chunks, a.inner) + 4 * present
    assert second == math.prod(a.inner) * 4 + 4


def shard_files(path):
    return sorted(p for p in pathlib.Path(path).rglob("c/*/*") if p.is_file())


def test_every_byte_flip_of_a_shard_is_caught(tmp_path):
    t = torch.arange(24 * 8, dtype=torch.float32).reshape(24, 8)
    p = tmp_path / "ck"
    with create_checkpoint(p, shard_bytes=256, inner_bytes=64, durable=False) as w:
        a = w.write_tensor("w", "param", t)
    assert a.inner is not None
    f = p / "w" / "param" / "c" / "1" / "0"
    data = f.read_bytes()
    cst = a.chunks[0]
    assert verify(p) == []
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01 if i % 2 else 0x80
        f.write_bytes(bad)
        probs = verify(p)
        assert probs and any("c/1/0" in q for q in probs), i
        with pytest.raises(CorruptChunkError):
            open_checkpoint(p).read("w", index=slice(cst, 2 * cst))
        # a read outside the shard is unaffected
        assert torch.equal(open_checkpoint(p).read("w", index=slice(0, cst)), t[:cst])
    f.write_bytes(data)
    assert verify(p) == []


def test_partial_read_catches_flip_in_the_inner_chunk_it_reads(tmp_path):
    t, a = col_matrix(tmp_path / "ck")
    f = tmp_path / "ck" / "w" / "param" / "c" / "0" / "0"
    b = bytearray(f.read_bytes())
    b[5] ^= 1  # first inner chunk (rows 0.., cols 0..8)
    f.write_bytes(b)
    ck = open_checkpoint(tmp_path / "ck")
    assert torch.equal(ck.read("w", index=(slice(0, 4), slice(16, 32))), t[:4, 16:32])
    with pytest.raises(CorruptChunkError, match=r"inner chunk \[0, 0\] crc32c"):
        ck.read("w", index=(slice(0, 4), slice(0, 16)))


@pytest.mark.parametrize("how", ["truncate", "extend", "delete"])
def test_truncated_extended_deleted_shard(tmp_path, how):
    t, a = col_matrix(tmp_path / "ck")
    f = tmp_path / "ck" / "w" / "param" / "c" / "0" / "0"
    data = f.read_bytes()
    if how == "truncate":
        f.write_bytes(data[:-1])
    elif how == "extend":
        f.write_bytes(data + b"\0")
    else:
        f.unlink()
    for deep in (True, False):
        probs = verify(tmp_path / "ck", deep=deep)
        assert len(probs) == 1 and "c/0/0" in probs[0], probs
    for idx in [None, (slice(0, 2), slice(0, 16))]:
        with pytest.raises(CorruptChunkError):
            open_checkpoint(tmp_path / "ck").read("w", index=idx)


def test_missing_inner_chunk_is_corruption(tmp_path):
    """A shard whose index marks an inner chunk empty (zarr reads it as zeros) fails verify and read."""
    import crc32c

    t, a = col_matrix(tmp_path / "ck")
    f = tmp_path / "ck" / "w" / "param" / "c" / "0" / "0"
    data = bytearray(f.read_bytes())
    n = _shard.index_nbytes(a.chunks, a.inner)
    idx = np.frombuffer(bytes(data[-n:-4]), dtype="<u8").reshape(-1, 2).copy()
    idx[1] = _shard.EMPTY
    ib = idx.tobytes()
    data[-n:] = ib + crc32c.crc32c(ib).to_bytes(4, "little")
    f.write_bytes(bytes(data))
    probs = verify(tmp_path / "ck")
    assert any("missing" in p for p in probs), probs
    with pytest.raises(CorruptChunkError):
        open_checkpoint(tmp_path / "ck").read("w")


def test_check_shard_rejects_overlaps_and_gaps():
    shape, shard, inner = (4, 4), (4, 4), (2, 4)
    buf = np.arange(16, dtype=np.float32).reshape(4, 4)
    out, size, icrc, content = _shard.encode(buf, shard, inner, (2, 1))
    data = bytes(out)
    assert len(data) == size and _shard.check_shard(data, shape, shard, inner, (0, 0), 4) == (icrc, content)
    import crc32c

    idx = np.frombuffer(data[-36:-4], dtype="<u8").reshape(2, 2).copy()
    idx[1, 0] = idx[0, 0]  # both entries point at the same bytes
    ib = idx.tobytes()
    bad = data[:-36] + ib + crc32c.crc32c(ib).to_bytes(4, "little")
    with pytest.raises(_shard.ShardError):
        _shard.check_shard(bad, shape, shard, inner, (0, 0), 4)


def test_resume_adopts_complete_shards(tmp_path):
    p = tmp_path / "ck"
    t = torch.randn(96, 16)
    w = create_checkpoint(p, durable=False)
    a = w.add_array("w", "param", t.shape, t.dtype, chunks=(8, 8), shards=(32, 16))
    assert a.chunks[0] == 32 and len(a.pending()) == 3
    a.write((0, 0), t[:64])
    a.write((64, 0), t[64:70])  # partial shard: staged only, lost
    w.abort()
    f = p / "w" / "param" / "c" / "1" / "0"
    b = bytearray(f.read_bytes())
    b[3] ^= 1
    f.write_bytes(b)  # a corrupt complete shard is not adopted
    w = create_checkpoint(p, resume=True, durable=False)
    a = w.add_array("w", "param", t.shape, t.dtype, chunks=(8, 8), shards=(32, 16))
    assert a.pending() == [((32, 0), (64, 16)), ((64, 0), (96, 16))]
    a.write((0, 0), t)
    w.commit()
    assert verify(p) == [] and torch.equal(open_checkpoint(p).read("w"), t)


def test_sharded_metadata_tensor_and_plain_small(tmp_path):
    big = torch.arange(100000, dtype=torch.int64)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("tiny", "param", torch.ones(3))
        w.set_metadata({"big": big})
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.array_info("tiny").inner_chunks is None
    assert "inner_chunks" in ck.manifest["meta_arrays"]["_ucp/meta/0"]
    assert torch.equal(ck.metadata["big"], big)
    assert verify(tmp_path / "ck") == []


def test_one_percent_row_slice(tmp_path):
    t = torch.randn(3200, 128)
    with create_checkpoint(tmp_path / "ck", shard_bytes=64 << 10, inner_bytes=1024, durable=False) as w:
        a = w.write_tensor("w", "param", t)
    assert a.inner == (16, 16), a.inner
    ck = open_checkpoint(tmp_path / "ck")
    got = ck.read("w", index=slice(1600, 1632))  # 1% of the rows, aligned to inner rows
    assert torch.equal(got, t[1600:1632])
    s = ck.last_read_stats
    assert s["bytes_read"] <= 1.1 * s["bytes_needed"], s
    got = ck.read("w", index=slice(1605, 1637))  # unaligned: one extra band of 16 rows at most
    assert torch.equal(got, t[1605:1637])
    s = ck.last_read_stats
    assert s["bytes_read"] <= (32 + 16 + 1) * 128 * 4, s


@SETTINGS
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 2**32 - 1))
def test_sharded_flat_ranges(shape, seed):
    rnd = random.Random(seed)
    n = math.prod(shape)
    t = torch.arange(n, dtype=torch.float32).reshape(shape)
    pts = sorted(set([0, n] + [rnd.randint(0, n) for _ in range(rnd.randint(0, 4))]))
    ranges = list(zip(pts[:-1], pts[1:]))
    rnd.shuffle(ranges)
    with tempfile.TemporaryDirectory() as d:
        w = create_checkpoint(d + "/ck", durable=False, shard_bytes=rnd.choice([64, 256]), inner_bytes=16)
        a = w.add_array("p", "exp_avg", shape, torch.float32)
        for x, y in ranges:
            a.write_flat(x, t.reshape(-1)[x:y])
        w.commit()
        ck = open_checkpoint(d + "/ck")
        assert torch.equal(ck.read("p", "exp_avg"), t)
        for _ in range(3):
            x = rnd.randint(0, n)
            y = rnd.randint(x, n)
            assert torch.equal(ck.read_flat("p", "exp_avg", x, y), t.reshape(-1)[x:y])
            assert ck.last_read_stats["bytes_needed"] == (y - x) * 4


# -- band reads: inner chunks too large to batch whole (reader.STREAM_BYTES made tiny to get them) ---------
def band_read(ck, stream, **kw):
    """``ck.read(**kw)`` with inner chunks read a band at a time (``reader.STREAM_BYTES`` = ``stream``)."""
    from unittest import mock

    from ucp.format import reader

    with mock.patch.object(reader, "STREAM_BYTES", stream):
        return ck.read("w", **kw)


@SETTINGS
@given(shape=st.lists(st.integers(1, 30), min_size=1, max_size=3).map(tuple), seed=st.integers(0, 2**32 - 1),
       stream=st.sampled_from([1, 40, 130, 300]), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_band_reads_equal_the_tensor(shape, seed, stream, dtype):
    """Every box of a sharded array reads the same bits whether its inner chunks come whole or in
    bands of their first dim (one row each with ``stream`` 1, several, an uneven last band), with the
    bytes of whole inner chunks counted."""
    rnd = random.Random(seed)
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed % 1000)).to(dtype)
    with tempfile.TemporaryDirectory() as d:
        with create_checkpoint(d + "/ck", durable=False, **SMALL) as w:
            a = w.write_tensor("w", "param", t)
        ck = open_checkpoint(d + "/ck")
        for k in range(4):
            idx = None if k == 0 else tuple(slice(a_, rnd.randint(a_, n)) for n in shape for a_ in [rnd.randint(0, n)])
            want = t if idx is None else t[idx]
            assert bits(band_read(ck, stream, index=idx)) == bits(want)
            if a.inner is not None and want.numel():
                s = ck.last_read_stats
                assert s["bytes_read"] % (math.prod(a.inner) * t.element_size() + 4) == 0 or k == 0, s


def band_matrix(path):
    """(24, 32) float32: shards of (8, 32), inner chunks (4, 8): four column blocks side by side."""
    t = torch.arange(24 * 32, dtype=torch.float32).reshape(24, 32)
    with create_checkpoint(path, durable=False) as w:
        w.write_tensor("w", "param", t, shards=(8, 32), chunks=(4, 8))
    return t


@pytest.mark.parametrize("stream", [1, 100, 200, 1 << 20], ids=["row-bands", "3-row-bands", "6-row-bands", "whole"])
def test_band_reads_of_column_blocks(tmp_path, stream):
    """Column blocks side by side are read in bands of rows and fill whole output rows; a band that
    misses the box copies nothing; the shard's index, content crc32c and inner chunks are checked."""
    t = band_matrix(tmp_path / "ck")
    ck = open_checkpoint(tmp_path / "ck")
    for idx in (None, slice(9, 11), (slice(3, 21), slice(5, 30)), (slice(8, 16), slice(8, 16)), (5, slice(None))):
        assert torch.equal(band_read(ck, stream, index=idx), t if idx is None else t[idx])


def test_band_reads_of_a_one_dim_array(tmp_path):
    t = torch.arange(300, dtype=torch.int32)
    with create_checkpoint(tmp_path / "ck", durable=False) as w:
        w.write_tensor("w", "param", t, shards=(100,), chunks=(25,))
    ck = open_checkpoint(tmp_path / "ck")
    for idx in (None, slice(10, 290), slice(30, 40)):
        assert torch.equal(band_read(ck, 24, index=idx), t if idx is None else t[idx])


@pytest.mark.parametrize("stream", [1, 100])
def test_band_reads_catch_every_byte_flip(tmp_path, stream):
    """A flipped byte anywhere in a shard read whole in bands (data of any band, a crc32c word, the
    index) fails the read; the other shards read on."""
    t = band_matrix(tmp_path / "ck")
    f = tmp_path / "ck" / "w" / "param" / "c" / "1" / "0"
    data = f.read_bytes()
    for i in range(0, len(data), 7):
        bad = bytearray(data)
        bad[i] ^= 0x10
        f.write_bytes(bad)
        with pytest.raises(CorruptChunkError):
            band_read(open_checkpoint(tmp_path / "ck"), stream, index=slice(8, 16))
        assert torch.equal(band_read(open_checkpoint(tmp_path / "ck"), stream, index=slice(0, 8)), t[:8])
    f.write_bytes(data)


def test_band_read_names_the_inner_chunk_that_fails(tmp_path):
    band_matrix(tmp_path / "ck")
    f = tmp_path / "ck" / "w" / "param" / "c" / "0" / "0"
    b = bytearray(f.read_bytes())
    b[(4 * 8 * 4 + 4) * 6 + 20] ^= 1  # inner chunk 6 in file order: rows 4.., column block 2
    f.write_bytes(b)
    ck = open_checkpoint(tmp_path / "ck")
    with pytest.raises(CorruptChunkError, match=r"inner chunk \[1, 2\] crc32c mismatch"):
        band_read(ck, 100, index=slice(0, 8))
    assert torch.equal(band_read(ck, 100, index=(slice(0, 8), slice(0, 16))), torch.arange(24 * 32.).reshape(24, 32)[:8, :16])


@pytest.mark.parametrize("how", ["truncate", "extend", "delete", "swap"])
def test_band_reads_of_a_damaged_or_swapped_shard(tmp_path, how):
    band_matrix(tmp_path / "ck")
    f, g = (tmp_path / "ck" / "w" / "param" / "c" / str(i) / "0" for i in (0, 1))
    data = f.read_bytes()
    if how == "truncate":
        f.write_bytes(data[:-1])
    elif how == "extend":
        f.write_bytes(data + b"\0")
    elif how == "delete":
        f.unlink()
    else:
        f.write_bytes(g.read_bytes())
        g.write_bytes(data)
    match = {"truncate": "truncated", "extend": "extra bytes", "delete": "missing", "swap": "content crc32c"}[how]
    for idx in (slice(0, 8), (slice(0, 8), slice(8, 24))):
        with pytest.raises(CorruptChunkError, match=match):
            band_read(open_checkpoint(tmp_path / "ck"), 100, index=idx)


W, B = [132] * 4, []  # the kernel asked for a run's whole chunks once; nothing more for its later bands


@pytest.mark.parametrize("stream, want, advised", [
    (1056, [[1056]], [None]), (1055, [[528], [528]], [None] * 2), (528, [[528], [528]], [None] * 2),
    (527, [[132] * 4] * 2, [W, W]), (263, [[64] * 4, [68] * 4] * 2, [W, B] * 2),
    (100, ([[32] * 4] * 3 + [[36] * 4]) * 2, [W, B, B, B] * 2)])
def test_which_inner_chunks_are_read_in_bands(tmp_path, stream, want, advised):
    """Runs of side-by-side inner chunks (here four 132-byte column blocks, 528 bytes) are batched
    whole up to ``STREAM_BYTES``; a larger run is read in bands of as many of its rows as fit (at
    least one): the ranges each read asks for, for one whole (8, 32) shard of two runs, and the
    ranges the kernel is asked to fetch ahead (None: the store's default, the ranges read)."""
    from unittest import mock

    from ucp.format.store import _LocalRanges

    t = band_matrix(tmp_path / "ck")
    ck = open_checkpoint(tmp_path / "ck")
    ck.read("w", index=(slice(0, 1), slice(0, 1)))  # the shard's index is read and kept first
    asked, ahead, read_ranges = [], [], _LocalRanges.read_ranges

    def spy(f, ranges, buf, advise=None):
        asked.append([b - a for a, b in ranges])
        ahead.append(None if advise is None else [b - a for a, b in advise])
        return read_ranges(f, ranges, buf, advise)

    with mock.patch.object(_LocalRanges, "read_ranges", spy):
        assert torch.equal(band_read(ck, stream, index=slice(0, 8)), t[:8])
    assert (asked, ahead) == (want, advised)
