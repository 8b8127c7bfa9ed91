"""What a reader of a committed checkpoint promises its caller, beyond "the values come back":

- ``out=`` buffers are filled in place and returned; a buffer of the wrong shape, dtype or layout
  is refused before anything is read, as is a box or flat range outside the array;
- the read statistics (spec/FORMAT.md, "Reading": ``bytes_read``, ``chunks_read``,
  ``last_read_stats``) count the chunk files a read touched, per read and in total;
- a ``Checkpoint`` is a context manager that stops its reader threads and lets errors through;
- missing parameters and states are named with the ones that do exist.

Surviving mutants of ucp/format/reader.py (bench/mutation.py) showed no test checked these.
"""
import threading

import pytest
import torch

from ucp.errors import NotFoundError, UcpError
from ucp.format import create_checkpoint, open_checkpoint

T = torch.arange(10 * 4, dtype=torch.float32).reshape(10, 4)
CHUNK_FILE = 3 * 4 * 4 + 4  # a (3, 4) float32 chunk and its crc32c (the edge chunk is padded to full size)


@pytest.fixture
def rows(tmp_path):
    """(10, 4) float32 in row chunks of 3 rows: chunks 0..3 hold rows 0-2, 3-5, 6-8, 9."""
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("w", "param", T, chunks=(3, 4))
        w.write_tensor("w", "exp_avg", T * 2, chunks=(3, 4))
        w.write_tensor("b", "param", T[0], chunks=(4,))
    return tmp_path / "ck"


def test_out_buffers_are_filled_and_returned(rows):
    ck = open_checkpoint(rows)
    out = torch.full((4, 4), -1.0)
    assert ck.read("w", index=slice(2, 6), out=out) is out
    assert torch.equal(out, T[2:6])
    row = torch.full((4,), -1.0)  # an int index drops the dimension, in out too
    assert ck.read("w", index=7, out=row) is row and torch.equal(row, T[7])
    box = torch.full((3, 2), -1.0)
    assert ck.read_box("w", "exp_avg", (5, 1), (8, 3), out=box) is box
    assert torch.equal(box, T[5:8, 1:3] * 2)
    flat = torch.full((13,), -1.0)
    assert ck.read_flat("w", "param", 5, 18, out=flat) is flat
    assert torch.equal(flat, T.reshape(-1)[5:18])


def test_out_buffers_that_do_not_fit_are_refused(rows):
    ck = open_checkpoint(rows)
    with pytest.raises(UcpError, match=r"out has shape \(3, 4\), the index selects \(4, 4\)"):
        ck.read("w", index=slice(2, 6), out=torch.empty(3, 4))
    with pytest.raises(UcpError, match="out must be contiguous"):
        ck.read("w", index=slice(0, 4), out=torch.empty(4, 4).t())
    bad = {"shape": torch.empty(2, 2), "dtype": torch.empty(3, 2, dtype=torch.float64),
           "layout": torch.empty(2, 3).t(), "device": torch.empty(3, 2, device="meta")}
    for why, out in bad.items():
        with pytest.raises(UcpError, match=r"out must be a contiguous CPU torch.float32 tensor of shape \(3, 2\)"):
            ck.read_box("w", "param", (5, 1), (8, 3), out=out)
    for out in (torch.empty(12), torch.empty(26)[::2]):
        with pytest.raises(UcpError, match="out must be a contiguous 1-D tensor of 13 elements"):
            ck.read_flat("w", "param", 5, 18, out=out)


@pytest.mark.parametrize("start, stop", [((0,), (3,)), ((0, 0, 0), (1, 1, 1)), ((0, 0), (11, 4)),
                                         ((-1, 0), (2, 4)), ((4, 0), (3, 4)), ((0, 0), (3, 5)),
                                         ((0, 0), (3,))])
def test_boxes_outside_the_array_are_refused(rows, start, stop):
    with pytest.raises(UcpError, match=r"does not fit 'w'/'param' of shape \(10, 4\)"):
        open_checkpoint(rows).read_box("w", "param", start, stop)


@pytest.mark.parametrize("start, stop", [(-1, 3), (5, 41), (6, 5)])
def test_flat_ranges_outside_the_array_are_refused(rows, start, stop):
    with pytest.raises(UcpError, match=rf"flat range \[{start}, {stop}\) outside 'w'/'param'"):
        open_checkpoint(rows).read_flat("w", "param", start, stop)


