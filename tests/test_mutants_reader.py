"""Reader behaviour that surviving mutants of ucp/format/reader.py (bench/mutation.py) showed no
test pinned down:

- chunks larger than the reader's 64 KiB scratch buffer read back right by every read path (rows
  of a row chunk, a column box, a whole chunk);
- which read path a box takes never changes its values: column chunks read as whole rows, 1-D
  arrays, scalars;
- the flat range of a whole array and an empty one are ranges like any other;
- sizes (``ArrayInfo.nbytes``, ``Checkpoint.nbytes``) and statistics before any read;
- checkpoint metadata is decoded once per open checkpoint;
- a shard file is judged by its size before its index is believed; swapped shard files are
  refused by whole-shard reads too; a shard deleted after its index was checked is named missing;
- a missing chunk file too large to read blind is named missing, not short.
"""
import pytest
import torch

from ucp.errors import CorruptChunkError
from ucp.format import create_checkpoint, open_checkpoint

BIG = torch.arange(64 * 1024, dtype=torch.float32).reshape(64, 1024)  # one 256 KiB chunk


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big") / "ck"
    with create_checkpoint(root) as w:
        w.write_tensor("w", "param", BIG, chunks=(64, 1024))
    return root


@pytest.mark.parametrize("index", [slice(10, 20), slice(0, 1), slice(63, 64), (slice(None), slice(5, 7)),
                                   (slice(3, 40), slice(1000, 1024)), slice(None)],
                         ids=["middle-rows", "first-row", "last-row", "columns", "corner", "whole"])
def test_chunks_larger_than_the_scratch_buffer(big, index):
    """Rows of a row chunk are read around a scratch buffer that must hold every other row of the
    chunk and its crc32c; a column box reads the chunk whole into it."""
    ck = open_checkpoint(big)
    assert torch.equal(ck.read("w", index=index), BIG[index])
    assert ck.last_read_stats["bytes_read"] == BIG.numel() * 4 + 4


def test_read_paths_give_the_same_values(tmp_path):
    t2 = torch.arange(10 * 6, dtype=torch.int32).reshape(10, 6)
    t3 = torch.arange(4 * 3 * 5, dtype=torch.int16).reshape(4, 3, 5)
    t1 = torch.arange(11, dtype=torch.int64)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("cols", "param", t2, chunks=(3, 4))  # column chunks: whole rows are not contiguous
        w.write_tensor("rows3", "param", t3, chunks=(3, 3, 5))  # 3-D row chunks
        w.write_tensor("vec", "param", t1, chunks=(4,))
        w.write_tensor("one", "param", torch.tensor(7.5, dtype=torch.float64))
    ck = open_checkpoint(tmp_path / "ck")
    for index in (None, slice(2, 9), (slice(None), slice(1, 5)), 4):
        assert torch.equal(ck.read("cols", index=index), t2 if index is None else t2[index])
    for index in (None, slice(1, 4), (slice(None), slice(1, 2)), (slice(None), slice(None), slice(2, 3))):
        assert torch.equal(ck.read("rows3", index=index), t3 if index is None else t3[index])
    for index in (None, slice(3, 9), 10):
        assert torch.equal(ck.read("vec", index=index), t1 if index is None else t1[index])
    one = ck.read("one")
    assert one.shape == () and one.item() == 7.5


def test_flat_range_of_the_whole_array_and_empty_ranges(tmp_path):
    t = torch.arange(10 * 4, dtype=torch.float32).reshape(10, 4)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("w", "param", t, chunks=(3, 4))
    ck = open_checkpoint(tmp_path / "ck")
    assert torch.equal(ck.read_flat("w", "param", 0, 40), t.reshape(-1))
    assert torch.equal(ck.read_flat("w", "param", 0, 7), t.reshape(-1)[:7])
    for k in (0, 17, 40):
        empty = ck.read_flat("w", "param", k, k)
        assert empty.shape == (0,) and empty.dtype == torch.float32
        assert ck.last_read_stats == {"bytes_read": 0, "bytes_needed": 0, "chunks_read": 0}


