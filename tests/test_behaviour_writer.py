"""What the checkpoint writer promises its caller (``create_checkpoint``, ``CheckpointWriter``,
``ArrayWriter``), beyond "what is written reads back":

- a committed or aborted writer refuses every further call, and says so;
- ``commit`` with unwritten chunks names them (the first 20, then how many more);
- an array declared twice is the same array, unless the declarations disagree;
- empty extents are arrays like any other; negative extents, a 2-D ``write_flat``, flat ranges
  outside the array and overlapping writes are refused;
- a chunk whose file could not be written is not counted as written;
- many ``zarr.json`` documents on an object store (written by threads) all arrive.

Surviving mutants of ucp/format/writer.py and array_writer.py (bench/mutation.py) showed these
went unchecked.
"""
import pytest
import torch

from ucp.errors import IncompleteCheckpointError, OverlapError, UcpError
from ucp.format import create_checkpoint, open_checkpoint, verify


def test_committed_or_aborted_writer_refuses_further_calls(tmp_path):
    for end in ("commit", "abort"):
        w = create_checkpoint(tmp_path / end)
        a = w.add_array("w", "param", (4,), torch.float32)
        a.write((0,), torch.ones(4))
        assert w.committed is False
        getattr(w, end)()
        assert w.committed is (end == "commit")
        calls = {"add_param": lambda: w.add_param("x"), "add_array": lambda: w.add_array("x", "param", (2,), torch.int8),
                 "write_tensor": lambda: w.write_tensor("w", "param", torch.ones(4)),
                 "write": lambda: a.write((0,), torch.ones(2)), "set_metadata": lambda: w.set_metadata({"step": 1}),
                 "commit": w.commit}
        for name, call in calls.items():
            with pytest.raises(UcpError, match="the checkpoint writer is closed"):
                call()
    assert open_checkpoint(tmp_path / "commit").params == ["w"]


@pytest.mark.parametrize("n, more", [(20, ""), (21, " (and 1 more)"), (25, " (and 5 more)")])
def test_commit_names_the_first_20_unwritten_chunks(tmp_path, n, more):
    w = create_checkpoint(tmp_path / "ck")
    w.add_array("w", "param", (n,), torch.float32, chunks=(1,))
    with pytest.raises(IncompleteCheckpointError) as e:
        w.commit()
    msg = str(e.value)
    assert f"cannot commit, {n} chunk(s) unwritten" in msg
    assert msg.count("not written") == 20 and msg.endswith(f"chunk c/19 region [19:20] not written{more}")
    w.abort()


def test_an_array_declared_twice_is_one_array_unless_the_declarations_disagree(tmp_path):
    w = create_checkpoint(tmp_path / "ck")
    a = w.add_array("w", "param", (8, 4), torch.float32, chunks=(2, 4))
    assert w.add_array("w", "param", (8, 4), torch.float32) is a  # no layout asked: the declared one
    assert w.add_array("w", "param", [8, 4], torch.float32, chunks=(2, 4)) is a
    for kw in ({"chunks": (4, 4)}, {"shards": (4, 4), "chunks": (2, 4)}):
        with pytest.raises(UcpError, match=r"'w' state 'param' was already declared with shape \(8, 4\), "
                                           r"dtype float32, chunks \(2, 4\)$"):
            w.add_array("w", "param", (8, 4), torch.float32, **kw)
    with pytest.raises(UcpError, match="already declared"):
        w.add_array("w", "param", (8, 4), torch.bfloat16)
    s = w.add_array("s", "param", (8, 4), torch.float32, shards=(4, 4), chunks=(2, 4))
    assert w.add_array("s", "param", (8, 4), torch.float32, shards=(4, 4), chunks=(2, 4)) is s
    with pytest.raises(UcpError, match=r"chunks \(4, 4\), inner chunks \(2, 4\)$"):
        w.add_array("s", "param", (8, 4), torch.float32, shards=(4, 4), chunks=(1, 4))
    w.abort()


