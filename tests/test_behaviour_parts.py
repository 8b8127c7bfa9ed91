"""Several writers, one checkpoint (``create_checkpoint(rank=, world_size=)``, ``commit_parts``): what
the coordinator refuses and what it leaves behind, checked in one process (the checks are the
coordinator's; tests/test_format_parts.py runs real separate processes). Crafted part records are
re-signed so that only the check under test can refuse them; a staged piece that is missing or
damaged is named; the checkpoint's metadata tensors survive the clean-up of the part records.
"""
import pytest
import torch

from ucp.errors import FormatError, IncompleteCheckpointError, UcpError
from ucp.format import commit_parts, create_checkpoint, open_checkpoint, verify
from ucp.format.verify import verify_report

from _manifest_edit import rewrite_manifest

X = torch.arange(20.0).reshape(10, 2)


def _parts(root, world=2):
    """Rank 0 writes rows 0..4, rank 1 rows 5..9 of (10, 2) in chunks of 4 rows: chunk c/1/0 (rows
    4..7) is staged in pieces by both ranks."""
    for r in range(world):
        w = create_checkpoint(root, rank=r, world_size=world, durable=False)
        a = w.add_array("a", "param", (10, 2), torch.float32, chunks=(4, 2))
        lo, hi = (0, 5) if r == 0 else (5, 10)
        a.write((lo, 0), X[lo:hi])
        w.add_param("a", {"frozen": False})
        w.commit()
    return root


@pytest.mark.parametrize("edit, err, match", [
    (lambda d: d.__setitem__("format", "ucp"), FormatError, "not a ucp part record"),
    (lambda d: d.__setitem__("format_version", 1), FormatError, "rank 1 wrote format_version 1, this coordinator"),
    (lambda d: d.__setitem__("rank", 0), UcpError, "part of rank 0 of world_size 2, expected rank 1"),
    (lambda d: d.__setitem__("params", {}), FormatError, "'params' is not a list"),
    (lambda d: d["params"][0]["states"]["param"].__setitem__("staged", {}), FormatError, "'staged' is not a list"),
    (lambda d: d["params"][0]["states"]["param"]["staged"][0].__setitem__("file", "_ucp/parts/0/stage/0"),
     FormatError, "malformed staged piece"),
    (lambda d: d["params"][0]["states"]["param"]["staged"][0].__setitem__("boxes", "all"), FormatError,
     "malformed staged piece"),
    (lambda d: d["params"][0]["states"]["param"]["staged"][0].__setitem__("key", 7), FormatError,
     "malformed staged piece"),
], ids=["format", "version", "rank", "params", "staged", "file-of-another-rank", "boxes", "key"])
def test_crafted_part_record_is_refused(tmp_path, edit, err, match):
    root = _parts(tmp_path / "ck")
    rewrite_manifest(root, edit, rel="_ucp/parts/1.json")
    with pytest.raises(err, match=match):
        commit_parts(root, 2)
    assert not (root / "ucp.manifest.json").exists()


def test_missing_or_damaged_staged_piece_is_named(tmp_path):
    root = _parts(tmp_path / "ck")
    piece = root / "_ucp" / "parts" / "1" / "stage" / "0"
    data = piece.read_bytes()
    piece.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(FormatError, match=r"_ucp/parts/1/stage/0 \(rank 1, param 'a' state 'param' chunk c/1/0\): "
                                          r"staged piece is corrupt"):
        commit_parts(root, 2)
    piece.write_bytes(data + b"\0")
    with pytest.raises(FormatError, match="staged piece is corrupt"):
        commit_parts(root, 2)
    piece.unlink()
    with pytest.raises(FormatError, match=r"_ucp/parts/1/stage/0 .*: staged piece is missing"):
        commit_parts(root, 2)
    assert not (root / "ucp.manifest.json").exists()


