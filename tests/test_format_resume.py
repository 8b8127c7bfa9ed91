"""Issue 13 item 3: a resume adopts chunk files only when they belong to this run: the same source
fingerprint, the same layout for every array. Anything else is refused naming what changed."""
import os

import pytest
import torch

from ucp.errors import UcpError
from ucp.format import ResumeMismatchError, create_checkpoint, open_checkpoint, source_fingerprint, verify


def source(tmp_path, scale):
    """A source directory of six 'layer' files (torch.save with plain tensors)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for i in range(6):
        torch.save({"w": torch.full((16, 8), float(scale * (i + 1)))}, src / f"layer{i}.pt")
    return src


def convert(src, dst, n, resume=False, kill_after=None):
    """Write layers 0..n-1 from ``src`` (stopping like a killed job after ``kill_after`` of them)."""
    w = create_checkpoint(dst, resume=resume, fingerprint=source_fingerprint(src), chunk_bytes=128, durable=False)
    for i in range(n):
        if kill_after is not None and i == kill_after:
            w.abort()
            return w
        t = torch.load(src / f"layer{i}.pt", weights_only=True)["w"]
        a = w.add_array(f"layers.{i}.w", "param", t.shape, t.dtype)
        for start, stop in a.pending():
            a.write(start, t[tuple(slice(x, y) for x, y in zip(start, stop))].clone())
    w.commit()
    return w


def test_resume_with_a_changed_source_is_refused(tmp_path):
    src = source(tmp_path, 1)
    convert(src, tmp_path / "ck", 6, kill_after=4)
    torch.save({"w": torch.full((16, 8), -1.0)}, src / "layer0.pt")  # the source changed meanwhile
    os.utime(src / "layer0.pt", ns=(10**18, 10**18))
    with pytest.raises(ResumeMismatchError, match=r"another source \(layer0.pt: \[\d+, \d+\] -> \[\d+, 1000000000000000000\]\)"):
        convert(src, tmp_path / "ck", 6, resume=True)
    # afresh: the values are the new source's, nothing of the old run survives
    convert(src, tmp_path / "ck2", 6)
    assert torch.equal(open_checkpoint(tmp_path / "ck2").read("layers.0.w"), torch.full((16, 8), -1.0))


def test_resume_with_the_same_source_adopts_and_completes(tmp_path):
    src = source(tmp_path, 1)
    convert(src, tmp_path / "ck", 6, kill_after=4)
    first = tmp_path / "ck" / "layers.0.w" / "param" / "c" / "0" / "0"
    os.utime(first, ns=(1, 1))  # a rewrite would set the current time
    convert(src, tmp_path / "ck", 6, resume=True)
    assert first.stat().st_mtime_ns == 1
    ck = open_checkpoint(tmp_path / "ck")
    for i in range(6):
        assert torch.equal(ck.read(f"layers.{i}.w"), torch.full((16, 8), float(i + 1)))
    assert verify(tmp_path / "ck", strict=True) == []  # the run journal is gone with the commit


def test_resume_with_changed_inner_chunking_is_refused(tmp_path):
    t = torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64)
    w = create_checkpoint(tmp_path / "ck", durable=False)
    w.write_tensor("w", "param", t, shards=(32, 64), chunks=(8, 16))
    w.abort()
    w = create_checkpoint(tmp_path / "ck", resume=True, durable=False)
    with pytest.raises(ResumeMismatchError, match=r"array w/param was written with another layout "
                                                  r"\(inner_chunks: \[8, 16\] -> \[16, 8\]\)"):
        w.add_array("w", "param", t.shape, t.dtype, shards=(32, 64), chunks=(16, 8))
    w.abort()


def test_resume_without_a_journal_adopts_nothing(tmp_path):
    t = torch.arange(64.0).reshape(8, 8)
    w = create_checkpoint(tmp_path / "ck", durable=False, chunk_bytes=64)
    w.write_tensor("w", "param", t)
    w.abort()
    (tmp_path / "ck" / "_ucp" / "run.json").unlink()  # no record: nothing proves whose chunks these are
    w = create_checkpoint(tmp_path / "ck", resume=True, durable=False, chunk_bytes=64)
    a = w.add_array("w", "param", t.shape, t.dtype)
    assert len(a.pending()) == a.nchunks == 4
    w.abort()


@pytest.mark.parametrize("leftover", [["notes.txt"], ["_ucp/", "notes.txt"], ["data/", "notes.txt"]])
def test_resume_refuses_a_folder_no_ucp_write_left(tmp_path, leftover):
    """``resume=True`` continues what an interrupted ucp write left, and nothing else: a folder of
    someone's files (even beside a ``_ucp`` folder) is refused naming them, and left as it was."""
    dst = tmp_path / "ck"
    for name in leftover:
        (dst / name.rstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (dst / name.rstrip("/")).mkdir() if name.endswith("/") else (dst / name).write_text("mine")
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    with pytest.raises(UcpError, match=r"ck (holds no interrupted ucp write \(it holds|holds files that).*"
                                       r"resume=True continues only"):
        create_checkpoint(dst, resume=True, durable=False)
    assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before
    # one of several writers (a torchrun job), resuming or not, refuses someone's files the same way
    for resume in (True, False):
        with pytest.raises(UcpError, match=r"ck holds (no interrupted ucp write|files that).*notes\.txt"):
            create_checkpoint(dst, rank=1, world_size=2, resume=resume, durable=False)


def test_one_writer_finishing_a_jobs_interrupted_write_leaves_no_part_files(tmp_path):
    """A job of two writers was interrupted; one process resumes alone and commits: the job's part
    records, journals and locks are no part of the checkpoint (``verify --strict`` called them
    stray files)."""
    src = source(tmp_path, 1)
    dst = tmp_path / "ck"
    for rank in (0, 1):
        w = create_checkpoint(dst, rank=rank, world_size=2, fingerprint=source_fingerprint(src), chunk_bytes=128,
                              durable=False)
        t = torch.load(src / f"layer{rank}.pt", weights_only=True)["w"]
        w.write_tensor(f"layers.{rank}.w", "param", t)
        w.commit() if rank == 0 else w.abort()     # rank 1 stopped before its part record
    convert(src, dst, 6, resume=True)
    assert verify(dst, strict=True) == []
    assert not (dst / "_ucp" / "parts").exists()


@pytest.mark.parametrize("how", ["resume", "overwrite"])
def test_one_writer_refuses_a_root_a_jobs_process_is_still_writing(tmp_path, how):
    """A job's processes lock only their parts, not the root: one writer resuming or overwriting it
    meanwhile wrote the same chunk files as the job, which then failed at its commit. It is refused,
    naming the live part's lock; once that process ends, the resume goes ahead."""
    from ucp.format import WriterLockedError

    dst = tmp_path / "ck"
    live = create_checkpoint(dst, rank=1, world_size=2, durable=False)
    live.write_tensor("w", "param", torch.ones(4))
    with pytest.raises(WriterLockedError, match=r"a job's process is still writing into it: .*_ucp/parts/1\.lock"):
        create_checkpoint(dst, durable=False, **{how: True})
    live.abort()
    w = create_checkpoint(dst, durable=False, **{how: True})
    w.write_tensor("w", "param", torch.ones(4))
    w.commit()
    assert verify(dst, strict=True) == []
