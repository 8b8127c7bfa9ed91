"""Several writers, one checkpoint (spec/FORMAT.md §13): part records, ``PartWriter``, ``commit_parts``.

Each of ``world_size`` writers (ranks of a job, or independent workers) runs
``create_checkpoint(path, rank=r, world_size=w)`` (a ``PartWriter``), writes the chunk/shard files of
the boxes it owns and calls ``commit()``, which writes the part record ``_ucp/parts/<r>.json`` (never
the manifest), and the ``zarr.json`` of each array whose first chunk it wrote (recorded with its size
and crc32c, so the coordinator does not write it again: the documents are written in parallel). A chunk that this rank's boxes cover only partly is staged under
``_ucp/parts/<r>/stage/<n>`` instead. After a barrier one coordinator calls ``commit_parts(path, w)``:
it checks every part, assembles the staged chunks through an ordinary ``CheckpointWriter`` and commits.
"""
from __future__ import annotations

from typing import Optional

import crc32c
import numpy as np

from ucp.errors import FormatError, IncompleteCheckpointError, OverlapError, UcpError
from ucp.format import manifest
from ucp.format.array_writer import fmt_box
from ucp.format.journal import PARTS, journal_rel
from ucp.format.layout import chunk_key
from ucp.format.manifest import ManifestArray, ManifestParam, key_index
from ucp.format.store import MANIFEST, make_store
from ucp.format.writer import CheckpointWriter, now, refuse_foreign_root, writer_version
from ucp.plan.grid import volume

PART_FORMAT = "ucp-part"
_MAX_LINES = 20


def part_rel(rank) -> str:
    return f"{PARTS}/{int(rank)}.json"


def stage_rel(rank) -> str:
    return f"{PARTS}/{int(rank)}"