def test_commit_parts_counts_and_clean_up_keeps_metadata_tensors(tmp_path):
    root = _parts(tmp_path / "ck")
    info = commit_parts(root, 2, metadata={"step": 3, "rng": torch.tensor([1, 2, 3])})
    assert info == {"params": 1, "arrays": 1, "chunks": 3, "assembled": 1}
    assert not (root / "_ucp" / "parts").exists()
    ck = open_checkpoint(root)
    assert torch.equal(ck.read("a"), X) and ck.param_meta("a") == {"frozen": False, "shape": [10, 2],
                                                                    "dtype": "float32"}
    assert ck.metadata["step"] == 3 and torch.equal(ck.metadata["rng"], torch.tensor([1, 2, 3]))
    assert verify(root, strict=True) == []


def test_without_clean_up_the_part_records_stay_as_stray_files(tmp_path):
    root = _parts(tmp_path / "ck")
    commit_parts(root, 2, cleanup=False)
    problems, warnings = verify_report(root)
    assert problems == [] and warnings and all("_ucp/parts/" in w and "stray file" in w for w in warnings)


def test_param_order_orders_the_manifest(tmp_path):
    root = tmp_path / "ck"
    for r, names in ((0, ["b", "a"]), (1, ["c"])):
        w = create_checkpoint(root, rank=r, world_size=2, durable=False)
        for n in names:
            w.write_tensor(n, "param", torch.ones(2))
        w.commit()
    commit_parts(root, 2, param_order=["c", "a"])
    assert open_checkpoint(root).params == ["c", "a", "b"]  # names not in param_order follow in rank order


def test_ranks_disagreeing_on_metadata_are_named(tmp_path):
    root = tmp_path / "ck"
    for r in range(2):
        w = create_checkpoint(root, rank=r, world_size=2, durable=False)
        w.add_param("a", {"frozen": bool(r)})
        a = w.add_array("a", "param", (2,), torch.float32, chunks=(1,))
        a.write((r,), torch.ones(1))
        w.commit()
    with pytest.raises(UcpError, match=r"1 inconsistent declaration\(s\):\n  param 'a' meta\['frozen'\]: "
                                       r"rank 0 has False, rank 1 has True"):
        commit_parts(root, 2)


def test_more_than_20_problems_are_counted(tmp_path):
    root = tmp_path / "ck"
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    w.add_array("a", "param", (23,), torch.float32, chunks=(1,))
    w.commit()
    with pytest.raises(IncompleteCheckpointError) as e:
        commit_parts(root, 1)
    msg = str(e.value)
    assert "cannot commit, 23 chunk(s) unwritten" in msg and msg.count("not written by any rank") == 20
    assert msg.endswith("\n  (and 3 more)")


def test_rank_and_world_size_arguments(tmp_path):
    for rank, world in ((0, 0), (-1, 2)):
        with pytest.raises(UcpError, match=rf"rank {rank} is not in range\(world_size={world}\)"):
            create_checkpoint(tmp_path / "ck", rank=rank, world_size=world)
    with pytest.raises(UcpError, match="overwrite=True cannot be used with rank="):
        create_checkpoint(tmp_path / "ck", rank=0, world_size=1, overwrite=True)
    with pytest.raises(UcpError, match="world_size must be >= 1, got 0"):
        commit_parts(tmp_path / "ck", 0)


def test_rerun_rank_adopts_its_valid_chunk_files_and_rewrites_damaged_ones(tmp_path):
    """One of several writers, rerun with resume=True after dying before its commit: a chunk file
    that checks out is kept as it is (not rewritten), a damaged one is written again."""
    import os

    root = tmp_path / "ck"
    x = torch.arange(8.0).reshape(4, 2)
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    a = w.add_array("a", "param", (4, 2), torch.float32, chunks=(2, 2))
    a.write((0, 0), x[:2])
    a.write((2, 0), x[2:])
    w.abort()  # died before commit(): chunk files and run journal stay
    good, bad = root / "a" / "param" / "c" / "0" / "0", root / "a" / "param" / "c" / "1" / "0"
    os.utime(good, ns=(1, 1))
    data = bytearray(bad.read_bytes())
    data[0] ^= 1
    bad.write_bytes(bytes(data))
    w = create_checkpoint(root, rank=0, world_size=1, durable=False, resume=True)
    a = w.add_array("a", "param", (4, 2), torch.float32, chunks=(2, 2))
    a.write((0, 0), x[:2])
    a.write((2, 0), x[2:])
    w.commit()
    commit_parts(root, 1)
    assert good.stat().st_mtime_ns == 1  # adopted, not rewritten
    assert torch.equal(open_checkpoint(root).read("a"), x) and verify(root) == []


