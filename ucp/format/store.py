"""A tiny store abstraction: a local fast path (os.* calls) and fsspec for URLs."""
from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import threading

from ucp.errors import UcpError

MANIFEST = "ucp.manifest.json"


def _is_url(path: str) -> bool:
    return "://" in str(path)


def make_store(path, storage_options=None):
    path = os.fspath(path) if not isinstance(path, str) else path
    if _is_url(path):
        return FsspecStore(path, storage_options or {})
    if storage_options:
        raise UcpError(f"storage_options given for the local path {path!r}; use a URL (file://, s3://)")
    return LocalStore(path)


def readahead(path) -> None:
    """Ask the kernel to read a whole file in the background (posix_fadvise WILLNEED)."""
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


class LocalStore:
    local = True

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.url = root
        self._dirs: set[str] = set()
        self._dlock = threading.Lock()

    def _p(self, rel):
        return os.path.join(self.root, rel)

    def is_empty(self) -> bool:
        if not os.path.exists(self.root):
            return True
        if not os.path.isdir(self.root):
            raise UcpError(f"{self.root} exists and is not a directory")
        return not os.listdir(self.root)

    def clear(self):
        if os.path.isdir(self.root):
            m = self._p(MANIFEST)
            if os.path.exists(m):  # uncommit first: a crash mid-removal leaves no stale checkpoint
                os.unlink(m)
                self._fsync_dir(self.root)
            shutil.rmtree(self.root)
        self._dirs.clear()

    def _mkdir(self, d):
        if d in self._dirs:
            return
        parent = os.path.dirname(d)
        if parent != d and parent not in self._dirs and not os.path.isdir(parent):
            self._mkdir(parent)  # top-down: one mkdir per new directory, no failed attempts
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        with self._dlock:
            self._dirs.add(d)

    def put(self, rel, buffers, fsync=False):
        path = self._p(rel)
        self._mkdir(os.path.dirname(path))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            mvs = [m for m in (memoryview(b).cast("B") for b in buffers) if len(m)]
            while mvs:  # writev in batches (IOV_MAX is 1024 on Linux), resuming after short writes
                n = os.writev(fd, mvs[:1024])
                while n and mvs:
                    if n >= len(mvs[0]):
                        n -= len(mvs[0])
                        mvs.pop(0)
                    else:
                        mvs[0] = mvs[0][n:]
                        n = 0
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

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
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(self.root, os.O_RDONLY)
            try:
                if libc.syncfs(fd) == 0:
                    return
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass
        os.sync()

    def get(self, rel) -> bytes:
        with open(self._p(rel), "rb") as f:
            return f.read()

    def exists(self, rel) -> bool:
        return os.path.exists(self._p(rel))

    def size(self, rel):
        """File size, or None when missing."""
        try:
            return os.stat(self._p(rel)).st_size
        except FileNotFoundError:
            return None

    def readinto(self, rel, buffers) -> tuple[int, int]:
        """Scatter-read the file into ``buffers``; returns (bytes read, file size)."""
        fd = os.open(self._p(rel), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            total = 0
            mvs = [memoryview(b).cast("B") for b in buffers]
            want = sum(len(m) for m in mvs)
            while total < want:
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
        fd = os.open(self._p(rel), os.O_RDONLY)
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

    def read_ranges(self, rel, ranges, buf):
        """Read the byte ranges ``[(start, stop)]`` of the file back to back into ``buf``.

        Returns (bytes read, file size). Raises FileNotFoundError for a missing file."""
        fd = os.open(self._p(rel), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            mv = memoryview(buf).cast("B")
            pos = got = 0
            for a, b in ranges:
                want = b - a
                while want:
                    n = os.preadv(fd, [mv[pos:pos + want]], a)
                    if n == 0:
                        return got, size
                    pos += n
                    got += n
                    a += n
                    want -= n
            return got, size
        finally:
            os.close(fd)

    def prefetch(self, rels):
        """Ask the kernel to start reading these files (cold reads overlap with the current one)."""
        for rel in rels:
            readahead(self._p(rel))

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
        out = []
        for dp, _dn, fns in os.walk(self.root):
            for fn in fns:
                out.append(os.path.relpath(os.path.join(dp, fn), self.root).replace(os.sep, "/"))
        return out


class FsspecStore:
    local = False

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

    def is_empty(self):
        try:
            if not self.fs.exists(self.root):
                return True
            return not self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True

    def clear(self):
        try:
            if self.fs.exists(self._p(MANIFEST)):
                self.fs.rm_file(self._p(MANIFEST))
            if self.fs.exists(self.root):
                self.fs.rm(self.root, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

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
        pass

    def get(self, rel) -> bytes:
        return self.fs.cat_file(self._p(rel))

    def exists(self, rel):
        return self.fs.exists(self._p(rel))

    def size(self, rel):
        try:
            return self.fs.size(self._p(rel))
        except FileNotFoundError:
            return None

    def read_ranges(self, rel, ranges, buf):
        """Byte ranges of one object, back to back into ``buf``; file size unknown (None)."""
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
