"""A chunk file is bound to its place by the manifest's crc32c, not only by its own trailer.

Two valid chunk files of the same size swapped on disk each pass their own trailing checksum;
only the comparison with the crc32c the manifest records for that chunk can catch the swap.
Every read path (row-contiguous chunks, other chunks, fsspec URLs) and `verify` must refuse
such a checkpoint, and a corrupted trailer alone (data intact) must not pass either.
"""
import pathlib

import pytest
import torch

from ucp.cli import main
from ucp.errors import CorruptChunkError
from ucp.format import create_checkpoint, open_checkpoint, verify

T = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)


def _write(path, chunks):
    with create_checkpoint(path) as w:
        w.add_param("w")
        w.write_tensor("w", "param", T, chunks=chunks)
        w.write_tensor("w", "exp_avg", -T, chunks=chunks)
    return path


def _chunk_files(path, state="param"):
    return sorted(p for p in (pathlib.Path(path) / "w" / state / "c").rglob("*") if p.is_file())


def _swap(a, b):
    da, db = a.read_bytes(), b.read_bytes()
    assert len(da) == len(db) and da != db
    a.write_bytes(db)
    b.write_bytes(da)


@pytest.mark.parametrize("chunks", [(2, 6), (8, 3), (4, 3)], ids=["rows", "columns", "tiles"])
@pytest.mark.parametrize("url", [False, True], ids=["local", "fsspec"])
def test_swapped_chunk_files_are_refused_by_reads(tmp_path, chunks, url):
    path = _write(tmp_path / "ck", chunks)
    files = _chunk_files(path)
    assert len(files) == (8 // chunks[0]) * (6 // chunks[1]) >= 2
    _swap(files[0], files[-1])
    where = ("file://" if url else "") + str(path)
    ck = open_checkpoint(where)
    key = "/".join(files[0].relative_to(path / "w" / "param").parts)
    with pytest.raises(CorruptChunkError, match=f"chunk {key}.*crc32c mismatch"):
        ck.read("w")
    # a box inside the first (swapped) chunk only
    box = tuple(slice(0, c) for c in chunks)
    with pytest.raises(CorruptChunkError, match="crc32c mismatch"):
        ck.read("w", index=box)
    # the untouched chunks still read, and the other state is intact
    assert torch.equal(ck.read("w", "exp_avg"), -T)


def test_chunk_swapped_across_states_is_refused(tmp_path):
    path = _write(tmp_path / "ck", (2, 6))
    a, b = _chunk_files(path, "param")[1], _chunk_files(path, "exp_avg")[1]
    _swap(a, b)
    ck = open_checkpoint(path)
    for state in ("param", "exp_avg"):
        with pytest.raises(CorruptChunkError, match="crc32c mismatch"):
            ck.read("w", state, index=(slice(2, 4),))


def test_swapped_chunk_files_are_reported_by_verify(tmp_path, capsys):
    path = _write(tmp_path / "ck", (2, 6))
    assert verify(path) == []
    files = _chunk_files(path)
    _swap(files[1], files[2])
    problems = verify(path)
    assert len(problems) == 2
    for f, p in zip(files[1:3], problems):
        key = "/".join(f.relative_to(path / "w" / "param").parts)
        assert f"param 'w' state 'param' chunk {key}" in p and "crc32c mismatch" in p, p
    assert main(["verify", str(path), "-q"]) != 0
    assert "crc32c mismatch" in capsys.readouterr().out


def test_corrupt_trailer_with_intact_data_is_refused(tmp_path):
    """The stored checksum is part of the file: a flipped trailer byte is corruption even when the
    data bytes (and so the manifest's crc32c of them) are intact."""
    path = _write(tmp_path / "ck", (2, 6))
    f = _chunk_files(path)[0]
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0x40
    f.write_bytes(raw)
    with pytest.raises(CorruptChunkError, match="crc32c mismatch"):
        open_checkpoint(path).read("w", index=(slice(0, 2),))
    with pytest.raises(CorruptChunkError, match="crc32c mismatch"):
        open_checkpoint("file://" + str(path)).read("w")
    (problem,) = verify(path)
    assert "crc32c mismatch" in problem