def test_empty_extents_are_arrays_and_negative_extents_are_refused(tmp_path):
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("e", "param", torch.empty(0, 4))
        w.write_tensor("e", "exp_avg", torch.empty(3, 0, dtype=torch.int32), chunks=(1, 1))
        with pytest.raises(UcpError, match=r"param 'n' state 'param': negative extent in shape \(2, -1\)"):
            w.add_array("n", "param", (2, -1), torch.float32)
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.read("e").shape == (0, 4) and ck.read("e", "exp_avg").shape == (3, 0)
    assert verify(tmp_path / "ck") == []


def test_shards_without_inner_chunks_take_the_default_or_ask_for_them(tmp_path):
    w = create_checkpoint(tmp_path / "ck")
    a = w.add_array("big", "param", (1024, 256), torch.float32, shards=(1024, 256))  # 1 MiB: default inner chunks
    assert a.inner is not None and a.chunks == (1024, 256)
    with pytest.raises(UcpError, match=r"param 'small' state 'param': pass chunks= \(inner chunks\) with shards="):
        w.add_array("small", "param", (4, 4), torch.float32, shards=(4, 4))
    w.abort()


def test_small_arrays_are_one_chunk_by_default(tmp_path):
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("b", "param", torch.ones(1000))  # 4000 bytes, far below one inner chunk
        w.write_tensor("w", "param", torch.ones(8, 300, dtype=torch.bfloat16))
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.array_info("b").chunks == (1000,) and ck.array_info("b").inner_chunks is None
    assert ck.array_info("w").chunks == (8, 300) and ck.array_info("w").inner_chunks is None


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(UcpError, match="resume=True and overwrite=True exclude each other"):
        create_checkpoint(tmp_path / "ck", resume=True, overwrite=True)


def test_write_flat_takes_1d_ranges_inside_the_array(tmp_path):
    w = create_checkpoint(tmp_path / "ck")
    a = w.add_array("w", "param", (3, 5), torch.float32, chunks=(1, 5))
    with pytest.raises(UcpError, match=r"write_flat needs a 1-D tensor, got shape \(2, 2\)"):
        a.write_flat(0, torch.zeros(2, 2))
    for start, n in ((-1, 2), (14, 2), (16, 0)):
        with pytest.raises(UcpError, match=rf"flat range \[{start}, {start + n}\) outside an array of 15 elements"):
            a.write_flat(start, torch.zeros(n))
    a.write_flat(15, torch.zeros(0))  # the empty range at the very end is inside
    a.write_flat(0, torch.arange(7.0))
    a.write_flat(7, torch.arange(7.0, 15.0))
    w.commit()
    assert torch.equal(open_checkpoint(tmp_path / "ck").read("w"), torch.arange(15.0).reshape(3, 5))


def test_overlapping_writes_are_refused_whole_or_partial(tmp_path):
    w = create_checkpoint(tmp_path / "ck")
    a = w.add_array("w", "param", (4, 4), torch.float32, chunks=(2, 4))
    a.write((0, 0), torch.zeros(1, 4))  # part of chunk c/0/0, staged
    with pytest.raises(OverlapError, match=r"chunk c/0/0: region \[0:2, 0:4\] was already written"):
        a.write((0, 0), torch.zeros(2, 4))  # the whole chunk, over the staged part
    a.write((2, 0), torch.zeros(2, 4))  # chunk c/1/0 whole
    with pytest.raises(OverlapError, match=r"chunk c/1/0: region \[2:4, 0:4\] was already written"):
        a.write((2, 0), torch.zeros(2, 4))
    with pytest.raises(OverlapError, match=r"chunk c/1/0: region \[3:4, 0:2\] overlaps a write that already"):
        a.write((3, 0), torch.zeros(1, 2))
    w.abort()


def test_a_chunk_whose_file_cannot_be_written_is_not_counted_as_written(tmp_path):
    root = tmp_path / "ck"
    w = create_checkpoint(root)
    a = w.add_array("w", "param", (4, 4), torch.float32, chunks=(2, 4))
    (root / "w" / "param" / "c" / "1" / "0").mkdir(parents=True)  # a directory where chunk c/1/0's file goes
    a.write((0, 0), torch.ones(2, 4))
    with pytest.raises(OSError):
        a.write((2, 0), torch.ones(2, 4))
    assert a.pending() == [((2, 0), (4, 4))]
    with pytest.raises(IncompleteCheckpointError, match=r"chunk c/1/0 region \[2:4, 0:4\] not written"):
        w.commit()
    (root / "w" / "param" / "c" / "1" / "0").rmdir()  # the obstacle gone, the same chunk can be written again
    a.write((2, 0), torch.full((2, 4), 2.0))
    w.commit()
    assert torch.equal(open_checkpoint(root).read("w"), torch.cat([torch.ones(2, 4), torch.full((2, 4), 2.0)]))


