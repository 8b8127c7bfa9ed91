"""Several writers, one checkpoint (spec/FORMAT.md §13): real processes write parts, one commits."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from ucp.errors import IncompleteCheckpointError, NotCommittedError, OverlapError, UcpError
from ucp.format import (aligned_chunks, commit_parts, create_checkpoint, encode_param, open_checkpoint,
                        split_boxes, verify)
from ucp.format.store import make_store

# The worker runs in a fresh interpreter (like a torchrun rank): it rebuilds the same full tensors
# from a seed and writes its share of them.
WORKER = r'''
import json, sys, torch
from ucp.format import create_checkpoint, split_boxes, aligned_chunks

def full():
    g = torch.Generator().manual_seed(1234)
    t = {}
    for i in range(7):
        t[f"layers.{i}.w"] = torch.randn(9 + i, 33, generator=g)
        t[f"layers.{i}.b"] = torch.randn(5 + 3 * i, generator=g).bfloat16()
    t["emb"] = torch.randint(-9, 9, (40, 8), generator=g)
    t["rows.a"] = torch.randn(37, 24, generator=g)                        # torch.chunk rows
    t["rows.b"] = torch.randn(50, 16, generator=g).bfloat16()             # torch.tensor_split rows
    t["rows.s"] = torch.randn(45, 64, generator=g)                        # sharded, tensor_split
    t["rows.al"] = torch.randn(41, 32, generator=g)                       # aligned grid (torch.chunk)
    return t

ROWS = {"rows.a": ("chunk", dict(chunks=(4, 24))), "rows.b": ("tensor_split", dict(chunks=(8, 16))),
        "rows.s": ("tensor_split", dict(shards=(12, 64), chunks=(4, 32))), "rows.al": ("chunk", None)}

a = json.loads(sys.argv[1])
r, n = a["rank"], a["world"]
t = full()
w = create_checkpoint(a["path"], rank=r, world_size=n, resume=a.get("resume", False), chunk_bytes=512,
                      durable=False, workers=2)
hold = a.get("hold", False)  # block (on stdin, a pipe) after the first param: killed mid-write
if a["mode"] == "disjoint":
    names = [k for k in t if not k.startswith("rows.")]
    for i, name in enumerate(names):
        if i % n != r:
            continue
        w.add_param(name, {"frozen": False, "scalars": {"owner": r}})
        w.write_tensor(name, "param", t[name])
        sh = dict(shards=(8, 33), chunks=(4, 11)) if t[name].dim() == 2 and t[name].shape[0] >= 8 else {}
        w.write_tensor(name, "exp_avg", t[name] * 2, **sh)
        print("wrote", name, flush=True)
        if hold:
            sys.stdin.readline()  # the test never writes: this rank waits here until it is killed
else:
    for name, (how, kw) in ROWS.items():
        x = t[name]
        if kw is None:
            kw = dict(chunks=aligned_chunks(x.shape, split_boxes(x.shape, n, 0, how), x.element_size(), 512))
        for state, y in (("param", x), ("exp_avg", x * 3)):
            arr = w.add_array(name, state, x.shape, x.dtype, **kw)
            st, sp = split_boxes(x.shape, n, 0, how)[r]
            piece = (torch.chunk if how == "chunk" else torch.tensor_split)(y, n, 0)
            if r < len(piece):
                assert piece[r].shape[0] == sp[0] - st[0]
                arr.write(st, piece[r].clone())
            print("wrote", name, state, flush=True)
w.commit()
print("part done", flush=True)
'''


def full():
    ns = {}
    exec(WORKER.split("\nROWS")[0], ns)
    return ns["full"]()


def spawn(path, rank, world, mode, **kw):
    arg = json.dumps({"path": str(path), "rank": rank, "world": world, "mode": mode, **kw})
    return subprocess.Popen([sys.executable, "-c", WORKER, arg], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_all(path, world, mode, **kw):
    procs = [spawn(path, r, world, mode, **kw) for r in range(world)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert "part done" in out


def check_equal(path, mode):
    t = full()
    ck = open_checkpoint(path)
    names = [k for k in t if k.startswith("rows.") == (mode == "rows")]
    assert sorted(ck.params) == sorted(names)
    for name in names:
        for state, mult in (("param", 1), ("exp_avg", 3 if mode == "rows" else 2)):
            want = t[name] * mult if mult != 1 else t[name]
            got = ck.read(name, state)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.view(torch.uint8) if got.dtype != torch.int64 else got,
                               want.view(torch.uint8) if want.dtype != torch.int64 else want), (name, state)
    return ck


def test_three_processes_disjoint_params(tmp_path):
    path = tmp_path / "ck"
    run_all(path, 3, "disjoint")
    with pytest.raises(NotCommittedError):  # nothing exists for readers before the commit
        open_checkpoint(path)
    assert sorted(f.name for f in (path / "_ucp" / "parts").glob("[0-9].json")) == ["0.json", "1.json", "2.json"]
    assert not list((path / "_ucp" / "parts").glob("*.lock"))  # every rank released its lock
    rng = torch.arange(5, dtype=torch.uint8)
    info = commit_parts(path, 3, metadata={"iteration": 7, "rng": rng})
    assert info["assembled"] == 0
    ck = check_equal(path, "disjoint")
    assert ck.metadata["iteration"] == 7 and torch.equal(ck.metadata["rng"], rng)
    assert ck.param_meta("layers.4.w")["scalars"] == {"owner": 2}
    assert ck.params[:3] == ["layers.0.w", "layers.1.b", "layers.3.w"]  # rank order, then declaration order
    assert not (path / "_ucp" / "parts").exists()
    assert verify(path) == []
    cli = subprocess.run([sys.executable, "-m", "ucp", "verify", str(path)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stdout + cli.stderr


def test_four_processes_uneven_row_blocks_of_the_same_arrays(tmp_path):
    path = tmp_path / "ck"
    run_all(path, 4, "rows")
    parts = [json.loads((path / "_ucp" / "parts" / f"{r}.json").read_bytes()) for r in range(4)]
    staged = {p["name"]: sum(len(s["staged"]) for s in p["states"].values()) for d in parts for p in d["params"]}
    assert staged["rows.al"] == 0  # the aligned grid needs no staging
    assert staged["rows.a"] > 0 and staged["rows.b"] > 0 and staged["rows.s"] > 0  # chunks straddle ranks
    info = commit_parts(path, 4)
    assert info["assembled"] > 0
    check_equal(path, "rows")
    assert verify(path) == []
    assert not (path / "_ucp").exists()


def test_sigkilled_rank_resumes_and_commits(tmp_path):
    """Rank 1 writes its first param, then blocks on a pipe nobody writes to: it is SIGKILLed there, with
    params still unwritten and no part record. Synchronised on its output and the pipe, never on time."""
    path = tmp_path / "ck"
    victim = spawn(path, 1, 3, "disjoint", hold=True)
    others = [spawn(path, r, 3, "disjoint") for r in (0, 2)]
    for p in others:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert victim.stdout.readline() == "wrote layers.0.b\n"  # one param done; now blocked on stdin
    victim.send_signal(signal.SIGKILL)
    out, _err = victim.communicate(timeout=300)
    assert victim.returncode == -signal.SIGKILL
    assert "wrote" not in out and "part done" not in out  # killed before its second param: mid-write
    assert not (path / "_ucp" / "parts" / "1.json").exists()
    assert (path / "_ucp" / "parts" / "1.lock").exists()  # the dead rank's lock, stale now
    with pytest.raises(IncompleteCheckpointError, match=r"rank\(s\) 1 "):
        commit_parts(path, 3)
    assert not (path / "ucp.manifest.json").exists()
    first = path / "layers.0.b" / "param" / "c" / "0"  # rank 1's first param, written before "wrote"
    os.utime(first, ns=(1, 1))  # a rewrite would set the current time
    p = spawn(path, 1, 3, "disjoint", resume=True)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert first.stat().st_mtime_ns == 1  # adopted, not rewritten
    commit_parts(path, 3)
    check_equal(path, "disjoint")
    assert verify(path, strict=True) == []


# -- errors (in one process: the checks are the coordinator's) ------------------------------------
def _part(path, rank, world, arrays, **kw):
    w = create_checkpoint(path, rank=rank, world_size=world, durable=False, **kw)
    for name, state, shape, dtype, chunks, boxes in arrays:
        a = w.add_array(name, state, shape, dtype, chunks=chunks)
        for st, t in boxes:
            a.write(st, t)
    w.commit()


def test_missing_rank_is_named_and_no_manifest(tmp_path):
    x = torch.arange(12.0).reshape(6, 2)
    _part(tmp_path, 0, 4, [("a", "param", (6, 2), torch.float32, (3, 2), [((0, 0), x[:3])])])
    _part(tmp_path, 2, 4, [("a", "param", (6, 2), torch.float32, (3, 2), [((3, 0), x[3:])])])
    with pytest.raises(IncompleteCheckpointError, match=r"2 of 4 part\(s\) missing: rank\(s\) 1, 3 "):
        commit_parts(tmp_path, 4)
    assert not (tmp_path / "ucp.manifest.json").exists()
    with pytest.raises(NotCommittedError):
        open_checkpoint(tmp_path)


def test_same_chunk_by_two_ranks(tmp_path):
    x = torch.arange(12.0).reshape(6, 2)
    _part(tmp_path, 0, 2, [("a", "param", (6, 2), torch.float32, (3, 2), [((0, 0), x[:3])])])
    _part(tmp_path, 1, 2, [("a", "param", (6, 2), torch.float32, (3, 2), [((0, 0), x[:3]), ((3, 0), x[3:])])])
    with pytest.raises(OverlapError, match=r"param 'a' state 'param' chunk c/0/0 region \[0:3, 0:2\]: "
                                           r"written by rank 0 and by rank 1"):
        commit_parts(tmp_path, 2)
    assert not (tmp_path / "ucp.manifest.json").exists()


def test_overlapping_staged_pieces(tmp_path):
    x = torch.arange(12.0).reshape(6, 2)
    _part(tmp_path, 0, 2, [("a", "param", (6, 2), torch.float32, (6, 2), [((0, 0), x[:4])])])
    _part(tmp_path, 1, 2, [("a", "param", (6, 2), torch.float32, (6, 2), [((3, 0), x[3:])])])
    with pytest.raises(OverlapError, match=r"rank 0 region \[0:4, 0:2\] overlaps rank 1 region \[3:6, 0:2\]"):
        commit_parts(tmp_path, 2)


def test_inconsistent_declarations_name_both_ranks(tmp_path):
    x = torch.arange(12.0).reshape(6, 2)
    _part(tmp_path, 0, 2, [("a", "param", (6, 2), torch.float32, (3, 2), [((0, 0), x[:3])])])
    _part(tmp_path, 1, 2, [("a", "param", (6, 2), torch.float32, (2, 2), [((4, 0), x[4:])])])
    with pytest.raises(UcpError, match=r"param 'a' state 'param' declared inconsistently: rank 0 shape \[6, 2\], "
                                       r"dtype float32, chunks \[3, 2\]; rank 1 shape \[6, 2\], dtype float32, "
                                       r"chunks \[2, 2\]"):
        commit_parts(tmp_path, 2)
    assert not (tmp_path / "ucp.manifest.json").exists()


def test_unwritten_regions_are_named_with_ranks(tmp_path):
    x = torch.arange(20.0).reshape(10, 2)
    _part(tmp_path, 0, 2, [("a", "param", (10, 2), torch.float32, (4, 2), [((0, 0), x[:5])])])
    _part(tmp_path, 1, 2, [("a", "param", (10, 2), torch.float32, (4, 2), [((6, 0), x[6:])])])
    with pytest.raises(IncompleteCheckpointError) as ei:
        commit_parts(tmp_path, 2)
    msg = str(ei.value)
    assert ("param 'a' state 'param' chunk c/1/0 region [4:8, 0:2] only partly written "
            "(6 of 8 elements: rank 0 wrote [4:5, 0:2]; rank 1 wrote [6:8, 0:2])") in msg
    # now the chunk nobody touched
    _part(tmp_path, 1, 2, [("a", "param", (10, 2), torch.float32, (4, 2), [((5, 0), x[5:8])])])
    with pytest.raises(IncompleteCheckpointError, match=r"chunk c/2/0 region \[8:10, 0:2\] not written by any "
                                                        r"rank \(chunks of this array written per rank: rank 0: 1\)"):
        commit_parts(tmp_path, 2)


def test_single_process_parts_roundtrip_and_stale_part_replaced(tmp_path):
    x = torch.arange(20.0).reshape(10, 2)
    _part(tmp_path, 0, 2, [("a", "param", (10, 2), torch.float32, (4, 2), [((0, 0), x[:5])])])
    _part(tmp_path, 1, 2, [("a", "param", (10, 2), torch.float32, (4, 2), [((5, 0), x[5:] + 1)])])
    # rank 1 runs again (same boxes, new data): its old part record and stage files are replaced
    _part(tmp_path, 1, 2, [("a", "param", (10, 2), torch.float32, (4, 2), [((5, 0), x[5:])])])
    commit_parts(tmp_path, 2)
    assert torch.equal(open_checkpoint(tmp_path).read("a"), x)
    with pytest.raises(UcpError, match="already a committed"):
        commit_parts(tmp_path, 2)
    with pytest.raises(UcpError, match="already a committed"):
        create_checkpoint(tmp_path, rank=0, world_size=2)


def test_rank_arguments_and_metadata_refused(tmp_path):
    with pytest.raises(UcpError, match="both rank= and world_size="):
        create_checkpoint(tmp_path, rank=0)
    with pytest.raises(UcpError, match="not in range"):
        create_checkpoint(tmp_path, rank=2, world_size=2)
    w = create_checkpoint(tmp_path, rank=0, world_size=1)
    with pytest.raises(UcpError, match="commit_parts"):
        w.set_metadata({"a": 1})


def test_split_boxes_and_aligned_chunks():
    assert split_boxes((10, 3), 4) == [((0, 0), (3, 3)), ((3, 0), (6, 3)), ((6, 0), (9, 3)), ((9, 0), (10, 3))]
    assert [b[1][0] - b[0][0] for b in split_boxes((10, 3), 4, mode="tensor_split")] == [3, 3, 2, 2]
    assert [b[1][0] - b[0][0] for b in split_boxes((5, 3), 4)] == [2, 2, 1, 0]  # torch.chunk: 3 pieces
    for n, k in ((37, 4), (4096, 8), (1000, 3), (7, 7)):
        c = aligned_chunks((n, 64), split_boxes((n, 64), k), 4, target=1 << 20)
        assert c is not None and c[1] == 64 and all(b[0][0] % c[0] == 0 for b in split_boxes((n, 64), k))
    assert aligned_chunks((4096, 1024), split_boxes((4096, 1024), 8), 4) == (512, 1024)  # 2 MiB, <= 4 MiB
    assert aligned_chunks((4099, 1024), split_boxes((4099, 1024), 8, mode="tensor_split"), 4) is None
    # column splits (tensor parallel on dim 1)
    assert aligned_chunks((64, 4096), split_boxes((64, 4096), 4, dim=1), 2, target=1 << 16) == (32, 1024)


def test_coordinator_crash_then_ranks_resume_and_commit_again(tmp_path, monkeypatch):
    from ucp.format import writer

    x = torch.arange(20.0).reshape(10, 2)
    arrays = lambda r: [("a", "param", (10, 2), torch.float32, (4, 2), [((0, 0), x[:5])] if r == 0 else
                         [((5, 0), x[5:])])]
    for r in (0, 1):
        _part(tmp_path, r, 2, arrays(r))

    def crash(self):
        raise RuntimeError("coordinator died")

    monkeypatch.setattr(writer.CheckpointWriter, "commit", crash)
    with pytest.raises(RuntimeError, match="coordinator died"):
        commit_parts(tmp_path, 2)  # the straddling chunk c/1/0 was assembled and written, no manifest
    monkeypatch.undo()
    assert (tmp_path / "a" / "param" / "c" / "1" / "0").exists()
    assert not (tmp_path / "ucp.manifest.json").exists()
    for r in (0, 1):  # both ranks rerun: neither may claim the assembled chunk
        _part(tmp_path, r, 2, arrays(r), resume=True)
    assert commit_parts(tmp_path, 2)["assembled"] == 1
    assert torch.equal(open_checkpoint(tmp_path).read("a"), x)
    assert verify(tmp_path) == []


def test_corrupt_part_record_and_world_size_mismatch(tmp_path):
    from ucp.errors import FormatError

    x = torch.arange(12.0).reshape(6, 2)
    _part(tmp_path, 0, 1, [("a", "param", (6, 2), torch.float32, (3, 2), [((0, 0), x)])])
    with pytest.raises(UcpError, match=r"part of rank 0 of world_size 1, expected rank 0 of world_size 2"):
        commit_parts(tmp_path, 2)
    rec = tmp_path / "_ucp" / "parts" / "0.json"
    raw = bytearray(rec.read_bytes())
    raw[-5] ^= 1
    rec.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"_ucp/parts/0.json: manifest checksum mismatch"):
        commit_parts(tmp_path, 1)
    assert not (tmp_path / "ucp.manifest.json").exists()


def _two_ranks(root):
    """Rank 0 and rank 1 of one checkpoint: array ``a`` in whole chunks (rank 0 writes the first),
    array ``c`` whose first chunk both ranks write partly (the coordinator assembles it)."""
    x = torch.arange(20.0).reshape(10, 2)
    writers = []
    for rank, rows in ((0, slice(0, 5)), (1, slice(5, 10))):
        w = create_checkpoint(root, rank=rank, world_size=2, durable=False)
        w.add_array("a", "param", (10, 2), torch.float32, chunks=(5, 2)).write((rows.start, 0), x[rows])
        c = slice(0, 3) if rank == 0 else slice(3, 10)
        w.add_array("c", "param", (10, 2), torch.float32, chunks=(4, 2)).write((c.start, 0), x[c] * 2)
        w.commit()
        writers.append(w)
    return x, writers


def test_rank_writes_the_documents_of_arrays_it_starts_and_records_them(tmp_path):
    x, (w0, w1) = _two_ranks(tmp_path)
    docs0 = {rel for _, _, docs in w0.records for rel in docs}
    docs1 = {rel for _, _, docs in w1.records for rel in docs}
    assert docs0 == {"a/param/zarr.json"} and docs1 == set()        # c's first chunk is staged: no rank
    before = (tmp_path / "a" / "param" / "zarr.json").stat().st_mtime_ns
    commit_parts(tmp_path, 2)
    assert (tmp_path / "a" / "param" / "zarr.json").stat().st_mtime_ns == before   # not written again
    ck = open_checkpoint(tmp_path)
    assert torch.equal(ck.read("a"), x) and torch.equal(ck.read("c"), x * 2)
    assert verify(tmp_path) == []


def test_records_handed_over_in_memory_commit_the_same_checkpoint(tmp_path):
    """commit_parts(parts=) takes the ranks' records without reading their part files; a document
    recorded with other bytes than the coordinator's is written again (verify then passes)."""
    x, (w0, w1) = _two_ranks(tmp_path)
    for rank in (0, 1):   # the part files are not read: removing them changes nothing
        (tmp_path / "_ucp" / "parts" / f"{rank}.json").unlink()
    name, staged, docs = w0.records[0]
    w0.records[0] = (name, staged, {rel: (1, 2) for rel in docs})    # recorded otherwise: rewritten
    (tmp_path / "a" / "param" / "zarr.json").write_bytes(b"{}")
    commit_parts(tmp_path, 2, parts={0: w0.records, 1: w1.records})
    ck = open_checkpoint(tmp_path)
    assert torch.equal(ck.read("a"), x) and torch.equal(ck.read("c"), x * 2)
    assert verify(tmp_path) == []


