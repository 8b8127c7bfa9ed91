"""Several writers, one checkpoint (spec/FORMAT.md §13): part records, ``commit_parts``, grid helpers.

Each of ``world_size`` writers (ranks of a job, or independent workers) runs
``create_checkpoint(path, rank=r, world_size=w)``, writes the chunk/shard files of the boxes it owns and
calls ``commit()``, which writes the part record ``_ucp/parts/<r>.json`` (never the manifest). A chunk
that this rank's boxes cover only partly is staged under ``_ucp/parts/<r>/stage/<n>`` instead. After a
barrier one coordinator calls ``commit_parts(path, w)``: it checks every part, assembles the staged
chunks, writes every ``zarr.json`` document and, last, the manifest.
"""
from __future__ import annotations

import datetime
import math

import crc32c
import numpy as np

from ucp.errors import FormatError, IncompleteCheckpointError, OverlapError, UcpError
from ucp.format import layout, manifest, names
from ucp.format.layout import chunk_key
from ucp.format.store import MANIFEST, make_store

PARTS = "_ucp/parts"
PART_FORMAT = "ucp-part"
_MAX_LINES = 20


def part_rel(rank) -> str:
    return f"{PARTS}/{int(rank)}.json"


def stage_rel(rank) -> str:
    return f"{PARTS}/{int(rank)}"


def _fmt_box(start, stop):
    return "[" + ", ".join(f"{a}:{b}" for a, b in zip(start, stop)) + "]"


def _chunk_box(idx, chunks, shape):
    cst = tuple(i * c for i, c in zip(idx, chunks))
    return cst, tuple(min(a + c, n) for a, c, n in zip(cst, chunks, shape))


def _vol(start, stop):
    return math.prod(b - a for a, b in zip(start, stop))


# ------------------------------------------------------------------------------------------ rank side
def write_part(w) -> None:
    """Write rank ``w._part[0]``'s stage files and part record (called by ``CheckpointWriter.commit``)."""
    from ucp.format.writer import _writer_version

    rank, world = w._part
    store = w._store
    params = []
    n = 0
    for p in w._params.values():
        states = {}
        for s, a in p.arrays.items():
            with a._lock:
                table = {k: v for k, v in a._done.items() if v is not None}
                staged = dict(a._staged)
            rec = {"path": a.rel, "dtype": a.dtype_name, "shape": list(a.shape), "chunks": list(a.chunks),
                   "chunk_table": dict(sorted(table.items()))}
            if a.inner is not None:
                rec["inner_chunks"] = list(a.inner)
            pieces = []
            for idx in sorted(staged):
                st = staged[idx]
                cst = tuple(i * c for i, c in zip(idx, a.chunks))
                boxes = sorted(st.boxes)
                data = b"".join(np.ascontiguousarray(st.buf[tuple(slice(x - c, y - c) for x, y, c in
                                                                   zip(b0, b1, cst))]).tobytes()
                                for b0, b1 in boxes)
                rel = f"{stage_rel(rank)}/stage/{n}"
                n += 1
                store.put(rel, [data], fsync=w.durable)
                pieces.append({"key": chunk_key(idx), "boxes": [[list(b0), list(b1)] for b0, b1 in boxes],
                               "file": rel, "size": len(data), "crc32c": crc32c.crc32c(data)})
            rec["staged"] = pieces
            states[s] = rec
        params.append({"name": p.name, "path": p.enc, "meta": dict(p.meta), "states": states,
                       "state_order": list(states)})
    body = {"format": PART_FORMAT, "format_version": manifest.FORMAT_VERSION, "rank": rank, "world_size": world,
            "writer": _writer_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "params": params}
    if w.durable:
        store.sync()  # the part record promises that its chunks and stage files are on stable storage
    store.put_atomic(part_rel(rank), manifest.dump(body), fsync=w.durable)


def create_part(path, rank, world_size, **kw):
    """``create_checkpoint(path, rank=rank, world_size=world_size, **kw)``."""
    from ucp.format.writer import create_checkpoint

    return create_checkpoint(path, rank=rank, world_size=world_size, **kw)