def test_many_documents_on_an_object_store_all_arrive(tmp_path):
    """More than 8 zarr.json documents on an object store are written by threads, parents first."""
    url = f"memory://ucp-behaviour-writer/{tmp_path.name}/ck"
    tensors = {f"layer{i}.w": torch.full((3, 2), float(i)) for i in range(6)}
    with create_checkpoint(url, workers=4) as w:
        for name, t in tensors.items():
            w.write_tensor(name, "param", t)
            w.write_tensor(name, "exp_avg", -t)
        w.set_metadata({"step": torch.tensor([7])})
    assert verify(url) == []
    ck = open_checkpoint(url)
    assert all(torch.equal(ck.read(n), t) and torch.equal(ck.read(n, "exp_avg"), -t) for n, t in tensors.items())
    assert torch.equal(ck.metadata["step"], torch.tensor([7]))


def test_checkpoints_are_durable_unless_asked_otherwise(tmp_path, monkeypatch):
    """The default is durable: data is synced (one syncfs) before the manifest is written."""
    from ucp.format import store

    synced, real = [], store.syncfs
    monkeypatch.setattr(store, "syncfs", lambda fd: synced.append(fd) or real(fd))
    with create_checkpoint(tmp_path / "a") as w:
        w.write_tensor("w", "param", torch.ones(3))
    assert len(synced) == 1
    with create_checkpoint(tmp_path / "b", durable=False) as w:
        w.write_tensor("w", "param", torch.ones(3))
    assert len(synced) == 1


def test_boxes_of_another_rank_than_the_array_are_refused(tmp_path):
    w = create_checkpoint(tmp_path / "ck")
    a = w.add_array("w", "param", (4, 2), torch.float32)
    with pytest.raises(UcpError, match=r"box of rank 2 at offset \(0,\) does not fit array shape \(4, 2\)"):
        a.write((0,), torch.zeros(2, 2))
    with pytest.raises(UcpError, match=r"box of rank 1 at offset \(0, 0\) does not fit array shape \(4, 2\)"):
        a.write((0, 0), torch.zeros(2))
    w.abort()


def test_edge_chunks_written_box_by_box_read_back(tmp_path):
    """Each box is exactly one chunk's part of the array, edge chunks included (their padding lies
    after every row of the valid region, not after the region's bytes)."""
    t = torch.arange(5 * 6, dtype=torch.float32).reshape(5, 6)
    w = create_checkpoint(tmp_path / "ck")
    a = w.add_array("w", "param", (5, 6), torch.float32, chunks=(2, 4))
    for r in range(0, 5, 2):
        for c in range(0, 6, 4):
            a.write((r, c), t[r:r + 2, c:c + 4].clone())  # a contiguous box, (2, 2) or (1, 2) at the edges
    s = w.add_array("s", "param", (5, 6), torch.float32, shards=(4, 4), chunks=(2, 2))
    for r in range(5):  # one row at a time: every shard is staged, then written when complete
        s.write((r, 0), t[r:r + 1].clone())
    w.commit()
    ck = open_checkpoint(tmp_path / "ck")
    assert torch.equal(ck.read("w"), t) and torch.equal(ck.read("s"), t)
    assert verify(tmp_path / "ck") == []


def test_adjacent_boxes_in_one_chunk_are_not_overlaps(tmp_path):
    w = create_checkpoint(tmp_path / "ck")
    a = w.add_array("w", "param", (4, 4), torch.float32, chunks=(4, 4))
    a.write((0, 0), torch.zeros(2, 2))
    a.write((0, 2), torch.ones(2, 2))  # touches the first box along a column edge
    a.write((2, 0), torch.full((2, 4), 2.0))  # touches both along a row edge
    w.commit()
    want = torch.cat([torch.cat([torch.zeros(2, 2), torch.ones(2, 2)], 1), torch.full((2, 4), 2.0)])
    assert torch.equal(open_checkpoint(tmp_path / "ck").read("w"), want)


