"""Property tests: write -> read is bit-exact for every dtype, chunking and box decomposition."""
import math
import random
import tempfile
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ucp
from conftest import validate_manifest
from ucp.errors import NotFoundError, OverlapError, UcpError
from ucp.format import create_checkpoint, dtypes, layout, open_checkpoint, verify
from ucp.plan.boxes import flat_to_boxes
from ucp.plan.grid import ChunkGrid

DTYPES = [dtypes.torch_dtype(n) for n in dtypes.SUPPORTED]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


def bits(t):
    return dtypes.to_storage_numpy(t.contiguous()).tobytes()


def random_tensor(dtype, shape, rnd):
    n = math.prod(shape) * dtypes.itemsize(dtypes.dtype_name(dtype))
    raw = bytearray(rnd.getrandbits(8) for _ in range(n))
    if dtype == torch.bool:
        raw = bytearray(b & 1 for b in raw)
    st_ = dtypes.storage_torch_dtype(dtypes.dtype_name(dtype))
    base = torch.frombuffer(raw, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    return base.view(st_).view(dtype).reshape(shape).clone()


def cuts(n, rnd):
    k = rnd.randint(0, min(n, 3))
    pts = sorted(set(rnd.randint(1, n - 1) for _ in range(k))) if n > 1 else []
    edges = [0] + pts + [n]
    return list(zip(edges[:-1], edges[1:]))


def boxes(shape, rnd):
    import itertools

    per_dim = [cuts(n, rnd) if n else [(0, 0)] for n in shape]
    return [tuple(zip(*b)) if b else ((), ()) for b in itertools.product(*per_dim)]


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@SETTINGS
@given(dtype=st.sampled_from(DTYPES), shape=shapes, seed=st.integers(0, 2**32 - 1),
       chunk_mode=st.sampled_from(["default", "small", "explicit"]), threads=st.sampled_from([1, 3]))
def test_roundtrip_boxes_any_order(dtype, shape, seed, chunk_mode, threads):
    rnd = random.Random(seed)
    t = random_tensor(dtype, shape, rnd)
    chunks = None
    chunk_bytes = None
    if chunk_mode == "explicit":
        chunks = tuple(rnd.randint(1, n + 1) for n in shape)
    elif chunk_mode == "small":
        chunk_bytes = rnd.choice([1, 8, 24])
    bl = boxes(shape, rnd)
    rnd.shuffle(bl)
    with tempfile.TemporaryDirectory() as d:
        w = create_checkpoint(d + "/ck", chunk_bytes=chunk_bytes, durable=False)
        a = w.add_array("m.w", "param", shape, dtype, chunks=chunks)
        if chunks is not None:
            assert a.chunks == chunks

        def run(part):
            for start, stop in part:
                a.write(start, t[tuple(slice(x, y) for x, y in zip(start, stop))])

        parts = [bl[i::threads] for i in range(threads)]
        ths = [threading.Thread(target=run, args=(p,)) for p in parts]
        [th.start() for th in ths]
        [th.join() for th in ths]
        w.commit()
        ck = open_checkpoint(d + "/ck")
        got = ck.read("m.w")
        assert got.dtype == dtype and tuple(got.shape) == shape
        assert bits(got) == bits(t)
        assert verify(d + "/ck") == []
        validate_manifest(d + "/ck")
        # partial reads of random indices equal the slice and touch only intersecting chunks
        for _ in range(4):
            idx = []
            for n in shape:
                if n and rnd.random() < 0.3:
                    idx.append(rnd.randint(-n, n - 1))
                else:
                    a_ = rnd.randint(-n - 2, n + 2)
                    b_ = rnd.randint(-n - 2, n + 2)
                    idx.append(slice(a_ if rnd.random() < 0.8 else None, b_ if rnd.random() < 0.8 else None))
            if idx and rnd.random() < 0.3:
                k = rnd.randint(0, len(idx))
                idx = idx[:k] + [Ellipsis] + idx[k + rnd.randint(0, len(idx) - k):]
            idx = tuple(idx)
            want = t[idx]
            got = ck.read("m.w", index=idx)
            assert tuple(got.shape) == tuple(want.shape)
            assert bits(got) == bits(want)
            start, stop, _ = layout.normalize_index(idx, shape)
            info = ck.array_info("m.w")
            nch = math.prod(len(r) for r in ChunkGrid(shape, info.chunks).ranges(start, stop))
            per_chunk = math.prod(info.chunks) * dtypes.itemsize(dtypes.dtype_name(dtype)) + 4
            if want.numel():
                assert ck.last_read_stats["bytes_read"] == nch * per_chunk
                assert ck.last_read_stats["chunks_read"] == nch


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_bit_exact(tmp_path, dtype):
    if dtype.is_floating_point:
        st_ = dtypes.storage_torch_dtype(dtypes.dtype_name(dtype))
        isz = dtypes.itemsize(dtypes.dtype_name(dtype))
        vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-45, 1.0, -2.5]
        t = torch.tensor(vals, dtype=torch.float64).to(dtype)
        # add every payload-ish bit pattern of the top and bottom bytes
        pat = torch.arange(256, dtype=torch.int64)
        if isz == 1:
            extra = pat.to(torch.uint8).view(dtype)
        else:
            extra = torch.frombuffer(bytearray(np.repeat(np.arange(256, dtype=np.uint8), isz).tobytes()),
                                     dtype=torch.uint8).view(st_).view(dtype)
        t = torch.cat([t, extra])
    elif dtype == torch.bool:
        t = torch.tensor([True, False, True])
    elif dtype.is_complex:
        t = torch.tensor([complex(float("nan"), -0.0), complex(float("inf"), 1e-310)], dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        t = torch.tensor([info.min, info.max, 0, 1], dtype=dtype)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("x", "param", t)
        w.write_tensor("x", "exp_avg", t.reshape(1, -1)[:, ::2])  # non-contiguous source
        w.write_tensor("s", "param", t[0].clone())  # 0-d
    ck = ucp.open(tmp_path / "ck")
    assert bits(ck.read("x")) == bits(t)
    assert bits(ck.read("x", "exp_avg")) == bits(t.reshape(1, -1)[:, ::2])
    assert ck.read("s").dim() == 0 and bits(ck.read("s")) == bits(t[0])
    assert ck.param_meta("x")["dtype"] == dtypes.dtype_name(dtype)


def test_out_and_read_box(tmp_path):
    t = torch.randn(64, 33)
    with create_checkpoint(tmp_path / "ck", chunk_bytes=33 * 4 * 5) as w:
        w.write_tensor("w", "param", t)
    ck = open_checkpoint(tmp_path / "ck")
    out = torch.empty(10, 33)
    r = ck.read("w", index=slice(3, 13), out=out)
    assert r is out and torch.equal(out, t[3:13])
    b = ck.read_box("w", "param", (2, 5), (40, 9))
    assert torch.equal(b, t[2:40, 5:9])
    row = ck.read("w", index=7)
    assert torch.equal(row, t[7])
    assert ck.last_read_stats["bytes_read"] == 5 * 33 * 4 + 4
    assert ck.array_info("w").chunks == (5, 33)
    assert ck.nbytes == t.numel() * 4


def test_overlap_and_errors(tmp_path):
    w = create_checkpoint(tmp_path / "ck", durable=False)
    a = w.add_array("w", "param", (8, 4), torch.float32, chunks=(4, 4))
    a.write((0, 0), torch.zeros(4, 4))
    with pytest.raises(OverlapError, match=r"'w'.*'param'.*c/0/0"):
        a.write((2, 0), torch.zeros(1, 4))
    a.write((4, 0), torch.zeros(2, 2))
    with pytest.raises(OverlapError, match=r"c/1/0"):
        a.write((5, 1), torch.zeros(2, 2))
    with pytest.raises(UcpError, match="outside"):
        a.write((7, 0), torch.zeros(2, 4))
    with pytest.raises(UcpError, match="never casts"):
        a.write((0, 0), torch.zeros(1, 4, dtype=torch.float64))
    for bad in ["_ucp.x", "__x", ""]:
        with pytest.raises(UcpError):
            w.add_param(bad)
    with pytest.raises(UcpError):
        w.add_array("w", "zarr.json", (1,), torch.float32)
    w.abort()
    assert not (tmp_path / "ck" / "ucp.manifest.json").exists()
    with pytest.raises(UcpError, match="not empty"):
        create_checkpoint(tmp_path / "ck")
    create_checkpoint(tmp_path / "ck", overwrite=True).commit()


def test_unknown_names_list_close_matches(tmp_path):
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("layers.0.mlp.fc1.weight", "param", torch.ones(2))
        w.write_tensor("layers.0.mlp.fc1.weight", "exp_avg", torch.ones(2))
    ck = open_checkpoint(tmp_path / "ck")
    with pytest.raises(NotFoundError, match="layers.0.mlp.fc1.weight"):
        ck.read("layers.0.mlp.fc1.weihgt")
    with pytest.raises(KeyError, match="exp_avg"):
        ck.read("layers.0.mlp.fc1.weight", "exp_avg_sq")
    assert ck.states("layers.0.mlp.fc1.weight") == ["param", "exp_avg"]


def test_odd_names_roundtrip(tmp_path):
    names = ["a/b", "100%", "ünï cødé", "..", "zarr.json", "ucp.manifest.json", "x.y-z_0", "c"]
    with create_checkpoint(tmp_path / "ck") as w:
        for i, n in enumerate(names):
            w.write_tensor(n, "param", torch.full((2,), float(i)))
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.params == names
    for i, n in enumerate(names):
        assert torch.equal(ck.read(n), torch.full((2,), float(i)))
    assert verify(tmp_path / "ck") == []


def test_default_chunks_are_row_blocks():
    mib = 1 << 20
    assert layout.default_chunks((4096, 4096), 4) == (256, 4096)
    assert layout.default_chunks((10, 4 * mib), 4) == (1, mib)
    assert layout.default_chunks((), 4) == ()
    assert layout.default_chunks((0, 7), 4) == (1, 7)
    assert layout.default_chunks((1000,), 2) == (1000,)


@pytest.mark.parametrize("chunks", [None, (100, 256), (37, 1000)])
def test_large_reads_use_parallel_paths(tmp_path, chunks):
    t = torch.randn(3000, 1024)  # 12 MiB: reads go through the thread pool
    with create_checkpoint(tmp_path / "ck", chunk_bytes=1 << 20) as w:
        a = w.add_array("w", "param", t.shape, t.dtype, chunks=chunks)
        threads = [threading.Thread(target=a.write, args=((i, 0), t[i:i + 700])) for i in range(0, 3000, 700)]
        [th.start() for th in threads]
        [th.join() for th in threads]
    ck = open_checkpoint(tmp_path / "ck", workers=4)
    assert torch.equal(ck.read("w"), t)
    assert torch.equal(ck.read("w", index=(slice(123, 2900), slice(5, 1000))), t[123:2900, 5:1000])
    out = torch.empty(2000, 1024)
    ck.read("w", index=slice(999, 2999), out=out)
    assert torch.equal(out, t[999:2999])
    s = ck.last_read_stats
    assert s["bytes_needed"] == out.numel() * 4 and s["bytes_read"] >= s["bytes_needed"]


@SETTINGS
@given(shape=st.lists(st.integers(1, 7), min_size=0, max_size=4).map(tuple), seed=st.integers(0, 2**32 - 1))
def test_flat_ranges_write_and_read(shape, seed):
    rnd = random.Random(seed)
    n = math.prod(shape)
    t = torch.arange(n, dtype=torch.float32).reshape(shape)
    cutpts = sorted(set([0, n] + [rnd.randint(0, n) for _ in range(rnd.randint(0, 4))]))
    ranges = list(zip(cutpts[:-1], cutpts[1:]))
    rnd.shuffle(ranges)
    for a_, b_ in ranges:  # the boxes tile the range exactly
        bx = flat_to_boxes(a_, b_, shape)
        assert sum(b.numel for b in bx) == b_ - a_
    with tempfile.TemporaryDirectory() as d:
        w = create_checkpoint(d + "/ck", chunk_bytes=rnd.choice([4, 12, 64]), durable=False)
        a = w.add_array("p", "exp_avg", shape, torch.float32)
        for a_, b_ in ranges:
            a.write_flat(a_, t.reshape(-1)[a_:b_])
        w.commit()
        ck = open_checkpoint(d + "/ck")
        assert torch.equal(ck.read("p", "exp_avg"), t)
        for _ in range(3):
            x = rnd.randint(0, n)
            y = rnd.randint(x, n)
            assert torch.equal(ck.read_flat("p", "exp_avg", x, y), t.reshape(-1)[x:y])


def test_many_threads_single_rows_into_shared_chunks(tmp_path):
    """The zarr-python failure mode (threads writing rows that share a chunk) loses nothing here."""
    t = torch.randn(640, 16)
    w = create_checkpoint(tmp_path / "ck", durable=False)
    a = w.add_array("w", "param", t.shape, t.dtype, chunks=(64, 16))
    rows = list(range(640))
    random.Random(0).shuffle(rows)

    def run(part):
        for r in part:
            a.write((r, 0), t[r:r + 1])

    ths = [threading.Thread(target=run, args=(rows[i::32],)) for i in range(32)]
    [th.start() for th in ths]
    [th.join() for th in ths]
    assert not a._staged  # staging memory is released as chunks complete
    w.commit()
    assert torch.equal(open_checkpoint(tmp_path / "ck").read("w"), t)
