"""Where a checkpoint's files live: the ``Store`` protocol, a local store (os.* calls, fsync, mmap) and
an fsspec store for URLs. Writers and readers call only the protocol's methods, never ask which one."""
from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import shutil
import stat
import threading
from typing import Protocol, runtime_checkable

from ucp.errors import FormatError, UcpError

MANIFEST = "ucp.manifest.json"


def named(e: OSError, path) -> OSError:
    """``e`` naming ``path`` (an error of write(2) on a descriptor names no file: a full disk said
    only "[Errno 28] No space left on device")."""
    if e.filename is not None:
        return e
    return type(e)(e.errno, e.strerror, str(path))


def _consume(mvs: list, n: int) -> None:
    """Drop the first ``n`` bytes from the buffers ``mvs`` (in place) after a vectored read or write
    that moved only ``n``: the call is then repeated on what is left."""
    while n and mvs:
        if n >= len(mvs[0]):
            n -= len(mvs[0])
            mvs.pop(0)
        else:
            mvs[0] = mvs[0][n:]
            n = 0


@runtime_checkable
class Store(Protocol):
    """The files of one root. ``rel`` paths use ``/`` and never leave the root.

    ``parallel_reads``: reads of separate files gain from threads even when small (high latency).
    Sizes are ``None`` where the backend cannot tell them without another request."""

    url: str
    parallel_reads: bool

    def top_level(self, ignore=()) -> dict[str, bool]: ...
    def is_empty(self, ignore=()) -> bool: ...
    def clear(self, keep=()) -> None: ...
    def sole_writer(self) -> None: ...
    def put(self, rel, buffers, fsync=False) -> None: ...
    def file_buffer(self, n) -> memoryview: ...
    def release_buffer(self, buf) -> None: ...
    def writes_direct(self, nbytes) -> bool: ...
    def put_atomic(self, rel, data: bytes, fsync=True) -> None: ...
    def create_exclusive(self, rel, data: bytes) -> bool: ...
    def append(self, rel, data: bytes) -> None: ...
    def appender(self, rel) -> "Appender": ...
    def sync(self) -> None: ...
    def get(self, rel) -> bytes: ...
    def exists(self, rel) -> bool: ...
    def size(self, rel) -> int | None: ...
    def readinto(self, rel, buffers) -> tuple[int, int]: ...
    def read_ranges(self, rel, ranges, buf, advise=None) -> tuple[int, int | None]: ...
    def ranges_reader(self, rel) -> "RangesReader": ...
    def cached(self, rel, start, stop) -> bool | None: ...
    def map(self, rel) -> tuple[memoryview, int]: ...
    def prefetch(self, rels, ranges=None) -> None: ...
    def delete(self, rel) -> None: ...
    def delete_tree(self, rel) -> None: ...
    def list_files(self) -> list[str]: ...
    def describe_root(self) -> str | None: ...


class RangesReader(Protocol):
    """One file held open for several ``read_ranges`` calls (``Store.ranges_reader``): a shard read
    asks for its index, its crc32c words and its data in several calls, and opening the file for each
    (with the symlink check of ``LocalStore._open``) cost more than the reads of a warm 2-D DCP load."""

    def read_ranges(self, ranges, buf, advise=None) -> tuple[int, int | None]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "RangesReader": ...
    def __exit__(self, *exc) -> bool: ...


class Appender(Protocol):
    """Records appended to one file, in order (``Store.appender``); ``close`` when done."""

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


def _is_url(path: str) -> bool:
    return "://" in str(path)


def local_root(path) -> str | None:
    """The local path that ``path`` names: itself, or a ``file://`` URL's path; None for a URL of
    any other store. The one rule for what is local."""
    path = os.fspath(path) if not isinstance(path, str) else path
    if path.startswith("file://"):
        return path[len("file://"):] or "/"
    return None if _is_url(path) else path