# ------------------------------------------------------------------------------------------ coordinator
def _load_part(store, path, rank, world_size):
    rel = part_rel(rank)
    try:
        raw = store.get(rel)
    except (FileNotFoundError, NotADirectoryError):
        return None
    where = f"{path}/{rel}"
    doc = manifest.load_verified(raw, where)
    if doc.get("format") != PART_FORMAT:
        raise FormatError(f"{where}: not a ucp part record")
    if doc.get("format_version") != manifest.FORMAT_VERSION:
        raise FormatError(f"{where}: rank {rank} wrote format_version {doc.get('format_version')!r}, this "
                          f"coordinator writes {manifest.FORMAT_VERSION}: every rank must run the same ucp")
    if doc.get("rank") != rank or doc.get("world_size") != world_size:
        raise UcpError(f"{where}: part of rank {doc.get('rank')} of world_size {doc.get('world_size')}, "
                       f"expected rank {rank} of world_size {world_size}")
    return doc


class _MArray:
    __slots__ = ("decl", "rank", "rec", "table", "staged", "count")

    def __init__(self, rank, rec):
        self.rank, self.rec = rank, rec
        self.decl = (tuple(rec["shape"]), rec["dtype"], tuple(rec["chunks"]),
                     tuple(rec["inner_chunks"]) if rec.get("inner_chunks") is not None else None)
        self.table = {}  # key -> (rank, [size, crc])
        self.staged = {}  # key -> [(rank, piece)]
        self.count = {}  # rank -> chunks written whole


def _decl_str(d):
    s = f"shape {list(d[0])}, dtype {d[1]}, chunks {list(d[2])}"
    return s + (f", inner chunks {list(d[3])}" if d[3] is not None else "")


def _raise(cls, head, lines):
    more = f"\n  (and {len(lines) - _MAX_LINES} more)" if len(lines) > _MAX_LINES else ""
    raise cls(head + ":\n  " + "\n  ".join(lines[:_MAX_LINES]) + more)