# ------------------------------------------------------------------------------------------ rank side
class PartWriter(CheckpointWriter):
    """One of several writers: ``commit()`` writes this rank's part record instead of the manifest.

    It locks only its own part (``_ucp/parts/<rank>.lock``), refuses a committed root, replaces a stale
    part record of an earlier run, and on ``resume`` adopts its own chunk files when it writes them again."""

    adopt_mode = "lazy"

    def __init__(self, path, rank, world_size, overwrite=False, **kw):
        rank, world_size = int(rank), int(world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise UcpError(f"rank {rank} is not in range(world_size={world_size})")
        if overwrite:
            raise UcpError("overwrite=True cannot be used with rank=: several writers would race to clear "
                           "the root; clear it once before starting the ranks")
        self.rank, self.world_size = rank, world_size
        self._docs = {}  # rel -> (size, crc32c) of the array documents written so far
        self._doc_mine: dict[str, bool] = {}  # rel -> whether this rank writes it, as the caller named
        super().__init__(path, **kw)

    def lock_rel(self) -> str:
        return f"{PARTS}/{self.rank}.lock"

    def journal_rel(self) -> str:
        return journal_rel(self.rank)

    def prepare_root(self, overwrite) -> None:
        if self.store.exists(MANIFEST):
            raise UcpError(f"{self.path} is already a committed ucp checkpoint: rank {self.rank} cannot add a "
                           "part to it; write into another folder, or remove it first")
        refuse_foreign_root(self.store, self.path, (), "resume=True continues only" if self.resume else
                            "several writers write only into a new folder or")
        # a stale part record of an earlier run must never be committed with this run's data
        self.store.delete(part_rel(self.rank))
        self.store.delete_tree(stage_rel(self.rank))

    def set_metadata(self, obj) -> None:
        raise UcpError(f"rank {self.rank}: set_metadata is not available to one of several writers; "
                       "pass metadata= to commit_parts")

    def commit(self, sync: bool = True, record_file: bool = True) -> None:
        """Write this rank's stage files, array documents and part record (the coordinator's
        ``commit_parts`` reads them); ``records`` then holds the part as ``commit_parts(parts=)`` takes it.

        ``sync=False``: the caller commits the manifest next, in this process and on this store
        (``commit_parts`` makes every file durable before the manifest), so this part need not be
        durable on its own. ``record_file=False`` (with ``sync=False``): that caller also hands
        ``records`` to ``commit_parts(parts=)`` in memory, so no part record file is written (it
        would be deleted with ``_ucp/parts`` right after the manifest)."""
        if record_file is False and sync:
            raise UcpError(f"rank {self.rank}: commit(record_file=False) needs sync=False (the caller "
                           "commits the manifest next, from the records in memory)")
        self.check_open()
        durable = self.durable and sync
        params, records, stage = [], [], []
        for p in self.params.values():
            states, typed, staged, docs = {}, {}, {}, {}
            for s, a in p.arrays.items():
                typed[s] = a.completed()
                staged[s] = self._stage_pieces(a, stage, durable)
                states[s] = {**typed[s].to_json(), "staged": staged[s]}
                doc = self._array_doc(a, typed[s])
                if doc is not None:
                    states[s]["doc"] = list(doc)
                    docs[f"{a.rel}/zarr.json"] = doc
            params.append({"name": p.name, "path": p.enc, "meta": dict(p.meta), "states": states,
                           "state_order": list(states)})
            records.append((ManifestParam(p.name, p.enc, dict(p.meta), typed), staged, docs))
        body = {"format": PART_FORMAT, "format_version": manifest.FORMAT_VERSION, "rank": self.rank,
                "world_size": self.world_size, "writer": writer_version(), "created": now(), "params": params}
        if durable:
            self.store.sync()  # the part record promises that its chunks and stage files are on stable storage
        self.writer_lock.check()
        if record_file:
            self.store.put_atomic(part_rel(self.rank), manifest.dump(body), fsync=durable)
        self.records = records
        self.committed = True
        self._shutdown()

    def sync_data(self) -> None:
        """Make the chunk files written so far durable now (one syncfs when ``durable``): a writer
        that commits later (``commit(sync=False)``) keeps its data's flush off that later, serial step."""
        if self.durable:
            self.store.sync()

    def _stage_pieces(self, a, stage: list, durable: bool) -> list:
        """Write the staged pieces of array ``a`` (chunks this rank covers partly) as stage files."""
        out = []
        for idx, boxes, data in a.staged_pieces():
            rel = f"{stage_rel(self.rank)}/stage/{len(stage)}"
            stage.append(rel)
            self.store.put(rel, [data], fsync=durable)
            out.append({"key": chunk_key(idx), "boxes": [[list(b0), list(b1)] for b0, b1 in boxes],
                        "file": rel, "size": len(data), "crc32c": crc32c.crc32c(data)})
        return out

    def write_doc(self, a, mine: Optional[bool] = None) -> None:
        """Write array ``a``'s ``zarr.json`` now if this rank is its writer, not in ``commit``: a
        caller writing its boxes on several threads writes the documents there, in parallel with its
        data and before ``sync_data``.

        ``mine``: the caller, who knows every rank's boxes, names one writer per array: this rank
        (True) or another (False), for good (``commit`` follows it). Under FSDP one rank holds the
        first chunk of every array, so by the default rule it would write every document while the
        others wait for it. None: the default, the rank that wrote the array's first chunk whole."""
        rel = f"{a.rel}/zarr.json"
        if mine is not None:
            self._doc_mine[rel] = bool(mine)
        if mine is not False:
            self._array_doc(a, a.completed())

    def _array_doc(self, a, done: ManifestArray):
        """Write ``a``'s ``zarr.json`` (once) when this rank is its writer: the one the caller named
        (``write_doc``), else the rank that wrote its first chunk whole (exactly one rank did, or
        none: the coordinator assembles it and writes the document); its (size, crc32c)."""
        rel = f"{a.rel}/zarr.json"
        if rel in self._docs:
            return self._docs[rel]
        mine = self._doc_mine.get(rel)
        if not (chunk_key((0,) * len(a.shape)) in done.chunk_table if mine is None else mine):
            return None
        doc = a.doc_bytes()
        self.store.put(rel, [doc])
        self._docs[rel] = rec = (len(doc), crc32c.crc32c(doc))
        return rec


def create_part(path, rank, world_size, **kw) -> PartWriter:
    """The writer of part ``rank`` of ``world_size`` (same options as ``create_checkpoint``)."""
    return PartWriter(path, rank, world_size, **kw)


# ------------------------------------------------------------------------------------------ coordinator
def _load_part(store, path, rank, world_size):
    """Rank ``rank``'s part record as typed parameter records (None when missing)."""
    rel = part_rel(rank)
    try:
        raw = store.get(rel)
    except (FileNotFoundError, NotADirectoryError):
        return None
    where = f"{path}/{rel}"
    doc = manifest.load_verified(raw, where)
    if not isinstance(doc, dict) or doc.get("format") != PART_FORMAT:
        raise FormatError(f"{where}: not a ucp part record")
    if doc.get("format_version") != manifest.FORMAT_VERSION:
        raise FormatError(f"{where}: rank {rank} wrote format_version {doc.get('format_version')!r}, this "
                          f"coordinator writes {manifest.FORMAT_VERSION}: every rank must run the same ucp")
    if doc.get("rank") != rank or doc.get("world_size") != world_size:
        raise UcpError(f"{where}: part of rank {doc.get('rank')} of world_size {doc.get('world_size')}, "
                       f"expected rank {rank} of world_size {world_size}")
    if not isinstance(doc.get("params"), list):
        raise FormatError(f"{where}: 'params' is not a list")
    out = []
    for p in doc["params"]:
        rec = ManifestParam.from_json(p, f"{where} (rank {rank})", complete=False)
        staged = {s: _staged(p["states"][s].get("staged", []), f"{where} state {s!r}", rank) for s in rec.states}
        docs = {f"{a.path}/zarr.json": _doc(p["states"][s].get("doc"), f"{where} state {s!r}")
                for s, a in rec.states.items() if p["states"][s].get("doc") is not None}
        out.append((rec, staged, docs))
    return out


def _doc(rec, where):
    if not (isinstance(rec, list) and len(rec) == 2 and all(isinstance(x, int) and x >= 0 for x in rec)):
        raise FormatError(f"{where}: malformed 'doc' record {str(rec)[:60]} (want [size, crc32c])")
    return tuple(rec)


def _staged(pieces, where, rank):
    if not isinstance(pieces, list):
        raise FormatError(f"{where}: 'staged' is not a list")
    for pc in pieces:
        if not (isinstance(pc, dict) and manifest.safe_rel(pc.get("file"))
                and pc["file"].startswith(f"{stage_rel(rank)}/stage/") and isinstance(pc.get("boxes"), list)
                and isinstance(pc.get("key"), str)):
            raise FormatError(f"{where}: malformed staged piece {str(pc)[:120]}")
    return pieces


class MergedArray:
    """One array as the parts declare it: the first declaration, who wrote which chunk whole, the
    staged pieces per chunk, and how many chunks each rank wrote."""

    __slots__ = ("record", "rank", "table", "staged", "count")

    def __init__(self, rank, record: ManifestArray):
        self.rank, self.record = rank, record
        self.table = {}  # key -> (rank, record)
        self.staged = {}  # key -> [(rank, piece)]
        self.count = {}  # rank -> chunks written whole

    @staticmethod
    def decl(r: ManifestArray):
        return r.shape, r.dtype, r.chunks, r.inner_chunks

    @staticmethod
    def decl_str(r: ManifestArray):
        s = f"shape {list(r.shape)}, dtype {r.dtype}, chunks {list(r.chunks)}"
        return s + (f", inner chunks {list(r.inner_chunks)}" if r.inner_chunks is not None else "")


class _Merge:
    """The parts merged: parameters in rank order, with every inconsistency and overlap collected."""

    def __init__(self, parts):
        self.meta: dict[str, dict] = {}
        self.meta_from: dict[str, dict] = {}
        self.arrays: dict[str, dict[str, MergedArray]] = {}
        self.decl_err, self.overlap = [], []
        self.docs: dict[str, tuple] = {}  # rel -> (size, crc32c) of array documents ranks wrote
        for r, doc in parts:
            for rec, staged, docs in doc:
                self._add_param(r, rec, staged)
                self.docs.update(docs)

    def _add_param(self, r, rec: ManifestParam, staged):
        meta, frm = self.meta.setdefault(rec.name, {}), self.meta_from.setdefault(rec.name, {})
        arrays = self.arrays.setdefault(rec.name, {})
        for k, v in rec.meta.items():
            if k in meta and meta[k] != v:
                self.decl_err.append(f"param {rec.name!r} meta[{k!r}]: rank {frm[k]} has {meta[k]!r}, rank {r} "
                                     f"has {v!r}")
            elif k not in meta:
                meta[k], frm[k] = v, r
        for s, a in rec.states.items():
            ma = arrays.get(s)
            if ma is None:
                ma = arrays[s] = MergedArray(r, a)
            elif MergedArray.decl(a) != MergedArray.decl(ma.record):
                self.decl_err.append(f"param {rec.name!r} state {s!r} declared inconsistently: rank {ma.rank} "
                                     f"{MergedArray.decl_str(ma.record)}; rank {r} {MergedArray.decl_str(a)}")
                continue
            self._add_chunks(f"param {rec.name!r} state {s!r}", r, a, ma, staged[s])

    def _add_chunks(self, where, r, a, ma, staged):
        for key, ent in a.chunk_table.items():
            if key in ma.table:
                self.overlap.append(f"{where} chunk {key} region {fmt_box(*a.grid.chunk_box(key_index(key)))}: "
                                    f"written by rank {ma.table[key][0]} and by rank {r}")
                continue
            ma.table[key] = (r, ent)
            ma.count[r] = ma.count.get(r, 0) + 1
        for pc in staged:
            ma.staged.setdefault(pc["key"], []).append((r, pc))

    def check(self, path):
        """Raise naming every inconsistent declaration, overlap and unwritten region; no manifest then."""
        if self.decl_err:
            _raise(UcpError, f"{path}: cannot commit, {len(self.decl_err)} inconsistent declaration(s)",
                   self.decl_err)
        incomplete = []
        for name, arrays in self.arrays.items():
            for s, ma in arrays.items():
                incomplete += self._check_array(f"param {name!r} state {s!r}", ma)
        if self.overlap:
            _raise(OverlapError, f"{path}: cannot commit, {len(self.overlap)} chunk(s) written by two ranks",
                   self.overlap)
        if incomplete:
            _raise(IncompleteCheckpointError, f"{path}: cannot commit, {len(incomplete)} chunk(s) unwritten",
                   incomplete)

    def _check_array(self, where, ma):
        grid = ma.record.grid
        incomplete = []
        for key, lst in ma.staged.items():
            if key in ma.table:
                rb = "; ".join(f"rank {r} {', '.join(fmt_box(*b) for b in pc['boxes'])}" for r, pc in lst)
                self.overlap.append(f"{where} chunk {key}: written whole by rank {ma.table[key][0]} and partly by {rb}")
                continue
            boxes = [(r, tuple(b[0]), tuple(b[1])) for r, pc in lst for b in pc["boxes"]]
            for i, (r1, a1, b1) in enumerate(boxes):
                for r2, a2, b2 in boxes[i + 1:]:
                    if all(x < y2 and x2 < y for x, y, x2, y2 in zip(a1, b1, a2, b2)):
                        self.overlap.append(f"{where} chunk {key}: rank {r1} region {fmt_box(a1, b1)} overlaps "
                                            f"rank {r2} region {fmt_box(a2, b2)}")
            cbox = grid.chunk_box(key_index(key))
            got = sum(volume(a, b) for _, a, b in boxes)
            if got < volume(*cbox):
                by = "; ".join(f"rank {r} wrote {fmt_box(a, b)}" for r, a, b in boxes)
                incomplete.append(f"{where} chunk {key} region {fmt_box(*cbox)} only partly written "
                                  f"({got} of {volume(*cbox)} elements: {by})")
        for idx in grid.indices():
            key = chunk_key(idx)
            if key not in ma.table and key not in ma.staged:
                by = ", ".join(f"rank {r}: {c}" for r, c in sorted(ma.count.items())) or "none"
                incomplete.append(f"{where} chunk {key} region {fmt_box(*grid.chunk_box(idx))} not written by "
                                  f"any rank (chunks of this array written per rank: {by})")
        return incomplete


def _raise(cls, head, lines):
    more = f"\n  (and {len(lines) - _MAX_LINES} more)" if len(lines) > _MAX_LINES else ""
    raise cls(head + ":\n  " + "\n  ".join(lines[:_MAX_LINES]) + more)


def _load_parts(store, path, world_size, given):
    parts, missing = [], []
    for r in range(world_size):
        doc = given[r] if r in given else _load_part(store, path, r, world_size)
        (missing.append(r) if doc is None else parts.append((r, doc)))
    if missing:
        raise IncompleteCheckpointError(
            f"{path}: cannot commit, {len(missing)} of {world_size} part(s) missing: rank(s) "
            f"{', '.join(map(str, missing))} (no {', '.join(part_rel(r) for r in missing[:8])}"
            f"{', ...' if len(missing) > 8 else ''}); rerun those ranks (resume=True) and commit again")
    return parts


def _assemble(store, path, name, s, a, ma) -> int:
    """Write the chunks the ranks staged in pieces through ``a`` (an ``ArrayWriter``); returns how many."""
    assembled = 0
    for key, lst in ma.staged.items():
        for r, pc in lst:
            where = f"{path}/{pc['file']} (rank {r}, param {name!r} state {s!r} chunk {key})"
            try:
                data = store.get(pc["file"])
            except (FileNotFoundError, NotADirectoryError):
                raise FormatError(f"{where}: staged piece is missing") from None
            if len(data) != pc["size"] or crc32c.crc32c(data) != pc["crc32c"]:
                raise FormatError(f"{where}: staged piece is corrupt (size or crc32c differs from the part record)")
            off = 0
            for b0, b1 in pc["boxes"]:
                v = volume(b0, b1)
                arr = np.frombuffer(data, dtype=a.storage_np, count=v, offset=off).reshape(
                    tuple(y - x for x, y in zip(b0, b1)))
                off += v * a.itemsize
                a.write_storage(tuple(b0), arr)
        assembled += 1
    return assembled


class _Coordinator(CheckpointWriter):
    """The writer of the manifest: it writes the documents no rank wrote (or wrote otherwise)."""

    def __init__(self, path, docs, **kw):
        self._docs = docs
        super().__init__(path, coordinator=True, **kw)

    def doc_on_disk(self, rel, data: bytes) -> bool:
        return self._docs.get(rel) == (len(data), crc32c.crc32c(data))


def commit_parts(path, world_size, metadata=None, storage_options=None, durable=True, workers=4,
                 cleanup=True, param_order=None, parts=None) -> dict:
    """Check the parts of ranks ``0 .. world_size-1``, assemble staged chunks, write the manifest.

    Run by one process after every rank's ``commit()`` returned (a barrier). Raises
    ``IncompleteCheckpointError`` naming the missing ranks / unwritten regions, ``OverlapError`` for a
    chunk written by two ranks, ``UcpError`` for inconsistent declarations; no manifest in any of these
    cases. ``metadata``: the checkpoint's non-tensor state (§6.2). ``cleanup``: delete ``_ucp/parts``
    once the manifest is durable. ``param_order``: names in the order the manifest lists them (the
    model's order, which grouped flat layouts depend on); names it omits follow in rank order.
    ``parts``: ``{rank: PartWriter.records}`` handed over in memory by a caller that gathered them
    from its own ranks (torch DCP's ``finish``): those part records are not read back and parsed again.
    Returns counts {"params", "arrays", "chunks", "assembled"}.
    """
    world_size = int(world_size)
    if world_size < 1:
        raise UcpError(f"world_size must be >= 1, got {world_size}")
    store = make_store(path, storage_options)
    if store.exists(MANIFEST):
        raise UcpError(f"{path} is already a committed ucp checkpoint")
    merged = _Merge(_load_parts(store, path, world_size, parts or {}))
    merged.check(path)
    names = list(merged.arrays)
    if param_order is not None:
        rank_of = {n: i for i, n in enumerate(param_order)}
        names.sort(key=lambda n: rank_of.get(n, len(rank_of)))
    w = _Coordinator(path, merged.docs, storage_options=storage_options, durable=durable, workers=workers)
    try:
        nchunks = assembled = narrays = 0
        for name in names:
            w.set_param_meta_json(name, merged.meta[name])
            for s, ma in merged.arrays[name].items():
                a = w.declare_array(name, s, ma.record)
                a.adopt_records({k: ent for k, (_r, ent) in ma.table.items()})
                narrays += 1
                nchunks += len(ma.table)
                assembled += _assemble(store, path, name, s, a, ma)
        if metadata is not None:
            w.set_metadata(metadata)
        w.commit()
    finally:
        w.abort()
    if cleanup:  # the manifest is durable: the part records are no longer needed by anyone
        store.delete_tree(PARTS if w.has_meta_arrays else "_ucp")
    return {"params": len(names), "arrays": narrays, "chunks": nchunks + assembled, "assembled": assembled}