def test_sizes_and_statistics_before_any_read(tmp_path):
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("w", "param", torch.zeros(10, 4, dtype=torch.bfloat16), chunks=(3, 4))
        w.write_tensor("w", "exp_avg", torch.zeros(10, 4), chunks=(3, 4))
        w.write_tensor("s", "param", torch.zeros(16, 8, dtype=torch.float64), shards=(8, 8), chunks=(2, 8))
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.last_read_stats == {"bytes_read": 0, "bytes_needed": 0, "chunks_read": 0}
    assert (ck.bytes_read, ck.chunks_read) == (0, 0)
    assert [ck.array_info("w", s).nbytes for s in ("param", "exp_avg")] == [80, 160]
    assert ck.array_info("s").nbytes == 16 * 8 * 8
    assert ck.nbytes == 80 + 160 + 1024


def test_metadata_is_decoded_once_per_open_checkpoint(tmp_path):
    step = torch.arange(5, dtype=torch.int64)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("w", "param", torch.zeros(4))
        w.set_metadata({"step": step, "lr": 0.5})
    ck = open_checkpoint(tmp_path / "ck")
    m = ck.metadata
    assert torch.equal(m["step"], step) and m["lr"] == 0.5
    assert ck.chunks_read == 1
    assert ck.metadata is m and ck.chunks_read == 1  # the second look reads nothing again


S = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)
PART, WHOLE = slice(2, 4), slice(0, 8)  # one inner chunk of shard c/0/0; all of it


@pytest.fixture
def shards(tmp_path):
    """(16, 8) float32 in 2 shards of (8, 8), inner chunks of (2, 8); returns (root, shard c/0/0)."""
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("s", "param", S, shards=(8, 8), chunks=(2, 8))
    return tmp_path / "ck", tmp_path / "ck" / "s" / "param" / "c" / "0" / "0"


def test_a_shard_is_judged_by_its_size_before_its_index(shards):
    """A byte inserted at the front shifts the index: the error names the size, not the index."""
    root, f = shards
    data = f.read_bytes()
    f.write_bytes(b"\0" + data)
    for index in (PART, WHOLE):
        with pytest.raises(CorruptChunkError, match=rf"shard c/0/0 .*size {len(data) + 1} bytes, the manifest "
                                                    rf"records {len(data)} \(extra bytes\)"):
            open_checkpoint(root).read("s", index=index)


def test_swapped_shards_are_refused_by_whole_shard_reads(shards):
    """Each index checks out and the manifest's index crc32c is the same for both files: the
    content crc32c binds a file to its place, also when the shard is read whole."""
    root, f = shards
    g = root / "s" / "param" / "c" / "1" / "0"
    a, b = f.read_bytes(), g.read_bytes()
    f.write_bytes(b)
    g.write_bytes(a)
    for index in (WHOLE, slice(8, 16), slice(None)):
        with pytest.raises(CorruptChunkError, match=r"content crc32c 0x[0-9a-f]{8} differs from the manifest's"):
            open_checkpoint(root).read("s", index=index)


def test_shard_deleted_after_its_index_was_checked_is_named_missing(shards):
    root, f = shards
    ck = open_checkpoint(root)
    assert torch.equal(ck.read("s", index=PART), S[PART])  # index checked and kept
    f.unlink()
    with pytest.raises(CorruptChunkError, match=r"chunk c/0/0: file s/param/c/0/0 is missing"):
        ck.read("s", index=slice(4, 6))


def test_missing_large_chunk_is_named_missing(tmp_path):
    """The reader stats a chunk file before allocating more than 16 MiB for it: a missing one is
    named missing there, by the row path (one row of a 24 MiB chunk) and the generic path alike."""
    n = (6 << 20) // 4
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("w", "param", torch.zeros(4, n), chunks=(4, n))
    (tmp_path / "ck" / "w" / "param" / "c" / "0" / "0").unlink()
    ck = open_checkpoint(tmp_path / "ck")
    for index in (1, (slice(None), slice(0, 3))):
        with pytest.raises(CorruptChunkError, match=r"chunk c/0/0: file w/param/c/0/0 is missing"):
            ck.read("w", index=index)


