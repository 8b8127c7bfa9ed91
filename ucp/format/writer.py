"""Writing universal checkpoints: thread-safe boxes in any order, manifest last, one writer per root."""
from __future__ import annotations

import datetime
import threading
from concurrent.futures import ThreadPoolExecutor

import crc32c
import numpy as np

from ucp import __version__
from ucp.errors import DestinationNotEmptyError, IncompleteCheckpointError, UcpError
from ucp.format import dtypes, jsonmeta, layout, manifest, names
from ucp.format.array_writer import FSYNC_MIN, ArrayWriter
from ucp.format.journal import PARTS, RunJournal, journal_rel
from ucp.format.lock import LOCK, WriterLock, WriterLockedError, describe
from ucp.format.manifest import Manifest, ManifestParam
from ucp.format.store import MANIFEST, make_store

DEFAULT_WORKERS = 4

PARAM_META_KEYS = ("shape", "dtype", "fragmentation", "parts", "padding", "tied_to", "frozen", "rule", "scalars")


def writer_version() -> str:
    """``ucp <version>``: the ``writer`` field of manifests and part records."""
    return f"ucp {__version__}"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


#: the files a writer makes at the root (FORMAT.md §2); the rest of a checkpoint is directories
ROOT_FILES = frozenset({MANIFEST, MANIFEST + ".tmp", "zarr.json", LOCK})


def clear_to_overwrite(store, path, keep=()) -> None:
    """Clear a root for ``overwrite``, which replaces a ucp checkpoint, or what an interrupted ucp
    write left, and nothing else. DCP's ``FileSystemWriter(overwrite=True)`` replaces only the
    files it writes, and users carry the flag over: a project directory, or stock DCP files, handed
    to a ucp writer by mistake is refused, not wiped. ``keep``: top-level names the writer holds
    (its lock), neither evidence nor cleared."""
    if refuse_foreign_root(store, path, keep, "overwrite=True replaces only a ucp checkpoint or",
                           what="is not a ucp checkpoint"):
        store.clear(keep=keep)


def refuse_foreign_root(store, path, keep, flag: str, what: str = "holds no interrupted ucp write") -> bool:
    """Refuse a root holding anything but a ucp checkpoint or what an interrupted ucp write left,
    naming what it holds: ``overwrite`` would delete it, ``resume`` would write beside it. ``flag``
    says what the caller's flag takes ("overwrite=True replaces only ... or"), ``what`` what the
    root is not. False: the root is empty."""
    entries = store.top_level(ignore=keep)
    if not entries:
        return False

    def some(names):
        names = sorted(names)
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    if not (MANIFEST in entries or LOCK in entries or entries.get("_ucp")):
        raise UcpError(f"{path} {what} (it holds {some(entries)}); {flag} what an interrupted ucp write "
                       "left: empty it yourself or choose another directory")
    foreign = [n for n, is_dir in entries.items() if not is_dir and n not in ROOT_FILES]
    if foreign:
        raise UcpError(f"{path} holds files that a ucp checkpoint does not have at its root ({some(foreign)}); "
                       f"{flag} what an interrupted ucp write left: move them first")
    return True


def _no_tensor(_t):
    raise UcpError("tensors are not allowed in per-parameter metadata; store them as a state array")


_META_TYPES = {"shape": list, "dtype": str, "fragmentation": dict, "parts": list, "padding": dict,
               "tied_to": str, "frozen": bool, "rule": str, "scalars": dict}


def _check_meta(name, meta):
    for k, v in meta.items():
        if not isinstance(k, str):
            raise UcpError(f"param {name!r}: metadata keys must be strings, got {k!r}")
        want = _META_TYPES.get(k)
        if want is list and isinstance(v, tuple):
            continue
        if want is not None and not isinstance(v, want):
            raise UcpError(f"param {name!r}: meta[{k!r}] must be a {want.__name__}, got {type(v).__name__}")
    if "dtype" in meta and meta["dtype"] not in dtypes.SUPPORTED:
        raise UcpError(f"param {name!r}: meta['dtype'] {meta['dtype']!r} is not a ucp dtype")
    for part in meta.get("parts") or ():
        if not (isinstance(part, dict) and {"name", "dim", "start", "stop"} <= set(part)):
            raise UcpError(f"param {name!r}: each of meta['parts'] needs name, dim, start, stop; got {part!r}")
    pad = meta.get("padding")
    if pad is not None and not {"dim", "size"} <= set(pad):
        raise UcpError(f"param {name!r}: meta['padding'] needs dim and size; got {pad!r}")


