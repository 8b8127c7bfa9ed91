"""Issue 13 item 4 (and issue 19's "no fsync" mutant): ``durable=True`` makes the data stable before the
manifest, for a local path and for a ``file://`` URL alike. The fsync(2) and syncfs(2) calls are
counted through hooks on ``os.fsync`` and ``ucp.format.store.syncfs``: removing the chunk fsync, the
manifest fsync, the root directory fsync or the syncfs makes this test fail."""
import os

import pytest
import torch

from ucp.format import create_checkpoint, open_checkpoint, store


@pytest.fixture
def calls(monkeypatch):
    seen = {"fsync": [], "syncfs": 0}
    real_fsync, real_syncfs = os.fsync, store.syncfs

    def fsync(fd):
        seen["fsync"].append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def syncfs(fd):
        seen["syncfs"] += 1
        return real_syncfs(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(store, "syncfs", syncfs)
    return seen


def write(dst, durable):
    big = torch.arange(3 << 18, dtype=torch.float32).reshape(768, 1024)  # 3 MiB: chunks above FSYNC_MIN
    with create_checkpoint(dst, durable=durable, chunk_bytes=2 << 20) as w:
        w.write_tensor("big", "param", big)
        w.write_tensor("small", "param", torch.ones(3))
    return big


@pytest.mark.parametrize("url", [False, True], ids=["path", "file-url"])
def test_durable_fsyncs_chunks_manifest_and_root_and_syncs_the_fs(tmp_path, calls, url):
    root = tmp_path / "ck"
    big = write(f"file://{root}" if url else root, durable=True)
    assert torch.equal(open_checkpoint(root).read("big"), big)
    synced = set(calls["fsync"])
    # a large chunk is fsync'ed by its writer only when written through the page cache (O_DIRECT refused)
    direct = store.make_store(root).writes_direct(2 << 20)
    assert (str(root / "big" / "param" / "c" / "0" / "0") in synced) is not direct
    assert str(root / "ucp.manifest.json.tmp") in synced or str(root / "ucp.manifest.json") in synced
    assert str(root) in synced  # the directory entry of the renamed manifest
    assert calls["syncfs"] == 1  # small files and directories: one syncfs before the manifest


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_large_chunks_are_fsynced_by_their_writer_only_when_buffered(tmp_path, calls, monkeypatch, direct):
    """O_DIRECT leaves no page-cache pages to flush early; buffered large chunks are flushed by the
    thread that wrote them. Either way the one syncfs before the manifest covers every file."""
    if not direct:
        monkeypatch.setattr(store, "DIRECT_MIN", 1 << 62)
    root = tmp_path / "ck"
    big = write(root, durable=True)
    assert torch.equal(open_checkpoint(root).read("big"), big)
    chunks = [f for f in calls["fsync"] if "/big/param/c/" in f]
    assert len(chunks) == (0 if store.make_store(root).writes_direct(2 << 20) else 2)
    assert calls["syncfs"] == 1


@pytest.mark.parametrize("url", [False, True], ids=["path", "file-url"])
def test_not_durable_makes_no_sync_calls(tmp_path, calls, url):
    root = tmp_path / "ck"
    write(f"file://{root}" if url else root, durable=False)
    assert calls == {"fsync": [], "syncfs": 0}
    assert open_checkpoint(f"file://{root}").params == ["big", "small"]
