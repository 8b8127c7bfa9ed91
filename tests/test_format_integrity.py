"""Corruption, deletion, missing manifest and incomplete commits are always caught."""
import os
import pathlib

import pytest
import torch

from ucp.errors import CorruptChunkError, IncompleteCheckpointError, NotCommittedError, UcpError
from ucp.format import create_checkpoint, open_checkpoint, verify


def small_checkpoint(path):
    with create_checkpoint(path, chunk_bytes=16) as w:
        w.add_param("a.w", {"frozen": False, "scalars": {"step": 1}})
        w.write_tensor("a.w", "param", torch.arange(6, dtype=torch.float32).reshape(3, 2))
        w.write_tensor("a.w", "exp_avg", torch.arange(6, dtype=torch.float32).reshape(3, 2).bfloat16(), chunks=(2, 2))
        w.write_tensor("b", "param", torch.tensor(7, dtype=torch.int64))
        w.set_metadata({"iteration": 5, "rng": torch.tensor([1, 2, 3], dtype=torch.uint8)})
    return path


def files_of(path):
    return sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())


def read_all(path):
    ck = open_checkpoint(path)
    for n in ck.params:
        for s in ck.states(n):
            ck.read(n, s)
    return ck.metadata


def test_every_single_byte_flip_is_reported(tmp_path):
    ck = small_checkpoint(tmp_path / "ck")
    assert verify(ck) == []
    n_checked = 0
    for f in files_of(ck):
        data = f.read_bytes()
        rel = f.relative_to(ck).as_posix()
        is_chunk = "/c/" in "/" + rel or rel.endswith("/c")
        for i in range(len(data)):
            bad = bytearray(data)
            bad[i] ^= 0x01 if i % 2 else 0x80
            f.write_bytes(bad)
            try:
                problems = verify(ck)
                assert problems, f"flip of byte {i} of {rel} not reported"
                if is_chunk:
                    assert any(rel in p for p in problems), problems
                    with pytest.raises(UcpError):
                        read_all(ck)
                n_checked += 1
            finally:
                f.write_bytes(data)
    assert n_checked > 1000
    assert verify(ck) == []


def test_truncated_and_extended_chunk(tmp_path):
    ck = small_checkpoint(tmp_path / "ck")
    f = next(p for p in files_of(ck) if p.match("a.w/param/c/0/0"))
    data = f.read_bytes()
    f.write_bytes(data[:-1])
    assert any("truncated" in p and "c/0/0" in p for p in verify(ck, deep=False))
    with pytest.raises(CorruptChunkError, match="truncated"):
        open_checkpoint(ck).read("a.w")
    f.write_bytes(data + b"\0")
    assert any("extra bytes" in p for p in verify(ck))
    with pytest.raises(CorruptChunkError, match="extra"):
        open_checkpoint(ck).read("a.w")


def test_deleted_chunk(tmp_path):
    ck = small_checkpoint(tmp_path / "ck")
    f = ck / "a.w" / "exp_avg" / "c" / "1" / "0"
    assert f.exists()
    f.unlink()
    for deep in (True, False):
        probs = verify(ck, deep=deep)
        assert len(probs) == 1 and "'a.w'" in probs[0] and "'exp_avg'" in probs[0] and "c/1/0" in probs[0]
    with pytest.raises(CorruptChunkError, match="missing"):
        open_checkpoint(ck).read("a.w", "exp_avg")
    # a read that does not touch the chunk still works
    assert open_checkpoint(ck).read("a.w", "exp_avg", index=0).tolist() == [0.0, 1.0]


def test_deleted_zarr_json_and_metadata_chunk(tmp_path):
    ck = small_checkpoint(tmp_path / "ck")
    (ck / "b" / "zarr.json").unlink()
    assert any("b/zarr.json" in p for p in verify(ck))
    ck2 = small_checkpoint(tmp_path / "ck2")
    (ck2 / "_ucp" / "meta" / "0" / "c" / "0").unlink()
    assert any("_ucp/meta/0" in p for p in verify(ck2))
    with pytest.raises(CorruptChunkError):
        read_all(ck2)


def test_missing_manifest_refused(tmp_path):
    ck = small_checkpoint(tmp_path / "ck")
    os.unlink(ck / "ucp.manifest.json")
    with pytest.raises(NotCommittedError, match="not a committed ucp checkpoint: no ucp.manifest.json"):
        open_checkpoint(ck)
    assert "not a committed ucp checkpoint" in verify(ck)[0]
    with pytest.raises(NotCommittedError):
        open_checkpoint(tmp_path / "nowhere")