@pytest.mark.parametrize("meta, match", [
    ([("frozen", True)], "meta must be a dict"),
    ({1: "x"}, "metadata keys must be strings, got 1"),
    ({"frozen": "yes"}, r"meta\['frozen'\] must be a bool, got str"),
    ({"shape": "2x3"}, r"meta\['shape'\] must be a list, got str"),
    ({"dtype": "float7"}, r"meta\['dtype'\] 'float7' is not a ucp dtype"),
    ({"parts": [{"name": "q", "dim": 0}]}, r"each of meta\['parts'\] needs name, dim, start, stop"),
    ({"padding": {"dim": 0}}, r"meta\['padding'\] needs dim and size"),
    ({"scalars": {"t": torch.ones(1)}}, "tensors are not allowed in per-parameter metadata"),
    ({"rule": ("copy",)}, r"meta\['rule'\] must be a str, got tuple"),
    ({"shape": (2, 3), "frozen": "yes"}, r"meta\['frozen'\] must be a bool, got str"),
], ids=["not-dict", "key", "type", "shape", "dtype", "parts", "padding", "tensor", "tuple-not-list",
        "checked-after-a-tuple"])
def test_malformed_parameter_metadata_is_refused(tmp_path, meta, match):
    w = create_checkpoint(tmp_path / "ck")
    with pytest.raises(UcpError, match=match):
        w.add_param("w", meta)
    w.add_param("w", {"shape": (2, 3), "dtype": "bfloat16",  # tuples are lists; a ucp dtype name is fine
                      "parts": [{"name": "q", "dim": 0, "start": 0, "stop": 1}]})
    w.abort()


def test_overwrite_leaves_nothing_of_the_checkpoint_it_replaces(tmp_path):
    """``overwrite=True`` replaces a checkpoint: the old parameters' files are gone (not stray files
    beside the new ones that ``verify --strict`` would report), and the new one opens alone."""
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.write_tensor("old.a", "param", torch.ones(8))
        w.write_tensor("old.b", "exp_avg", torch.ones(3, 5))
    with create_checkpoint(root, overwrite=True) as w:
        w.write_tensor("new", "param", torch.arange(6.0))
    assert not [p for p in root.rglob("*") if "old" in p.relative_to(root).as_posix()]
    assert verify(root, strict=True) == []
    ck = open_checkpoint(root)
    assert ck.params == ["new"] and torch.equal(ck.read("new"), torch.arange(6.0))


def test_overwrite_refuses_what_is_not_a_ucp_checkpoint_and_leaves_it_whole(tmp_path):
    """``overwrite=True`` replaces a checkpoint or an interrupted write's leftovers (FORMAT.md §2),
    never a directory of other files: a wrong path must not cost a user their files."""
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "train.py").write_text("x")
    (other / "sub" / "data.bin").write_bytes(b"y")
    with pytest.raises(UcpError, match=r"other is not a ucp checkpoint \(it holds sub, train\.py\); "
                                       r"overwrite=True replaces only"):
        create_checkpoint(other, overwrite=True)
    assert sorted(p.relative_to(other).as_posix() for p in other.rglob("*")) == ["sub", "sub/data.bin", "train.py"]
    ck = tmp_path / "ck"
    with create_checkpoint(ck) as w:
        w.write_tensor("w", "param", torch.ones(4))
    (ck / "notes.txt").write_text("mine")
    with pytest.raises(UcpError, match=r"holds files that a ucp checkpoint does not have at its root \(notes\.txt\)"):
        create_checkpoint(ck, overwrite=True)
    assert torch.equal(open_checkpoint(ck).read("w"), torch.ones(4))


@pytest.mark.parametrize("workers", [0, 1])
def test_writer_without_worker_threads_writes_every_chunk(tmp_path, workers):
    """``workers=0`` or ``1`` (no thread pool: e.g. inside a framework's own worker thread) still
    writes arrays of many chunks, in the caller's thread."""
    t = torch.arange(64 * 24, dtype=torch.float32).reshape(64, 24)
    with create_checkpoint(tmp_path / "ck", workers=workers, chunk_bytes=24 * 4 * 4) as w:
        w.write_tensor("w", "param", t)
    ck = open_checkpoint(tmp_path / "ck")
    assert ck.array_info("w").chunks[0] < 64 and torch.equal(ck.read("w"), t)