def test_read_statistics_count_the_chunk_files_read(rows):
    ck = open_checkpoint(rows)
    assert (ck.bytes_read, ck.chunks_read) == (0, 0)
    ck.read("w", index=slice(2, 7))  # rows 2..6: chunks 0, 1, 2, each read whole (their crc32c covers all)
    assert ck.last_read_stats == {"bytes_read": 3 * CHUNK_FILE, "bytes_needed": 5 * 4 * 4, "chunks_read": 3}
    ck.read_box("w", "exp_avg", (9, 1), (10, 2))  # one element of the padded edge chunk
    assert ck.last_read_stats == {"bytes_read": CHUNK_FILE, "bytes_needed": 4, "chunks_read": 1}
    assert (ck.bytes_read, ck.chunks_read) == (4 * CHUNK_FILE, 4)  # totals over the open checkpoint
    ck.read_flat("w", "param", 10, 30)  # rows 2..7 in three boxes: chunks 0, 1 (twice), 2
    assert ck.last_read_stats == {"bytes_read": 4 * CHUNK_FILE, "bytes_needed": 20 * 4, "chunks_read": 4}
    assert (ck.bytes_read, ck.chunks_read) == (8 * CHUNK_FILE, 8)
    ck.read("w", index=slice(3, 3))  # nothing selected: nothing read
    assert ck.last_read_stats == {"bytes_read": 0, "bytes_needed": 0, "chunks_read": 0}
    assert (ck.bytes_read, ck.chunks_read) == (8 * CHUNK_FILE, 8)


def test_read_statistics_of_sharded_arrays(tmp_path):
    """A whole shard read reads the shard file; a partial one reads the index once per open
    checkpoint (with the inner chunks' crc32c words that bind it), then only the inner chunks."""
    t = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("s", "param", t, shards=(8, 8), chunks=(2, 8))  # 2 shards of 4 inner chunks
    files = sorted((tmp_path / "ck" / "s" / "param" / "c").rglob("*"))
    files = [f for f in files if f.is_file()]
    inner_nb, index_nb = 2 * 8 * 4 + 4, 4 * 16 + 4
    assert [f.stat().st_size for f in files] == [4 * inner_nb + index_nb] * 2
    ck = open_checkpoint(tmp_path / "ck")
    assert torch.equal(ck.read("s"), t)
    assert ck.last_read_stats == {"bytes_read": 2 * (4 * inner_nb + index_nb), "bytes_needed": t.numel() * 4,
                                  "chunks_read": 8}
    ck2 = open_checkpoint(tmp_path / "ck")
    assert torch.equal(ck2.read("s", index=slice(2, 4)), t[2:4])  # inner chunk 1 of shard 0
    assert ck2.last_read_stats["chunks_read"] == 1
    assert inner_nb < ck2.last_read_stats["bytes_read"] <= inner_nb + index_nb + 4 * 4
    assert torch.equal(ck2.read("s", index=slice(4, 8)), t[4:8])  # index already checked: data only
    assert ck2.last_read_stats == {"bytes_read": 2 * inner_nb, "bytes_needed": 4 * 8 * 4, "chunks_read": 2}


def _reader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("ucp-read")]


def test_checkpoint_context_stops_reader_threads_and_lets_errors_through(tmp_path):
    url = f"memory://ucp-behaviour-reader/{tmp_path.name}/ck"  # an object store: reads run on threads
    t = torch.arange(64, dtype=torch.float32).reshape(16, 4)
    with create_checkpoint(url, chunk_bytes=64) as w:
        w.write_tensor("w", "param", t)
    before = len(_reader_threads())
    with open_checkpoint(url) as ck:
        assert repr(ck) == f"<ucp.Checkpoint {url!r}: 1 params>"
        assert torch.equal(ck.read("w"), t)
        assert len(_reader_threads()) > before
    assert len(_reader_threads()) == before
    with pytest.raises(KeyError, match="raised inside"):
        with open_checkpoint(url):
            raise KeyError("raised inside")
    ck = open_checkpoint(url, workers=1)  # one worker: the caller's thread reads
    assert torch.equal(ck.read("w"), t) and len(_reader_threads()) == before


def test_missing_names_list_what_exists(rows):
    ck = open_checkpoint(rows)
    with pytest.raises(NotFoundError, match=r"no parameter 'ww'; close matches: w"):
        ck.read("ww")
    with pytest.raises(NotFoundError, match=r"has no state 'exp_avgg'; it has: exp_avg"):
        ck.read("w", "exp_avgg")
    with pytest.raises(NotFoundError, match=r"has no state 'zzz'; it has: param, exp_avg$"):
        ck.read("w", "zzz")