def test_incomplete_commit_names_region(tmp_path):
    w = create_checkpoint(tmp_path / "ck", durable=False)
    a = w.add_array("layers.1.w", "exp_avg_sq", (8, 3), torch.float32, chunks=(4, 3))
    a.write((0, 0), torch.zeros(4, 3))
    a.write((4, 0), torch.zeros(2, 3))
    with pytest.raises(IncompleteCheckpointError) as ei:
        w.commit()
    msg = str(ei.value)
    assert "'layers.1.w'" in msg and "'exp_avg_sq'" in msg and "c/1/0" in msg and "[4:8, 0:3]" in msg
    assert "partly written (6 of 12" in msg
    assert not (tmp_path / "ck" / "ucp.manifest.json").exists()
    with pytest.raises(NotCommittedError):
        open_checkpoint(tmp_path / "ck")
    a.write((6, 0), torch.zeros(2, 3))  # finish it: the writer stays usable
    w.commit()
    assert verify(tmp_path / "ck") == []


def test_context_manager_aborts_on_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with create_checkpoint(tmp_path / "ck") as w:
            w.write_tensor("x", "param", torch.ones(3))
            raise RuntimeError("boom")
    assert not (tmp_path / "ck" / "ucp.manifest.json").exists()


def test_resume_interrupted_write(tmp_path):
    p = tmp_path / "ck"
    t = torch.randn(40, 8)
    w = create_checkpoint(p, chunk_bytes=8 * 4 * 10)  # 4 row chunks of 10 rows
    a = w.add_array("w", "param", t.shape, t.dtype)
    a.write((0, 0), t[:20])
    a.write((20, 0), t[20:25])  # partial chunk: staged only, lost with the process
    w.abort()
    # corrupt one of the finished chunks: resume must not trust it
    f = p / "w" / "param" / "c" / "1" / "0"
    b = bytearray(f.read_bytes())
    b[0] ^= 1
    f.write_bytes(b)
    with pytest.raises(UcpError, match="not empty"):
        create_checkpoint(p)
    w = create_checkpoint(p, resume=True, chunk_bytes=8 * 4 * 10)
    a = w.add_array("w", "param", t.shape, t.dtype)
    assert a.pending() == [((10, 0), (20, 8)), ((20, 0), (30, 8)), ((30, 0), (40, 8))]
    a.write((0, 0), t)  # rewrites only the pending chunks
    w.set_metadata({"rng": torch.arange(3)})
    w.commit()
    assert verify(p) == []
    assert torch.equal(open_checkpoint(p).read("w"), t)
    with pytest.raises(UcpError, match="already a committed"):
        create_checkpoint(p, resume=True)


# -- issue 13 item 7 ----------------------------------------------------------------------------------
def test_open_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(NotCommittedError, match=r"missing is not a committed ucp checkpoint: no such directory"):
        open_checkpoint(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(NotCommittedError, match=r"it is a file, not a checkpoint directory"):
        open_checkpoint(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotCommittedError, match=r"no ucp.manifest.json \(incomplete or still being written\)"):
        open_checkpoint(tmp_path / "empty")
    assert "no such directory" in verify(tmp_path / "missing")[0]


def test_symlinks_inside_the_root_are_refused(tmp_path):
    from ucp.errors import FormatError

    ck = small_checkpoint(tmp_path / "ck")
    outside = tmp_path / "outside"
    outside.mkdir()
    chunk = ck / "a.w" / "param" / "c" / "0" / "0"
    (outside / "chunk").write_bytes(chunk.read_bytes())  # identical bytes: only the link is wrong
    chunk.unlink()
    chunk.symlink_to(outside / "chunk")
    with pytest.raises(FormatError, match=r"a.w/param/c/0/0 is a symbolic link"):
        open_checkpoint(ck).read("a.w")
    assert any("symbolic link" in p for p in verify(ck))
    ck2 = small_checkpoint(tmp_path / "ck2")
    os.rename(ck2 / "a.w" / "exp_avg", outside / "exp_avg")  # a whole directory elsewhere, linked in
    (ck2 / "a.w" / "exp_avg").symlink_to(outside / "exp_avg")
    with pytest.raises(FormatError, match=r"a symbolic link leads outside the checkpoint"):
        open_checkpoint(ck2).read("a.w", "exp_avg")
    assert any("leads outside" in p for p in verify(ck2))


def test_stray_files_are_warnings_and_problems_with_strict(tmp_path):
    from ucp.format import verify_report

    ck = small_checkpoint(tmp_path / "ck")
    (ck / "a.w" / "param" / "c" / "9").write_bytes(b"left over")
    (ck / "notes.txt").write_bytes(b"hello")
    assert verify(ck) == []
    problems, warnings = verify_report(ck)
    assert problems == [] and warnings == ["a.w/param/c/9: stray file, not part of the checkpoint",
                                           "notes.txt: stray file, not part of the checkpoint"]
    assert verify(ck, strict=True) == warnings
