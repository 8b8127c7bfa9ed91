"""Writing one array: boxes in any order from any thread, each chunk (or shard) written once when whole.

A box that covers a chunk's whole valid region is written straight away; a box covering part of one is
copied into that chunk's staging buffer, which is written when the boxes staged in it fill it. The
owner (``CheckpointWriter``) runs the file writes (``run_jobs``) and owns the store.
"""
from __future__ import annotations

import functools
import math
import threading

import crc32c
import numpy as np

from ucp.errors import OverlapError, UcpError
from ucp.format import dtypes, layout, shard as shards
from ucp.format.layout import CRC_BYTES, chunk_key
from ucp.format.manifest import ManifestArray, key_index
from ucp.plan.boxes import flat_to_boxes
from ucp.plan.grid import box_slices, chunk_grid, intersect, volume

# Chunks above this size are fsync'ed by the thread that wrote them (overlaps the flush with other
# writes: 0.87x -> 0.9x of numpy tofile+fsync measured); smaller files rely on one syncfs at commit.
FSYNC_MIN = 1 << 20


def fmt_box(start, stop) -> str:
    return "[" + ", ".join(f"{a}:{b}" for a, b in zip(start, stop)) + "]"


class _Staging:
    """A chunk being filled by several boxes: its buffer, the boxes staged so far, elements filled."""

    __slots__ = ("buf", "boxes", "filled")

    def __init__(self, chunks, dtype):
        self.buf = np.zeros(chunks, dtype=dtype)
        self.boxes = []
        self.filled = 0