def test_format_version_1_shards_are_read_without_a_content_crc(shards):
    """A format_version 1 manifest records [size, index crc32c] per shard: both read paths read
    it (with the warning that contents are not bound)."""
    from _manifest_edit import rewrite_manifest

    root, _f = shards

    def as_version_1(doc):
        doc["format_version"] = 1
        rec = doc["params"][0]["states"]["param"]
        rec["chunk_table"] = {k: v[:2] for k, v in rec["chunk_table"].items()}
    rewrite_manifest(root, as_version_1)
    for index in (PART, WHOLE, slice(None)):
        with pytest.warns(UserWarning, match="format_version 1 does not bind shard contents"):
            ck = open_checkpoint(root)
        assert torch.equal(ck.read("s", index=index), S[index])


def test_shard_index_too_large_to_read_blind_is_checked_first(tmp_path):
    """A manifest that claims a shard of 2^23 inner chunks (a 128 MiB index) while the file on disk
    is small: a read of one inner chunk stats the file before allocating the index buffer."""
    from test_behaviour_lies import _lie, _refused_without_allocating

    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.write_tensor("w", "param", torch.ones(8), shards=(8,), chunks=(4,))
    n = 1 << 23
    _lie(root, (n,), (n,), (1,))
    _refused_without_allocating(root, slice(0, 1), r"shard c/0 .*size 76 bytes, the manifest records")


@pytest.mark.parametrize("index", [PART, WHOLE, slice(0, 6)], ids=["its-own", "whole-shard", "most"])
def test_damaged_inner_chunk_is_named_by_a_first_read(shards, index):
    """A data byte of inner chunk 1 flipped: its stored crc32c word is intact, so the shard's content
    crc32c still checks out, and the first read of the shard names the damaged inner chunk."""
    root, f = shards
    data = bytearray(f.read_bytes())
    data[2 * 8 * 4 + 4 + 5] ^= 1  # a data byte of inner chunk 1 (rows 2..3)
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError, match=r"shard c/0/0 .*inner chunk \[1, 0\] crc32c mismatch"):
        open_checkpoint(root).read("s", index=index)
    assert torch.equal(open_checkpoint(root).read("s", index=slice(4, 16)), S[4:])  # the other chunks are fine


# -- survivors of the rerun on the look-ahead / one-open-file reader (bench/results/mutation_reader.txt)
def _grid_shards(root):
    """(64, 48) float32 in 4 shard files of (16, 48), inner chunks of (16, 16): each shard one row
    of 3 inner chunks (1028 bytes each with its crc32c word)."""
    x = torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48)
    with create_checkpoint(str(root), durable=False) as w:
        w.write_tensor("x", "param", x, chunks=(16, 16), shards=(16, 48))
    return x


@pytest.fixture
def uncached(monkeypatch):
    """No shard file in the page cache (as after a restart): reads across files fetch ahead."""
    from ucp.format.store import LocalStore

    monkeypatch.setattr(LocalStore, "cached", lambda self, rel, start, stop: False)


def test_small_arrays_read_by_index_and_into_out(tmp_path):
    """A small one-chunk array takes the short path only when read whole into a new tensor: an index
    or an ``out`` buffer is honoured like for any other array."""
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("b", "param", t)
    ck = open_checkpoint(tmp_path / "ck")
    assert ck._array("b", "param").small_key is not None  # the array this test is about
    out = torch.full((3, 4), -1.0)
    assert ck.read("b", out=out) is out and torch.equal(out, t)
    assert torch.equal(ck.read("b", index=1), t[1])
    assert torch.equal(ck.read("b", index=(slice(None), slice(1, 3))), t[:, 1:3])
    assert ck.last_read_stats == {"bytes_read": 12 * 4 + 4, "bytes_needed": 3 * 2 * 4, "chunks_read": 1}


