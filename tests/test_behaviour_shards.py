"""A damaged shard file is refused by every way of reading it: a read of the whole shard, a read of
some of its inner chunks (index first, then byte ranges), a read after the index was checked, and
``verify``. Missing, truncated, grown, and a shard index whose crc32c the manifest does not record
are each named as such. Surviving mutants of ucp/format/reader.py and verify.py showed the partial
read paths and the manifest's index crc32c went unchecked.
"""
import pytest
import torch

from ucp.errors import CorruptChunkError
from ucp.format import create_checkpoint, open_checkpoint, verify

from _manifest_edit import rewrite_manifest

T = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)
WHOLE, PART = slice(0, 8), slice(2, 4)  # all of shard c/0/0; one inner chunk of it


@pytest.fixture
def ck(tmp_path):
    """(16, 8) float32 in 2 shards of (8, 8), inner chunks of (2, 8); returns (root, shard c/0/0)."""
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("s", "param", T, shards=(8, 8), chunks=(2, 8))
    return tmp_path / "ck", tmp_path / "ck" / "s" / "param" / "c" / "0" / "0"


def _reads(root, match):
    for index in (WHOLE, PART):
        with pytest.raises(CorruptChunkError, match=match):
            open_checkpoint(root).read("s", index=index)
    assert torch.equal(open_checkpoint(root).read("s", index=slice(8, 16)), T[8:])  # the other shard is fine


def test_missing_shard_is_named(ck):
    root, f = ck
    f.unlink()
    _reads(root, r"chunk c/0/0: file s/param/c/0/0 is missing")
    assert verify(root) == ["param 's' state 'param' chunk c/0/0 (s/param/c/0/0): missing"]


@pytest.mark.parametrize("cut", [-1, -100, 1], ids=["last-byte", "into-data", "extra-byte"])
def test_truncated_or_grown_shard_is_named(ck, cut):
    root, f = ck
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut < 0 else data + b"\0" * cut)
    tail = "truncated" if cut < 0 else "extra bytes"
    _reads(root, rf"shard c/0/0 .*the manifest records {len(data)} \({tail}\)")
    (problem,) = verify(root)
    assert f"chunk c/0/0 (s/param/c/0/0): {tail}" in problem


def test_shard_index_crc_is_compared_with_the_manifest(ck):
    """An index that checks out on its own but is not the one the manifest recorded is refused."""
    root, _f = ck
    rewrite_manifest(root, lambda doc: doc["params"][0]["states"]["param"]["chunk_table"]["c/0/0"].__setitem__(
        1, doc["params"][0]["states"]["param"]["chunk_table"]["c/0/0"][1] ^ 1))
    _reads(root, r"shard c/0/0 .*shard index crc32c 0x[0-9a-f]{8} differs from the manifest's")
    (problem,) = verify(root)
    assert "shard c/0/0 (s/param/c/0/0): index crc32c" in problem and "differs from the manifest's" in problem


def test_shard_truncated_after_its_index_was_checked_is_refused(ck):
    """The index of a shard is checked once per open checkpoint; the data reads after that still
    check the file's size (a file replaced or cut while a reader has it open)."""
    root, f = ck
    c = open_checkpoint(root)
    assert torch.equal(c.read("s", index=PART), T[PART])
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(CorruptChunkError, match=r"shard c/0/0 .*\(truncated\)"):
        c.read("s", index=slice(4, 6))
    with pytest.raises(CorruptChunkError, match=r"shard c/0/0 .*\(truncated\)"):
        c.read("s", index=WHOLE)


def test_inner_chunk_flipped_after_its_index_was_checked_is_refused(ck):
    root, f = ck
    c = open_checkpoint(root)
    assert torch.equal(c.read("s", index=PART), T[PART])
    data = bytearray(f.read_bytes())
    data[2 * 8 * 4 + 4 + 5] ^= 1  # a data byte of inner chunk 1 (rows 2..3)
    f.write_bytes(bytes(data))
    for index in (PART, WHOLE):
        with pytest.raises(CorruptChunkError, match=r"inner chunk \[1, 0\] crc32c mismatch"):
            c.read("s", index=index)


def _recraft_index(root, f, edit):
    """Edit the index entries of shard file ``f`` and re-sign both the index and the manifest's
    record of its crc32c, so only the entry checks of the read itself can refuse it."""
    import crc32c
    import numpy as np

    data = f.read_bytes()
    n = 4 * 16 + 4  # 4 inner chunks per shard
    ent = np.frombuffer(data[-n:-4], dtype="<u8").reshape(-1, 2).copy()
    edit(ent)
    ib = ent.astype("<u8").tobytes()
    icrc = crc32c.crc32c(ib)
    f.write_bytes(data[:-n] + ib + icrc.to_bytes(4, "little"))
    rewrite_manifest(root, lambda d: d["params"][0]["states"]["param"]["chunk_table"]["c/0/0"].__setitem__(1, icrc))


@pytest.mark.parametrize("edit, match", [
    (lambda e: e.__setitem__((3, 0), int(e[3, 0]) + 4), r"inner chunk at index position 3: index entry .* is invalid"),
    (lambda e: e.__setitem__((3,), [2**64 - 1, 2**64 - 1]), r"inner chunk at index position 3: missing from the"),
    (lambda e: e.__setitem__((3, 1), int(e[3, 1]) - 4), r"inner chunk at index position 3: index entry .* is invalid"),
    (lambda e: e.__setitem__((slice(None), 1), e[:, 1] - 4), r"inner chunk at index position 0: index entry .* is invalid"),
], ids=["past-the-data", "missing", "short", "all-short"])
def test_crafted_index_signed_in_the_manifest_is_refused_by_reads(ck, edit, match):
    """Even an index the manifest vouches for must describe this shard's geometry."""
    root, f = ck
    _recraft_index(root, f, edit)
    for index in (slice(6, 8), WHOLE):  # the crafted inner chunk only; the whole shard
        with pytest.raises(CorruptChunkError, match=match):
            open_checkpoint(root).read("s", index=index)
    (problem,) = verify(root)
    assert "shard c/0/0" in problem


def test_shards_swapped_on_disk_are_refused_by_partial_reads(ck):
    """Two shard files of the same geometry swapped: each index checks out and the manifest's index
    crc32c is the same for both; only the content crc32c binds each file to its place, and a read of
    one inner chunk checks it too."""
    root, f = ck
    g = root / "s" / "param" / "c" / "1" / "0"
    a, b = f.read_bytes(), g.read_bytes()
    f.write_bytes(b)
    g.write_bytes(a)
    for index in (PART, slice(10, 12)):
        with pytest.raises(CorruptChunkError, match=r"content crc32c 0x[0-9a-f]{8} differs from the manifest's"):
            open_checkpoint(root).read("s", index=index)
