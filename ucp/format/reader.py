"""Reading universal checkpoints: one manifest read to open, only intersecting chunks per read."""
from __future__ import annotations

import collections
import difflib
import functools
import math
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

import crc32c
import numpy as np
import torch

from ucp.errors import CorruptChunkError, NotFoundError, UcpError
from ucp.format import dtypes, jsonmeta, layout, manifest, shard as _shard
from ucp.format.layout import CRC_BYTES, chunk_key
from ucp.format.manifest import ManifestArray
from ucp.format.store import MANIFEST, make_store
from ucp.plan.boxes import flat_to_boxes
from ucp.plan.grid import ChunkGrid, box_slices


@dataclass(frozen=True)
class ArrayInfo:
    name: str
    state: str
    path: str
    shape: tuple
    dtype: torch.dtype
    storage_dtype: str
    chunks: tuple
    nbytes: int
    nchunks: int
    inner_chunks: tuple | None = None  # inner chunk shape of a sharded array (chunks is the shard shape)


class _Array:
    """An array being read: its manifest record plus the numbers every read of it needs."""

    __slots__ = ("info", "rec", "table", "np", "isz", "chunk_nbytes", "inner", "inner_nb", "index_nb", "grid",
                 "positions", "small_key")

    def __init__(self, name, state, rec: ManifestArray):
        self.rec = rec
        self.table = rec.chunk_table
        self.grid = rec.grid
        self.inner = rec.inner_chunks
        (self.np, self.isz, self.chunk_nbytes, self.inner_nb, self.index_nb, torch_dtype, nbytes,
         self.small_key) = _geometry(rec.dtype, rec.shape, rec.chunks, rec.inner_chunks)
        self.info = ArrayInfo(name, state, rec.path, rec.shape, torch_dtype, rec.storage_dtype, rec.chunks, nbytes,
                              self.grid.nchunks, self.inner)

    def content_crc(self, key):
        """The shard's recorded content crc32c (None in a format_version 1 manifest)."""
        ent = self.table[key]
        return ent[2] if len(ent) > 2 else None