class ArrayWriter:
    """One (parameter, state) array. ``write(offset, tensor)`` may be called from any thread.

    ``adopt``: how chunk files of an interrupted earlier run are reused: ``None`` (never), ``"scan"``
    (check them all now, single writer) or ``"lazy"`` (check a chunk when this writer writes it whole
    again: one of several writers, whose other chunks belong to other ranks)."""

    def __init__(self, owner, name, enc, state, shape, dtype_name, chunks, rel=None, inner=None, adopt=None):
        self._owner = owner
        self.name, self.state = name, state
        self.rel = rel or f"{enc}/{state}"
        self.shape = tuple(shape)
        self.dtype_name = dtype_name
        self.chunks = tuple(chunks)  # the outer grid: plain chunks, or shards when ``inner`` is set
        self.inner = tuple(inner) if inner is not None else None
        self.grid = chunk_grid(self.shape, self.chunks)  # shared by the arrays of this geometry
        self.nchunks = self.grid.nchunks
        self.storage_np = dtypes.numpy_storage_dtype(dtype_name)
        self.itemsize = dtypes.itemsize(dtype_name)
        self._done: dict[str, tuple | None] = {}
        self._staged: dict[tuple, _Staging] = {}
        self._lock = threading.Lock()
        self._resumed: set[str] = set()
        self._lazy = adopt == "lazy"
        self._checked: set[str] = set()
        if adopt == "scan":
            self._scan_existing()

    @property
    def where(self):
        return f"param {self.name!r} state {self.state!r}"

    def layout(self) -> dict:
        """What a resume must find unchanged to adopt this array's chunk files."""
        return {"shape": list(self.shape), "dtype": self.dtype_name, "chunks": list(self.chunks),
                "inner_chunks": list(self.inner) if self.inner is not None else None}

    def _manifest_array(self, table) -> ManifestArray:
        return ManifestArray(self.rel, self.dtype_name, self.shape, self.chunks, table, self.inner)

    # -- resume ------------------------------------------------------------------------------
    def _check_file(self, idx):
        """The manifest record of a valid existing chunk/shard file at ``idx``, else None."""
        store = self._owner.store
        rel = f"{self.rel}/{chunk_key(idx)}"
        want = self._manifest_array({}).chunk_file_size(idx)
        if store.size(rel) != want:
            return None
        try:
            data = memoryview(store.get(rel))
        except (OSError, UcpError):
            return None
        if len(data) != want:
            return None
        if self.inner is not None:
            try:
                icrc, content = shards.check_shard(data, self.shape, self.chunks, self.inner, idx, self.itemsize)
            except shards.ShardError:
                return None
            return (want, icrc, content)
        crc = crc32c.crc32c(data[:-CRC_BYTES])
        return (want, crc) if crc == int.from_bytes(data[-CRC_BYTES:], "little") else None

    def _scan_existing(self):
        """Resume: adopt chunk files of the interrupted run whose size and crc32c check out."""
        for idx in self.grid.indices():
            rec = self._check_file(idx)
            if rec is not None:
                key = chunk_key(idx)
                self._done[key] = rec
                self._resumed.add(key)

    def _adopt(self, idx, key):
        """Lazy resume (several writers): check this chunk's file once, on this rank's first write to it."""
        with self._lock:
            if key in self._checked:
                return
            self._checked.add(key)
            if key in self._done or idx in self._staged:
                return
        rec = self._check_file(idx)
        if rec is not None:
            with self._lock:
                if key not in self._done and idx not in self._staged:
                    self._done[key] = rec
                    self._resumed.add(key)

    def adopt_records(self, table: dict) -> None:
        """Take chunk files another writer wrote and recorded (``{key: record}``) as written."""
        with self._lock:
            self._done.update({k: tuple(v) for k, v in table.items()})

    # -- writing -----------------------------------------------------------------------------
    @property
    def dtype(self):
        """The array's torch dtype (imports torch)."""
        return dtypes.torch_dtype(self.dtype_name)

    def write(self, offset, tensor) -> None:
        """Write ``tensor`` (a torch tensor, or a numpy array in the storage dtype: a bfloat16
        box is ``uint16``) as the box of this array starting at ``offset``."""
        if isinstance(tensor, np.ndarray):
            if tensor.dtype != self.storage_np:
                raise UcpError(f"{self.where}: array dtype {tensor.dtype} differs from the storage dtype "
                               f"{self.storage_np} of the array's {self.dtype_name} (ucp never casts implicitly)")
            return self.write_storage(offset, tensor)
        if not dtypes.is_torch_dtype(getattr(tensor, "dtype", None)):
            raise UcpError(f"{self.where}: write() needs a torch.Tensor or a numpy array, got {type(tensor).__name__}")
        if dtypes.dtype_name(tensor.dtype) != self.dtype_name:
            raise UcpError(f"{self.where}: tensor dtype {tensor.dtype} differs from the array's {self.dtype} "
                           "(ucp never casts implicitly)")
        self.write_storage(offset, dtypes.to_storage_numpy(tensor))

    def write_storage(self, offset, arr: np.ndarray) -> None:
        """Write a box given in the storage dtype (a numpy array, e.g. bytes staged by another writer)."""
        offset = tuple(int(o) for o in offset)
        if len(offset) != len(self.shape) or arr.ndim != len(self.shape):
            raise UcpError(f"{self.where}: box of rank {arr.ndim} at offset {offset} does not fit "
                           f"array shape {self.shape}")
        start, stop = offset, tuple(o + s for o, s in zip(offset, arr.shape))
        if any(a < 0 or b > n for a, b, n in zip(start, stop, self.shape)):
            raise UcpError(f"{self.where}: box {fmt_box(start, stop)} lies outside array shape {self.shape}")
        if any(b == a for a, b in zip(start, stop)):
            return
        self._owner.check_open()
        jobs = []
        try:
            for idx in self.grid.indices_for(start, stop):
                job = self._place(idx, start, stop, arr)
                if job is not None:
                    jobs.append(job)
        finally:  # chunks claimed before an error (e.g. an overlap further on) are still written
            self._owner.run_jobs(self, jobs)

    def write_flat(self, start: int, tensor) -> None:
        """Write a 1-D ``tensor`` as the C-order flat range [start, start + numel) (fragments of flat-partitioned state)."""
        if tensor.dim() != 1:
            raise UcpError(f"{self.where}: write_flat needs a 1-D tensor, got shape {tuple(tensor.shape)}")
        t = tensor.contiguous()
        a = int(start)
        n = math.prod(self.shape)
        if not 0 <= a <= a + t.numel() <= n:
            raise UcpError(f"{self.where}: flat range [{a}, {a + t.numel()}) outside an array of {n} elements "
                           f"(shape {self.shape})")
        off = 0
        for box in flat_to_boxes(a, a + t.numel(), self.shape):
            self.write(box.start, t[off:off + box.numel].view(box.shape))
            off += box.numel

    def _place(self, idx, start, stop, arr):
        """Claim chunk ``idx``'s share of the box: a job (key, data) when the chunk is now whole."""
        cst, csp = self.grid.chunk_box(idx)
        ist, isp = intersect(start, stop, cst, csp)
        src = arr[box_slices(ist, isp, start)]
        key = chunk_key(idx)
        whole = ist == cst and isp == csp
        # several writers: adopt only a chunk this rank covers whole (a partly covered chunk's file
        # may be one the coordinator assembled before it crashed, shared with other ranks)
        if self._lazy and whole and key not in self._checked:
            self._adopt(idx, key)
        if key in self._resumed:  # written by the interrupted run and checked: skip
            return None
        if whole:
            return self._claim_whole(idx, key, src, ist, isp)
        return self._stage(idx, key, src, ist, isp, cst, csp)

    def _claim_whole(self, idx, key, src, ist, isp):
        """``src``: the chunk's whole valid region."""
        with self._lock:
            if key in self._done or idx in self._staged:
                raise OverlapError(f"{self.where} chunk {key}: region {fmt_box(ist, isp)} was already written")
            self._done[key] = None
        if self.inner is not None:
            return key, src  # encoded by the thread that writes it (_flush)
        return key, self._chunk_buffers(src)

    def _stage(self, idx, key, src, ist, isp, cst, csp):
        with self._lock:
            if key in self._done:
                raise OverlapError(f"{self.where} chunk {key}: region {fmt_box(ist, isp)} overlaps a write "
                                   "that already completed this chunk")
            st = self._staged.get(idx)
            if st is None:
                shape = self.chunks if self.inner is None else self._padded(idx)
                st = self._staged[idx] = _Staging(shape, self.storage_np)
            for a, b in st.boxes:
                if all(x < y2 and x2 < y for x, y, x2, y2 in zip(ist, isp, a, b)):
                    raise OverlapError(f"{self.where} chunk {key}: region {fmt_box(ist, isp)} overlaps "
                                       f"the earlier write {fmt_box(a, b)}")
            st.boxes.append((ist, isp))
        st.buf[box_slices(ist, isp, cst)] = src
        with self._lock:
            st.filled += volume(ist, isp)
            if st.filled != volume(cst, csp):
                return None
            del self._staged[idx]
            self._done[key] = None
        return key, (st.buf if self.inner is not None else [st.buf])

    def _padded(self, idx):
        """Extent of a shard's present inner chunks: the valid region rounded up to whole inner chunks."""
        return tuple(-(-v // c) * c for v, c in zip(self.grid.valid_shape(idx), self.inner))

    def _encode_shard(self, key, arr):
        """(the file's bytes, manifest record, the store buffer holding them to give back)."""
        idx = key_index(key)
        pv = self._padded(idx)  # ``arr``: the valid region, padded or not (shards.encode pads)
        lim = tuple(p // c for p, c in zip(pv, self.inner))
        store = self._owner.store
        held = store.file_buffer(shards.file_size(self.shape, self.chunks, self.inner, idx, self.itemsize))
        try:
            data, size, icrc, content = shards.encode(arr, self.chunks, self.inner, lim, held)
        except BaseException:
            store.release_buffer(held)
            raise
        return [data[:size]], (size, icrc, content), (held,)

    def _chunk_buffers(self, src):
        """The buffers of a plain chunk file's data, ``src`` being the chunk's whole valid region."""
        ch = self.chunks
        valid_shape = src.shape
        if valid_shape == ch:
            return [src if src.flags.c_contiguous else np.ascontiguousarray(src)]
        # edge chunk: padded with the fill value (0) to the full chunk shape
        if valid_shape[1:] == ch[1:] and src.flags.c_contiguous:
            return [src, bytes((math.prod(ch) - src.size) * self.itemsize)]
        buf = np.zeros(ch, dtype=self.storage_np)
        buf[tuple(slice(0, n) for n in valid_shape)] = src
        return [buf]

    def flush(self, key, bufs):
        """Encode and write chunk ``key`` (called by the owner's ``run_jobs``, on any thread)."""
        try:
            held = ()
            if self.inner is not None:
                bufs, rec, held = self._encode_shard(key, bufs)
            else:
                crc, size = 0, CRC_BYTES
                for b in bufs:
                    mv = memoryview(b).cast("B")
                    crc = crc32c.crc32c(mv, crc)
                    size += len(mv)
                bufs, rec = [*bufs, crc.to_bytes(4, "little")], (size, crc)
            try:
                self._owner.store.put(f"{self.rel}/{key}", bufs, fsync=self._owner.fsync_wanted(rec[0]))
            finally:
                del bufs
                for h in held:
                    self._owner.store.release_buffer(h)
        except BaseException:
            with self._lock:
                self._done.pop(key, None)
            raise
        with self._lock:
            self._done[key] = rec

    # -- bookkeeping -------------------------------------------------------------------------
    def pending(self):
        """Boxes ``(start, stop)`` of the chunks still to write (all of them for a fresh array)."""
        with self._lock:
            done = {k for k, v in self._done.items() if v is not None}
        return [self.grid.chunk_box(idx) for idx in self.grid.indices() if chunk_key(idx) not in done]

    def missing(self):
        """Human-readable list of unwritten regions (empty when complete)."""
        out = []
        with self._lock:
            staged = dict(self._staged)
            done = {k for k, v in self._done.items() if v is not None}
        for idx in self.grid.indices():
            key = chunk_key(idx)
            if key in done:
                continue
            cst, csp = self.grid.chunk_box(idx)
            st = staged.get(idx)
            if st is None:
                out.append(f"chunk {key} region {fmt_box(cst, csp)} not written")
            else:
                out.append(f"chunk {key} region {fmt_box(cst, csp)} only partly written "
                           f"({st.filled} of {volume(cst, csp)} elements)")
        return out

    def completed(self) -> ManifestArray:
        """The chunks written so far, as a (possibly incomplete) manifest record."""
        with self._lock:
            table = {k: v for k, v in self._done.items() if v is not None}
        return self._manifest_array(dict(sorted(table.items())))

    def staged_pieces(self):
        """``[(chunk index, [(start, stop)], bytes)]`` of the partly written chunks: the staged boxes'
        data back to back in box order (what one of several writers hands to the coordinator)."""
        with self._lock:
            staged = dict(self._staged)
        out = []
        for idx in sorted(staged):
            st = staged[idx]
            cst = self.grid.chunk_start(idx)
            boxes = sorted(st.boxes)
            data = b"".join(np.ascontiguousarray(st.buf[box_slices(b0, b1, cst)]).tobytes() for b0, b1 in boxes)
            out.append((idx, boxes, data))
        return out

    def record(self) -> ManifestArray:
        """The complete manifest record (after every chunk is written)."""
        return self._manifest_array({chunk_key(idx): self._done[chunk_key(idx)] for idx in self.grid.indices()})

    def doc_bytes(self) -> bytes:
        """The bytes of the array's ``zarr.json`` document, shared by every array of the same layout (a parameter and its
        optimizer states: one JSON encoding instead of three, on the rank and again at commit)."""
        return _doc_bytes(self.shape, self.chunks, self.dtype_name, self.inner)


@functools.lru_cache(maxsize=1024)
def _doc_bytes(shape, chunks, dtype_name, inner) -> bytes:
    return layout.doc_bytes(layout.array_doc(shape, chunks, dtype_name, inner=inner))
