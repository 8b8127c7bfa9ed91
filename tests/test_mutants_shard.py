"""Shard files: edge shards (inner chunks wholly outside the array) check out, and a crafted index
is refused by the check it trips, while a permuted but valid index is accepted. Kills surviving
mutants of ucp/format/shard.py (bench/mutation.py)."""
import crc32c
import numpy as np
import pytest
import torch

from ucp.format import create_checkpoint, open_checkpoint, verify
from ucp.format import shard as S

SHAPE, SHARDS, INNER = (10, 7), (8, 8), (4, 4)  # shard (1, 0) holds 2 rows: inner chunks (1, *) absent


@pytest.fixture
def ck(tmp_path):
    t = torch.arange(70, dtype=torch.float32).reshape(SHAPE)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("x", "param", t, shards=SHARDS, chunks=INNER)
    return tmp_path / "ck", t


def test_edge_shards_verify_and_read(ck):
    path, t = ck
    assert verify(path) == []
    c = open_checkpoint(path)
    assert torch.equal(c.read("x"), t)
    assert torch.equal(c.read("x", index=(slice(8, 10), slice(4, 7))), t[8:, 4:])
    assert S.present_positions(SHAPE, SHARDS, INNER, (1, 0)) is not None
    _it, lim = S.present(SHAPE, SHARDS, INNER, (1, 0))
    assert lim == (1, 2)
    _it, lim = S.present(SHAPE, SHARDS, INNER, (0, 0))
    assert lim == (2, 2)


def _parts(path, key=(0, 0)):
    f = path / "x" / "param" / "c" / "/".join(map(str, key))
    data = bytearray(f.read_bytes())
    ilen = S.index_nbytes(SHARDS, INNER)
    entries = np.frombuffer(bytes(data[-ilen:-4]), dtype="<u8").reshape(-1, 2).copy()
    return data[:-ilen], entries


def _with_index(body, entries):
    ib = entries.astype("<u8").tobytes()
    return bytes(body) + ib + crc32c.crc32c(ib).to_bytes(4, "little")


def _check(data, key=(0, 0)):
    return S.check_shard(data, SHAPE, SHARDS, INNER, key, 4)


def test_permuted_index_is_a_valid_shard(ck):
    """zarr allows inner chunks in any order in the file: offsets swapped in the index still check out."""
    path, _t = ck
    body, ent = _parts(path)
    ent[[0, 1]] = ent[[1, 0]]
    body2 = bytearray(body)
    nb = int(ent[0, 1])
    body2[:nb], body2[nb:2 * nb] = body[nb:2 * nb], body[:nb]
    _check(_with_index(body2, ent))


@pytest.mark.parametrize("edit,match", [
    (lambda e, nb: e.__setitem__((0,), [S.EMPTY, S.EMPTY]), "missing from the shard index"),
    (lambda e, nb: e.__setitem__((0, 0), S.EMPTY), "is invalid"),
    (lambda e, nb: e.__setitem__((0, 1), nb - 4), "is invalid"),
    (lambda e, nb: e.__setitem__((3, 0), int(e[3, 0]) + 4), "is invalid"),
    (lambda e, nb: e.__setitem__((1, 0), int(e[0, 0])), "overlaps another one|not covered"),
])
def test_crafted_index_is_refused(ck, edit, match):
    path, _t = ck
    body, ent = _parts(path)
    edit(ent, int(ent[0, 1]))
    with pytest.raises(S.ShardError, match=match):
        _check(_with_index(body, ent))


def test_entry_for_a_chunk_outside_the_array_is_refused(ck):
    path, _t = ck
    body, ent = _parts(path, (1, 0))
    assert int(ent[2, 0]) == S.EMPTY  # inner (1, 0) of the edge shard lies outside the array
    ent[2] = ent[0]
    with pytest.raises(S.ShardError, match="wholly outside the array"):
        _check(_with_index(body, ent), (1, 0))


def test_file_of_only_an_index_is_refused(ck):
    path, _t = ck
    _body, ent = _parts(path)
    ent[:] = S.EMPTY
    with pytest.raises(S.ShardError, match="missing from the shard index"):
        _check(_with_index(b"", ent))
    with pytest.raises(S.ShardError, match="shorter than its index"):
        _check(_with_index(b"", ent)[1:])


@pytest.mark.parametrize("half", [0, 1], ids=["offset-only", "nbytes-only"])
def test_half_empty_entry_for_a_chunk_outside_the_array_is_refused(ck, half):
    """Only the pair (2**64-1, 2**64-1) marks an absent inner chunk; one half of it is not absence."""
    path, _t = ck
    body, ent = _parts(path, (1, 0))
    ent[2] = ent[0]
    ent[2, half] = S.EMPTY
    with pytest.raises(S.ShardError, match="index entry 2 points at an inner chunk wholly outside the array"):
        _check(_with_index(body, ent), (1, 0))


def test_bytes_between_the_inner_chunks_and_the_index_are_refused(ck):
    path, _t = ck
    body, ent = _parts(path)
    with pytest.raises(S.ShardError, match="shard file has 3 bytes not covered by any inner chunk"):
        _check(_with_index(bytes(body) + b"\0\0\0", ent))


def test_index_of_the_wrong_length_is_refused():
    want = S.index_nbytes(SHARDS, INNER)
    for n in (want - 1, want + 1, 0):
        with pytest.raises(S.ShardError, match=f"shard index is {n} bytes, expected {want}"):
            S.parse_index(bytes(n), SHARDS, INNER)


def test_gap_between_inner_chunks_is_refused(ck):
    """Inner chunks that do not overlap and end exactly at the index can still leave a gap between
    them: the bytes not covered are counted, not only those at the end."""
    path, _t = ck
    body, ent = _parts(path)
    nb = int(ent[0, 1])
    order = np.argsort(ent[:, 0])
    body2 = bytes(body[:nb]) + b"\0" * 4 + bytes(body[nb:])
    for pos in order[1:]:
        ent[pos, 0] += 4
    with pytest.raises(S.ShardError, match="shard file has 4 bytes not covered by any inner chunk"):
        _check(_with_index(body2, ent))