def test_premade_dirs_are_exactly_where_the_ranks_write_their_chunk_files(tmp_path):
    """Issue 17: the coordinator makes every chunk directory once before the ranks write
    (``make_part_dirs``); the ranks then create no directory of their own. The rule that names
    the directories must match the writer's chunk keys: plain 1-D and 3-D arrays, a sharded 2-D
    array, a 0-d array and one left to the default layout (only its own directory)."""
    from ucp.format.parts import chunk_dirs, make_part_dirs

    x3 = torch.arange(5 * 6 * 4, dtype=torch.float32).reshape(5, 6, 4)
    x2 = torch.arange(10 * 8, dtype=torch.float32).reshape(10, 8)
    x1 = torch.arange(7, dtype=torch.int64)
    decl = [("a.b", "param", x3, (2, 4, 4), None), ("a.b", "exp_avg", x2, (2, 4), (6, 8)),
            ("c%d", "param", x1, (3,), None), ("s", "param", torch.tensor(2.5), (), None)]
    n = make_part_dirs(tmp_path, [(nm, st, tuple(t.shape), sh or ch) for nm, st, t, ch, sh in decl]
                       + [("d", "param", (9, 9), None)])
    made = {os.path.relpath(dp, tmp_path) for dp, _dn, _fn in os.walk(tmp_path)} - {"."}
    want = {"_ucp", "_ucp/parts", "d", "d/param", "a.b", "c%25d", "s"}
    for nm, st, t, ch, sh in decl:
        want |= set(chunk_dirs(f"{encode_param(nm)}/{st}", tuple(t.shape), sh or ch))
    assert made == want and n == len(want) - 5      # the listed ones, parents made on the way
    assert chunk_dirs("a/p", (5, 6, 4), (2, 4, 4)) == ["a/p", "a/p/c", "a/p/c/0", "a/p/c/1", "a/p/c/2",
                                                         "a/p/c/0/0", "a/p/c/0/1", "a/p/c/1/0", "a/p/c/1/1",
                                                         "a/p/c/2/0", "a/p/c/2/1"]
    w = create_checkpoint(tmp_path, rank=0, world_size=1, durable=False)
    for nm, st, t, ch, sh in decl:
        w.add_array(nm, st, tuple(t.shape), t.dtype, chunks=ch, shards=sh).write((0,) * t.dim(), t)
    w.commit()
    chunk_files = [f for f in make_store(tmp_path).list_files() if not f.endswith(".json") and "/c" in f
                   and not f.startswith("_ucp")]
    assert {os.path.dirname(f) for f in chunk_files} <= made       # every chunk file in a premade dir
    made_after = {os.path.relpath(dp, tmp_path) for dp, _dn, _fn in os.walk(tmp_path)} - {"."}
    assert made_after == made                                    # and the rank made none of its own
    commit_parts(tmp_path, 1)
    ck = open_checkpoint(tmp_path)
    for nm, st, t, _ch, _sh in decl:
        assert torch.equal(ck.read(nm, st), t)