def commit_parts(path, world_size, metadata=None, storage_options=None, durable=True, workers=4,
                 cleanup=True, param_order=None) -> dict:
    """Check the parts of ranks ``0 .. world_size-1``, assemble staged chunks, write the manifest.

    Run by one process after every rank's ``commit()`` returned (a barrier). Raises
    ``IncompleteCheckpointError`` naming the missing ranks / unwritten regions, ``OverlapError`` for a
    chunk written by two ranks, ``UcpError`` for inconsistent declarations; no manifest in any of these
    cases. ``metadata``: the checkpoint's non-tensor state (§6.2). ``cleanup``: delete ``_ucp/parts``
    once the manifest is durable. ``param_order``: names in the order the manifest lists them (the
    model's order, which grouped flat layouts depend on); names it omits follow in rank order.
    Returns counts {"params", "arrays", "chunks", "assembled"}.
    """
    from ucp.format.writer import ArrayWriter, CheckpointWriter, _Param

    world_size = int(world_size)
    if world_size < 1:
        raise UcpError(f"world_size must be >= 1, got {world_size}")
    store = make_store(path, storage_options)
    if store.exists(MANIFEST):
        raise UcpError(f"{path} is already a committed ucp checkpoint")
    parts, missing = [], []
    for r in range(world_size):
        doc = _load_part(store, path, r, world_size)
        (missing.append(r) if doc is None else parts.append(doc))
    if missing:
        raise IncompleteCheckpointError(
            f"{path}: cannot commit, {len(missing)} of {world_size} part(s) missing: rank(s) "
            f"{', '.join(map(str, missing))} (no {', '.join(part_rel(r) for r in missing[:8])}"
            f"{', ...' if len(missing) > 8 else ''}); rerun those ranks (resume=True) and commit again")

    # -- merge ---------------------------------------------------------------------------------
    mparams: dict[str, dict] = {}
    decl_err, overlap = [], []
    for doc in parts:
        r = doc["rank"]
        for prec in doc["params"]:
            name = prec["name"]
            mp = mparams.get(name)
            if mp is None:
                if prec["path"] != names.encode_param(name):
                    raise FormatError(f"part of rank {r}: param {name!r} has path {prec['path']!r}")
                mp = mparams[name] = {"meta": {}, "meta_from": {}, "arrays": {}}
            for k, v in prec["meta"].items():
                if k in mp["meta"] and mp["meta"][k] != v:
                    decl_err.append(f"param {name!r} meta[{k!r}]: rank {mp['meta_from'][k]} has "
                                    f"{mp['meta'][k]!r}, rank {r} has {v!r}")
                elif k not in mp["meta"]:
                    mp["meta"][k], mp["meta_from"][k] = v, r
            for s in prec["state_order"]:
                rec = prec["states"][s]
                ma = mp["arrays"].get(s)
                if ma is None:
                    ma = mp["arrays"][s] = _MArray(r, rec)
                else:
                    d = _MArray(r, rec).decl
                    if d != ma.decl:
                        decl_err.append(f"param {name!r} state {s!r} declared inconsistently: rank {ma.rank} "
                                        f"{_decl_str(ma.decl)}; rank {r} {_decl_str(d)}")
                        continue
                shape, _, chunks, _ = ma.decl
                for key, ent in rec["chunk_table"].items():
                    if key in ma.table:
                        idx = tuple(int(x) for x in key.split("/")[1:])
                        overlap.append(f"param {name!r} state {s!r} chunk {key} region "
                                       f"{_fmt_box(*_chunk_box(idx, chunks, shape))}: written by rank "
                                       f"{ma.table[key][0]} and by rank {r}")
                        continue
                    ma.table[key] = (r, ent)
                    ma.count[r] = ma.count.get(r, 0) + 1
                for pc in rec.get("staged", ()):
                    ma.staged.setdefault(pc["key"], []).append((r, pc))
    if decl_err:
        _raise(UcpError, f"{path}: cannot commit, {len(decl_err)} inconsistent declaration(s)", decl_err)

    incomplete = []
    for name, mp in mparams.items():
        for s, ma in mp["arrays"].items():
            shape, _, chunks, _ = ma.decl
            where = f"param {name!r} state {s!r}"
            for key, lst in ma.staged.items():
                idx = tuple(int(x) for x in key.split("/")[1:])
                if key in ma.table:
                    rb = "; ".join(f"rank {r} {', '.join(_fmt_box(*b) for b in pc['boxes'])}" for r, pc in lst)
                    overlap.append(f"{where} chunk {key}: written whole by rank {ma.table[key][0]} and partly "
                                   f"by {rb}")
                    continue
                boxes = [(r, tuple(b[0]), tuple(b[1])) for r, pc in lst for b in pc["boxes"]]
                for i, (r1, a1, b1) in enumerate(boxes):
                    for r2, a2, b2 in boxes[i + 1:]:
                        if all(x < y2 and x2 < y for x, y, x2, y2 in zip(a1, b1, a2, b2)):
                            overlap.append(f"{where} chunk {key}: rank {r1} region {_fmt_box(a1, b1)} overlaps "
                                           f"rank {r2} region {_fmt_box(a2, b2)}")
                cst, cvs = _chunk_box(idx, chunks, shape)
                got = sum(_vol(a, b) for _, a, b in boxes)
                if got < _vol(cst, cvs):
                    by = "; ".join(f"rank {r} wrote {_fmt_box(a, b)}" for r, a, b in boxes)
                    incomplete.append(f"{where} chunk {key} region {_fmt_box(cst, cvs)} only partly written "
                                      f"({got} of {_vol(cst, cvs)} elements: {by})")
            for idx in layout.all_chunk_indices(shape, chunks):
                key = chunk_key(idx)
                if key not in ma.table and key not in ma.staged:
                    by = ", ".join(f"rank {r}: {c}" for r, c in sorted(ma.count.items())) or "none"
                    incomplete.append(f"{where} chunk {key} region {_fmt_box(*_chunk_box(idx, chunks, shape))} "
                                      f"not written by any rank (chunks of this array written per rank: {by})")
    if overlap:
        _raise(OverlapError, f"{path}: cannot commit, {len(overlap)} chunk(s) written by two ranks", overlap)
    if incomplete:
        _raise(IncompleteCheckpointError, f"{path}: cannot commit, {len(incomplete)} chunk(s) unwritten",
               incomplete)

    # -- assemble and commit -------------------------------------------------------------------
    w = CheckpointWriter(path, storage_options=storage_options, durable=durable, workers=workers,
                         _coordinator=True)
    nchunks = assembled = narrays = 0
    if param_order is not None:
        rank_of = {n: i for i, n in enumerate(param_order)}
        mparams = dict(sorted(mparams.items(), key=lambda kv: rank_of.get(kv[0], len(rank_of))))
    for name, mp in mparams.items():
        enc = names.encode_param(name)
        p = w._params[name] = _Param(name, enc)
        p.meta = dict(mp["meta"])
        for s, ma in mp["arrays"].items():
            shape, dn, chunks, inner = ma.decl
            a = ArrayWriter(w, name, enc, s, shape, dn, chunks, rel=ma.rec["path"], scan=False, inner=inner)
            a._done = {k: list(ent) for k, (_, ent) in ma.table.items()}
            p.arrays[s] = a
            narrays += 1
            nchunks += len(ma.table)
            for key, lst in ma.staged.items():
                idx = tuple(int(x) for x in key.split("/")[1:])
                for r, pc in lst:
                    where = f"{path}/{pc['file']} (rank {r}, param {name!r} state {s!r} chunk {key})"
                    try:
                        data = store.get(pc["file"])
                    except (FileNotFoundError, NotADirectoryError):
                        raise FormatError(f"{where}: staged piece is missing") from None
                    if len(data) != pc["size"] or crc32c.crc32c(data) != pc["crc32c"]:
                        raise FormatError(f"{where}: staged piece is corrupt (size or crc32c differs from the "
                                          "part record)")
                    off = 0
                    for b0, b1 in pc["boxes"]:
                        b0, b1 = tuple(b0), tuple(b1)
                        v = _vol(b0, b1)
                        arr = np.frombuffer(data, dtype=a._np, count=v, offset=off).reshape(
                            tuple(y - x for x, y in zip(b0, b1)))
                        off += v * a._isz
                        job = a._place(idx, b0, b1, arr)
                        if job is not None:
                            w._run_jobs(a, [job])
                            assembled += 1
    if metadata is not None:
        w.set_metadata(metadata)
    w.commit()
    if cleanup:  # the manifest is durable: the part records are no longer needed by anyone
        store.delete_tree(PARTS if w._meta_arrays else "_ucp")
    return {"params": len(mparams), "arrays": narrays, "chunks": nchunks + assembled, "assembled": assembled}