def test_rank_rerun_without_resume_rewrites_its_chunks(tmp_path):
    """Valid chunk files of an earlier run are adopted only with resume=True: a plain rerun (new
    data, e.g. a later step) writes every chunk again."""
    root = tmp_path / "ck"
    x = torch.arange(8.0).reshape(4, 2)
    for data, end in ((x, "abort"), (x + 100, "commit")):
        w = create_checkpoint(root, rank=0, world_size=1, durable=False)
        w.add_array("a", "param", (4, 2), torch.float32, chunks=(2, 2)).write((0, 0), data)
        getattr(w, end)()
    commit_parts(root, 1)
    assert torch.equal(open_checkpoint(root).read("a"), x + 100)


def test_a_committed_part_writer_is_closed_and_its_rank_can_start_again(tmp_path, monkeypatch):
    from ucp.format import create_part, store

    root = tmp_path / "ck"
    synced, real = [], store.syncfs
    w = create_part(root, 0, 1)  # the public alias, durable by default
    w.write_tensor("a", "param", torch.ones(2))
    monkeypatch.setattr(store, "syncfs", lambda fd: synced.append(fd) or real(fd))
    w.commit()
    monkeypatch.undo()
    assert w.committed is True and len(synced) == 1  # the part record promises its chunks are on disk
    for call in (lambda: w.add_param("b"), w.commit):
        with pytest.raises(UcpError, match="the checkpoint writer is closed"):
            call()
    again = create_checkpoint(root, rank=0, world_size=1, durable=False)  # its lock was released
    again.write_tensor("a", "param", torch.full((2,), 3.0))
    again.commit()
    assert commit_parts(root, 1)["chunks"] == 1
    assert torch.equal(open_checkpoint(root).read("a"), torch.full((2,), 3.0))


def test_a_rerun_rank_that_dies_before_its_commit_leaves_no_part_record(tmp_path):
    """The part record of an earlier run is removed when the rank starts again: if the rerun dies,
    the coordinator sees the part missing instead of committing the earlier run's data."""
    root = tmp_path / "ck"
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    w.write_tensor("a", "param", torch.ones(2))
    w.commit()
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    w.write_tensor("a", "param", torch.zeros(2))
    w.abort()
    with pytest.raises(IncompleteCheckpointError, match=r"1 of 1 part\(s\) missing: rank\(s\) 0"):
        commit_parts(root, 1)


def test_stage_files_of_an_earlier_run_are_removed(tmp_path):
    root = tmp_path / "ck"
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    w.add_array("a", "param", (4, 2), torch.float32, chunks=(4, 2)).write((0, 0), torch.ones(2, 2))  # staged
    w.commit()
    assert (root / "_ucp" / "parts" / "0" / "stage" / "0").exists()
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    w.add_array("a", "param", (4, 2), torch.float32, chunks=(4, 2)).write((0, 0), torch.ones(4, 2))  # whole
    w.commit()
    commit_parts(root, 1, cleanup=False)
    problems, warnings = verify_report(root)
    assert problems == [] and not any("/stage/" in x for x in warnings)


def test_exactly_20_problems_are_all_listed(tmp_path):
    root = tmp_path / "ck"
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    w.add_array("a", "param", (20,), torch.float32, chunks=(1,))
    w.commit()
    with pytest.raises(IncompleteCheckpointError) as e:
        commit_parts(root, 1)
    assert str(e.value).count("not written by any rank") == 20 and "more)" not in str(e.value)


