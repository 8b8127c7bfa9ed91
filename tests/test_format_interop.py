"""zarr-python 3.1.6 opens what ucp writes and reads identical values; it verifies our crc32c."""
import math

import numpy as np
import pytest
import torch
import zarr

from ucp.format import FORMAT_VERSION, create_checkpoint, dtypes, open_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# The RNG state stored as metadata: a fixed generator's state, so the check below is exact.
RNG_STATE = torch.Generator().manual_seed(1234).get_state()


def storage_np(t):
    return dtypes.to_storage_numpy(t.contiguous())


def make(path, **kw):
    g = torch.Generator().manual_seed(0)
    tensors = {}
    with create_checkpoint(path, chunk_bytes=256, **kw) as w:
        for i, name in enumerate(dtypes.SUPPORTED):
            dt = dtypes.torch_dtype(name)
            shape = [(5, 7), (13,), (), (3, 0, 2), (2, 3, 40)][i % 5]
            raw = torch.randint(0, 256, (math.prod(shape) * dtypes.itemsize(name),), dtype=torch.uint8, generator=g)
            if dt == torch.bool:
                raw = raw & 1
            t = raw.view(dtypes.storage_torch_dtype(name)).view(dt).reshape(shape)
            pname = f"layers.{i}.{name}/w"
            w.add_param(pname, {"rule": "test", "frozen": bool(i % 2)})
            w.write_tensor(pname, "param", t)
            w.write_tensor(pname, "exp_avg", t.clone(), chunks=tuple(max(1, (n + 1) // 2) for n in shape))
            tensors[pname] = t
        w.set_metadata({"rng": RNG_STATE})
    return tensors


def check_zarr(path, tensors, **open_kw):
    g = zarr.open_group(path, mode="r", **open_kw)
    assert g.attrs["ucp"]["format_version"] == FORMAT_VERSION == 2
    ck = open_checkpoint(path, **({"storage_options": open_kw["storage_options"]} if open_kw else {}))
    for pname, t in tensors.items():
        enc = ck.manifest["params"][ck.params.index(pname)]["path"]
        pg = g[enc]
        assert pg.attrs["ucp"]["name"] == pname
        for state in ("param", "exp_avg"):
            arr = pg[state]
            assert arr.attrs["ucp"]["dtype"] == dtypes.dtype_name(t.dtype)
            got = arr[...]
            want = storage_np(t)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert got.tobytes() == want.tobytes()
            assert storage_np(ck.read(pname, state)).tobytes() == want.tobytes()
    rng = g["_ucp"]["meta"]["0"][...]
    assert rng.dtype == np.uint8 and rng.tobytes() == RNG_STATE.numpy().tobytes()
    assert torch.equal(ck.metadata["rng"], RNG_STATE)


def test_zarr_python_reads_everything(tmp_path):
    tensors = make(tmp_path / "ck")
    check_zarr(str(tmp_path / "ck"), tensors)


def test_zarr_python_checks_our_crc(tmp_path):
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("x", "param", torch.arange(10, dtype=torch.float32))
    f = tmp_path / "ck" / "x" / "param" / "c" / "0"
    b = bytearray(f.read_bytes())
    b[3] ^= 1
    f.write_bytes(b)
    arr = zarr.open_group(str(tmp_path / "ck"), mode="r")["x"]["param"]
    with pytest.raises(Exception, match="checksum"):
        arr[...]


def test_file_url_through_fsspec(tmp_path):
    url = "file://" + str(tmp_path / "ck")
    tensors = make(url)
    check_zarr(str(tmp_path / "ck"), tensors)
    ck = open_checkpoint(url)
    for n, t in tensors.items():
        assert storage_np(ck.read(n, index=(Ellipsis,))).tobytes() == storage_np(t).tobytes()


def test_zarr_python_reads_sharded_arrays(tmp_path):
    """Every dtype, sharded (tiny targets so the small shapes shard), edge shards with absent inner chunks."""
    tensors = make(tmp_path / "ck", shard_bytes=96, inner_bytes=16)
    ck = open_checkpoint(tmp_path / "ck")
    n_sharded = sum(ck.array_info(n, "param").inner_chunks is not None for n in tensors)
    assert n_sharded >= len(tensors) // 2
    check_zarr(str(tmp_path / "ck"), tensors)
    g = zarr.open_group(str(tmp_path / "ck"), mode="r")
    for n in tensors:
        info = ck.array_info(n, "param")
        if info.inner_chunks is not None:
            arr = g[ck.manifest["params"][ck.params.index(n)]["path"]]["param"]
            assert arr.shards == info.chunks and arr.chunks == info.inner_chunks


def test_zarr_python_checks_sharded_crc(tmp_path):
    t = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    with create_checkpoint(tmp_path / "ck", shard_bytes=4096, inner_bytes=1024) as w:
        w.write_tensor("x", "param", t)
    f = tmp_path / "ck" / "x" / "param" / "c" / "0" / "0"
    b = bytearray(f.read_bytes())
    b[3] ^= 1
    f.write_bytes(b)
    arr = zarr.open_group(str(tmp_path / "ck"), mode="r")["x"]["param"]
    assert np.array_equal(arr[32:], t.numpy()[32:])
    with pytest.raises(Exception, match="checksum"):
        arr[...]


@pytest.mark.parametrize("shape,shards,inner", [
    ((70, 50), (32, 24), (8, 6)),          # 4 x 4 inner grid; edge shards hold fewer inner chunks
    ((12, 20, 9), (6, 10, 9), (2, 5, 3)),  # 3 x 2 x 3 inner grid
    ((9, 64), (9, 32), (3, 8)),            # 3 x 4: rows and columns of the inner grid differ
], ids=["2d-edges", "3d", "2d-wide"])
def test_zarr_python_reads_multi_dimensional_inner_grids(tmp_path, shape, shards, inner):
    """Inner chunks indexed in C order of a 2-D / 3-D inner grid: a Fortran-order index (or any
    other permutation) puts every tile in the wrong place for zarr-python and for ucp."""
    import itertools

    t = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("x", "param", t, chunks=inner, shards=shards)
    arr = zarr.open_group(str(tmp_path / "ck"), mode="r")["x"]["param"]
    assert arr.shards == shards and arr.chunks == inner
    assert np.array_equal(arr[...], t.numpy())
    ck = open_checkpoint(tmp_path / "ck")
    assert torch.equal(ck.read("x"), t)
    # every inner chunk on its own, through both readers
    for idx in itertools.product(*(range(-(-n // c)) for n, c in zip(shape, inner))):
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(idx, inner, shape))
        assert np.array_equal(arr[box], t.numpy()[box]), idx
        assert torch.equal(ck.read("x", index=box), t[box]), idx