def test_commit_and_abort_leave_no_writer_threads_or_open_files(tmp_path):
    """A training loop creates a writer per save: each one must hand back its threads and file
    handles when it ends (commit or abort), or a long run leaks them save after save."""
    import os
    import threading

    def open_under(root):
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(root)):
                fds.append(target)
        return fds

    t = torch.ones(64, 24)
    for end in ("commit", "abort"):
        root = tmp_path / end
        before = set(threading.enumerate())  # other tests' threads are not this writer's
        w = create_checkpoint(root, workers=4, chunk_bytes=24 * 4 * 4)
        w.write_tensor("w", "param", t)
        assert {th for th in threading.enumerate() if th.name.startswith("ucp-write")} - before
        getattr(w, end)()
        assert not [th.name for th in set(threading.enumerate()) - before if th.name.startswith("ucp-write")], end
        assert open_under(root) == [], end


def test_an_error_inside_the_with_block_propagates_and_writes_no_manifest(tmp_path):
    """The ``with`` form commits only a block that finished: an exception raised inside it reaches
    the caller (it is not swallowed by the writer) and the partial directory has no manifest."""
    with pytest.raises(KeyError, match="boom"):
        with create_checkpoint(tmp_path / "ck") as w:
            w.write_tensor("w", "param", torch.ones(4))
            raise KeyError("boom")
    assert not (tmp_path / "ck" / "ucp.manifest.json").exists()
    with pytest.raises(UcpError):
        open_checkpoint(tmp_path / "ck")


def test_a_writer_that_fails_to_open_releases_its_lock(tmp_path):
    """A refused ``create_checkpoint`` (here: the directory is not empty) must not keep the writer
    lock, or the user's next, corrected call would be told another writer holds the directory."""
    root = tmp_path / "ck"
    with create_checkpoint(root) as w:
        w.write_tensor("w", "param", torch.ones(2))
    with pytest.raises(UcpError, match="not empty"):
        create_checkpoint(root)
    assert not (root / "ucp.lock").exists()
    with create_checkpoint(root, overwrite=True) as w:
        w.write_tensor("w", "param", torch.zeros(2))
    assert torch.equal(open_checkpoint(root).read("w"), torch.zeros(2))


def test_a_chunk_that_fails_in_a_writer_thread_fails_the_write(tmp_path):
    """Chunks written by the writer's threads: one that cannot be written makes ``write`` raise (after
    the other threads finished), and only that chunk is left to write."""
    root = tmp_path / "ck"
    w = create_checkpoint(root, workers=4)
    a = w.add_array("w", "param", (6, 4), torch.float32, chunks=(2, 4))
    (root / "w" / "param" / "c" / "1" / "0").mkdir(parents=True)  # a directory where chunk c/1/0's file goes
    with pytest.raises(IsADirectoryError):
        a.write((0, 0), torch.ones(6, 4))  # three chunks, three jobs for the pool
    assert a.pending() == [((2, 0), (4, 4))]
    w.abort()


def test_an_error_inside_the_with_block_aborts_the_writer(tmp_path):
    """The ``with`` form aborts on an exception: the writer is closed, its threads have ended and its
    lock is released, so that the next save (here: a resume of the same directory) can start."""
    import threading

    root = tmp_path / "ck"
    before = set(threading.enumerate())
    with pytest.raises(KeyError, match="boom"):
        with create_checkpoint(root, workers=4, chunk_bytes=4 * 4 * 4) as w:
            w.write_tensor("w", "param", torch.ones(16, 4))  # four chunks: the writer's threads start
            assert {th for th in threading.enumerate() if th.name.startswith("ucp-write")} - before
            raise KeyError("boom")
    assert w.closed
    assert not [th.name for th in set(threading.enumerate()) - before if th.name.startswith("ucp-write")]
    assert not (root / "ucp.lock").exists()
    with create_checkpoint(root, resume=True, chunk_bytes=4 * 4 * 4) as again:
        again.write_tensor("w", "param", torch.ones(16, 4))
    assert torch.equal(open_checkpoint(root).read("w"), torch.ones(16, 4))