def test_an_empty_box_does_not_stop_the_boxes_after_it(tmp_path):
    t = torch.arange(10 * 4, dtype=torch.float32).reshape(10, 4)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("w", "param", t, chunks=(3, 4))
    ck = open_checkpoint(tmp_path / "ck")
    out = torch.full((3, 4), -1.0)
    ck.read_boxes([("w", "param", [2, 0], [2, 4], torch.empty(0, 4)), ("w", "param", [4, 0], [7, 4], out)])
    assert torch.equal(out, t[4:7])
    assert ck.last_read_stats == {"bytes_read": 2 * (3 * 4 * 4 + 4), "bytes_needed": 3 * 4 * 4, "chunks_read": 2}


def test_a_closed_checkpoint_reads_again(tmp_path):
    """``close`` (the end of a ``with``) stops the reader threads; a later read starts new ones."""
    url = f"memory://ucp-mutants-reader/{tmp_path.name}/ck"  # an object store: reads run on threads
    t = torch.arange(64, dtype=torch.float32).reshape(16, 4)
    with create_checkpoint(url, chunk_bytes=64) as w:
        w.write_tensor("w", "param", t)
    with open_checkpoint(url) as ck:
        assert torch.equal(ck.read("w"), t)
    assert torch.equal(ck.read("w"), t)
    assert ck.last_read_stats["chunks_read"] == 4


def test_a_checkpoint_closed_after_a_failed_read_reads_the_other_shards(tmp_path, uncached, monkeypatch):
    """A read that fails on its first shard leaves files fetched ahead that it never read; ``close``
    drops that look-ahead, and a read of the other shards afterwards gets their values."""
    from ucp.format import reader as reader_mod

    root = tmp_path / "ck"
    x = _grid_shards(root)
    monkeypatch.setattr(reader_mod, "LOOK_AHEAD_BYTES", 1)  # two files ahead: one left unread
    ck = open_checkpoint(str(root), workers=1)
    a = ck._array("x", "param")
    f = root / a.info.path / sorted(a.table)[0]
    data = bytearray(f.read_bytes())
    data[-6] ^= 0xFF  # inside the index of shard 0
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError, match="index"):
        ck.read_box("x", "param", [0, 16], [64, 32])
    ck.close()
    assert torch.equal(ck.read_box("x", "param", [16, 16], [64, 32]), x[16:, 16:32])


@pytest.mark.parametrize("index", [None, (slice(None), slice(16, 48))], ids=["whole", "columns"])
def test_runs_read_in_bands_count_the_bytes_read(tmp_path, monkeypatch, index):
    """A run of inner chunks larger than the batch limit is read in bands: the same values and the
    same bytes counted as a read of the same box in whole batches."""
    from ucp.format import reader as reader_mod

    root = tmp_path / "ck"
    x = _grid_shards(root)
    want = x if index is None else x[index]
    ck = open_checkpoint(str(root), workers=1)
    monkeypatch.setattr(ck, "_look_ahead", lambda shards: None)
    assert torch.equal(ck.read("x", index=index), want)
    batched = ck.last_read_stats
    monkeypatch.setattr(reader_mod, "STREAM_BYTES", 2048)  # a run of 2 or 3 chunks (2056, 3084 bytes): bands of 10 rows
    ck = open_checkpoint(str(root), workers=1)
    monkeypatch.setattr(ck, "_look_ahead", lambda shards: None)
    bands = []
    real = reader_mod.Checkpoint._read_bands
    monkeypatch.setattr(reader_mod.Checkpoint, "_read_bands", lambda self, *a: bands.append(1) or real(self, *a))
    assert torch.equal(ck.read("x", index=index), want)
    assert len(bands) == 4  # one run per shard file
    assert ck.last_read_stats == batched
    assert ck.bytes_read == batched["bytes_read"] > 0