class Checkpoint:
    """Read-only view of a committed universal checkpoint."""

    def __init__(self, path, storage_options=None, workers=4):
        self.path = path
        self._store = make_store(path, storage_options)
        why = self._store.describe_root()
        if why is not None:
            raise manifest.not_committed(path, why)
        try:
            raw = self._store.get(MANIFEST)
        except (FileNotFoundError, NotADirectoryError):
            raise manifest.not_committed(path) from None
        self.catalog = manifest.load(raw, f"{path}/{MANIFEST}")
        self._params = {p.name: p for p in self.catalog.params}
        self._manifest_json = None
        self._arrays: dict[tuple, _Array] = {}
        self._metadata = None
        self._meta_loaded = False
        self._workers = int(workers or 0)
        self._pool = None
        self._tls = threading.local()
        self._slock = threading.Lock()
        self._index_cache: dict[str, np.ndarray] = {}  # shard path -> checked index entries
        self._ahead: dict = {}  # shard path -> the look-ahead's work on it (_Ahead), or the _LookAhead queueing it
        self._alock = threading.Lock()  # _ahead: a read takes a file's entry as the look-ahead hands the file out
        self._ahead_pool = None
        self.bytes_read = 0
        self.chunks_read = 0
        self.chunks_direct = 0   # inner chunks read straight into the output (no scratch, no copy)
        self.last_read_stats = {"bytes_read": 0, "bytes_needed": 0, "chunks_read": 0}

    @property
    def manifest(self) -> dict:
        """The manifest as JSON (``catalog`` is the typed, checked form)."""
        if self._manifest_json is None:
            self._manifest_json = self.catalog.to_json()
        return self._manifest_json

    # -- catalogue ---------------------------------------------------------------------------
    @property
    def params(self) -> list[str]:
        return list(self._params)

    def _param(self, name):
        try:
            return self._params[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), self._params, n=5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise NotFoundError(f"{self.path}: no parameter {name!r}{hint}") from None

    def states(self, name) -> list[str]:
        return list(self._param(name).states)

    def param_meta(self, name) -> dict:
        return jsonmeta.decode(self._param(name).meta, _no_tensor, where=f"param {name!r} meta")

    def holder(self, name) -> str:
        """The parameter whose arrays hold ``name``'s values: ``name`` itself, or for an alias
        stored once its ``tied_to`` (FORMAT.md §6.1); reads of the alias are served from it."""
        p = self._param(name)
        holder = p.meta.get("tied_to") if not p.states else None
        if isinstance(holder, str) and holder in self._params and self._params[holder].states:
            return holder
        return name

    def _array(self, name, state) -> _Array:
        a = self._arrays.get((name, state))
        if a is not None:
            return a
        if state is None and isinstance(name, str) and name.startswith("_ucp/meta/"):
            rec = self.catalog.meta_arrays[name]
        else:
            holder = self.holder(name)
            if holder != name:
                return self._array(holder, state)  # an alias stored once reads its holder (FORMAT.md 6.1)
            st = self._param(name).states
            if state not in st:
                close = difflib.get_close_matches(str(state), st, n=5) or list(st)
                raise NotFoundError(f"{self.path}: parameter {name!r} has no state {state!r}; "
                                    f"it has: {', '.join(close)}")
            rec = st[state]
        a = self._arrays[(name, state)] = _Array(name, state, rec)
        return a

    def array_info(self, name, state="param") -> ArrayInfo:
        return self._array(name, state).info

    @property
    def nbytes(self) -> int:
        return sum(self.array_info(p, s).nbytes for p in self._params for s in self.states(p))

    @property
    def metadata(self):
        if not self._meta_loaded:
            self._metadata = jsonmeta.decode(self.catalog.metadata, self._meta_tensor,
                                             where=f"{self.path}/{MANIFEST}: metadata")
            self._meta_loaded = True
        return self._metadata

    def _meta_tensor(self, rel):
        if rel not in self.catalog.meta_arrays:
            raise LookupError(rel)
        return self.read_box(rel, None, None, None)

    # -- reading -----------------------------------------------------------------------------
    def read(self, name, state="param", index=None, out=None) -> torch.Tensor:
        """An array (or the part ``index`` selects: ints, step-1 slices, ...) in its logical dtype."""
        a = self._array(name, state)
        if index is None and out is None and a.small_key is not None:
            return self._read_small(a)
        start, stop, squeeze = layout.normalize_index(index, a.info.shape)
        box = [b - s for s, b in zip(start, stop)]
        rshape = [n for d, n in enumerate(box) if d not in squeeze]
        if out is not None:
            if list(out.shape) != rshape:
                raise UcpError(f"out has shape {tuple(out.shape)}, the index selects {tuple(rshape)}")
            if not out.is_contiguous():
                raise UcpError("out must be contiguous")
            self.read_box(name, state, start, stop, out=out.view(box))
            return out
        t = self.read_box(name, state, start, stop)
        return t.reshape(rshape) if squeeze else t

    def _read_small(self, a) -> torch.Tensor:
        """The whole of a small one-chunk array (``_Array.small_key``): the chunk's data read straight into
        a new tensor and its crc32c word into scratch, in one preadv, with the checks of every chunk read
        (``_check``), but none of the box, grid and job steps of ``read_box``: a checkpoint of thousands
        of small tensors spent more time in those steps than in the system calls."""
        key = a.small_key
        size, crc = a.table[key]
        raw = torch.empty(a.info.nbytes, dtype=torch.uint8)
        data = raw.numpy()
        crcb = self._scratch(CRC_BYTES)[:CRC_BYTES]
        got, fsize = self._readinto(a, key, f"{a.info.path}/{key}", [data, crcb])
        self._check(a, key, got, fsize, size, crc, [data], crcb)
        with self._slock:
            self.bytes_read += got
            self.chunks_read += 1
        self.last_read_stats = {"bytes_read": got, "bytes_needed": a.info.nbytes, "chunks_read": 1}
        return raw.view(a.info.dtype).reshape(a.info.shape)

    def read_box(self, name, state, start, stop, out=None) -> torch.Tensor:
        """The box ``[start, stop)`` of an array (None: the whole extent), read into ``out`` if given."""
        _a, start, stop, out = self._box(name, state, start, stop, out)
        self.read_boxes([(name, state, start, stop, out)])
        return out

    def read_boxes(self, boxes) -> None:
        """Read every box ``(name, state, start, stop, out)`` into its ``out`` (contiguous, CPU, the
        box's shape and the array's dtype). The chunk reads of all the boxes go to ONE pool at once,
        so many small boxes (a DCP rank's read requests) keep the threads busy without a pool per box
        or a pool calling into a pool. ``last_read_stats`` sums over the boxes."""
        tasks, counted, need, tails = [], [], 0, {}
        for name, state, start, stop, out in boxes:
            a, start, stop, out = self._box(name, state, start, stop, out)
            if out.numel() == 0:
                continue
            jobs = list(a.grid.indices_for(start, stop))
            fn, counts = self._reader_for(a, start, stop, out, jobs)
            tasks += [(fn, j) for j in jobs]
            counted.append(len(jobs) if counts is None else counts)
            need += out.numel() * a.isz
            if a.inner is not None:
                tails.update((f"{a.info.path}/{chunk_key(j)}", (a, j, start, stop)) for j in jobs)
        ahead = self._look_ahead(tails)
        try:
            if len(tasks) > 1 and self._workers > 1 and (need >= (8 << 20) or self._store.parallel_reads):
                got = self._run_pooled(tasks)
            else:
                got = sum(fn(idx) for fn, idx in tasks)
        finally:
            if ahead is not None:
                ahead.close()
        nread = sum(c if isinstance(c, int) else sum(c) for c in counted)
        with self._slock:
            self.bytes_read += got
            self.chunks_read += nread
        self.last_read_stats = {"bytes_read": got, "bytes_needed": need, "chunks_read": nread}

    def _run_pooled(self, tasks) -> int:
        """Run the chunk reads on the pool; their bytes read. A read that fails lets the reads already
        running finish and drops those not started before the first failure (in task order) is
        raised: each read writes into its caller's tensor, and none may still be writing once
        ``read_boxes`` has raised and its caller reuses or frees that tensor."""
        futures = [self._thread_pool().submit(fn, idx) for fn, idx in tasks]
        _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if pending:
            for f in pending:
                f.cancel()
            wait(pending)
        # the pool starts reads in task order: any read before a failed one has started (not cancelled)
        return sum(f.result() for f in futures)

    def _look_ahead(self, shards):
        """Fetch and check the indexes of the shard files a read spans, and ask the kernel for the data
        the read needs of each, in threads ahead of the reads (``shards``: path -> (array, shard
        index, box start, stop), in read order). Read cold, a file's open, its index and the crc32c
        words of its content check are a round trip each before its data can be asked for; with one
        reader thread per rank (``rank_threads`` on a small node) these waits add up (a 2-D DCP load of
        ~1200 shard files spent 0.45 s of 2.4 in ``open`` alone). A file read whole is only hinted.
        At most ``LOOK_AHEAD_BYTES`` of data are asked for ahead of the read, so that a read larger
        than memory does not evict what it asked for before using it. The read of a file waits for
        its fetch and counts its bytes (``_read_shard``); a fetch that fails is done again by the
        read, which raises. A file whose index is already checked is not fetched again, only hinted.
        This is the one read-ahead of shard files. Skipped for a single file, for object stores
        (reads there are already parallel requests), and when the first file's index is in the page
        cache (``Store.cached``): warm, fetching ahead only moves the same work to other threads and
        adds an open and a hint per file (a warm replay of a 2-D DCP rank's reads took 30% more CPU
        with it)."""
        todo = [(rel, v) for rel, v in shards.items() if rel not in self._ahead]
        if len(todo) < 2 or self._store.parallel_reads:
            return None
        rel, (a, sidx, _start, _stop) = todo[0]
        size = a.table[chunk_key(sidx)][0]
        if self._store.cached(rel, size - min(a.index_nb, PROBE_BYTES), size):
            return None
        if self._ahead_pool is None:
            with self._slock:
                if self._ahead_pool is None:
                    self._ahead_pool = ThreadPoolExecutor(LOOK_AHEAD_THREADS, thread_name_prefix="ucp-look-ahead")
        ahead = _LookAhead(self, todo)
        ahead.fill()
        return ahead

    def _take_ahead(self, rel):
        """The look-ahead's work on file ``rel`` for the read about to read it (None: none was
        handed out). A file the look-ahead has not reached yet is struck from its queue: reads on the
        pool can outrun it, and a fetch of a file already read would be I/O for nothing, its bytes
        counted by whichever read of that file came next."""
        with self._alock:
            got = self._ahead.pop(rel, None)
        return got if isinstance(got, _Ahead) else None

    def _fetch(self, a, sidx, rel, start, stop) -> int:
        """The look-ahead's work for one file: the bytes it read (0 when the fetch failed: the read
        does it again and raises)."""
        key = chunk_key(sidx)
        size = a.table[key][0]
        _cst, _ist, _isp, _inner, locals_, whole = self._shard_part(a, sidx, start, stop)
        if whole:  # its content check comes from its chunks: only hinted
            self._store.prefetch([rel])
            return 0
        try:
            ent, got, _pending = self._index(a, sidx, key, rel, size)
        except Exception:  # noqa: BLE001 - reported by the read itself, in order
            return 0
        ig = _shard.inner_grid(a.info.chunks, a.inner)
        self._store.prefetch([rel], [[(int(ent[p, 0]), int(ent[p, 0]) + a.inner_nb)
                                      for p in (_shard.linear(loc, ig) for loc in locals_)]])
        return got

    def _box(self, name, state, start, stop, out):
        """The array, the box as int lists (None: the whole extent) and the output tensor, checked."""
        a = self._array(name, state)
        shape = a.info.shape
        start = [0] * len(shape) if start is None else [int(x) for x in start]
        stop = list(shape) if stop is None else [int(x) for x in stop]
        if len(start) != len(shape) or len(stop) != len(shape) or any(
                not 0 <= s <= e <= n for s, e, n in zip(start, stop, shape)):
            raise UcpError(f"box {start}..{stop} does not fit {name!r}/{state!r} of shape {shape}")
        bshape = [e - s for s, e in zip(start, stop)]
        if out is None:
            out = _empty(bshape, a.info.dtype, a.isz)
        elif list(out.shape) != bshape or out.dtype != a.info.dtype or not out.is_contiguous() \
                or out.device.type != "cpu":
            raise UcpError(f"out must be a contiguous CPU {a.info.dtype} tensor of shape {tuple(bshape)}")
        return a, start, stop, out

    def _thread_pool(self) -> ThreadPoolExecutor:
        """The Checkpoint's one reader pool (``workers`` threads), started on first use."""
        if self._pool is None:
            with self._slock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="ucp-read")
        return self._pool

    def _reader_for(self, a, start, stop, out, jobs):
        """The per-chunk read function for this box (and a list it counts inner chunks in, for shards),
        with kernel read-ahead of the next plain chunks."""
        shape, ch = a.info.shape, a.info.chunks
        onp = dtypes.to_storage_numpy(out)
        if a.inner is not None:  # the look-ahead (``_look_ahead``) asks for what each shard read needs
            counts = [0] * len(jobs)
            jpos = {j: i for i, j in enumerate(jobs)}

            def shard(idx):
                got, n = self._read_shard(a, idx, start, stop, onp)
                counts[jpos[idx]] = n
                return got
            return shard, counts
        full_rows = all(s == 0 for s in start[1:]) and list(stop[1:]) == list(shape[1:])
        if len(shape) >= 1 and tuple(ch[1:]) == tuple(shape[1:]) and full_rows:
            obytes = onp.reshape(-1).view(np.uint8)
            fn = lambda idx: self._read_rows(a, idx, start, stop, obytes)  # noqa: E731
        else:
            fn = lambda idx: self._read_generic(a, idx, start, stop, onp)  # noqa: E731
        if len(jobs) < 2:
            return fn, None
        keys = [f"{a.info.path}/{chunk_key(j)}" for j in jobs]
        self._store.prefetch(keys[1:PREFETCH + 1])
        if len(jobs) <= PREFETCH + 1:
            return fn, None
        pos = {j: i for i, j in enumerate(jobs)}

        def ahead(idx):  # keep the kernel reading PREFETCH chunks ahead (posix_fadvise WILLNEED)
            i = pos[idx] + PREFETCH + 1
            if i < len(keys):
                self._store.prefetch(keys[i:i + 1])
            return fn(idx)
        return ahead, None

    def read_flat(self, name, state, start, stop, out=None) -> torch.Tensor:
        """Elements [start, stop) of the C-order flattened array, as a 1-D tensor (flat-partitioned ranges).

        Reads only the chunks the range touches, straight into ``out``."""
        a = self._array(name, state)
        start, stop = int(start), int(stop)
        n = stop - start
        if not 0 <= start <= stop <= math.prod(a.info.shape):
            raise UcpError(f"flat range [{start}, {stop}) outside {name!r}/{state!r} of shape {a.info.shape}")
        if out is None:
            out = _empty((max(n, 0),), a.info.dtype, a.isz)
        elif tuple(out.shape) != (n,) or not out.is_contiguous():
            raise UcpError(f"out must be a contiguous 1-D tensor of {n} elements")
        got = chunks = off = 0
        for box in flat_to_boxes(start, stop, a.info.shape):
            self.read_box(name, state, box.start, box.stop, out=out[off:off + box.numel].view(box.shape))
            off += box.numel
            got += self.last_read_stats["bytes_read"]
            chunks += self.last_read_stats["chunks_read"]
        self.last_read_stats = {"bytes_read": got, "bytes_needed": n * a.isz, "chunks_read": chunks}
        return out

    def _scratch(self, n):
        s = getattr(self._tls, "buf", None)
        if s is None or len(s) < n:
            s = self._tls.buf = bytearray(max(n, 1 << 16))
        return memoryview(s)

    def _where(self, a, key, what="chunk"):
        return f"{self.path}: param {a.info.name!r} state {a.info.state!r} {what} {key} ({a.info.path}/{key})"

    def _size_err(self, a, key, fsize, size, what="chunk"):
        tail = "" if fsize is None else (" (truncated)" if fsize < size else " (extra bytes)")
        return CorruptChunkError(f"{self._where(a, key, what)}: size {fsize if fsize is not None else 'fewer'} "
                                 f"bytes, the manifest records {size}{tail}")

    def _open_err(self, a, key):
        return CorruptChunkError(f"{self.path}: param {a.info.name!r} state {a.info.state!r} chunk {key}: "
                                 f"file {a.info.path}/{key} is missing")

    def _check_size_first(self, a, key, rel, size, what="chunk"):
        """Before a large allocation: the file really has the size the manifest records."""
        if size > BIG_ALLOC:
            fsize = self._store.size(rel)
            if fsize is None:
                raise self._open_err(a, key)
            if fsize != size:
                raise self._size_err(a, key, fsize, size, what)

    def _check(self, a, key, got, fsize, size, crc, data_bufs, stored):
        if fsize != size or got != size:
            raise self._size_err(a, key, fsize, size)
        c = 0
        for b in data_bufs:
            c = crc32c.crc32c(b, c)
        s = int.from_bytes(stored, "little")
        if c != s or c != crc:
            raise CorruptChunkError(f"{self._where(a, key)}: crc32c mismatch (computed {c:#010x}, stored {s:#010x}, "
                                    f"manifest {crc:#010x})")

    def _readinto(self, a, key, rel, bufs):
        try:
            return self._store.readinto(rel, bufs)
        except (FileNotFoundError, NotADirectoryError):
            raise self._open_err(a, key) from None

    def _read_rows(self, a, idx, start, stop, obytes):
        """Row-contiguous chunk: scatter-read the needed rows straight into ``out``."""
        key = chunk_key(idx)
        size, crc = a.table[key]
        r = a.info.chunks[0]
        rowb = a.chunk_nbytes // r
        c0 = idx[0] * r
        i0, i1 = max(start[0], c0), min(stop[0], c0 + r)
        pre, mid = (i0 - c0) * rowb, (i1 - i0) * rowb
        post = a.chunk_nbytes - pre - mid
        rel = f"{a.info.path}/{key}"
        if pre + post > BIG_ALLOC:
            self._check_size_first(a, key, rel, size)
        scratch = self._scratch(pre + post + CRC_BYTES)
        o = (i0 - start[0]) * rowb
        bufs = [obytes[o:o + mid]]
        if pre:
            bufs.insert(0, scratch[:pre])
        if post:
            bufs.append(scratch[pre:pre + post])
        crcb = scratch[pre + post:pre + post + CRC_BYTES]
        got, fsize = self._readinto(a, key, rel, bufs + [crcb])
        self._check(a, key, got, fsize, size, crc, bufs, crcb)
        return got

    def _read_generic(self, a, idx, start, stop, onp):
        key = chunk_key(idx)
        size, crc = a.table[key]
        n = a.chunk_nbytes
        rel = f"{a.info.path}/{key}"
        self._check_size_first(a, key, rel, size)
        buf = self._scratch(n + CRC_BYTES)[:n + CRC_BYTES]
        got, fsize = self._readinto(a, key, rel, [buf])
        self._check(a, key, got, fsize, size, crc, [buf[:n]], buf[n:n + CRC_BYTES])
        chunk = np.frombuffer(buf[:n], dtype=a.np).reshape(a.info.chunks)
        ist, isp = a.grid.overlap(idx, start, stop)
        onp[box_slices(ist, isp, start)] = chunk[box_slices(ist, isp, a.grid.chunk_start(idx))]  # 0-d: onp[()]
        return got

    # -- sharded arrays ----------------------------------------------------------------------
    def _parse_index(self, a, key, raw):
        try:
            ent, c = _shard.parse_index(raw, a.info.chunks, a.inner)
        except _shard.ShardError as e:
            raise CorruptChunkError(f"{self._where(a, key, 'shard')}: {e}") from None
        icrc = a.table[key][1]
        if c != icrc:
            raise CorruptChunkError(f"{self._where(a, key, 'shard')}: shard index crc32c {c:#010x} differs from "
                                    f"the manifest's {icrc:#010x}")
        return ent.copy()

    def _check_content(self, a, key, words):
        """The inner chunks' crc32c words (index order) must give the manifest's content crc32c: binds
        this file's data to this shard of this array (a swapped shard file fails here)."""
        want = a.content_crc(key)
        got = _shard.content_crc(words)
        if want is not None and got != want:
            raise CorruptChunkError(f"{self._where(a, key, 'shard')}: content crc32c {got:#010x} differs from "
                                    f"the manifest's {want:#010x} (the file is another shard's, or stale)")

    def _positions(self, a, sidx):
        return _present_positions(a.info.shape, a.info.chunks, a.inner, sidx)

    def _index(self, a, sidx, key, rel, size, whole=False, src=None):
        """The checked index of a shard, its content crc32c checked too (once per open Checkpoint).
        ``whole``: the caller reads every inner chunk, so their crc32c words are not read here; it
        checks the content crc32c from the chunks (``_finish_content``). ``src``: the file already
        open (``Store.ranges_reader``). Returns (entries, bytes read, the index positions whose words
        the caller must check, or None when checked)."""
        ent = self._index_cache.get(rel)
        if ent is not None:
            return ent, 0, None
        if src is None:
            with self._ranges_reader(a, key, rel) as src:
                return self._index(a, sidx, key, rel, size, whole, src)
        n = a.index_nb
        if n > BIG_ALLOC:
            self._check_size_first(a, key, rel, size, "shard")
        buf = bytearray(n)
        got, fsize = src.read_ranges([(size - n, size)], buf)
        if (fsize is not None and fsize != size) or got != n:
            raise self._size_err(a, key, fsize, size, "shard")
        ent = self._parse_index(a, key, buf)
        data_end = size - n
        positions = self._positions(a, sidx)
        self._entries(ent, positions, a, data_end, key)
        if whole:
            return ent, n, positions
        ranges = _shard.crc_word_ranges(ent, positions)
        words = bytearray(CRC_BYTES * len(ranges))
        got2, _ = src.read_ranges(ranges, words)
        if got2 != len(words):
            raise self._size_err(a, key, None, size, "shard")
        self._finish_content(a, key, rel, ent, [words[i:i + CRC_BYTES] for i in range(0, len(words), CRC_BYTES)])
        return ent, n + got2, None

    def _finish_content(self, a, key, rel, ent, words):
        """Check the content crc32c from the inner chunks' words (index order); then the index is trusted."""
        self._check_content(a, key, words)
        self._index_cache[rel] = ent

    def _read_shard(self, a, sidx, start, stop, onp):
        """Read the inner chunks of shard ``sidx`` that intersect the box into ``onp``, a batch of
        adjacent inner chunks (or a band of a run too large to batch, ``_batches``) at a time
        (``STREAM_BYTES``): each batch is copied out and its crc32c computed while it is still in the
        CPU cache, instead of reading the whole shard into memory and passing over it twice more. The checks run in the order of a whole-file read (index, content
        crc32c, then each inner chunk's crc32c) before this returns; a failing read raises, leaving
        ``onp`` partly written. Returns (bytes read, inner chunks read)."""
        key = chunk_key(sidx)
        size = a.table[key][0]
        rel = f"{a.info.path}/{key}"
        cst, ist, isp, inner, locals_, whole = self._shard_part(a, sidx, start, stop)
        ahead = self._take_ahead(rel)
        pre = ahead.wait() if ahead is not None else 0  # what the look-ahead read of this file
        with self._ranges_reader(a, key, rel) as src:
            ent, got, pending = self._index(a, sidx, key, rel, size, whole, src)
            got += pre
            ig = _shard.inner_grid(a.info.chunks, a.inner)  # every entry was checked (_entry) before _index returned it
            spans = sorted((int(ent[p, 0]), p, loc) for loc, p in ((loc, _shard.linear(loc, ig)) for loc in locals_))
            box, words, bad = (inner, cst, ist, isp, start), {}, {}
            # a local file streams through the thread's scratch; an object store gets one request per shard
            limit = len(spans) * a.inner_nb if self._store.parallel_reads else STREAM_BYTES
            for bands, part in _batches(spans, a.inner_nb, limit):
                read = self._read_bands if bands else self._read_tiles
                got += read(a, key, src, size, part, box, onp, words, bad)
        if pending is not None:
            self._finish_content(a, key, rel, ent, [words[p] for p in pending])
        for loc in locals_:
            if loc in bad:
                c, s = bad[loc]
                raise CorruptChunkError(f"{self._where(a, key, 'shard')}: inner chunk {list(loc)} crc32c mismatch "
                                        f"(computed {c:#010x}, stored {s:#010x})")
        return got, len(spans)

    @staticmethod
    def _shard_part(a, sidx, start, stop):
        """What the box needs of shard ``sidx``: its start, the box's overlap with it, its inner grid
        (shard coordinates), the inner chunks the overlap touches, and whether those are every inner
        chunk in the file."""
        cst = a.grid.chunk_start(sidx)
        ist, isp = a.grid.overlap(sidx, start, stop)
        inner = _inner_grid(a.info.chunks, a.inner)
        lst, lsp = [x - c for x, c in zip(ist, cst)], [y - c for y, c in zip(isp, cst)]
        locals_ = list(inner.indices_for(lst, lsp))
        lim = _present_extent(a.info.shape, a.info.chunks, a.inner, sidx)
        whole = all(len(r) == m for r, m in zip(inner.ranges(lst, lsp), lim))
        return cst, ist, isp, inner, locals_, whole

    def _read_tiles(self, a, key, src, size, spans, box, onp, words, bad):
        """Read the inner chunks ``spans`` (``(offset, index position, local index)``, ascending offsets;
        adjacent ones in one read) into the thread's scratch buffer and copy each one's part of the box
        into ``onp``; its stored crc32c word goes to ``words[position]``, a mismatch to ``bad[local index]``
        (raised by the caller, after the content check). A chunk whose bytes are one contiguous run of
        ``onp`` is read straight there instead (``_read_direct``). Returns the bytes read."""
        got = 0
        direct = self._direct_spans(a, spans, box, onp) if hasattr(src, "read_vec") else None
        if direct:
            got = self._read_direct(a, key, src, size, direct, words, bad)
            spans = [sp for sp in spans if sp[1] not in direct]
            if not spans:
                return got
        ranges = []
        for off, _p, _loc in spans:
            if ranges and ranges[-1][1] == off:
                ranges[-1][1] = off + a.inner_nb
            else:
                ranges.append([off, off + a.inner_nb])
        buf = self._read_span(a, key, src, size, ranges, len(spans) * a.inner_nb)
        _inner, cst, ist, isp, start = box
        nd = a.inner_nb - CRC_BYTES
        run = _TileRun(a, buf, onp, start, a.inner, a.inner_nb)
        for j, (_off, p, loc) in enumerate(spans):
            o = j * a.inner_nb
            stored = bytes(buf[o + nd:o + a.inner_nb])  # the scratch buffer is reused by the next batch
            words[p] = stored
            c, s = crc32c.crc32c(buf[o:o + nd]), int.from_bytes(stored, "little")
            if c != s:
                bad[loc] = (c, s)
                continue
            run.add(j, *_tile_part(cst, loc, a.inner, 0, a.inner, ist, isp))
        run.flush()
        return got + len(buf)

    @staticmethod
    def _direct_spans(a, spans, box, onp):
        """``{index position: (offset, local index, run of onp's bytes)}`` for the chunks of ``spans``
        that lie wholly inside the box and whose bytes are one contiguous run of ``onp`` (the box
        spans the chunk's extent in every dim but the first: a column block read on its own, or
        whole-row chunks); None when there are none."""
        inner = a.inner
        if tuple(inner[1:]) != tuple(onp.shape[1:]):
            return None
        _inner, cst, ist, isp, start = box
        row = a.isz * math.prod(inner[1:])
        nd = a.inner_nb - CRC_BYTES
        flat = onp.reshape(-1).view(np.uint8)
        out = {}
        for off, p, loc in spans:
            tst = [c0 + t * k for c0, t, k in zip(cst, loc, inner)]
            if all(t >= x for x, t in zip(ist, tst)) and all(t + k <= y for y, t, k in zip(isp, tst, inner)):
                at = (tst[0] - start[0]) * row
                out[p] = (off, loc, memoryview(flat[at:at + nd]))
        return out or None

    def _read_direct(self, a, key, src, size, direct, words, bad) -> int:
        """Read each chunk of ``direct`` (``_direct_spans``) straight into its run of the output and its
        crc32c word beside it, in one ``preadv`` each, then check it: no scratch buffer and no copy
        (column-block boxes read 2.50 GB/s on one thread against 2.13 through the scratch buffer).
        Returns the bytes read."""
        tail = memoryview(bytearray(CRC_BYTES * len(direct)))
        got = 0
        for i, (p, (off, loc, run)) in enumerate(sorted(direct.items(), key=lambda kv: kv[1][0])):
            word = tail[i * CRC_BYTES:(i + 1) * CRC_BYTES]
            n, fsize = src.read_vec(off, [run, word])
            if (fsize is not None and fsize != size) or n != a.inner_nb:
                raise self._size_err(a, key, fsize, size, "shard")
            got += n
            stored = bytes(word)
            words[p] = stored
            c, s = crc32c.crc32c(run), int.from_bytes(stored, "little")
            if c != s:
                bad[loc] = (c, s)
        with self._slock:
            self.chunks_direct += len(direct)
        return got

    def _read_bands(self, a, key, src, size, group, box, onp, words, bad):
        """Read a run of inner chunks too large to batch whole (``group``: ``(offset, index position,
        local index)``, side by side along the last dim) a band of their first dim at a time, every chunk's
        band in one scratch buffer of about ``STREAM_BYTES``, and copy each band's part of the box out
        while it is cached: the output then fills whole rows in order, where one chunk at a time would
        write a narrow column of rows a chunk's size apart (column-block inner chunks read whole, e.g.
        an FSDP shard of an embedding loaded into any layout, copied at ~0.6x the speed). Each chunk's
        crc32c is carried from band to band and checked, as in ``_read_tiles``, once its last band
        (with the stored word) is read; the box is written before (a mismatch raises in the caller).
        Returns the bytes read."""
        _inner, cst, ist, isp, start = box
        nd = a.inner_nb - CRC_BYTES
        rows = a.inner[0]
        row_nb = nd // rows
        band = max(1, STREAM_BYTES // (len(group) * row_nb))
        crcs = [0] * len(group)
        got = 0
        advise = [(off, off + a.inner_nb) for off, _p, _loc in group]  # the kernel is asked once, for all
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            step = (r1 - r0) * row_nb + (CRC_BYTES if r1 == rows else 0)  # the last band ends with the word
            ranges = [(off + r0 * row_nb, off + r0 * row_nb + step) for off, _p, _loc in group]
            buf = self._read_span(a, key, src, size, ranges, step * len(group), advise if r0 == 0 else ())
            got += len(buf)
            shape = (r1 - r0,) + tuple(a.inner[1:])
            run = _TileRun(a, buf, onp, start, shape, step)
            for j, (_off, _p, loc) in enumerate(group):
                crcs[j] = crc32c.crc32c(buf[j * step:j * step + (r1 - r0) * row_nb], crcs[j])
                tst, x0, x1 = _tile_part(cst, loc, a.inner, r0, shape, ist, isp)
                if x0[0] < x1[0]:  # a band outside the box has nothing to copy
                    run.add(j, tst, x0, x1)
            run.flush()
        for j, (_off, p, loc) in enumerate(group):
            stored = bytes(buf[(j + 1) * step - CRC_BYTES:(j + 1) * step])
            words[p] = stored
            s = int.from_bytes(stored, "little")
            if crcs[j] != s:
                bad[loc] = (crcs[j], s)
        return got

    def _read_span(self, a, key, src, size, ranges, n, advise=None):
        """The byte ranges of a shard file (open: ``src``) back to back in the thread's scratch buffer
        (``n`` bytes); ``advise`` as in ``Store.read_ranges``."""
        buf = self._scratch(n)[:n]
        got, fsize = src.read_ranges(ranges, buf, advise)
        if (fsize is not None and fsize != size) or got != n:
            raise self._size_err(a, key, fsize, size, "shard")
        return buf

    def _ranges_reader(self, a, key, rel):
        """The shard file ``rel`` open for its reads (a missing one named as the reads name it)."""
        try:
            return self._store.ranges_reader(rel)
        except (FileNotFoundError, NotADirectoryError):
            raise self._open_err(a, key) from None

    def _entries(self, ent, positions, a, data_end, key):
        """Every entry at ``positions`` checked at once; the first bad one is named as ``_entry`` names
        it (a DCP load checks the index of each of the hundreds of shard files it opens)."""
        nb = a.inner_nb
        sel = ent[list(positions)]
        if data_end >= nb and bool(((sel[:, 1] == nb) & (sel[:, 0] <= data_end - nb)).all()):
            return
        for pos in positions:
            self._entry(ent, pos, a, data_end, key)

    def _entry(self, ent, pos, a, data_end, key):
        try:
            return _shard.check_entry(ent, pos, a.inner_nb, data_end, f"inner chunk at index position {pos}")
        except _shard.ShardError as e:
            raise CorruptChunkError(f"{self._where(a, key, 'shard')}: {e}") from None

    def close(self):
        for name in ("_pool", "_ahead_pool"):
            pool = getattr(self, name)
            if pool is not None:
                pool.shutdown()
                setattr(self, name, None)
        self._ahead.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return f"<ucp.Checkpoint {self.path!r}: {len(self._params)} params>"


class _TileRun:
    """Copies the inner chunks of one read batch into the output, one numpy copy per run of
    chunks that lie side by side along the last dim, each wholly inside the box there, and next to
    each other in the buffer (column blocks of the same rows: the default layout's inner chunks).
    The run is viewed in place as ``(m, *inner)`` with the buffer's stride (the crc32c words in
    between are skipped) and the box part as ``(..., m, k)``: no Python step per chunk beyond
    ``add``. Any other chunk is copied on its own."""

    __slots__ = ("a", "buf", "onp", "start", "shape", "step", "first", "tst", "x0", "x1", "m")

    def __init__(self, a, buf, onp, start, shape, step):
        """Chunk ``j`` of the batch has ``shape`` (an inner chunk, or a band of one) at ``j * step`` of ``buf``."""
        self.a, self.buf, self.onp, self.start, self.shape, self.step = a, buf, onp, start, shape, step
        self.m = 0

    def add(self, j, tst, x0, x1):
        k = self.shape[-1]
        whole = x0[-1] == tst[-1] and x1[-1] == tst[-1] + k
        if self.m and whole and j == self.first + self.m and tst[:-1] == self.tst[:-1] \
                and tst[-1] == self.tst[-1] + self.m * k and x0[:-1] == self.x0[:-1] and x1[:-1] == self.x1[:-1]:
            self.x1 = x1
            self.m += 1
            return
        self.flush()
        self.first, self.tst, self.x0, self.x1, self.m = j, tst, x0, x1, 1
        if not whole:
            self.flush()

    def flush(self):
        m = self.m
        if not m:
            return
        self.m = 0
        a, tst, x0, x1 = self.a, self.tst, self.x0, self.x1
        inner, isz = self.shape, a.isz
        cstr = tuple(isz * math.prod(inner[d + 1:]) for d in range(len(inner)))
        src = np.ndarray((m,) + tuple(inner), dtype=a.np, buffer=self.buf, offset=self.first * self.step,
                         strides=(self.step,) + cstr)
        lead = tuple(slice(p - t, q - t) for p, q, t in zip(x0[:-1], x1[:-1], tst[:-1]))
        src = src[(slice(None),) + lead + (slice(x0[-1] - tst[-1], x1[-1] - tst[-1]) if m == 1 else slice(None),)]
        dst = self.onp[box_slices(x0, x1, self.start)]
        if m > 1:
            k = inner[-1]
            dst = np.lib.stride_tricks.as_strided(dst, dst.shape[:-1] + (m, k),
                                                  dst.strides[:-1] + (k * dst.strides[-1], dst.strides[-1]),
                                                  writeable=True)
            nd = len(inner)
            src = src.transpose(tuple(range(1, nd)) + (0, nd))   # np.moveaxis(src, 0, -2), without its checks
        else:
            src = src[0]
        dst[...] = src


def _side_by_side(spans):
    """``spans`` (ascending offsets) cut where the local index changes other than in its last dim: each
    group is a run of chunks that lie side by side along the last dim (C order keeps them adjacent)."""
    group = []
    for span in spans:
        if group and span[2][:-1] != group[-1][2][:-1]:
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def _batches(spans, inner_nb, limit):
    """``(in bands?, spans)``: the runs of side-by-side chunks (``_side_by_side``) batched whole up to
    ``limit`` bytes a batch, and each run larger than that alone, to be read in bands (``_read_bands``):
    a run read a part at a time would write each output row in as many pieces."""
    batch = []
    for group in _side_by_side(spans):
        if len(group) * inner_nb > limit:
            if batch:
                yield False, batch
                batch = []
            yield True, group
            continue
        if (len(batch) + len(group)) * inner_nb > limit:
            yield False, batch
            batch = []
        batch += group
    if batch:
        yield False, batch


def _tile_part(cst, loc, inner, r0, shape, ist, isp):
    """Where the part ``shape`` of inner chunk ``loc`` starting at its row ``r0`` lies in the array
    (``tst``), and its intersection ``[x0, x1)`` with the box ``[ist, isp)`` (empty where x0 >= x1)."""
    tst = [c0 + t * k for c0, t, k in zip(cst, loc, inner)]
    tst[0] += r0
    return (tst, [max(x, t) for x, t in zip(ist, tst)],
            [min(y, t + k) for y, t, k in zip(isp, tst, shape)])


class _LookAhead:
    """The look-ahead of one read: its files in read order, handed to the pool while less than
    ``LOOK_AHEAD_BYTES`` of the data they need is ahead of the read (at least two files). Each file
    waiting in the queue is marked in ``ck._ahead``; a read that takes the mark first
    (``Checkpoint._take_ahead``) has the file skipped. ``close`` when the read is done."""

    def __init__(self, ck, todo):
        self.ck, self.todo, self.lock = ck, collections.deque(todo), threading.Lock()
        self.ahead_bytes = self.ahead_files = 0
        with ck._alock:
            ck._ahead.update((rel, self) for rel, _ in todo)

    def fill(self):
        with self.lock:
            while self.todo and (self.ahead_files < 2 or self.ahead_bytes < LOOK_AHEAD_BYTES):
                rel, (a, sidx, start, stop) = self.todo.popleft()
                with self.ck._alock:
                    if self.ck._ahead.get(rel) is not self:  # its read came first
                        continue
                    n = math.prod(y - x for x, y in zip(*a.grid.overlap(sidx, start, stop))) * a.isz
                    self.ahead_bytes += n
                    self.ahead_files += 1
                    self.ck._ahead[rel] = _Ahead(self, n, self.ck._ahead_pool.submit(
                        self.ck._fetch, a, sidx, rel, start, stop))

    def close(self):
        """The read is over (done or failed): nothing more is handed out, and the work no read took
        (files of a read that failed part way) is dropped, not left for a later read to count."""
        with self.lock, self.ck._alock:
            self.todo.clear()
            for rel in [r for r, v in self.ck._ahead.items() if v is self or getattr(v, "owner", None) is self]:
                del self.ck._ahead[rel]

    def done(self, n):
        with self.lock:
            self.ahead_bytes -= n
            self.ahead_files -= 1
        self.fill()


@dataclass
class _Ahead:
    """The look-ahead's work on one file; ``wait`` is called by the read of that file."""
    owner: _LookAhead
    nbytes: int
    future: object

    def wait(self) -> int:
        got = self.future.result()
        self.owner.done(self.nbytes)
        return got


PREFETCH = 8  # plain chunks read ahead
LOOK_AHEAD_THREADS = 8  # threads fetching shard indexes ahead of the reads (waiting on the disk, not the CPU)
LOOK_AHEAD_BYTES = 64 << 20  # data of shard files asked for ahead of a read
PROBE_BYTES = 4096  # the tail of the first shard file of a read looked for in the page cache
# Shards are read a batch of inner chunks at a time into a per-thread scratch buffer of about this
# size, checked and copied out while still in the CPU cache. Before: the whole shard into a pooled
# buffer (one read, but the crc and copy passes then came from memory, not cache). 1 MiB (an L2's
# worth) cost more in Python steps per batch or band (an open, a fadvise, a preadv per chunk band,
# the tile arithmetic) than it saved: a warm read into a preallocated tensor of the default layout
# (32 MiB shards of 128 x 512 fp32 inner chunks, 4 workers, 2-core VM) took 0.12-0.15 s of CPU per
# 320 MiB at 4 MiB, 0.13-0.16 at 2, 0.16 at 8, 0.18-0.20 at 1, against 0.16-0.18 for the whole-shard
# read (cf900bf), same runs.
STREAM_BYTES = 4 << 20
_HUGE = 1 << 20
SMALL_BYTES = 1 << 20  # one-chunk arrays up to this size are read by ``Checkpoint._read_small``
BIG_ALLOC = 16 << 20  # files at least this large are stat'ed before their buffer is allocated


@functools.lru_cache(maxsize=1024)
def _geometry(dtype, shape, chunks, inner):
    """What every read of an array of this geometry needs, computed once per geometry (layers repeat
    theirs; a checkpoint of thousands of small arrays builds thousands of ``_Array``): numpy dtype,
    itemsize, chunk bytes, inner chunk file bytes and shard index bytes (sharded arrays), torch dtype,
    array bytes, and the chunk key of a small one-chunk array (``_read_small``), else None."""
    isz = dtypes.itemsize(dtype)
    inner_nb = index_nb = None
    if inner is not None:
        inner_nb = math.prod(inner) * isz + CRC_BYTES
        index_nb = _shard.index_nbytes(chunks, inner)
    nbytes = math.prod(shape) * isz
    small = inner is None and chunks == shape and 0 < nbytes <= SMALL_BYTES
    return (_numpy_dtype(dtype), isz, math.prod(chunks) * isz, inner_nb, index_nb, dtypes.torch_dtype(dtype),
            nbytes, chunk_key((0,) * len(shape)) if small else None)


@functools.lru_cache(maxsize=4096)
def _present_positions(shape, chunks, inner, sidx) -> tuple:
    """``shard.present_positions``, once per shard geometry: a DCP load opens a new ``Checkpoint``,
    whose first read of each shard file checks the index positions of its present inner chunks."""
    return tuple(_shard.present_positions(shape, chunks, inner, sidx))


@functools.lru_cache(maxsize=1024)
def _inner_grid(chunks, inner) -> ChunkGrid:
    """The inner chunk grid of a shard (shard coordinates), one per geometry: a DCP load asks for it
    once per shard file it reads, hundreds of times a load."""
    return ChunkGrid(chunks, inner)


@functools.lru_cache(maxsize=4096)
def _present_extent(shape, chunks, inner, sidx):
    """How many inner chunks of shard ``sidx`` intersect the array, per dim (``shard.present``), once
    per shard."""
    return _shard.present(shape, chunks, inner, sidx)[1]


@functools.lru_cache(maxsize=None)
def _numpy_dtype(name):
    """The numpy storage dtype of a logical dtype name (one per name: arrays are opened by the thousand)."""
    return dtypes.numpy_storage_dtype(name)


def _empty(shape, dtype, isz):
    """Output buffer; large ones come from numpy, whose allocator asks for transparent huge pages
    (first touch ~2.5x faster than torch.empty on the VMs measured)."""
    n = math.prod(shape)
    if n * isz < _HUGE:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(n * isz, dtype=np.uint8)).view(dtype).reshape(shape)


def _no_tensor(_p):
    raise UcpError("unexpected tensor reference in per-parameter metadata")


def open_checkpoint(path, storage_options=None, workers=4) -> Checkpoint:
    """Open a committed checkpoint read-only (local path or fsspec URL); one manifest read."""
    return Checkpoint(path, storage_options=storage_options, workers=workers)