def test_commit_parts_is_durable_by_default(tmp_path, monkeypatch):
    from ucp.format import store

    _parts(tmp_path / "ck")
    synced, real = [], store.syncfs
    monkeypatch.setattr(store, "syncfs", lambda fd: synced.append(fd) or real(fd))
    commit_parts(tmp_path / "ck", 2)
    assert len(synced) == 1


def test_every_chunk_written_by_two_ranks_is_named(tmp_path):
    root = tmp_path / "ck"
    for r in range(2):
        w = create_checkpoint(root, rank=r, world_size=2, durable=False)
        w.add_array("a", "param", (4, 2), torch.float32, chunks=(2, 2)).write((0, 0), X[:4])
        w.commit()
    with pytest.raises(UcpError, match=r"2 chunk\(s\) written by two ranks:\n.*chunk c/0/0.*\n.*chunk c/1/0"):
        commit_parts(root, 2)


def test_a_staged_piece_of_several_boxes_is_assembled(tmp_path):
    """Rank 0 writes two separate boxes of one chunk (one staged piece holding both), rank 1 the rest."""
    root = tmp_path / "ck"
    t = torch.arange(16.0).reshape(4, 4)
    w = create_checkpoint(root, rank=0, world_size=2, durable=False)
    a = w.add_array("a", "param", (4, 4), torch.float32, chunks=(4, 4))
    a.write((0, 0), t[0:1].clone())
    a.write((2, 0), t[2:3].clone())
    w.commit()
    w = create_checkpoint(root, rank=1, world_size=2, durable=False)
    a = w.add_array("a", "param", (4, 4), torch.float32, chunks=(4, 4))
    a.write((1, 0), t[1:2].clone())
    a.write((3, 0), t[3:4].clone())
    w.commit()
    assert commit_parts(root, 2)["assembled"] == 1
    assert torch.equal(open_checkpoint(root).read("a"), t)


def test_a_rank_that_stages_pieces_of_several_chunks_keeps_each_piece(tmp_path):
    """Each staged piece is its own stage file: rank 0 covers rows 0 and 2 of every 2x2 chunk of a
    (4, 4) array (four pieces), rank 1 rows 1 and 3; the coordinator assembles all four chunks."""
    root = tmp_path / "ck"
    t = torch.arange(16.0).reshape(4, 4)
    for r in range(2):
        w = create_checkpoint(root, rank=r, world_size=2, durable=False)
        a = w.add_array("a", "param", (4, 4), torch.float32, chunks=(2, 2))
        a.write((r, 0), t[r:r + 1].clone())
        a.write((r + 2, 0), t[r + 2:r + 3].clone())
        w.commit()
    assert sorted(p.name for p in (root / "_ucp" / "parts" / "0" / "stage").iterdir()) == ["0", "1", "2", "3"]
    assert commit_parts(root, 2)["assembled"] == 4
    assert torch.equal(open_checkpoint(root).read("a"), t)


def test_a_part_writer_whose_lock_was_taken_over_does_not_commit(tmp_path):
    """Like the single writer's: a rank's part is not committed when its lock file names another
    writer (someone deleted it and another run of the same rank took it): no part record then."""
    import json

    from ucp.format import WriterLockedError

    root = tmp_path / "ck"
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    w.write_tensor("a", "param", torch.ones(2))
    lock = root / "_ucp" / "parts" / "0.lock"
    holder = json.loads(lock.read_bytes())
    lock.write_text(json.dumps({**holder, "writer_id": "another"}))
    with pytest.raises(WriterLockedError, match="no longer holds _ucp/parts/0.lock"):
        w.commit()
    assert not (root / "_ucp" / "parts" / "0.json").exists()