def test_tensor_references_in_crafted_metadata_are_refused(rows):
    """Per-parameter metadata never holds tensors; checkpoint metadata may only name its own
    metadata arrays (not a parameter's array, not one the manifest lacks)."""
    from _manifest_edit import rewrite_manifest
    from ucp.errors import FormatError

    def edit(doc):
        doc["params"][0]["meta"]["t"] = {"$tensor": "_ucp/meta/0"}
        doc["metadata"] = {"a": {"$tensor": "_ucp/meta/0"}, "b": {"$tensor": "w"}}
    rewrite_manifest(rows, edit)
    ck = open_checkpoint(rows)
    name = ck.params[0]
    with pytest.raises(UcpError, match="unexpected tensor reference in per-parameter metadata"):
        ck.param_meta(name)
    with pytest.raises(FormatError, match=r"metadata\.a\.\$tensor: \$tensor '_ucp/meta/0' names no metadata array"):
        ck.metadata
    rewrite_manifest(rows, lambda doc: doc.__setitem__("metadata", {"b": {"$tensor": "w"}}))
    with pytest.raises(FormatError, match=r"metadata\.b\.\$tensor: \$tensor 'w' names no metadata array"):
        open_checkpoint(rows).metadata


def test_array_info_is_immutable(rows):
    """The info of an array is shared by every read of it: it cannot be changed behind the reader."""
    import dataclasses

    ck = open_checkpoint(rows)
    info = ck.array_info("w")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.shape = (1, 1)
    assert ck.array_info("w").shape == (10, 4) and ck.read("w").shape == (10, 4)


@pytest.mark.parametrize("index", [slice(0, 3), (slice(0, 3), slice(1, 2))], ids=["rows", "columns"])
def test_a_chunk_file_grown_by_a_byte_is_refused(rows, index):
    f = rows / "w" / "param" / "c" / "0" / "0"
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(UcpError, match=rf"chunk c/0/0 .*size {CHUNK_FILE + 1} bytes, the manifest records "
                                       rf"{CHUNK_FILE} \(extra bytes\)"):
        open_checkpoint(rows).read("w", index=index)


def test_whole_shards_on_an_object_store_take_one_data_request_each(tmp_path, monkeypatch):
    """On an object store every request costs a round trip: a read of whole shards asks for each
    shard's index and then its data in one request, not one request per streamed batch."""
    from ucp.format.store import FsspecStore

    url = f"memory://ucp-behaviour-reader/{tmp_path.name}/shards"
    t = torch.arange(2 * (1 << 20), dtype=torch.float32)  # two 4 MiB shards of 256 KiB inner chunks
    with create_checkpoint(url, shard_bytes=4 << 20, inner_bytes=256 << 10) as w:
        w.write_tensor("w", "param", t)
    ck = open_checkpoint(url, workers=1)
    calls = []
    for name in ("read_ranges", "get", "readinto", "map"):
        real = getattr(FsspecStore, name)
        monkeypatch.setattr(FsspecStore, name,
                            lambda self, rel, *a, _real=real, _n=name, **k: calls.append((_n, rel)) or _real(self, rel, *a, **k))
    assert torch.equal(ck.read("w"), t)
    shards = {rel for _n, rel in calls}
    assert len(shards) == 2, calls
    assert len(calls) <= 2 * len(shards), calls


def test_a_tied_alias_stored_once_reads_its_holder(tmp_path):
    """FORMAT.md 6.1: an alias without arrays reads the holder's tensors, every state; an alias
    that kept its own copy reads that copy; a tie to a parameter that is not there is not followed."""
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("embed", "param", T)
        w.write_tensor("embed", "exp_avg", T * 2)
        w.add_param("head", {"tied_to": "embed", "shape": [10, 4], "dtype": "float32"})
        w.write_tensor("copy", "param", T + 1)
        w.add_param("copy", {"tied_to": "embed"})
        w.add_param("dangling", {"tied_to": "nothing", "shape": [10, 4], "dtype": "float32"})
        w.add_param("chained", {"tied_to": "head", "shape": [10, 4], "dtype": "float32"})  # not a holder
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.states("head") == []
    assert torch.equal(ck.read("head"), T) and torch.equal(ck.read("head", "exp_avg"), T * 2)
    assert torch.equal(ck.read("copy"), T + 1)
    with pytest.raises(NotFoundError, match="has no state 'exp_avg'"):
        ck.read("copy", "exp_avg")
    with pytest.raises(NotFoundError, match="'dangling' has no state 'param'"):
        ck.read("dangling")
    with pytest.raises(NotFoundError, match="'chained' has no state 'param'"):
        ck.read("chained")