def test_a_checkpoint_writer_neither_overwrites_nor_resumes_unless_asked(tmp_path):
    """``CheckpointWriter(path)`` (the class ``create_checkpoint`` returns) refuses a committed
    checkpoint and a directory holding an interrupted run: replacing or continuing one must be asked
    for (overwrite=True, resume=True)."""
    from ucp.errors import DestinationNotEmptyError
    from ucp.format import CheckpointWriter

    done, cut = tmp_path / "done", tmp_path / "cut"
    with CheckpointWriter(done) as w:
        w.write_tensor("w", "param", torch.ones(4))
    w = CheckpointWriter(cut)
    w.add_array("w", "param", (4, 4), torch.float32, chunks=(2, 4)).write((0, 0), torch.ones(2, 4))
    w.abort()
    for root in (done, cut):
        with pytest.raises(DestinationNotEmptyError, match="is not empty; pass overwrite=True"):
            CheckpointWriter(root)
    assert torch.equal(open_checkpoint(done).read("w"), torch.ones(4))
    with CheckpointWriter(cut, resume=True) as w:
        w.add_array("w", "param", (4, 4), torch.float32, chunks=(2, 4)).write((2, 0), torch.zeros(2, 4))
    assert torch.equal(open_checkpoint(cut).read("w"), torch.cat([torch.ones(2, 4), torch.zeros(2, 4)]))


def test_metadata_tensors_are_arrays_numbered_from_0(tmp_path):
    """FORMAT.md §2: the tensors inside non-tensor metadata are the arrays ``_ucp/meta/0``, ``1``, ``2``..."""
    meta = {"rng": torch.arange(3), "opt": {"step": torch.tensor(7), "m": [torch.ones(2), torch.zeros(1)]}}
    with create_checkpoint(tmp_path / "ck") as w:
        w.write_tensor("w", "param", torch.ones(2))
        w.set_metadata(meta)
    got = sorted(p.name for p in (tmp_path / "ck" / "_ucp" / "meta").iterdir() if p.is_dir())
    assert got == ["0", "1", "2", "3"]
    back = open_checkpoint(tmp_path / "ck").metadata
    assert torch.equal(back["rng"], meta["rng"]) and torch.equal(back["opt"]["m"][1], torch.zeros(1))


@pytest.mark.parametrize("extra, fsynced", [(0, False), (1, True)], ids=["at-FSYNC_MIN", "above"])
def test_chunk_files_above_fsync_min_are_fsynced_by_their_writer(tmp_path, monkeypatch, extra, fsynced):
    """A durable writer fsyncs a chunk file of more than FSYNC_MIN bytes written through the page
    cache as it writes it; smaller ones (FSYNC_MIN bytes included) are made durable by the one syncfs
    before the manifest. (Files written with O_DIRECT: tests/test_format_durability.py.)"""
    import os

    from ucp.format import store
    from ucp.format.array_writer import FSYNC_MIN
    from ucp.format.manifest import CRC_BYTES

    monkeypatch.setattr(store, "DIRECT_MIN", 1 << 62)

    seen, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: seen.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    n = FSYNC_MIN - CRC_BYTES + extra  # elements of one uint8 chunk: its file has FSYNC_MIN + extra bytes
    with create_checkpoint(tmp_path / "ck", chunk_bytes=2 * n) as w:
        w.write_tensor("w", "param", torch.zeros(n, dtype=torch.uint8))
    chunk = tmp_path / "ck" / "w" / "param" / "c" / "0"
    assert chunk.stat().st_size == FSYNC_MIN + extra
    assert (str(chunk) in seen) is fsynced


def test_each_document_is_written_once_and_after_its_parent_group(tmp_path, monkeypatch):
    """On an object store the writer's threads write the ``zarr.json`` documents one depth at a time:
    every document once, each group's before the documents inside it."""
    from ucp.format import store

    puts, real = [], store.FsspecStore.put
    monkeypatch.setattr(store.FsspecStore, "put", lambda self, rel, bufs, fsync=False:
                        puts.append(rel) or real(self, rel, bufs, fsync))
    url = f"memory://ucp-behaviour-writer/{tmp_path.name}/docs"
    with create_checkpoint(url, workers=4) as w:
        for i in range(6):
            w.write_tensor(f"layer{i}.w", "param", torch.full((3, 2), float(i)))
    docs = [rel for rel in puts if rel.endswith("zarr.json")]
    assert len(docs) == len(set(docs)) > 8
    for k, rel in enumerate(docs):
        parent = rel.rsplit("/", 2)[0] + "/zarr.json" if rel.count("/") > 1 else "zarr.json"
        assert rel == "zarr.json" or parent in docs[:k], (rel, docs)
    assert verify(url) == []