# ------------------------------------------------------------------------------------------ grids
def split_boxes(shape, k, dim=0, mode="chunk"):
    """The ``k`` boxes ``(start, stop)`` of ``torch.chunk`` (``mode="chunk"``: ceil(n/k) per piece,
    trailing pieces may be empty) or ``torch.tensor_split`` (``mode="tensor_split"``: the first n % k
    pieces one longer) of ``shape`` along ``dim``."""
    from ucp.plan.boxes import split_sizes  # the one rule for splits, shared with the planner

    shape = tuple(int(s) for s in shape)
    n, k = shape[dim], int(k)
    if mode not in ("chunk", "tensor_split"):
        raise UcpError(f"split_boxes: mode must be 'chunk' or 'tensor_split', got {mode!r}")
    cuts = [0]
    for size in split_sizes(n, k, mode):
        cuts.append(cuts[-1] + size)
    out = []
    for i in range(k):
        st = [0] * len(shape)
        sp = list(shape)
        st[dim], sp[dim] = cuts[i], cuts[i + 1]
        out.append((tuple(st), tuple(sp)))
    return out


def _closest_divisor(g, m):
    """The divisor of ``g`` closest to ``m`` on a log scale (ties: the smaller)."""
    divs = set()
    i = 1
    while i * i <= g:
        if g % i == 0:
            divs.update((i, g // i))
        i += 1
    return min(sorted(divs), key=lambda d: abs(math.log(d / max(m, 1))))


def aligned_chunks(shape, boxes, itemsize, target=None, min_bytes=64 << 10):
    """A plain chunk shape whose regular grid has every face of every box on a chunk boundary, so each
    writer of those boxes writes whole chunks only (nothing staged), or None where no such grid keeps
    chunks of at least ``min(min_bytes, the smallest box's bytes)``.

    Along each dim with box boundaries inside the array the chunk extent is the divisor of their gcd
    closest to the default extent for ``target`` bytes (default chunk size); the other dims then take
    the default layout of the array cut down to those extents. ``torch.chunk`` row splits (ceil(n/k) rows each) always have one; uneven
    ``torch.tensor_split`` splits usually do not. Pass the result as ``add_array(..., chunks=)``."""
    shape = tuple(int(s) for s in shape)
    default = layout.default_chunks(shape, itemsize, target)
    fixed = {}
    for d, n in enumerate(shape):
        bounds = {int(b[d]) for box in boxes for b in box if 0 < int(b[d]) < n}
        if bounds:
            fixed[d] = _closest_divisor(math.gcd(*bounds), default[d])
    # the other dims: the default layout of the array as cut down to the aligned extents
    sub = layout.default_chunks(tuple(fixed.get(d, n) for d, n in enumerate(shape)), itemsize, target)
    out = [fixed.get(d, sub[d]) for d in range(len(shape))]
    nonempty = [b for b in boxes if _vol(b[0], b[1]) > 0]
    if not shape or not nonempty:
        return tuple(out)
    floor = min(int(min_bytes), min(_vol(*b) for b in nonempty) * itemsize)
    if math.prod(out) * itemsize < floor:
        return None
    return tuple(out)