def test_whole_shard_reads_fetched_ahead_count_the_bytes_read(tmp_path, uncached, monkeypatch):
    """Files read whole are only hinted by the look-ahead: it adds nothing to the bytes the read counts."""
    root = tmp_path / "ck"
    x = _grid_shards(root)
    plain = open_checkpoint(str(root))
    monkeypatch.setattr(plain, "_look_ahead", lambda shards: None)
    assert torch.equal(plain.read("x"), x)
    ck = open_checkpoint(str(root))
    assert torch.equal(ck.read("x"), x)
    assert ck.last_read_stats == plain.last_read_stats
    assert ck.bytes_read == sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and "/c/" in str(f))


def test_whole_2d_shards_on_an_object_store_take_one_data_request_each(tmp_path, monkeypatch):
    """Like the 1-D case (test_behaviour_reader): a shard whose inner chunks are row blocks (each its
    own run) is still fetched in one data request after its index, not one per run."""
    from ucp.format.store import FsspecStore

    url = f"memory://ucp-mutants-reader/{tmp_path.name}/shards2d"
    t = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)
    with create_checkpoint(url) as w:
        w.write_tensor("s", "param", t, shards=(8, 8), chunks=(2, 8))  # 2 shards of 4 row-block inner chunks
    ck = open_checkpoint(url, workers=1)
    calls = []
    real = FsspecStore.read_ranges
    monkeypatch.setattr(FsspecStore, "read_ranges",
                        lambda self, rel, *a, **k: calls.append(rel) or real(self, rel, *a, **k))
    assert torch.equal(ck.read("s"), t)
    assert len(set(calls)) == 2 and len(calls) == 4, calls


@pytest.mark.parametrize("window, ahead", [(1, [2, 2, 2, 1, 0]), (3 * 1024, [3, 3, 2, 1, 0])],
                         ids=["below-one-file", "three-files"])
def test_the_look_ahead_keeps_its_window_full(tmp_path, uncached, monkeypatch, window, ahead):
    """The files fetched ahead and not yet read, after each step of the look-ahead of a read of 4
    files needing 1 KiB each: as many as the window's bytes hold, never fewer than two while files
    are left, refilled as each read takes its file."""
    from ucp.format import reader as reader_mod

    root = tmp_path / "ck"
    x = _grid_shards(root)
    monkeypatch.setattr(reader_mod, "LOOK_AHEAD_BYTES", window)
    seen, real_fill = [], reader_mod._LookAhead.fill

    def fill(self):
        real_fill(self)
        seen.append(sum(isinstance(v, reader_mod._Ahead) for v in self.ck._ahead.values()))  # not the queued marks
    monkeypatch.setattr(reader_mod._LookAhead, "fill", fill)
    ck = open_checkpoint(str(root), workers=1)
    assert torch.equal(ck.read_box("x", "param", [0, 16], [64, 32]), x[:, 16:32])  # 16 x 16 of each file
    assert seen == ahead


def _tails(ck, start, stop):
    """The shard files a read of box [start, stop) of x spans, as ``read_boxes`` hands them to the
    look-ahead (path -> (array, shard index, start, stop)), in read order."""
    from ucp.format.layout import chunk_key

    a = ck._array("x", "param")
    return a, {f"{a.info.path}/{chunk_key(j)}": (a, j, start, stop) for j in a.grid.indices_for(start, stop)}