@pytest.fixture
def syncs(monkeypatch):
    """Every fsync(2) and syncfs(2) the format code makes (counted, then made)."""
    import os

    from ucp.format import store

    seen, real_fsync, real_syncfs = [], os.fsync, store.syncfs
    monkeypatch.setattr(os, "fsync", lambda fd: seen.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(store, "syncfs", lambda fd: seen.append("syncfs") or real_syncfs(fd))
    return seen


@pytest.mark.parametrize("durable, sync, want", [
    (False, True, []), (True, False, []), (True, True, ["fsync", "syncfs", "fsync", "fsync"])],
    ids=["not-durable", "sync-false", "durable"])
def test_a_part_is_made_durable_only_when_durable_and_synced(tmp_path, syncs, durable, sync, want):
    """``commit(sync=False)`` leaves the flush to the manifest's commit (same process, same store),
    ``durable=False`` never syncs; a durable part fsyncs its stage file as it writes it, syncs the
    chunks (one syncfs), then fsyncs its part record and the directory holding it."""
    w = create_checkpoint(tmp_path / "ck", rank=0, world_size=1, durable=durable)
    w.add_array("a", "param", (4, 2), torch.float32, chunks=(4, 2)).write((0, 0), torch.ones(2, 2))  # staged
    w.write_tensor("b", "param", torch.ones(3))
    syncs.clear()
    w.commit(sync=sync)
    assert syncs == want


@pytest.mark.parametrize("durable", [False, True])
def test_sync_data_syncs_the_chunks_written_so_far_when_durable(tmp_path, syncs, durable):
    w = create_checkpoint(tmp_path / "ck", rank=0, world_size=1, durable=durable)
    w.write_tensor("b", "param", torch.ones(3))
    syncs.clear()
    w.sync_data()
    assert syncs == (["syncfs"] if durable else [])
    w.commit(sync=False)
    assert commit_parts(tmp_path / "ck", 1, durable=False)["chunks"] == 1


def test_every_inconsistent_declaration_is_named(tmp_path):
    """Two states of one parameter declared otherwise by rank 1: both are named, not only the first."""
    root = tmp_path / "ck"
    for r, cols in ((0, 2), (1, 3)):
        w = create_checkpoint(root, rank=r, world_size=2, durable=False)
        for s in ("param", "exp_avg"):
            w.add_array("a", s, (4, cols), torch.float32, chunks=(2, cols))
        w.commit()
    with pytest.raises(UcpError, match=r"2 inconsistent declaration\(s\):\n.*state 'param' declared "
                                       r"inconsistently.*\n.*state 'exp_avg' declared inconsistently"):
        commit_parts(root, 2)


def test_every_chunk_written_whole_and_in_pieces_is_named(tmp_path):
    """Rank 0 writes both chunks of (4, 2) whole, rank 1 a row of each: both chunks are named."""
    root = tmp_path / "ck"
    for r in range(2):
        w = create_checkpoint(root, rank=r, world_size=2, durable=False)
        a = w.add_array("a", "param", (4, 2), torch.float32, chunks=(2, 2))
        for row in ((0, 1, 2, 3) if r == 0 else (0, 2)):
            a.write((row, 0), X[row:row + 1].clone())
        w.commit()
    with pytest.raises(UcpError, match=r"2 chunk\(s\) written by two ranks:\n.*chunk c/0/0: written whole by rank 0 "
                                       r"and partly by rank 1 \[0:1, 0:2\]\n.*chunk c/1/0: written whole by rank 0"):
        commit_parts(root, 2)
    assert not (root / "ucp.manifest.json").exists()


@pytest.mark.parametrize("doc, ok", [
    ("x", False), ([64], False), ([64, 1, 2], False), ([-1, 5], False), (["64", 5], False), ([64, -5], False),
    ([64, True], True), ([64, 0], True), ([0, 0], True)],
    ids=["not-list", "short", "long", "negative-size", "str-size", "negative-crc", "bool", "crc-0", "zeros"])
def test_a_rank_s_array_document_record_is_checked(tmp_path, doc, ok):
    """Rank 0 wrote the array's ``zarr.json`` (it wrote chunk c/0/0) and recorded it as [size, crc32c]:
    any pair of non-negative ints is a record (0 is a crc32c like any other; a record that does not
    match the document only makes the coordinator write it again); anything else is refused."""
    root = _parts(tmp_path / "ck")
    rewrite_manifest(root, lambda d: d["params"][0]["states"]["param"].__setitem__("doc", doc),
                     rel="_ucp/parts/0.json")
    if not ok:
        with pytest.raises(FormatError, match=r"state 'param': malformed 'doc' record .* \(want \[size, crc32c\]\)"):
            commit_parts(root, 2)
        return
    commit_parts(root, 2)
    assert verify(root) == [] and torch.equal(open_checkpoint(root).read("a"), X)


def test_a_failed_commit_parts_releases_the_checkpoint_lock(tmp_path):
    """A coordinator that fails (here: a damaged staged piece) releases the root's lock at once: the
    rerun rank's part is then committed by the next ``commit_parts`` (of this or another process)."""
    root = _parts(tmp_path / "ck")
    piece = root / "_ucp" / "parts" / "1" / "stage" / "0"
    piece.write_bytes(piece.read_bytes()[:-1])
    with pytest.raises(FormatError, match="staged piece is corrupt"):
        commit_parts(root, 2)
    assert not (root / "ucp.lock").exists()
    w = create_checkpoint(root, rank=1, world_size=2, durable=False)
    w.add_array("a", "param", (10, 2), torch.float32, chunks=(4, 2)).write((5, 0), X[5:10])
    w.add_param("a", {"frozen": False})
    w.commit()
    commit_parts(root, 2)
    assert torch.equal(open_checkpoint(root).read("a"), X)


def test_write_doc_writes_an_array_document_once_when_its_first_chunk_is_written(tmp_path, monkeypatch):
    """``PartWriter.write_doc``: the array's ``zarr.json`` is written as soon as this rank has written
    the array's first chunk whole (not before), once: ``commit`` records it without writing it again."""
    import json

    import crc32c

    from ucp.format import store

    puts, real = [], store.LocalStore.put
    monkeypatch.setattr(store.LocalStore, "put", lambda self, rel, bufs, fsync=False:
                        puts.append(rel) or real(self, rel, bufs, fsync))
    root = tmp_path / "ck"
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    a = w.add_array("a", "param", (4, 2), torch.float32, chunks=(2, 2))
    a.write((2, 0), X[2:4])
    w.write_doc(a)
    assert not (root / "a" / "param" / "zarr.json").exists()
    a.write((0, 0), X[:2])
    w.write_doc(a)
    w.write_doc(a)
    assert (root / "a" / "param" / "zarr.json").exists()
    w.commit()
    rec = json.loads((root / "_ucp" / "parts" / "0.json").read_bytes())["params"][0]["states"]["param"]["doc"]
    doc = (root / "a" / "param" / "zarr.json").read_bytes()
    assert rec == [len(doc), crc32c.crc32c(doc)]  # recorded, so the coordinator does not write it again
    commit_parts(root, 1, durable=False)
    assert puts.count("a/param/zarr.json") == 1
    assert verify(root) == [] and torch.equal(open_checkpoint(root).read("a"), X[:4])


def test_a_part_handed_over_in_memory_writes_no_part_record(tmp_path):
    """``commit(sync=False, record_file=False)``: the caller commits the manifest next from
    ``records`` (``commit_parts(parts=)``), so no part record file is written; without sync=False
    that is refused (nothing would make the part durable)."""
    root = tmp_path / "ck"
    w = create_checkpoint(root, rank=0, world_size=1, durable=False)
    w.write_tensor("a", "param", X)
    with pytest.raises(UcpError, match=r"rank 0: commit\(record_file=False\) needs sync=False"):
        w.commit(record_file=False)
    w.commit(sync=False, record_file=False)
    assert not (root / "_ucp" / "parts" / "0.json").exists()
    assert commit_parts(root, 1, durable=False, parts={0: w.records})["chunks"] == 1
    assert torch.equal(open_checkpoint(root).read("a"), X)
