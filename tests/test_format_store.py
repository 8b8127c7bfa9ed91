"""Issue 14: one ``Store`` protocol, implemented by the local store and the fsspec store; the reader and
writer never ask which one they have. The same checkpoint round-trips through both, bit-exactly."""
import fsspec
import pytest
import torch

from ucp.format import create_checkpoint, open_checkpoint, verify
from ucp.format.store import FsspecStore, LocalStore, Store, make_store


def test_both_stores_implement_the_protocol(tmp_path):
    assert isinstance(make_store(tmp_path), LocalStore)
    assert isinstance(make_store(f"file://{tmp_path}"), LocalStore)  # durable file:// (issue 13 item 4)
    assert isinstance(make_store("memory://b/x"), FsspecStore)
    assert isinstance(make_store(f"file://{tmp_path}", {"auto_mkdir": True}), FsspecStore)
    for s in (make_store(tmp_path), make_store("memory://b/x")):
        assert isinstance(s, Store)
        missing = [m for m in Store.__annotations__] + [m for m in dir(Store) if not m.startswith("_")]
        assert all(hasattr(s, m) for m in missing)


@pytest.mark.parametrize("where", ["local", "memory", "file-fsspec"])
def test_same_checkpoint_through_every_store(tmp_path, where):
    url, so = {"local": (str(tmp_path / "ck"), None), "memory": (f"memory://stores/{tmp_path.name}/ck", None),
               "file-fsspec": (f"file://{tmp_path}/ck", {"auto_mkdir": True})}[where]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 40, generator=g)
    y = torch.randn(50, 7, generator=g).bfloat16()
    with create_checkpoint(url, storage_options=so, durable=False) as w:
        w.write_tensor("x", "param", x, shards=(32, 40), chunks=(8, 8))
        w.write_tensor("y", "param", y, chunks=(16, 7))
        w.set_metadata({"rng": torch.arange(4, dtype=torch.uint8)})
    ck = open_checkpoint(url, storage_options=so)
    assert torch.equal(ck.read("x"), x)  # whole shards
    assert torch.equal(ck.read("x", index=(slice(3, 40), slice(9, 20))), x[3:40, 9:20])  # inner chunk ranges
    assert torch.equal(ck.read("y").view(torch.int16), y.view(torch.int16))  # row chunks, scatter read
    assert torch.equal(ck.read("y", index=(slice(5, 9), slice(1, 3))).view(torch.int16),
                       y[5:9, 1:3].view(torch.int16))
    assert torch.equal(ck.read_flat("x", "param", 100, 1000), x.reshape(-1)[100:1000])
    assert torch.equal(ck.metadata["rng"], torch.arange(4, dtype=torch.uint8))
    assert verify(url, storage_options=so, strict=True) == []
    if where == "memory":
        fsspec.filesystem("memory").rm(f"/stores/{tmp_path.name}", recursive=True)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_appender_appends_in_order_and_every_line_is_there_at_once(tmp_path, where):
    """The run journal's appender: each record is in the file as soon as it is written (a killed
    writer loses none), after what the file held, on both stores."""
    store = make_store(str(tmp_path / "root") if where == "local" else f"memory://app/{tmp_path.name}")
    store.put("_ucp/j", [b"head\n"])
    a = store.appender("_ucp/j")
    a.write(b"one\n")
    assert store.get("_ucp/j") == b"head\none\n"
    a.write(b"two\n")
    a.close()
    b = store.appender("_ucp/j")
    b.write(b"three\n")
    b.close()
    assert store.get("_ucp/j") == b"head\none\ntwo\nthree\n"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_resume_through_every_store_adopts_the_journaled_arrays(tmp_path, where):
    url = str(tmp_path / "ck") if where == "local" else f"memory://resume/{tmp_path.name}/ck"
    x, y = torch.arange(64.0).reshape(8, 8), torch.arange(10, dtype=torch.int32)
    w = create_checkpoint(url, durable=False, fingerprint={"src": 1})
    w.write_tensor("x", "param", x, chunks=(4, 8))
    w.abort()
    w = create_checkpoint(url, durable=False, resume=True, fingerprint={"src": 1})
    a = w.add_array("x", "param", (8, 8), torch.float32, chunks=(4, 8))
    assert a.pending() == []  # both chunks adopted from the journaled run
    w.write_tensor("y", "param", y)
    w.commit()
    ck = open_checkpoint(url)
    assert torch.equal(ck.read("x"), x) and torch.equal(ck.read("y"), y)


def test_local_put_makes_missing_directories_even_ones_it_made_and_lost(tmp_path):
    """Issue 17: ``put`` opens the file first and makes its directory only when that fails, so
    files go straight into directories made earlier (by this or another process, e.g. another
    rank); a directory this store made that was removed since is made again, not assumed."""
    import os
    import shutil

    s = make_store(tmp_path / "root")
    s.put("a/b/c/x", [b"one"])                 # nothing exists yet, root included
    assert (tmp_path / "root/a/b/c/x").read_bytes() == b"one"
    shutil.rmtree(tmp_path / "root/a/b")       # behind the store's back
    s.put("a/b/c/y", [b"two", b"!"])
    assert (tmp_path / "root/a/b/c/y").read_bytes() == b"two!"
    os.makedirs(tmp_path / "root/p/r/s")       # another writer made these
    s.put("p/r/s/z", [b"three"])
    assert (tmp_path / "root/p/r/s/z").read_bytes() == b"three"


def test_read_ranges_asks_the_kernel_for_what_it_is_told(tmp_path, monkeypatch):
    """Several ranges are asked for ahead by default (cold files: one round trip for all), one range
    is not; ``advise`` names other ranges instead, or none."""
    from ucp.format import store as store_mod

    (tmp_path / "f").write_bytes(bytes(range(100)))
    s = store_mod.make_store(str(tmp_path))
    asked = []
    monkeypatch.setattr(store_mod.os, "posix_fadvise", lambda fd, a, n, how: asked.append((a, n)), raising=False)
    buf = bytearray(30)
    for ranges, advise, want in [([(0, 10), (50, 70)], None, [(0, 10), (50, 20)]), ([(5, 35)], None, []),
                                 ([(0, 10), (50, 70)], [(0, 100)], [(0, 100)]), ([(0, 10), (50, 70)], (), [])]:
        asked.clear()
        assert s.read_ranges("f", ranges, buf, advise) == (30, 100)
        assert bytes(buf) == b"".join(bytes(range(a, b)) for a, b in ranges)
        assert asked == want, (ranges, advise)