def test_a_file_read_before_the_look_ahead_reaches_it_is_never_fetched(tmp_path, uncached, monkeypatch):
    """Reads on the pool can outrun the look-ahead. A file whose read takes it before the look-ahead
    hands it out is struck from the queue: never fetched after its read (I/O for nothing, its bytes
    then counted by the next read of that file), and when the read is over none of the look-ahead's
    bookkeeping is left behind."""
    from ucp.format import reader as reader_mod

    root = tmp_path / "ck"
    x = _grid_shards(root)
    monkeypatch.setattr(reader_mod, "LOOK_AHEAD_BYTES", 1)        # two files ahead at a time
    fetched, real_fetch = [], reader_mod.Checkpoint._fetch
    monkeypatch.setattr(reader_mod.Checkpoint, "_fetch",
                        lambda self, a, sidx, *r: fetched.append(sidx) or real_fetch(self, a, sidx, *r))
    ck = open_checkpoint(str(root), workers=1)
    start, stop = [0, 16], [64, 32]
    _, tails = _tails(ck, start, stop)
    rels = list(tails)
    ahead = ck._look_ahead(tails)
    assert ck._take_ahead(rels[2]) is None          # the third file's read came first: struck, not fetched
    assert ck._take_ahead(rels[0]).wait() > 0        # the first read takes its fetch: the window moves on
    assert isinstance(ck._ahead[rels[3]], reader_mod._Ahead)      # past the struck file, at once
    for rel in (rels[1], rels[3]):
        assert ck._take_ahead(rel).wait() > 0
    ahead.close()
    assert sorted(fetched) == [(0, 0), (1, 0), (3, 0)] and ck._ahead == {}
    _next_read_takes_nothing_ahead(ck, monkeypatch, start, stop, x[:, 16:32])


def _next_read_takes_nothing_ahead(ck, monkeypatch, start, stop, want):
    """A read after the look-ahead of an earlier one (its own look-ahead off) reads right and finds
    no work of the earlier one to wait for and count."""
    taken, real_take = [], ck._take_ahead
    monkeypatch.setattr(ck, "_look_ahead", lambda shards: None)
    monkeypatch.setattr(ck, "_take_ahead", lambda rel: taken.append(real_take(rel)) or taken[-1])
    assert torch.equal(ck.read_box("x", "param", start, stop), want)
    assert len(taken) == 4 and taken == [None] * 4


def test_a_read_that_fails_leaves_no_fetch_for_the_next_read_to_count(tmp_path, uncached, monkeypatch):
    """The files a failed read had fetched ahead and not read are dropped when it ends: the next read
    of them reads and counts its own bytes only, not the earlier fetch's."""
    from ucp.format import reader as reader_mod

    root = tmp_path / "ck"
    x = _grid_shards(root)
    monkeypatch.setattr(reader_mod, "LOOK_AHEAD_BYTES", 1)        # two files fetched, two queued
    ck = open_checkpoint(str(root), workers=1)
    start, stop = [0, 16], [64, 32]
    _, tails = _tails(ck, start, stop)
    ahead = ck._look_ahead(tails)
    kinds = sorted(type(v).__name__ for v in ck._ahead.values())
    assert kinds == ["_Ahead", "_Ahead", "_LookAhead", "_LookAhead"]
    ahead.close()                                     # as read_boxes does when a read raises
    assert ck._ahead == {}
    _next_read_takes_nothing_ahead(ck, monkeypatch, start, stop, x[:, 16:32])


def test_read_boxes_closes_its_look_ahead_when_a_read_fails(tmp_path, uncached, monkeypatch):
    """A read that raises on its second file leaves nothing of its look-ahead behind (the files
    fetched or queued after the bad one), and the error names the file."""
    from ucp.format import reader as reader_mod
    from ucp.format.layout import chunk_key

    root = tmp_path / "ck"
    x = _grid_shards(root)
    monkeypatch.setattr(reader_mod, "LOOK_AHEAD_BYTES", 1)
    bad = root / "x" / "param" / chunk_key((1, 0))
    raw = bytearray(bad.read_bytes())
    raw[1028 + 100] ^= 0xFF                          # in the second inner chunk (the columns read): its crc32c fails
    bad.write_bytes(bytes(raw))
    ck = open_checkpoint(str(root), workers=1)
    with pytest.raises(CorruptChunkError, match=r"c/1/0"):
        ck.read_box("x", "param", [0, 16], [64, 32])
    assert ck._ahead == {}
    assert torch.equal(ck.read_box("x", "param", [32, 16], [64, 32]), x[32:, 16:32])
