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
    shutil.rmtree(tmp_path / "root/a")         # an ancestor it made, under a directory it never made
    s.put("a/b/new/w", [b"four"])
    assert (tmp_path / "root/a/b/new/w").read_bytes() == b"four"
    os.makedirs(tmp_path / "root/p/r/s")       # another writer made these
    s.put("p/r/s/z", [b"three"])
    assert (tmp_path / "root/p/r/s/z").read_bytes() == b"three"


def test_a_sole_writers_store_makes_new_directories_without_asking_first(tmp_path, monkeypatch):
    """Issue 14: the store of a writer that holds an empty root alone (``sole_writer``) makes a new
    file's directories straight away: no open and no stat that fail first. Directories made or
    removed behind its back still work (an EEXIST; made again)."""
    import os
    import shutil

    s = make_store(tmp_path / "root")
    assert s.create_exclusive("ucp.lock", b"me")  # a writer takes the root, then finds it empty
    s.sole_writer()
    calls = []
    real_open, real_stat = os.open, os.stat

    def counted(real, what):
        def call(path, *a, **k):
            calls.append((what, os.fspath(path)))
            return real(path, *a, **k)
        return call

    monkeypatch.setattr(os, "open", counted(real_open, "open"))
    monkeypatch.setattr(os, "stat", counted(real_stat, "stat"))
    s.put("a/b/c/x", [b"one"])
    s.put("a/b/c/y", [b"two"])
    s.put("a/d/z", [b"three"])
    monkeypatch.undo()
    assert calls == [("open", str(tmp_path / f"root/{f}")) for f in ("a/b/c/x", "a/b/c/y", "a/d/z")]
    assert [(tmp_path / f"root/{f}").read_bytes() for f in ("a/b/c/x", "a/b/c/y", "a/d/z")] == \
        [b"one", b"two", b"three"]
    os.makedirs(tmp_path / "root/p/r")         # made behind its back
    s.put("p/r/s/w", [b"four"])
    shutil.rmtree(tmp_path / "root/a")         # removed behind its back
    s.put("a/b/c/x", [b"five"])
    assert (tmp_path / "root/p/r/s/w").read_bytes() == b"four"
    assert (tmp_path / "root/a/b/c/x").read_bytes() == b"five"


# -- large files go to the disk with O_DIRECT (LocalStore._put_direct), falling back to buffered writes
import errno  # noqa: E402
import os  # noqa: E402

from ucp.format import store as store_mod  # noqa: E402


def _payload(n, seed=0):
    return bytes((i * 131 + seed) % 251 for i in range(n))


def _parts(data):
    """``data`` as the writer hands it over: a few buffers of odd sizes (numpy, bytes, a word)."""
    import numpy as np

    a, b = len(data) // 3, len(data) - 4
    return [np.frombuffer(data[:a], dtype=np.uint8), data[a:b], memoryview(data[b:])]


def _skip_without_direct_io(folder):
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip(f"{folder}: this file system refuses O_DIRECT (the fallback is tested below)")


