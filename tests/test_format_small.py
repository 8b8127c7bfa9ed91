"""Whole reads of small one-chunk arrays take a short path (``Checkpoint._read_small``, perf of issue 14):
it must give what the general box path gives, bit for bit, for every dtype and rank, count what it read,
and refuse every damaged chunk file as the general path does."""

import os

import pytest
import torch

from ucp.errors import CorruptChunkError, FormatError
from ucp.format import create_checkpoint, dtypes, open_checkpoint


def _tensor(name, shape):
    """A tensor of logical dtype ``name`` with distinct bit patterns (a random byte view)."""
    dt = dtypes.torch_dtype(name)
    itemsize = torch.empty((), dtype=dt).element_size()
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    if dt == torch.bool:
        raw = raw % 2
    return raw.view(dt).reshape(shape)


def _bits(t):
    return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


SHAPES = [(), (7,), (3, 5), (2, 3, 4)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small") / "ck"
    tensors = {f"{name}.{len(shape)}d": _tensor(name, shape) for name in dtypes.SUPPORTED for shape in SHAPES}
    with create_checkpoint(root) as w:
        for k, t in tensors.items():
            w.write_tensor(k, "param", t)
    return root, tensors


def test_small_whole_reads_equal_the_written_tensors_and_the_box_path(small):
    root, tensors = small
    ck = open_checkpoint(root)
    for k, t in tensors.items():
        info = ck.array_info(k)
        assert info.nchunks == 1 and info.chunks == tuple(t.shape), k  # one chunk: the short path applies
        got = ck.read(k)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(_bits(got), _bits(t)), k
        assert ck.last_read_stats == {"bytes_read": info.nbytes + 4, "bytes_needed": info.nbytes, "chunks_read": 1}
        box = ck.read_box(k, "param", None, None)  # the general path, for the same bytes
        assert torch.equal(_bits(box), _bits(got)), k


def test_small_reads_count_bytes_and_return_independent_writable_tensors(small):
    root, tensors = small
    ck = open_checkpoint(root)
    a, b = ck.read("float32.2d"), ck.read("float32.2d")
    a.add_(1)
    assert torch.equal(b, tensors["float32.2d"]) and not torch.equal(a, b)
    assert ck.bytes_read == 2 * (15 * 4 + 4) and ck.chunks_read == 2


@pytest.fixture
def one(tmp_path):
    root = tmp_path / "one"
    with create_checkpoint(root) as w:
        w.write_tensor("w", "param", torch.arange(12, dtype=torch.float32).reshape(3, 4))
    return root, root / "w" / "param" / "c" / "0" / "0"


def _damage(path, how):
    data = path.read_bytes()
    if how == "flip":
        path.write_bytes(data[:5] + bytes([data[5] ^ 1]) + data[6:])
    elif how == "truncate":
        path.write_bytes(data[:-1])
    elif how == "extra":
        path.write_bytes(data + b"\0")
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how,err,match", [
    ("flip", CorruptChunkError, "crc32c mismatch"),
    ("truncate", CorruptChunkError, r"size 51 bytes, the manifest records 52 \(truncated\)"),
    ("extra", CorruptChunkError, r"size 53 bytes, the manifest records 52 \(extra bytes\)"),
    ("missing", CorruptChunkError, "w/param/c/0/0 is missing"),
])
def test_small_reads_refuse_a_damaged_chunk_like_the_box_path(one, how, err, match):
    root, chunk = one
    _damage(chunk, how)
    ck = open_checkpoint(root)
    with pytest.raises(err, match=match):
        ck.read("w")
    with pytest.raises(err, match=match):
        ck.read_box("w", "param", None, None)


def test_small_reads_refuse_a_chunk_that_is_a_symbolic_link(one, tmp_path):
    root, chunk = one
    outside = tmp_path / "outside"
    outside.write_bytes(chunk.read_bytes())
    chunk.unlink()
    os.symlink(outside, chunk)
    with pytest.raises(FormatError, match="symbolic link"):
        open_checkpoint(root).read("w")