class ParamEntry:
    """A declared parameter: its name, group path, encoded metadata (§6.1) and arrays by state."""

    __slots__ = ("name", "enc", "meta", "arrays")

    def __init__(self, name, enc):
        self.name, self.enc, self.meta, self.arrays = name, enc, {}, {}


class CheckpointWriter:
    """Writes one checkpoint (see ``create_checkpoint``). Subclasses change what ``commit`` writes and which
    lock and journal they take (``ucp.format.parts.PartWriter``, one of several writers)."""

    adopt_mode = "scan"  # how a resume adopts an interrupted run's chunk files (see ArrayWriter)

    def __init__(self, path, overwrite=False, storage_options=None, chunk_bytes=None, durable=True,
                 workers=DEFAULT_WORKERS, fsync_each=None, resume=False, shard_bytes=None, inner_bytes=None,
                 sharding=None, fingerprint=None, coordinator=False):
        self.path = path
        self.storage_options = storage_options
        self.store = make_store(path, storage_options)
        self.resume = bool(resume)
        self.coordinator = bool(coordinator)
        self._set_layout(chunk_bytes, shard_bytes, inner_bytes, sharding)
        self.durable = durable
        self._fsync_each = fsync_each
        self._workers = int(workers or 0)
        self._pool = None
        self._lock = threading.Lock()
        self.params: dict[str, ParamEntry] = {}
        self._metadata = {}
        self._meta_arrays: dict[str, ArrayWriter] = {}
        self._meta_n = 0
        self.closed = False
        self.committed = False
        if (self.store.describe_root() or "").startswith("it is a file"):
            raise UcpError(f"{path} exists and is a file, not a checkpoint directory")
        self.writer_lock = WriterLock(self.store, self.lock_rel(), path, self)
        self.writer_lock.acquire()
        try:
            self.prepare_root(overwrite)
            self.journal = RunJournal(self.store, self.journal_rel(), path)
            if self.resume:
                self.journal.resume(fingerprint)
            elif not self.coordinator:
                self.journal.start(fingerprint)
        except BaseException:  # the half-built writer never reaches the caller: only its lock to release
            self.writer_lock.release()
            raise

    def _set_layout(self, chunk_bytes, shard_bytes, inner_bytes, sharding):
        self.chunk_bytes = int(chunk_bytes or layout.DEFAULT_CHUNK_BYTES)
        # sharding: default on, unless only the plain chunk size was asked for (chunk_bytes=)
        if sharding is None:
            sharding = chunk_bytes is None or shard_bytes is not None or inner_bytes is not None
        self.sharding = bool(sharding)
        self.shard_bytes = int(shard_bytes or layout.DEFAULT_SHARD_BYTES)
        self.inner_bytes = int(inner_bytes or layout.DEFAULT_INNER_BYTES)

    # -- hooks of the root's life cycle ---------------------------------------------------------
    def lock_rel(self) -> str:
        return LOCK

    def journal_rel(self) -> str:
        return journal_rel()

    def prepare_root(self, overwrite) -> None:
        """Refuse a committed or non-empty root (unless ``overwrite``, which clears it but the lock)."""
        if self.coordinator or self.resume:
            if self.resume and overwrite:
                raise UcpError("resume=True and overwrite=True exclude each other")
            if self.store.exists(MANIFEST):
                raise UcpError(f"{self.path} is already a committed ucp checkpoint"
                               + (": nothing to resume" if self.resume else ""))
            if self.resume:
                refuse_foreign_root(self.store, self.path, (LOCK,), "resume=True continues only")
                self._refuse_a_live_job()
            return
        if not self.store.is_empty(ignore=(LOCK,)):
            if not overwrite:
                raise DestinationNotEmptyError(f"{self.path} is not empty; pass overwrite=True to replace it")
            self._refuse_a_live_job()
            clear_to_overwrite(self.store, self.path, keep=(LOCK,))
        self.store.sole_writer()  # locked and empty: every directory under the root is ours to make

    def _refuse_a_live_job(self) -> None:
        """A job's writers lock only their own parts (§13), not the root: one writer resuming or
        clearing the root must find their locks and refuse a live one (both wrote the same chunk
        files at once)."""
        if not self.store.exists("_ucp"):
            return
        for rel in self.store.list_files():
            if not (rel.startswith(PARTS + "/") and rel.endswith(".lock")):
                continue
            probe = WriterLock(self.store, rel, self.path, self)
            holder = probe.holder()
            probe.release()
            if holder is not None and not probe.stale(holder):
                raise WriterLockedError(f"{self.path}: a job's process is still writing into it: {describe(holder)} "
                                        f"({self.store.url}/{rel}); wait for the job to end")

    # -- declaring ---------------------------------------------------------------------------
    def add_param(self, name, meta=None) -> None:
        """Declare parameter ``name`` (saved order = first declaration); ``meta`` is merged in (§6.1)."""
        self._add_param(name, meta)

    def _add_param(self, name, meta=None) -> ParamEntry:
        with self._lock:
            self.check_open()
            p = self.params.get(name)
            if p is None:
                p = self.params[name] = ParamEntry(name, names.encode_param(name))
            if meta:
                if not isinstance(meta, dict):
                    raise UcpError(f"param {name!r}: meta must be a dict")
                meta = dict(meta)
                if dtypes.is_dtype(meta.get("dtype")):
                    meta["dtype"] = dtypes.dtype_name(meta["dtype"])
                _check_meta(name, meta)
                p.meta.update(jsonmeta.encode(dict(meta), _no_tensor, f"param {name!r} meta"))
            return p

    def set_param_meta_json(self, name, meta: dict) -> None:
        """Set parameter ``name``'s metadata as already-encoded JSON (another writer's record of it)."""
        self._add_param(name).meta = dict(meta)

    def _layout(self, shape, itemsize):
        """(outer chunks, inner chunks or None) of the default layout."""
        if self.sharding:
            sh = layout.default_sharding(shape, itemsize, self.shard_bytes, self.inner_bytes)
            if sh is not None:
                return sh
            # default_sharding is None only for an empty, 0-d or small array (<= inner_bytes): one chunk
            return layout.default_chunks(shape, itemsize, max(self.inner_bytes, 1)), None
        return layout.default_chunks(shape, itemsize, self.chunk_bytes), None

    def _resolve_chunks(self, where, shape, isz, chunks, shards):
        if shards is not None:
            if chunks is None:
                d = layout.default_sharding(shape, isz, inner_bytes=self.inner_bytes)
                if d is None:
                    raise UcpError(f"{where}: pass chunks= (inner chunks) with shards=")
                chunks = d[1]
            return layout.check_shards(shape, shards, chunks)
        if chunks is not None:
            return layout.check_chunks(shape, chunks), None
        return self._layout(shape, isz)

    def add_array(self, name, state, shape, dtype, chunks=None, shards=None) -> ArrayWriter:
        """Declare an array. ``chunks`` alone: plain chunks of that shape. ``shards`` (with ``chunks``
        as the inner chunk shape, default: the default inner chunks): sharded. Neither: the default."""
        names.check_state_name(state)
        dn = dtypes.dtype_name(dtype)
        asked = chunks if shards is None else (shards, chunks)
        shape = tuple(int(s) for s in shape)
        where = f"param {name!r} state {state!r}"
        if any(s < 0 for s in shape):
            raise UcpError(f"{where}: negative extent in shape {shape}")
        chunks, inner = self._resolve_chunks(where, shape, dtypes.itemsize(dn), chunks, shards)
        p = self._add_param(name)
        with self._lock:
            a = p.arrays.get(state)
            if a is not None:
                if (a.shape, a.dtype_name) == (shape, dn) and (asked is None or (a.chunks, a.inner) == (chunks, inner)):
                    return a
                raise UcpError(f"{where} was already declared with shape {a.shape}, dtype {a.dtype_name}, "
                               f"chunks {a.chunks}" + (f", inner chunks {a.inner}" if a.inner else ""))
            a = p.arrays[state] = self._new_array(name, p.enc, state, shape, dn, chunks, inner)
            return a

    def _new_array(self, name, enc, state, shape, dn, chunks, inner, rel=None):
        a = ArrayWriter(self, name, enc, state, shape, dn, chunks, rel=rel, inner=inner)
        if self.coordinator:
            return a
        adopt = self.journal.declare(a.rel, a.layout())  # refuses a changed layout on resume
        if self.resume and adopt:
            a = ArrayWriter(self, name, enc, state, shape, dn, chunks, rel=rel, inner=inner, adopt=self.adopt_mode)
        return a

    def declare_array(self, name, state, record) -> ArrayWriter:
        """Declare an array exactly as a ``ManifestArray`` record describes it (several writers' commit)."""
        p = self._add_param(name)
        a = p.arrays[state] = self._new_array(name, p.enc, state, record.shape, record.dtype, record.chunks,
                                              record.inner_chunks, rel=record.path)
        return a

    def write_tensor(self, name, state, tensor, chunks=None, shards=None) -> ArrayWriter:
        """Declare ``name``/``state`` with the tensor's shape and dtype and write it whole."""
        a = self.add_array(name, state, tuple(tensor.shape), tensor.dtype, chunks, shards)
        a.write((0,) * len(tensor.shape), tensor)
        return a

    def set_metadata(self, obj) -> None:
        """Non-tensor state (JSON-like; tensors inside are stored as small arrays, snapshot now)."""
        self.check_open()
        new = {}

        def add_tensor(t):
            with self._lock:
                n = self._meta_n
                self._meta_n += 1
            rel = f"_ucp/meta/{n}"
            if not isinstance(t, np.ndarray):
                t = t.detach().cpu()
            name = dtypes.dtype_name(t.dtype)
            ch, inner = self._layout(tuple(t.shape), dtypes.itemsize(name))
            a = ArrayWriter(self, "_ucp", "_ucp", str(n), tuple(t.shape), name, ch, rel=rel, inner=inner)
            a.write((0,) * len(t.shape), t)
            new[rel] = a
            return rel

        enc = jsonmeta.encode(obj, add_tensor)
        with self._lock:
            self._metadata = enc
            self._meta_arrays = new

    @property
    def has_meta_arrays(self) -> bool:
        return bool(self._meta_arrays)

    # -- I/O ---------------------------------------------------------------------------------
    def fsync_wanted(self, size) -> bool:
        """Whether a chunk file of ``size`` bytes is fsync'ed by the thread that writes it: a large
        file, to flush its page-cache pages while others are written. The syncfs at commit makes
        every file durable either way, and a file the store writes straight to the disk
        (``Store.writes_direct``) has no pages to flush: an fsync would only wait for a journal
        commit (about 4 ms a file measured, 30% of the time to write 2 GiB in 20 MB files)."""
        if not self.durable:
            return False
        if self._fsync_each is not None:
            return self._fsync_each
        return size > FSYNC_MIN and not self.store.writes_direct(size)

    def run_jobs(self, arr, jobs) -> None:
        """Write the chunk jobs ``(key, data)`` of ``arr``, in parallel when there are several."""
        if not jobs:
            return
        if len(jobs) == 1 or self._workers <= 1:
            for key, bufs in jobs:
                arr.flush(key, bufs)
            return
        futs = [self._get_pool().submit(arr.flush, key, bufs) for key, bufs in jobs]
        err = None
        for f in futs:
            try:
                f.result()
            except BaseException as e:  # wait for all, then raise the first
                err = err or e
        if err is not None:
            raise err

    def _get_pool(self):
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="ucp-write")
            return self._pool

    def check_open(self):
        if self.closed:
            raise UcpError(f"{self.path}: the checkpoint writer is closed (committed or aborted)")

    def _write_docs(self, docs):
        # build_manifest lists parents before children; concurrent writes go one depth at a time so
        # that directories exist before their children are created
        if self._workers > 1 and len(docs) > 8 and self.store.parallel_reads:
            pool = self._get_pool()
            for depth in sorted({rel.count("/") for rel, _ in docs}):
                batch = [d for d in docs if d[0].count("/") == depth]
                list(pool.map(lambda d: self.store.put(d[0], [d[1]]), batch))
        else:
            for rel, data in docs:
                self.store.put(rel, [data])

    def doc_on_disk(self, rel, data: bytes) -> bool:
        """Whether the document ``rel`` is already on stable storage with exactly these bytes (written
        by another writer, which recorded it); such documents are not written again."""
        return False

    def unwritten(self) -> list[str]:
        """Every region not written yet, as lines naming parameter, state and chunk."""
        problems = []
        for p in self.params.values():
            for a in p.arrays.values():
                problems += [f"param {p.name!r} state {a.state!r}: {m}" for m in a.missing()]
        for a in self._meta_arrays.values():
            problems += [f"metadata tensor {a.rel}: {m}" for m in a.missing()]
        return problems

    def build_manifest(self) -> tuple[Manifest, list]:
        """The manifest and the ``zarr.json`` documents ``[(rel, bytes)]`` of everything written that
        are still to write (not ``doc_on_disk``)."""
        files, docs = {}, []

        def put_doc(rel, doc):
            data = doc if isinstance(doc, bytes) else layout.doc_bytes(doc)
            files[rel] = (len(data), crc32c.crc32c(data))
            if not self.doc_on_disk(rel, data):
                docs.append((rel, data))

        put_doc("zarr.json", layout.group_doc({"ucp": {"format_version": manifest.FORMAT_VERSION,
                                                       "writer": writer_version(), "manifest": MANIFEST,
                                                       "metadata": self._metadata}}))
        if self._meta_arrays:
            put_doc("_ucp/zarr.json", layout.group_doc())
            put_doc("_ucp/meta/zarr.json", layout.group_doc())
        meta_rec = {}
        for rel, a in self._meta_arrays.items():
            put_doc(f"{rel}/zarr.json", a.doc_bytes())
            meta_rec[rel] = a.record()
        params = []
        for p in self.params.values():
            meta = dict(p.meta)
            pa = p.arrays.get("param")
            if pa is not None:
                meta.setdefault("shape", list(pa.shape))
                meta.setdefault("dtype", pa.dtype_name)
            put_doc(f"{p.enc}/zarr.json", layout.group_doc({"ucp": {"name": p.name, **meta}}))
            for a in p.arrays.values():
                put_doc(f"{a.rel}/zarr.json", a.doc_bytes())
            params.append(ManifestParam(p.name, p.enc, meta, {s: a.record() for s, a in p.arrays.items()}))
        return Manifest(params, self._metadata, meta_rec, files, writer_version(), now()), docs

    def commit(self) -> None:
        """Check that every chunk was written, write the ``zarr.json`` documents and, last, the manifest."""
        self.check_open()
        problems = self.unwritten()
        if problems:
            more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
            raise IncompleteCheckpointError(
                f"{self.path}: cannot commit, {len(problems)} chunk(s) unwritten:\n  " + "\n  ".join(problems[:20]) + more)
        with manifest.gc_paused():
            man, docs = self.build_manifest()
            body = manifest.dump(man.to_json())
        self._write_docs(docs)
        if self.durable:
            self.store.sync()
        self.writer_lock.check()  # the writer-id marker: still ours, no other writer wrote in between
        self.store.put_atomic(MANIFEST, body, fsync=self.durable)
        self.committed = True
        self.journal.remove()
        if not self.coordinator:    # a job's parts, left when one writer finished its interrupted write
            self.store.delete_tree(PARTS)
        self._shutdown()

    def abort(self) -> None:
        """Stop writing; no manifest is written, so readers refuse the partial directory. The files and
        the run journal stay for a later ``resume=True``."""
        self._shutdown()

    def _shutdown(self):
        self.closed = True
        journal = getattr(self, "journal", None)  # absent when the constructor failed before it
        if journal is not None:
            journal.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.writer_lock.release()

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.commit()
        else:
            self.abort()
        return False