@pytest.mark.parametrize("size", [store_mod.DIRECT_MIN, store_mod.DIRECT_MIN + 1, 3 * store_mod.DIRECT_MIN + 4097])
@pytest.mark.parametrize("fsync", [False, True])
def test_direct_put_writes_exactly_the_bytes(tmp_path, size, fsync):
    _skip_without_direct_io(tmp_path)
    s = LocalStore(str(tmp_path))
    data = _payload(size)
    s.put("a/b/c", _parts(data), fsync=fsync)
    assert s.direct  # this file system takes O_DIRECT: the fast path ran, not the fallback
    assert (tmp_path / "a/b/c").read_bytes() == data
    s.put("a/b/c", [data[:size // 2 + 1]])  # rewritten shorter: truncated, not mixed with the old bytes
    assert (tmp_path / "a/b/c").read_bytes() == data[:size // 2 + 1]


def _flags_seen(monkeypatch):
    seen = []
    real = os.open

    def spy(path, flags, *a):
        seen.append(flags)
        return real(path, flags, *a)

    monkeypatch.setattr(os, "open", spy)
    return seen


def test_small_files_and_a_disabled_store_are_written_buffered(tmp_path, monkeypatch):
    _skip_without_direct_io(tmp_path)
    seen = _flags_seen(monkeypatch)
    s = LocalStore(str(tmp_path))
    s.put("small", [_payload(store_mod.DIRECT_MIN - 1)])
    s.direct = False
    s.put("large", [_payload(store_mod.DIRECT_MIN)])
    assert not any(f & os.O_DIRECT for f in seen)
    assert (tmp_path / "small").read_bytes() == _payload(store_mod.DIRECT_MIN - 1)
    assert (tmp_path / "large").read_bytes() == _payload(store_mod.DIRECT_MIN)
    s.direct = True
    s.put("large", [_payload(store_mod.DIRECT_MIN, 1)])
    assert any(f & os.O_DIRECT for f in seen)
    assert (tmp_path / "large").read_bytes() == _payload(store_mod.DIRECT_MIN, 1)


@pytest.mark.parametrize("code", sorted(store_mod.DIRECT_REFUSED))
@pytest.mark.parametrize("where", ["open", "write"])
def test_refused_direct_io_falls_back_to_buffered_writes(tmp_path, monkeypatch, code, where):
    """A file system without O_DIRECT (EINVAL at open or at the first write, EOPNOTSUPP): the same
    bytes are written buffered, and the store stops trying."""
    real_open, real_write, direct_fds = os.open, os.write, set()

    def fake_open(path, flags, *a):
        if flags & os.O_DIRECT and where == "open":
            raise OSError(code, os.strerror(code))
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def fake_write(fd, data):
        if fd in direct_fds:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "write", fake_write)
    s = LocalStore(str(tmp_path))
    data = _payload(2 * store_mod.DIRECT_MIN + 5)
    s.put("x/y", _parts(data))
    assert (tmp_path / "x/y").read_bytes() == data
    assert s.direct is False


def test_other_errors_of_direct_io_are_raised(tmp_path, monkeypatch):
    """A full disk is not a reason to try again buffered: the error reaches the writer."""
    _skip_without_direct_io(tmp_path)
    real_write = os.write

    def full(fd, data):
        if len(data) >= store_mod.DIRECT_MIN:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    s = LocalStore(str(tmp_path))
    with pytest.raises(OSError) as e:
        s.put("x", [_payload(store_mod.DIRECT_MIN)])
    assert e.value.errno == errno.ENOSPC
    assert s.direct


def test_a_short_direct_write_off_the_alignment_is_rewritten_buffered(tmp_path, monkeypatch):
    _skip_without_direct_io(tmp_path)
    real_write, calls = os.write, []

    def short(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, memoryview(data)[:store_mod.DIRECT_ALIGN])  # aligned short write: continue
        if len(calls) == 2:
            return 100  # as if the device took 100 bytes: the rest cannot follow aligned
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short)
    s = LocalStore(str(tmp_path))
    data = _payload(store_mod.DIRECT_MIN + 7)
    s.put("x", [data])
    assert (tmp_path / "x").read_bytes() == data
    assert s.direct  # not a refusal: the next file is tried direct again


def test_aligned_buffers_are_page_aligned_and_recycled():
    import ctypes

    pool = store_mod.AlignedBuffers(keep=2)
    views = [pool.take(n) for n in (5000, 9000, 70000)]
    for v in views:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(v.obj))
        assert addr % store_mod.DIRECT_ALIGN == 0
    maps = [v.obj for v in views]
    assert [len(v) for v in views] == [5000, 9000, 70000]
    for v in views:
        pool.give(v)
    again = pool.take(6000)  # best fit of the two largest kept: the 9000-byte one, the smallest dropped
    assert again.obj is maps[1] and len(again) == 6000
    assert pool.take(70000).obj is maps[2]
    assert pool.take(100).obj not in maps  # nothing left to recycle: a fresh map


def test_a_file_built_in_a_file_buffer_is_written_without_a_copy(tmp_path, monkeypatch):
    _skip_without_direct_io(tmp_path)
    s = LocalStore(str(tmp_path))
    n = store_mod.DIRECT_MIN + 3
    buf = s.file_buffer(n)
    buf[:] = _payload(n)
    taken = []
    real_take = store_mod._aligned.take
    monkeypatch.setattr(store_mod._aligned, "take", lambda k: taken.append(k) or real_take(k))
    s.put("f", [buf])
    assert taken == []  # written from the caller's buffer itself
    s.put("g", [buf[1:]])  # not the start of a map: copied into one first (O_DIRECT needs alignment)
    assert taken == [n - 1]
    s.release_buffer(buf)
    assert (tmp_path / "f").read_bytes() == _payload(n)
    assert (tmp_path / "g").read_bytes() == _payload(n)[1:]


def test_extent_and_give_ignore_buffers_the_pool_did_not_lend():
    pool = store_mod.AlignedBuffers(keep=2)
    foreign = memoryview(bytearray(8192))
    assert pool.extent(foreign) is None
    pool.give(foreign)  # not ours: nothing kept
    assert pool.take(10).obj is not foreign.obj
    lent = pool.take(5000)
    assert len(pool.extent(lent)) == 2 * store_mod.DIRECT_ALIGN
    assert pool.extent(lent[store_mod.DIRECT_ALIGN:]) is None
    pool.give(lent)
    assert pool.extent(lent) is None  # given back: no longer the caller's to write


def test_a_refused_open_other_than_no_direct_io_is_raised(tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, flags, *a):
        if flags & os.O_DIRECT:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", denied)
    s = LocalStore(str(tmp_path))
    with pytest.raises(PermissionError):
        s.put("x", [_payload(store_mod.DIRECT_MIN)])
    assert s.direct


@pytest.mark.parametrize("where", ["local", "memory"])
def test_checkpoint_files_are_the_same_with_and_without_direct_io(tmp_path, monkeypatch, where):
    """Shards large enough for O_DIRECT, and the same writes buffered: byte-identical files."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 700, generator=g)  # 2.7 MB: default shards of several MiB
    files, direct = [], store_mod.DIRECT_MIN
    for n, direct_min in enumerate((direct, 1 << 62)):
        monkeypatch.setattr(store_mod, "DIRECT_MIN", direct_min)
        url = str(tmp_path / f"ck{n}") if where == "local" else f"memory://direct/{tmp_path.name}/ck{n}"
        with create_checkpoint(url, durable=False) as w:
            w.write_tensor("x", "param", x)
            w.write_tensor("y", "param", x[:7, :11].bfloat16())
        assert torch.equal(open_checkpoint(url).read("x"), x)
        assert verify(url) == []
        fs = make_store(url)
        files.append({f: bytes(fs.get(f)) for f in fs.list_files() if "/c" in f})
    assert files[0] == files[1] and max(len(b) for b in files[0].values()) >= direct


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


def test_prefetch_asks_for_the_ranges_it_is_given_and_skips_missing_files(tmp_path, monkeypatch):
    """``prefetch`` is a hint: whole files by default, the named ranges otherwise, and a file that
    is not there (or cannot be opened) is passed over, not raised."""
    from ucp.format import store as store_mod

    (tmp_path / "a").write_bytes(bytes(100))
    (tmp_path / "b").write_bytes(bytes(50))
    s = store_mod.make_store(str(tmp_path))
    asked = []
    monkeypatch.setattr(store_mod.os, "posix_fadvise", lambda fd, a, n, how: asked.append((a, n)), raising=False)
    s.prefetch(["a", "gone", "b"])
    assert asked == [(0, 0), (0, 0)]
    asked.clear()
    s.prefetch(["a", "gone", "b"], [[(90, 100)], [(0, 5)], [(0, 10), (40, 50)]])
    assert asked == [(90, 10), (0, 10), (40, 10)]


def _four_shards(tmp_path, cols=48):
    """(64, cols) float32 in four shard files of 16 rows, three inner chunks each."""
    x = torch.arange(64 * cols, dtype=torch.float32).reshape(64, cols)
    with create_checkpoint(str(tmp_path / "ck"), durable=False) as w:
        w.write_tensor("x", "param", x, chunks=(16, cols // 3), shards=(16, cols))
    return x, str(tmp_path / "ck")


@pytest.fixture
def uncached(monkeypatch):
    """The store reports no file in the page cache, as after a restart: the look-ahead runs
    (``test_a_warm_read_does_not_fetch_ahead`` checks the real probe)."""
    monkeypatch.setattr(LocalStore, "cached", lambda self, rel, start, stop: False)


def _resident(path) -> bool:
    """Whether any page of the file is in the page cache (mincore(2) of a private map of it, which
    faults nothing in): the eviction's own check, independent of the probe under test."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    if not size:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = -(-size // mmap.PAGESIZE)
        vec = ctypes.create_string_buffer(pages)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        return any(b & 1 for b in vec.raw)


def _evict(root, attempts=100):
    """Drop every file under ``root`` from the page cache (written back first: dirty pages stay),
    until none of their pages is resident: on a loaded machine a page the kernel has not yet put on
    its LRU lists (per-CPU batches) survives one ``FADV_DONTNEED`` now and then."""
    files = [f for f in root.rglob("*") if f.is_file()]
    for _ in range(attempts):
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        if not any(_resident(f) for f in files):
            return
    raise AssertionError(f"{root}: pages still resident after {attempts} evictions")


def test_the_page_cache_probe_reads_nothing(tmp_path):
    """``Store.cached`` says whether a file's pages are resident without reading them: a probe of an
    evicted file says False and leaves it evicted (a ``preadv2(RWF_NOWAIT)`` probe started the
    kernel's read of the page it did not find, and on a fast disk returned it: a cold file was
    reported cached, and the look-ahead skipped a cold read)."""
    _, url = _four_shards(tmp_path)
    store = make_store(url)
    ck = open_checkpoint(url)
    a = ck._array("x", "param")
    rel = f"{a.info.path}/{sorted(a.table)[0]}"
    path = tmp_path / "ck" / rel
    size = path.stat().st_size
    path.read_bytes()
    assert store.cached(rel, size - 64, size) is True and store.cached(rel, 0, size) is True
    for _ in range(20):   # each time: evicted, probed, still evicted
        _evict(tmp_path / "ck")
        assert store.cached(rel, size - 64, size) is False and store.cached(rel, 0, size) is False
        assert not _resident(path)
    assert store.cached("x/param/c/9/9", 0, 4) is None      # no such file: the read reports it


@pytest.mark.parametrize("cols", [48, 63], ids=["3-KiB-files", "files-ending-on-a-page"])
def test_a_warm_read_does_not_fetch_ahead(tmp_path, monkeypatch, cols):
    """Files in the page cache: the look-ahead would only move the reads' own work to other threads,
    so a read whose first file's index is cached runs none; once evicted, the next open fetches
    ahead again. ``Store.cached`` tells the two apart (mincore), probing the file's last bytes (its
    index): with 63 columns each file is exactly 4096 bytes, so a probe past the end would look at a
    page that is never cached."""
    from ucp.format import reader as reader_mod

    x, url = _four_shards(tmp_path, cols)
    if cols == 63:
        assert {f.stat().st_size for f in (tmp_path / "ck" / "x" / "param" / "c").rglob("*") if f.is_file()} == {4096}
    for f in (tmp_path / "ck").rglob("*"):
        if f.is_file():
            f.read_bytes()
    fetched = []
    real_fetch = reader_mod.Checkpoint._fetch
    monkeypatch.setattr(reader_mod.Checkpoint, "_fetch", lambda self, a, sidx, *r: fetched.append(sidx) or real_fetch(self, a, sidx, *r))
    ck = open_checkpoint(url)
    a = ck._array("x", "param")
    assert ck._store.cached(f"{a.info.path}/{sorted(a.table)[0]}", 0, 4) is True
    assert torch.equal(ck.read_box("x", "param", [0, 16], [64, 32]), x[:, 16:32])
    assert fetched == []
    _evict(tmp_path / "ck")
    assert ck._store.cached(f"{a.info.path}/{sorted(a.table)[0]}", 0, 4) is False
    _evict(tmp_path / "ck")  # the probe may have started the kernel's read-ahead of that page
    assert torch.equal(open_checkpoint(url).read_box("x", "param", [0, 16], [64, 32]), x[:, 16:32])
    assert sorted(fetched) == [(0, 0), (1, 0), (2, 0), (3, 0)]


def test_a_shard_read_opens_its_file_once(tmp_path, monkeypatch):
    """The index, the crc32c words and every batch of inner chunks of one shard read come through one
    open file (``Store.ranges_reader``), with the symlink check once, not once per request; the values
    are the same, and a missing shard is still named."""
    from ucp.errors import CorruptChunkError
    from ucp.format.layout import chunk_key

    x, url = _four_shards(tmp_path)
    opened, real_open = [], store_mod.LocalStore._open
    monkeypatch.setattr(store_mod.LocalStore, "_open", lambda self, rel: opened.append(rel) or real_open(self, rel))
    ck = open_checkpoint(url, workers=1)
    monkeypatch.setattr(ck, "_look_ahead", lambda shards: None)
    a = ck._array("x", "param")
    opened.clear()
    assert torch.equal(ck.read_box("x", "param", [0, 16], [16, 48]), x[:16, 16:])  # two of three column chunks
    assert opened == [f"{a.info.path}/{chunk_key((0, 0))}"]
    opened.clear()
    assert torch.equal(ck.read_box("x", "param", [16, 0], [64, 48]), x[16:])
    assert sorted(opened) == sorted(f"{a.info.path}/{chunk_key((i, 0))}" for i in (1, 2, 3))
    (tmp_path / "ck" / a.info.path / chunk_key((3, 0))).unlink()
    with pytest.raises(CorruptChunkError, match=f"{a.info.path}/{chunk_key((3, 0))} is missing"):
        open_checkpoint(url).read_box("x", "param", [48, 0], [64, 16])


def test_reads_across_shard_files_fetch_their_indexes_ahead(tmp_path, uncached, monkeypatch):
    """A read of part of several shard files has look-ahead threads fetch and check every file's
    index (once each) and ask the kernel for the inner chunks the read needs; the read counts the
    same bytes as without them and gets the same values, and once the indexes are checked a second
    read fetches none. Files read whole are only hinted, and are the only hints: the look-ahead is
    the one read-ahead of shard files."""
    import threading

    from ucp.format import store as store_mod

    x, url = _four_shards(tmp_path)
    calls, lock = [], threading.Lock()
    real_rr, real_pf = store_mod._LocalRanges.read_ranges, store_mod.LocalStore.prefetch

    def rr(f, ranges, buf, advise=None):
        with lock:
            calls.append(("read", threading.current_thread().name.startswith("ucp-look-ahead"), f.rel, ranges[-1][1]))
        return real_rr(f, ranges, buf, advise)

    def pf(self, rels, ranges=None):
        with lock:
            calls.append(("hint", threading.current_thread().name.startswith("ucp-look-ahead"), tuple(rels), ranges))
        return real_pf(self, rels, ranges)
    monkeypatch.setattr(store_mod._LocalRanges, "read_ranges", rr)
    monkeypatch.setattr(store_mod.LocalStore, "prefetch", pf)

    plain = open_checkpoint(url)
    monkeypatch.setattr(plain, "_look_ahead", lambda shards: None)
    assert torch.equal(plain.read_box("x", "param", [8, 16], [60, 32]), x[8:60, 16:32])
    want_stats = plain.last_read_stats
    calls.clear()

    ck = open_checkpoint(url)
    a = ck._array("x", "param")
    assert torch.equal(ck.read_box("x", "param", [8, 16], [60, 32]), x[8:60, 16:32])
    assert ck.last_read_stats == want_stats
    size = {f"{a.info.path}/{k}": v[0] for k, v in a.table.items()}
    index_reads = [(rel, ahead) for kind, ahead, rel, end in calls if kind == "read" and end == size[rel]]
    assert sorted(index_reads) == sorted((rel, True) for rel in size) and len(size) == 4
    data_hints = sorted((rel, [b - a0 for a0, b in rs[0]]) for kind, ahead, rel, rs in calls if kind == "hint" and ahead)
    assert data_hints == sorted(((r,), [a.inner_nb]) for r in size)  # one inner chunk of each: the box's column block
    calls.clear()  # indexes checked: the look-ahead only hints, every inner chunk of every file
    assert torch.equal(ck.read_box("x", "param", [0, 0], [64, 48]), x)
    assert not any(c[0] == "read" and c[1] for c in calls)
    assert sorted(c[2] for c in calls if c[0] == "hint") == sorted((rel,) for rel in size)
    assert all(c[1] and c[3] is None for c in calls if c[0] == "hint")

    calls.clear()  # every inner chunk of every file: hints, no fetch
    fresh = open_checkpoint(url)
    assert torch.equal(fresh.read_box("x", "param", [0, 0], [64, 48]), x)
    fresh.close()
    assert sorted(c[2] for c in calls if c[0] == "hint") == sorted((rel,) for rel in size)
    assert not any(ahead for kind, ahead, *_r in calls if kind == "read")


def test_a_bad_index_fetched_ahead_is_reported_by_the_read(tmp_path, uncached):
    """The look-ahead swallows what it finds; the read that needs the file raises it, naming it."""
    from ucp.errors import CorruptChunkError

    x, url = _four_shards(tmp_path)
    ck = open_checkpoint(url)
    a = ck._array("x", "param")
    key = sorted(a.table)[2]
    f = tmp_path / "ck" / a.info.path / key
    data = bytearray(f.read_bytes())
    data[-6] ^= 0xFF  # inside the index
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptChunkError, match=f"{a.info.path}/{key}.*index"):
        ck.read_box("x", "param", [0, 16], [64, 32])
    assert torch.equal(ck.read_box("x", "param", [0, 16], [16, 32]), x[:16, 16:32])  # the others still read


def test_the_look_ahead_stays_within_its_window(tmp_path, uncached, monkeypatch):
    """With a window smaller than one file's data, two files at most are ahead of the read, and
    every file is still fetched ahead."""
    from ucp.format import reader as reader_mod

    x, url = _four_shards(tmp_path)
    monkeypatch.setattr(reader_mod, "LOOK_AHEAD_BYTES", 1)
    most, order, real_fill, real_fetch = [0], [], reader_mod._LookAhead.fill, reader_mod.Checkpoint._fetch

    def fill(self):
        real_fill(self)
        most[0] = max(most[0], self.ahead_files)

    def fetch(self, a, sidx, rel, start, stop):
        order.append(sidx)
        return real_fetch(self, a, sidx, rel, start, stop)
    monkeypatch.setattr(reader_mod._LookAhead, "fill", fill)
    monkeypatch.setattr(reader_mod.Checkpoint, "_fetch", fetch)
    ck = open_checkpoint(url)
    assert torch.equal(ck.read_box("x", "param", [0, 16], [64, 32]), x[:, 16:32])
    assert most[0] == 2 and sorted(order) == [(0, 0), (1, 0), (2, 0), (3, 0)]