def make_store(path, storage_options=None) -> Store:
    """The store of ``path``: a local path or ``file://`` URL (without storage options) is a
    ``LocalStore``, so ``durable=True`` fsyncs there too; any other URL goes through fsspec."""
    path = os.fspath(path) if not isinstance(path, str) else path
    root = local_root(path)
    is_file_url = root is not None and root != path
    if root is None or (is_file_url and storage_options):
        return FsspecStore(path, storage_options or {})
    if is_file_url:
        return LocalStore(root, url=path)
    if storage_options:
        raise UcpError(f"storage_options given for the local path {path!r}; use a URL (file://, s3://)")
    return LocalStore(path)


def syncfs(fd) -> bool:
    """syncfs(2) on the file system of ``fd``; False where the call is not available."""
    try:
        return _libc().syncfs(fd) == 0
    except (OSError, AttributeError):
        return False


def resident(fd, start, stop) -> bool | None:
    """Whether every page of bytes ``[start, stop)`` of file ``fd`` is in the page cache: mincore(2)
    on a map of them, which reads nothing; None where the kernel cannot say.

    Why not a read that may not wait (``preadv2`` with ``RWF_NOWAIT``): not finding a page, it starts
    the kernel's read of it, and on a fast disk the page can arrive before the read gives up, so a
    file just evicted was reported cached (the look-ahead then skipped a cold read)."""
    lo = start - start % mmap.PAGESIZE
    n = max(stop, start + 1) - lo
    try:
        libc = _libc()
        addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, lo)
        if addr in (None, _MAP_FAILED):
            return None
        try:
            vec = ctypes.create_string_buffer(-(-n // mmap.PAGESIZE))
            if libc.mincore(addr, n, vec) != 0:
                return None
            return not vec.raw.translate(None, _RESIDENT)  # each byte's low bit: that page is resident
        finally:
            libc.munmap(addr, n)
    except (OSError, AttributeError):
        return None


_MAP_FAILED = ctypes.c_void_p(-1).value
_RESIDENT = bytes(b for b in range(256) if b & 1)


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, loaded once, with the signatures of the calls made through it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def readahead(path, ranges=((0, 0),)) -> None:
    """Ask the kernel to read byte ranges of a file in the background (posix_fadvise WILLNEED;
    ``(0, 0)``: the whole file). A missing or unreadable file is skipped: this is only a hint."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        for a, b in ranges:
            os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Files of at least this many bytes are written with O_DIRECT (``LocalStore._put_direct``).
DIRECT_MIN = 1 << 20
#: Offset, length and memory alignment O_DIRECT needs (the page size covers every block size seen).
DIRECT_ALIGN = mmap.PAGESIZE
#: errno values meaning "no direct I/O here" (EINVAL: not supported or misaligned; EOPNOTSUPP).
DIRECT_REFUSED = frozenset({errno.EINVAL, errno.EOPNOTSUPP})


class AlignedBuffers:
    """Page-aligned anonymous maps in which writers build files (``Store.file_buffer``), recycled.

    Why: O_DIRECT needs aligned memory, and reused memory avoids the page faults a fresh
    allocation costs per 4 KiB on first touch (slow on the VMs measured). Keeps up to ``keep``
    free maps, the largest."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._free: list = []   # (map, its whole view), smallest first
        self._lent: dict = {}   # id(map) -> map, for maps handed out and not given back
        self._lock = threading.Lock()

    def take(self, n: int) -> memoryview:
        """A writable view of ``n`` bytes at the start of a map of whole pages."""
        with self._lock:
            i = next((i for i, (m, _v) in enumerate(self._free) if len(m) >= n), None)
            m, whole = self._free.pop(i) if i is not None else (None, None)
        if m is None:
            m = mmap.mmap(-1, max(1, -(-n // DIRECT_ALIGN)) * DIRECT_ALIGN)
            whole = memoryview(m)
        with self._lock:
            self._lent[id(m)] = m
        return whole[:n]

    def give(self, view: memoryview) -> None:
        """Take back a view :meth:`take` handed out (its map is reused)."""
        with self._lock:
            m = self._lent.pop(id(view.obj), None)
            if m is None:
                return
            self._free.append((m, memoryview(m)))
            self._free.sort(key=lambda h: len(h[0]))
            while len(self._free) > self.keep:
                self._free.pop(0)

    def extent(self, view: memoryview):
        """``view`` grown to whole pages when it starts one of the maps lent out (None otherwise):
        the bytes O_DIRECT writes, the tail past ``view`` free to overwrite."""
        with self._lock:
            m = self._lent.get(id(view.obj))
        if m is None or _address(view) != _address(memoryview(m)):
            return None
        return memoryview(m)[:-(-len(view) // DIRECT_ALIGN) * DIRECT_ALIGN]


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


_aligned = AlignedBuffers()


class FileBuffers:
    """``file_buffer`` / ``release_buffer`` of both stores: one recycled pool per process."""

    def file_buffer(self, n) -> memoryview:
        """A writable buffer of ``n`` bytes to build one file in: ``put(rel, [it])`` writes it (the
        local store with no copy, by O_DIRECT). Give it back with :meth:`release_buffer`."""
        return _aligned.take(n)

    def release_buffer(self, buf) -> None:
        _aligned.give(buf)


_PROC_FD = os.path.isdir("/proc/self/fd")  # Linux: an open file's resolved path can be read back


class LocalStore(FileBuffers):
    """A directory. Files are read with preadv/mmap; symbolic links inside the root are refused
    (a crafted checkpoint must not make a reader open files outside it)."""

    parallel_reads = False

    def __init__(self, root: str, url=None):
        self.root = os.path.abspath(root)
        self.url = url or root
        self._dirs: set[str] = set()
        self._dlock = threading.Lock()
        self._real = None
        self._safe_dirs: set[str] = set()
        self.direct = hasattr(os, "O_DIRECT")
        self._sole = False  # see sole_writer

    def _p(self, rel):
        return os.path.join(self.root, rel)

    def _rp(self, rel):
        """Path of ``rel`` for reading: its directory must resolve inside the root (checked once per
        directory), and the file itself is opened with O_NOFOLLOW."""
        path = self._p(rel)
        self._check_dir(os.path.dirname(path), rel)
        return path

    def _check_dir(self, d, rel):
        """``d`` must resolve inside the root. A directory whose parent was found safe and that is not
        itself a symbolic link is safe too: one lstat per new directory instead of a realpath walk."""
        if d in self._safe_dirs:
            return
        parent = os.path.dirname(d)
        if d != self.root and parent.startswith(self.root) and os.path.normpath(d) == d:  # no "..": a child
            self._check_dir(parent, rel)
            try:
                if stat.S_ISDIR(os.lstat(d).st_mode):  # a real directory, not a link
                    self._safe_dirs.add(d)
                    return
            except OSError:
                pass
        if self._real is None:
            self._real = os.path.realpath(self.root)
        real = os.path.realpath(d)
        if real != self._real and not real.startswith(self._real + os.sep):
            raise FormatError(f"{self.url}: {rel}: a symbolic link leads outside the checkpoint "
                              f"(to {real}); refused")
        self._safe_dirs.add(d)

    def _open(self, rel):
        """A read-only descriptor of ``rel``, refused when the file is a symbolic link or resolves outside
        the root. Where ``/proc/self/fd`` exists the opened file's own path is read back (one readlink
        instead of an lstat per new directory: checkpoints of many small arrays have a directory each)."""
        try:
            fd = os.open(self._p(rel) if _PROC_FD else self._rp(rel), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            if e.errno == 40:  # ELOOP: the file is a symbolic link
                raise FormatError(f"{self.url}: {rel} is a symbolic link; a checkpoint holds only plain "
                                  "files, refused") from None
            raise
        if _PROC_FD:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
                if self._real is None:
                    self._real = os.path.realpath(self.root)
                if not real.startswith(self._real + os.sep):
                    raise FormatError(f"{self.url}: {rel}: a symbolic link leads outside the checkpoint "
                                      f"(to {real}); refused")
            except BaseException:
                os.close(fd)
                raise
        return fd

    def describe_root(self):
        """Why the root cannot be a checkpoint (missing, not a directory), or None."""
        if not os.path.lexists(self.root):
            return "no such directory"
        if not os.path.isdir(self.root):
            return "it is a file, not a checkpoint directory"
        return None

    def top_level(self, ignore=()) -> dict:
        if not os.path.exists(self.root):
            return {}
        if not os.path.isdir(self.root):
            raise UcpError(f"{self.root} exists and is not a directory")
        with os.scandir(self.root) as entries:
            return {e.name: e.is_dir(follow_symlinks=False) for e in entries if e.name not in ignore}

    def is_empty(self, ignore=()) -> bool:
        return not self.top_level(ignore)

    def clear(self, keep=()):
        """Remove everything under the root except the top-level names in ``keep`` (a writer's lock)."""
        if os.path.isdir(self.root):
            m = self._p(MANIFEST)
            if os.path.exists(m):  # uncommit first: a crash mid-removal leaves no stale checkpoint
                os.unlink(m)
                self._fsync_dir(self.root)
            for name in os.listdir(self.root):
                if name in keep:
                    continue
                p = self._p(name)
                try:
                    if os.path.isdir(p) and not os.path.islink(p):
                        shutil.rmtree(p)
                    else:
                        os.unlink(p)
                except FileNotFoundError:
                    pass
        self._dirs.clear()

    def sole_writer(self) -> None:
        """The caller holds the root's writer lock and found the root empty but for its lock (or cleared
        it): a directory under the root that this store did not make is missing. ``put`` then makes a
        file's new directory before it opens the file, top-down and without asking first whether each
        exists: a small array's chunk file costs no failing open and no failing stats (three of
        each new array's directories; about 10 us of the 100 us a 4 KiB tensor costs). A directory
        made behind the store's back is only an ``EEXIST``; one removed is made again, as always."""
        self._sole = True
        with self._dlock:
            self._dirs.add(self.root)

    def create_exclusive(self, rel, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` unless it exists (O_EXCL); False when it existed."""
        path = self._p(rel)
        self._mkdir(os.path.dirname(path))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True

    def append(self, rel, data: bytes) -> None:
        """Append ``data`` to ``rel`` (created if missing) in one write."""
        path = self._p(rel)
        self._mkdir(os.path.dirname(path))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
        except OSError as e:
            raise named(e, path) from None
        finally:
            os.close(fd)

    def appender(self, rel) -> "_FileAppender":
        """Appends to ``rel`` (created if missing) through one open O_APPEND descriptor: a journal line
        per array is one write(2), not open + write + close (each line is in the kernel once written,
        so a killed process loses none)."""
        path = self._p(rel)
        self._mkdir(os.path.dirname(path))
        return _FileAppender(path)

    def _mkdir(self, d):
        if d in self._dirs:
            return
        parent = os.path.dirname(d)
        if parent != d and parent not in self._dirs and not self._is_dir(parent):
            self._mkdir(parent)  # top-down: one mkdir per new directory, no failed attempts
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        with self._dlock:
            self._dirs.add(d)

    def _is_dir(self, d) -> bool:
        """Whether ``d``, a directory this store has not made (or has forgotten), exists: under the root
        of a ``sole_writer`` it does not."""
        if self._sole and d.startswith(self.root + os.sep):
            return False
        return os.path.isdir(d)

    def _forget_dirs(self, d):
        """Forget that ``d`` and its ancestors were made (checked again on the next ``_mkdir``)."""
        with self._dlock:
            while d != os.path.dirname(d):
                self._dirs.discard(d)
                d = os.path.dirname(d)

    def _create(self, path, extra_flags=0):
        """Open ``path`` for writing, truncated. The file is opened first and its directory made only
        when that fails: the directories are usually there already (made earlier by this store or,
        for several writers, by another rank), and a mkdir of an existing directory still takes its
        parent's lock, which writers creating files side by side contend for. The store of a
        ``sole_writer`` knows a directory it has not made is missing, and makes it first."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | extra_flags
        if self._sole:
            d = os.path.dirname(path)
            if d not in self._dirs:  # missing (sole_writer): made first, no open that fails
                self._mkdir(d)
        try:
            return os.open(path, flags, 0o644)
        except FileNotFoundError:
            d = os.path.dirname(path)
            if d in self._dirs:  # made by this store once but removed since
                self._forget_dirs(d)
            try:
                self._mkdir(d)
            except FileNotFoundError:  # an ancestor this store made was removed since
                self._forget_dirs(d)
                self._mkdir(d)
            return os.open(path, flags, 0o644)

    def writes_direct(self, nbytes) -> bool:
        """Whether a file of ``nbytes`` goes straight to the disk (O_DIRECT), not through the page cache."""
        return self.direct and nbytes >= DIRECT_MIN

    def put(self, rel, buffers, fsync=False):
        try:
            self._put(rel, buffers, fsync)
        except OSError as e:
            raise named(e, self._p(rel)) from None

    def _put(self, rel, buffers, fsync):
        mvs, total = [], 0
        for b in buffers:  # a loop, not a list and a sum over generators: three puts per small array
            m = memoryview(b).cast("B")
            if len(m):
                mvs.append(m)
                total += len(m)
        if self.writes_direct(total) and self._put_direct(rel, mvs, total, fsync):
            return
        fd = self._create(self._p(rel))
        try:
            while mvs:  # writev in batches (IOV_MAX is 1024 on Linux), resuming after short writes
                _consume(mvs, os.writev(fd, mvs[:1024]))
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _put_direct(self, rel, mvs, total, fsync) -> bool:
        """Write the file with O_DIRECT from a page-aligned image of it: the caller's own when it
        built the file in a :meth:`file_buffer`, else a copy. False, leaving the buffered path to
        write it, where the file system refuses direct I/O.

        Why: a buffered write copies every byte into page-cache pages the kernel allocates for the
        file. On the VMs measured, memory the guest has not touched lately costs a host fault per page
        on first write, so that copy ran at 0.3-0.6 GB/s (3.4 s of system time for 2 GiB, against
        0.2 s with O_DIRECT, which moves the image, reused memory, straight to the disk). The data
        then bypasses the page cache, which also spares the flush the commit waits for."""
        whole = _aligned.extent(mvs[0]) if len(mvs) == 1 else None
        if whole is not None:
            return self._write_direct(rel, whole, total, fsync)
        image = _aligned.take(total)
        try:
            at = 0
            for m in mvs:
                image[at:at + len(m)] = m
                at += len(m)
            return self._write_direct(rel, _aligned.extent(image), total, fsync)
        finally:
            _aligned.give(image)

    def _write_direct(self, rel, image, total, fsync) -> bool:
        image[total:] = bytes(len(image) - total)  # the last block's tail: cut off by the truncate below
        try:
            fd = self._create(self._p(rel), os.O_DIRECT)
        except OSError as e:
            if e.errno not in DIRECT_REFUSED:
                raise
            self.direct = False
            return False
        try:
            at = 0
            while at < len(image):
                n = os.write(fd, image[at:])
                if n % DIRECT_ALIGN:  # a short write off the alignment: let the buffered path rewrite it
                    return False
                at += n
            os.ftruncate(fd, total)
            if fsync:
                os.fsync(fd)
        except OSError as e:
            if e.errno not in DIRECT_REFUSED:
                raise
            self.direct = False
            return False
        finally:
            os.close(fd)
        return True

    def put_atomic(self, rel, data: bytes, fsync=True):
        path = self._p(rel)
        tmp = path + ".tmp"
        self.put(rel + ".tmp", [data], fsync=fsync)
        os.replace(tmp, path)
        if fsync:
            self._fsync_dir(os.path.dirname(path))

    @staticmethod
    def _fsync_dir(d):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync(self):
        """Make every file written so far durable (one syncfs(2); falls back to os.sync)."""
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if syncfs(fd):
                return
        finally:
            os.close(fd)
        os.sync()

    def get(self, rel) -> bytes:
        fd = self._open(rel)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def exists(self, rel) -> bool:
        return os.path.exists(self._p(rel))

    def size(self, rel):
        """File size, or None when missing."""
        try:
            return os.stat(self._rp(rel)).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def readinto(self, rel, buffers) -> tuple[int, int]:
        """Scatter-read the file into ``buffers``; returns (bytes read, file size)."""
        fd = self._open(rel)
        try:
            size = os.fstat(fd).st_size
            mvs = [memoryview(b).cast("B") for b in buffers]
            want = sum(len(m) for m in mvs)
            total = os.preadv(fd, mvs, 0) if want else 0  # almost always the whole read at once
            while 0 < total < want:
                # advance past fully read buffers
                rest, acc = [], 0
                for m in mvs:
                    if acc + len(m) <= total:
                        acc += len(m)
                        continue
                    rest.append(m[max(0, total - acc):])
                    acc += len(m)
                n = os.preadv(fd, rest, total)
                if n == 0:
                    break
                total += n
            return total, size
        finally:
            os.close(fd)

    def map(self, rel):
        """(read-only memoryview of the whole file, file size) via mmap; the map lives as long as the view."""
        fd = self._open(rel)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return memoryview(b""), 0
            mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if hasattr(mm, "madvise"):
            try:
                mm.madvise(mmap.MADV_SEQUENTIAL)
                mm.madvise(mmap.MADV_WILLNEED)
            except (OSError, AttributeError):
                pass
        return memoryview(mm), size

    def read_ranges(self, rel, ranges, buf, advise=None):
        """Read the byte ranges ``[(start, stop)]`` of the file back to back into ``buf``.

        ``advise``: the ranges the kernel is asked for first (default: these ranges when there are
        several; a caller reading one region in several calls names it once). Returns (bytes read,
        file size). Raises FileNotFoundError for a missing file."""
        with self.ranges_reader(rel) as f:
            return f.read_ranges(ranges, buf, advise)

    def ranges_reader(self, rel) -> "_LocalRanges":
        """``rel`` opened (and checked, ``_open``) once for several ``read_ranges`` calls."""
        return _LocalRanges(self._open(rel), rel)

    def cached(self, rel, start, stop):
        """Whether bytes ``[start, stop)`` of the file are in the page cache (:func:`resident`). None
        where the kernel cannot say, or the file cannot be opened (the read that needs it reports that)."""
        try:
            f = self.ranges_reader(rel)
        except (OSError, FormatError):
            return None
        with f:
            return f.cached(start, stop)

    def prefetch(self, rels, ranges=None):
        """Ask the kernel to start reading these files (cold reads overlap with the current one);
        ``ranges``: for each file, the byte ranges wanted (default: the whole file)."""
        for i, rel in enumerate(rels):
            readahead(self._p(rel), ((0, 0),) if ranges is None else ranges[i])

    def delete(self, rel):
        """Remove one file; a missing file is not an error."""
        try:
            os.unlink(self._p(rel))
        except FileNotFoundError:
            pass

    def delete_tree(self, rel):
        """Remove everything under ``rel``; a missing tree is not an error."""
        shutil.rmtree(self._p(rel), ignore_errors=True)
        with self._dlock:
            pre = self._p(rel)
            self._dirs = {d for d in self._dirs if d != pre and not d.startswith(pre + os.sep)}

    def list_files(self):
        """Every file under the root (symbolic links included, not followed)."""
        out = []
        for dp, dn, fns in os.walk(self.root):
            for fn in fns + [d for d in dn if os.path.islink(os.path.join(dp, d))]:
                out.append(os.path.relpath(os.path.join(dp, fn), self.root).replace(os.sep, "/"))
        return out


class FsspecStore(FileBuffers):
    """Any fsspec file system (s3://, gs://, memory://, file:// with storage options)."""

    parallel_reads = True

    def writes_direct(self, nbytes) -> bool:
        return False

    def __init__(self, url: str, storage_options: dict):
        import fsspec

        so = dict(storage_options)
        if url.startswith("file://"):
            so.setdefault("auto_mkdir", True)
        self.fs, self.root = fsspec.core.url_to_fs(url, **so)
        self.root = self.root.rstrip("/")
        self.url = url

    def _p(self, rel):
        return f"{self.root}/{rel}"

    def describe_root(self):
        try:
            if self.fs.isfile(self.root):
                return "it is a file, not a checkpoint prefix"
            if not self.fs.exists(self.root):
                return "nothing exists at this location"
        except OSError:
            return None
        return None

    def top_level(self, ignore=()):
        try:
            if not self.fs.exists(self.root):
                return {}
            out = {}
            for e in self.fs.ls(self.root, detail=True):
                name = e["name"].rstrip("/").rsplit("/", 1)[-1]
                if name not in ignore:
                    out[name] = e.get("type") == "directory"
            return out
        except FileNotFoundError:
            return {}

    def is_empty(self, ignore=()):
        return not self.top_level(ignore)

    def clear(self, keep=()):
        try:
            if self.fs.exists(self._p(MANIFEST)):
                self.fs.rm_file(self._p(MANIFEST))
            if self.fs.exists(self.root):
                for p in self.fs.ls(self.root, detail=False):
                    if p.rstrip("/").rsplit("/", 1)[-1] not in keep:
                        self.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def sole_writer(self) -> None:
        """Nothing to know: an object store has no directories to make."""

    def create_exclusive(self, rel, data: bytes) -> bool:
        """Create ``rel`` unless it exists. Object stores have no O_EXCL here: this is check-then-put,
        so writers also re-check their writer-id marker before they commit (``WriterLock.check``)."""
        if self.fs.exists(self._p(rel)):
            return False
        self.fs.pipe_file(self._p(rel), data)
        return True

    def append(self, rel, data: bytes) -> None:
        """Objects cannot grow: read, extend, put (used for a small journal only)."""
        try:
            old = self.fs.cat_file(self._p(rel))
        except FileNotFoundError:
            old = b""
        self.fs.pipe_file(self._p(rel), old + data)

    def appender(self, rel) -> "_ObjectAppender":
        """Objects cannot grow: the content is read once, then every record puts the whole object
        (one request per record instead of a read and a write)."""
        try:
            old = self.fs.cat_file(self._p(rel))
        except FileNotFoundError:
            old = b""
        return _ObjectAppender(lambda data: self.fs.pipe_file(self._p(rel), data), old)

    def put(self, rel, buffers, fsync=False):
        if len(buffers) == 1 and isinstance(buffers[0], bytes):
            data = buffers[0]
        else:
            data = b"".join(memoryview(b).cast("B") for b in buffers)
        self.fs.pipe_file(self._p(rel), data)

    def put_atomic(self, rel, data, fsync=True):
        protos = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        if "file" in protos or "local" in protos:  # a file system: write aside, then rename
            self.fs.pipe_file(self._p(rel + ".tmp"), data)
            self.fs.mv(self._p(rel + ".tmp"), self._p(rel))
        else:
            self.fs.pipe_file(self._p(rel), data)  # a single PUT is atomic on object stores

    def sync(self):
        """Object stores make a PUT durable before it returns; nothing to flush."""

    def get(self, rel) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def readinto(self, rel, buffers) -> tuple[int, int]:
        """The whole object scattered into ``buffers``; returns (bytes copied, object size)."""
        data = memoryview(self.fs.cat_file(self._p(rel)))
        pos = 0
        for b in buffers:
            m = memoryview(b).cast("B")
            n = min(len(m), len(data) - pos)
            m[:n] = data[pos:pos + n]
            pos += n
        return pos, len(data)

    def map(self, rel):
        """The whole object as a read-only memoryview (fetched; no mmap on object stores)."""
        data = self.fs.cat_file(self._p(rel))
        return memoryview(data), len(data)

    def prefetch(self, rels, ranges=None):
        """Nothing to hint: reads of an object store are already parallel requests."""

    def exists(self, rel):
        return self.fs.exists(self._p(rel))

    def size(self, rel):
        try:
            return self.fs.size(self._p(rel))
        except FileNotFoundError:
            return None

    def ranges_reader(self, rel) -> "_ObjectRanges":
        """Each ``read_ranges`` call is its own request(s): nothing to hold open."""
        return _ObjectRanges(self, rel)

    def cached(self, rel, start, stop):
        """An object store keeps no page cache this process can ask about."""
        return None

    def read_ranges(self, rel, ranges, buf, advise=None):
        """Byte ranges of one object, back to back into ``buf``; file size unknown (None). ``advise``:
        nothing to ask ahead for (every range is fetched in this call)."""
        p = self._p(rel)
        mv = memoryview(buf).cast("B")
        if len(ranges) == 1:
            datas = [self.fs.cat_file(p, start=ranges[0][0], end=ranges[0][1])]
        else:
            datas = self.fs.cat_ranges([p] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges],
                                       on_error="raise")
        pos = 0
        for d in datas:
            if isinstance(d, BaseException):
                raise d
            mv[pos:pos + len(d)] = d
            pos += len(d)
        return pos, None

    def delete(self, rel):
        try:
            self.fs.rm_file(self._p(rel))
        except FileNotFoundError:
            pass

    def delete_tree(self, rel):
        try:
            if self.fs.exists(self._p(rel)):
                self.fs.rm(self._p(rel), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def list_files(self):
        try:
            return [p[len(self.root) + 1:] for p in self.fs.find(self.root)]
        except FileNotFoundError:
            return []


class _LocalRanges:
    """A local file open for reading byte ranges (``LocalStore.ranges_reader``); its size is read once."""

    def __init__(self, fd, rel):
        self.fd, self.rel, self.size = fd, rel, None

    def read_ranges(self, ranges, buf, advise=None):
        """As ``LocalStore.read_ranges``, on the open file."""
        fd = self.fd
        if self.size is None:
            self.size = os.fstat(fd).st_size
        if advise is None:
            advise = ranges if len(ranges) > 1 else ()
        if hasattr(os, "posix_fadvise"):
            for a, b in advise:  # cold: the kernel fetches every range at once, not one round trip each
                os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)
        mv = memoryview(buf).cast("B")
        pos = got = 0
        for a, b in ranges:
            want = b - a
            while want:
                n = os.preadv(fd, [mv[pos:pos + want]], a)
                if n == 0:
                    return got, self.size
                pos += n
                got += n
                a += n
                want -= n
        return got, self.size

    def read_vec(self, offset, bufs) -> tuple[int, int | None]:
        """Bytes from ``offset`` on into ``bufs`` (byte memoryviews) one after the other (``preadv``:
        one call puts a chunk's data in place and its crc32c word beside it); (bytes read, file size)."""
        if self.size is None:
            self.size = os.fstat(self.fd).st_size
        mvs = list(bufs)
        got = 0
        while mvs:
            n = os.preadv(self.fd, mvs, offset + got)
            if n == 0:
                break
            got += n
            _consume(mvs, n)
        return got, self.size

    def cached(self, start, stop):
        """As ``LocalStore.cached``, on the open file."""
        return resident(self.fd, start, stop)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _ObjectRanges:
    """An object of an fsspec store read by byte ranges (``FsspecStore.ranges_reader``)."""

    def __init__(self, store, rel):
        self.store, self.rel = store, rel

    def read_ranges(self, ranges, buf, advise=None):
        return self.store.read_ranges(self.rel, ranges, buf, advise)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FileAppender:
    """An O_APPEND file (``LocalStore.appender``); a file object, so it is closed if its owner is lost."""

    def __init__(self, path):
        self._f = open(path, "ab", buffering=0)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # one write(2) for a journal line; loop only on a short write
            view = view[self._f.write(view):]

    def close(self) -> None:
        self._f.close()


class _ObjectAppender:
    """An object rewritten whole on every record (``FsspecStore.appender``)."""

    def __init__(self, put, content: bytes):
        self._put, self._content = put, content

    def write(self, data: bytes) -> None:
        self._content += data
        self._put(self._content)

    def close(self) -> None:
        pass