def test_manifest_and_part_records_name_the_ucp_version_that_wrote_them(tmp_path):
    import json

    import ucp
    from ucp.format import commit_parts

    with create_checkpoint(tmp_path / "one") as w:
        w.write_tensor("w", "param", torch.ones(2))
    w = create_checkpoint(tmp_path / "parts", rank=0, world_size=1, durable=False)
    w.write_tensor("w", "param", torch.ones(2))
    w.commit()
    part = json.loads((tmp_path / "parts" / "_ucp" / "parts" / "0.json").read_bytes())
    commit_parts(tmp_path / "parts", 1, durable=False)
    for root in ("one", "parts"):
        assert json.loads((tmp_path / root / "ucp.manifest.json").read_bytes())["writer"] == f"ucp {ucp.__version__}"
    assert part["writer"] == f"ucp {ucp.__version__}"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("inner_bytes", [1, 3, 8])
@pytest.mark.parametrize("shape", [(0, 5), (0,), (0, 3, 7), (1,), ()])
def test_unsharded_default_chunks_keep_to_the_inner_chunk_budget(tmp_path, dtype, inner_bytes, shape):
    """Empty, 0-d and small arrays are not sharded by default; their chunks, like the inner chunks of
    sharded ones, hold at most ``inner_bytes`` (or one element, when an element is larger)."""
    import math

    with create_checkpoint(tmp_path / "ck", inner_bytes=inner_bytes) as w:
        w.write_tensor("w", "param", torch.zeros(shape, dtype=dtype))
    info = open_checkpoint(tmp_path / "ck").array_info("w")
    isz = torch.tensor([], dtype=dtype).element_size()
    assert (info.inner_chunks is None) == (math.prod(shape) * isz <= inner_bytes or 0 in shape or not shape)
    chunk = info.inner_chunks or info.chunks
    assert math.prod(chunk) * isz <= max(inner_bytes, isz), (chunk, shape)


def test_a_shard_that_fails_to_encode_gives_its_buffer_back_and_fails_the_write(tmp_path, monkeypatch):
    """The store buffer a shard is built in goes back to the pool when encoding fails, the encoder's
    own error reaches the caller, and the shard is left to write."""
    from ucp.format import array_writer

    def broken(*args, **kwargs):
        raise ValueError("encoder failed")

    root = tmp_path / "ck"
    w = create_checkpoint(root, workers=0)
    given, released = [], []
    real_take, real_give = w.store.file_buffer, w.store.release_buffer
    monkeypatch.setattr(w.store, "file_buffer", lambda n: given.append(real_take(n)) or given[-1])
    monkeypatch.setattr(w.store, "release_buffer", lambda b: released.append(b) or real_give(b))
    monkeypatch.setattr(array_writer.shards, "encode", broken)
    a = w.add_array("w", "param", (64, 32), torch.float32, chunks=(16, 8), shards=(64, 32))
    with pytest.raises(ValueError, match="encoder failed"):
        a.write((0, 0), torch.ones(64, 32))
    assert len(given) == 1 and released == given
    assert a.pending() == [((0, 0), (64, 32))]
    w.abort()


@pytest.mark.parametrize("each", [True, False])
def test_fsync_each_decides_for_every_chunk_file_whatever_its_size(tmp_path, monkeypatch, each):
    """``fsync_each=True``: every chunk file, a small one too, is fsync'ed by its writer; ``False``:
    none is (the syncfs before the manifest covers them)."""
    import os

    seen, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: seen.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    with create_checkpoint(tmp_path / "ck", fsync_each=each) as w:
        w.write_tensor("w", "param", torch.ones(16))
    chunk = tmp_path / "ck" / "w" / "param" / "c" / "0"
    assert chunk.exists() and (str(chunk) in seen) is each
