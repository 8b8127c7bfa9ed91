"""The manifest ``ucp.manifest.json``: canonical JSON whose first member is its own crc32c, read into
typed records (``Manifest``, ``ManifestParam``, ``ManifestArray``) that own their JSON and every check
of hostile input (spec/FORMAT.md §7).

A checksum proves a manifest is intact, not that it is benign or self-consistent: a crafted one could
point a reader at files outside the checkpoint (``../../x``), claim absurd shapes, leave a chunk out of
the table, or disagree with its own ``zarr.json`` documents. Every path and number a reader acts on is
checked here, before any of it is used and before anything is allocated.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter

import crc32c

from ucp.errors import FormatError, NotCommittedError
from ucp.format import dtypes, shard
from ucp.format.layout import CRC_BYTES, array_doc, canonical, chunk_key, doc_bytes
from ucp.format.names import all_encode_to_themselves, encode_param
from ucp.plan.grid import ChunkGrid, chunk_grid

FORMAT_VERSION = 2  # 2: every shard's inner chunk crc32c values are bound to the manifest (§4.3, §7)
OLDEST_READABLE = 1
_PREFIX = b'{"crc32c":'
MAX_NDIM = 64


def dump(body: dict) -> bytes:
    """Serialize ``body`` canonically and prepend its checksum member.

    With sorted keys "crc32c" is the first member, so the file is exactly
    ``{"crc32c":<n>,`` + canonical(body)[1:], and n = crc32c(canonical(body)).
    """
    if "crc32c" in body:
        raise ValueError("manifest body must not contain crc32c")
    c = canonical(body)
    n = crc32c.crc32c(c)
    return _PREFIX + str(n).encode() + b"," + c[1:]


def load(raw: bytes, where: str) -> "Manifest":
    """Check and parse a manifest file into a ``Manifest`` (raises ``FormatError`` naming the problem)."""
    with gc_paused():
        return Manifest.from_json(load_verified(raw, where), where)


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection while a manifest's many small acyclic objects are built or dumped: in
    a process with a large heap, the collections they trigger cost more than the parsing (measured
    38 -> 22 ms best, 1000 arrays)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def load_verified(raw: bytes, where: str):
    """Parse a file written by ``dump`` after checking its leading crc32c member (manifest, part record)."""
    if not raw.startswith(_PREFIX):
        raise FormatError(f"{where}: malformed manifest (does not start with {_PREFIX.decode()})")
    comma = raw.find(b",", len(_PREFIX))
    digits = raw[len(_PREFIX):comma]
    if comma < 0 or not digits.isdigit():
        raise FormatError(f"{where}: malformed manifest checksum member")
    body = b"{" + raw[comma + 1:]
    got = crc32c.crc32c(body)
    if int(digits) != got:
        raise FormatError(f"{where}: manifest checksum mismatch (recorded {int(digits)}, computed {got}): "
                          "the manifest is corrupt")
    try:
        return json.loads(body)
    except ValueError as e:
        raise FormatError(f"{where}: manifest is not valid JSON: {e}") from None


def not_committed(path, why="no ucp.manifest.json (incomplete or still being written)") -> NotCommittedError:
    err = NotCommittedError(f"{path} is not a committed ucp checkpoint: {why}")
    err.path = path
    return err


# -------------------------------------------------------------------------------------- field checks
# Possessive quantifiers (``*+``): a segment ends at "/" or "\n", which no class holds, so giving characters
# back could never make a match; without them the matcher keeps backtracking state for every repetition
# (measured: 4000 paths joined, 1.1-2.0 ms -> 0.45 ms).
# ("~" only inside a segment: it joins a long parameter name's kept head to its hash, FORMAT.md §3)
_SEG = re.compile(r"[A-Za-z0-9_%-][A-Za-z0-9._%~-]*+|\.[A-Za-z0-9_%-][A-Za-z0-9._%~-]*+|\.\.[A-Za-z0-9._%~-]++")
_KEY = re.compile(r"c(/[0-9]+)*")
_REL = re.compile(rf"(?:{_SEG.pattern})(?:/(?:{_SEG.pattern}))*+")  # segments joined by "/": one regex call
LISTED_CHUNKS = 4096  # grids up to this many chunks have their keys and file sizes listed once (cached)


def safe_rel(p) -> bool:
    """A relative path that cannot leave the root: no ``..``, no absolute path, no empty segment."""
    return isinstance(p, str) and 0 < len(p) < MAX_PATH and _REL.fullmatch(p) is not None


MAX_PATH = 4096
_RELS = re.compile(rf"(?:{_REL.pattern})(?:\n(?:{_REL.pattern}))*+")  # paths joined by "\n"


def all_safe_rel(paths) -> bool:
    """``safe_rel`` of every path, in one regex call over the paths joined by newlines (a path holding one
    is refused by the count): at open this is a few thousand paths, where one call each costs more than
    the parsing."""
    paths = list(paths)
    if not paths:
        return True
    try:
        joined = "\n".join(paths)
    except TypeError:  # a path that is not a string
        return False
    return (max(map(len, paths)) < MAX_PATH and joined.count("\n") == len(paths) - 1  # no path holds one
            and _RELS.fullmatch(joined) is not None)


def _int(x, lo=0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _ints(x, lo) -> bool:
    if not isinstance(x, list) or len(x) > MAX_NDIM:
        return False
    for i in x:  # a loop, not all(genexpr): called for every array at open
        if not isinstance(i, int) or isinstance(i, bool) or i < lo:
            return False
    return True


def key_index(key: str) -> tuple[int, ...]:
    """Chunk index of a chunk key ``c/i/j/...`` (``c`` for a 0-d array)."""
    return tuple(int(x) for x in key.split("/")[1:])


# -------------------------------------------------------------------------------------- records
@dataclass(slots=True)
class ManifestArray:
    """One array: where it lives, its logical dtype, shape and chunk grid, and per chunk (or shard) key
    its file record: ``(size, crc32c)`` for a plain chunk, ``(size, index crc32c, content crc32c)`` for a
    shard (the content crc32c is the crc32c of the inner chunks' crc32c values in index order, §4.3).
    A record of one of several writers (§13) holds only the chunks that writer wrote (``complete=False``)."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    chunk_table: dict[str, tuple[int, ...]]
    inner_chunks: tuple[int, ...] | None = None
    version: int = FORMAT_VERSION

    @property
    def storage_dtype(self) -> str:
        return dtypes.zarr_dtype(self.dtype)

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)

    @property
    def grid(self) -> ChunkGrid:
        return chunk_grid(self.shape, self.chunks)

    def chunk_file_size(self, idx) -> int:
        """The size every valid chunk or shard file ``idx`` has (a function of the geometry alone)."""
        if self.inner_chunks is None:
            return self.grid_chunk_nbytes + CRC_BYTES
        return shard.file_size(self.shape, self.chunks, self.inner_chunks, idx, self.itemsize)

    @property
    def grid_chunk_nbytes(self) -> int:
        n = self.itemsize
        for c in self.chunks:
            n *= c
        return n

    def doc_record(self) -> tuple[int, int]:
        """``(size, crc32c)`` of the array's ``zarr.json`` bytes (cached per geometry: layers repeat)."""
        return _doc_record(self.shape, self.chunks, self.dtype, self.inner_chunks)

    def to_json(self) -> dict:
        rec = {"path": self.path, "dtype": self.dtype, "storage_dtype": self.storage_dtype,
               "shape": list(self.shape), "chunks": list(self.chunks),
               "chunk_table": {k: list(v) for k, v in sorted(self.chunk_table.items())}}
        if self.inner_chunks is not None:
            rec["inner_chunks"] = list(self.inner_chunks)
        return rec

    @classmethod
    def from_json(cls, rec, where: str, path=None, version=FORMAT_VERSION, complete=True) -> "ManifestArray":
        """Check an array record (a dict from JSON) and build it; ``path``: the path it must have, which
        the caller built from checked names (so equality with it is the safety check; else ``safe_rel``)."""
        if not isinstance(rec, dict):
            raise FormatError(f"{where}: array record is not an object")
        p = rec.get("path")
        if not (p == path and len(p) < MAX_PATH if path is not None else safe_rel(p)):
            raise FormatError(f"{where}: unsafe or unexpected array path {p!r}")
        shape, chunks, inner = rec.get("shape"), rec.get("chunks"), rec.get("inner_chunks")
        if not _ints(shape, 0) or not _ints(chunks, 1) or len(chunks) != len(shape):
            raise FormatError(f"{where}: bad shape {shape!r} or chunks {chunks!r}")
        if inner is not None and (not _ints(inner, 1) or len(inner) != len(shape)
                                  or any(c % i for c, i in zip(chunks, inner))):
            raise FormatError(f"{where}: bad inner_chunks {inner!r} for chunks {chunks!r}")
        dn = rec.get("dtype")
        if dn not in dtypes.SUPPORTED:
            raise FormatError(f"{where}: unknown dtype {dn!r} (FORMAT.md §4.1 lists {', '.join(dtypes.SUPPORTED)})")
        sd = rec.get("storage_dtype", dtypes.zarr_dtype(dn) if not complete else None)
        if sd != dtypes.zarr_dtype(dn):
            raise FormatError(f"{where}: storage_dtype {sd!r} contradicts dtype {dn!r} "
                              f"(stored as {dtypes.zarr_dtype(dn)})")
        a = cls(p, dn, tuple(shape), tuple(chunks), {}, tuple(inner) if inner is not None else None, version)
        a.chunk_table = a._check_table(rec.get("chunk_table"), where, complete)
        return a

    def _check_table(self, table, where, complete) -> dict:
        """Keys name chunks of the grid, each exactly once when ``complete``; every recorded file size is
        the one the geometry implies (so nothing is allocated for a size the manifest made up)."""
        if not isinstance(table, dict):
            raise FormatError(f"{where}: chunk_table is not an object")
        width = 2 if self.inner_chunks is None or self.version < 2 else 3
        sizes = _chunk_sizes(self.shape, self.chunks, self.inner_chunks, self.dtype)
        if sizes is not None and (len(table) == len(sizes) or not complete):
            out = _listed_table(table, sizes, width)
            if out is not None:
                return out
        grid = self.grid.grid
        if complete and len(table) != self.grid.nchunks:
            raise FormatError(f"{where}: chunk_table has {len(table)} entries, the grid {list(grid)} of shape "
                              f"{list(self.shape)} and chunks {list(self.chunks)} has {self.grid.nchunks}")
        out = {}
        for k, v in table.items():
            if not (isinstance(k, str) and _KEY.fullmatch(k)):
                raise FormatError(f"{where}: malformed chunk key {str(k)[:40]!r}")
            idx = key_index(k)
            if len(idx) != len(grid) or any(i >= g for i, g in zip(idx, grid)) or chunk_key(idx) != k:
                raise FormatError(f"{where}: chunk key {k!r} is not a chunk of the grid {list(grid)}")
            if not (isinstance(v, list) and len(v) == width and _int(v[0]) and all(
                    _int(c) and c < 1 << 32 for c in v[1:])):
                raise FormatError(f"{where}: chunk {k}: record {str(v)[:60]} is not [size, crc32c"
                                  + (", content crc32c]" if width == 3 else "]"))
            want = self.chunk_file_size(idx)
            if v[0] != want:
                raise FormatError(f"{where}: chunk {k}: the manifest records {v[0]} bytes, the shape, chunks "
                                  f"and dtype imply {want}")
            out[k] = tuple(v)
        return out


def _listed_table(table, sizes, width) -> dict | None:
    """The checked table when every key and record passes against the geometry's listed chunk keys and
    file sizes ``sizes`` (the same checks as ``_check_table``, one dict lookup per key: layers share
    geometries); None when anything fails (``_check_table`` then names it)."""
    out = {}
    for k, v in table.items():
        if type(v) is not list or len(v) != width or type(v[0]) is not int or v[0] != sizes.get(k):
            return None
        for c in v[1:]:
            if type(c) is not int or not 0 <= c < 1 << 32:
                return None
        out[k] = tuple(v)
    return out


@functools.lru_cache(maxsize=256)
def _chunk_sizes(shape, chunks, inner, dtype) -> dict[str, int] | None:
    """``{chunk key: file size}`` of every chunk of a geometry (the file size a valid chunk or shard has);
    None for a grid of more than ``LISTED_CHUNKS`` chunks (checked key by key instead)."""
    grid = chunk_grid(shape, chunks)
    if grid.nchunks > LISTED_CHUNKS:
        return None
    itemsize = dtypes.itemsize(dtype)
    if inner is None:
        size = math.prod(chunks) * itemsize + CRC_BYTES
        return {chunk_key(idx): size for idx in grid.indices()}
    return {chunk_key(idx): shard.file_size(shape, chunks, inner, idx, itemsize) for idx in grid.indices()}


@dataclass(slots=True)
class ManifestParam:
    """One parameter: its name, group path, per-parameter metadata (§6.1) and arrays in saved order."""

    name: str
    path: str
    meta: dict
    states: dict[str, ManifestArray] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "path": self.path, "meta": self.meta,
                "states": {s: a.to_json() for s, a in self.states.items()}, "state_order": list(self.states)}

    @classmethod
    def from_json(cls, p, where: str, version=FORMAT_VERSION, complete=True) -> "ManifestParam":
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not safe_rel(p.get("path")) \
                or "/" in p["path"] or not isinstance(p.get("states"), dict) \
                or not isinstance(p.get("meta", {}), dict):
            raise FormatError(f"{where}: malformed parameter record {str(p)[:120]!r}")
        name, path, states = p["name"], p["path"], p["states"]
        try:
            enc = encode_param(name)
        except Exception:
            enc = None
        if enc != path:
            raise FormatError(f"{where}: parameter {name!r} has path {path!r}, expected {enc!r}")
        order = p.get("state_order")
        if order is None:
            order = list(states)
        elif order != list(states) and (not isinstance(order, list)
                                        or sorted(map(str, order)) != sorted(states)):
            raise FormatError(f"{where}: parameter {name!r}: state_order {order!r} does not list its states")
        out = {}
        for st in order:
            if not safe_rel(st) or "/" in st:
                raise FormatError(f"{where}: parameter {name!r}: unsafe state name {st!r}")
            out[st] = ManifestArray.from_json(states[st], _Where(where, name, st), f"{path}/{st}", version,
                                              complete)
        return cls(name, path, p.get("meta", {}), out)


class _Where:
    """``{where}: parameter {name!r} state {state!r}``, formatted only when an error message uses it:
    a manifest has thousands of states and almost never an error."""

    __slots__ = ("where", "name", "state")

    def __init__(self, where, name, state):
        self.where, self.name, self.state = where, name, state

    def __str__(self):
        return f"{self.where}: parameter {self.name!r} state {self.state!r}"

    def __format__(self, spec):
        return format(str(self), spec)


@dataclass
class Manifest:
    """The whole manifest (§7). ``files``: every ``zarr.json`` document's ``(size, crc32c)``."""

    params: list[ManifestParam]
    metadata: object = None
    meta_arrays: dict[str, ManifestArray] = field(default_factory=dict)
    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    writer: str = "ucp"
    created: str = ""
    format_version: int = FORMAT_VERSION

    def arrays(self):
        """``(description, ManifestArray)`` of every array, parameters first."""
        for p in self.params:
            for s, a in p.states.items():
                yield f"param {p.name!r} state {s!r}", a
        for rel, a in self.meta_arrays.items():
            yield f"metadata tensor {rel}", a

    def to_json(self) -> dict:
        return {"format": "ucp", "format_version": self.format_version, "writer": self.writer,
                "created": self.created, "params": [p.to_json() for p in self.params],
                "metadata": self.metadata, "meta_arrays": {k: a.to_json() for k, a in self.meta_arrays.items()},
                "files": {k: list(v) for k, v in self.files.items()}}

    @classmethod
    def from_json(cls, doc, where: str, at_once=True) -> "Manifest":
        """Check a manifest (a dict from JSON) and build it. ``at_once``: first try ``_params_at_once``, the
        same checks over all parameter records together; when anything there fails, or with
        ``at_once=False``, every record is checked alone (which names the failing one)."""
        if not isinstance(doc, dict) or doc.get("format") != "ucp":
            raise FormatError(f"{where}: not a ucp manifest")
        v = doc.get("format_version")
        if not _int(v, OLDEST_READABLE) or v > FORMAT_VERSION:
            raise FormatError(f"{where}: format_version {v!r} is not one this reader supports "
                              f"({OLDEST_READABLE}..{FORMAT_VERSION})")
        if v < 2:
            warnings.warn(f"{where}: format_version {v} does not bind shard contents to the manifest: a shard "
                          "file swapped for another of the same geometry is not detected; rewrite the "
                          "checkpoint with this ucp", stacklevel=3)
        if not isinstance(doc.get("params"), list):
            raise FormatError(f"{where}: 'params' is not a list")
        params = _params_at_once(doc["params"], where, v) if at_once else None
        if params is None:
            params = [ManifestParam.from_json(p, where, v) for p in doc["params"]]
        if len({p.name for p in params}) != len(params):
            raise FormatError(f"{where}: a parameter is listed twice")
        metas = doc.get("meta_arrays") or {}
        if not isinstance(metas, dict):
            raise FormatError(f"{where}: 'meta_arrays' is not an object")
        meta_arrays = {}
        for key, rec in metas.items():
            if not (isinstance(key, str) and key.startswith("_ucp/meta/") and safe_rel(key)):
                raise FormatError(f"{where}: unsafe metadata array path {key!r}")
            meta_arrays[key] = ManifestArray.from_json(rec, f"{where}: metadata array {key!r}", key, v)
        m = cls(params, doc.get("metadata"), meta_arrays, _check_files(doc.get("files") or {}, where),
                str(doc.get("writer", "")), str(doc.get("created", "")), v)
        m._check_docs(where)
        return m

    def _check_docs(self, where):
        """Every array's ``zarr.json`` record matches the document its manifest record implies, so the
        manifest cannot say one dtype or grid and ``zarr.json`` (what generic zarr readers use) another."""
        files = self.files
        for p in self.params:
            for a in p.states.values():
                if files.get(f"{a.path}/zarr.json") != a.doc_record():
                    self._docs_error(where)
        for a in self.meta_arrays.values():
            if files.get(f"{a.path}/zarr.json") != a.doc_record():
                self._docs_error(where)

    def _docs_error(self, where):
        """Name the first array whose ``zarr.json`` record is wrong (the error path of ``_check_docs``)."""
        for what, a in self.arrays():
            rel = f"{a.path}/zarr.json"
            rec = self.files.get(rel)
            if rec is None or tuple(rec) != a.doc_record():
                raise FormatError(f"{where}: {what}: {rel} is not recorded in 'files' as the document its "
                                  "shape, chunks and dtype imply (the manifest contradicts its zarr.json)")


@functools.lru_cache(maxsize=4096)
def _doc_record(shape, chunks, dtype, inner):
    data = doc_bytes(array_doc(shape, chunks, dtype, inner=inner))
    return len(data), crc32c.crc32c(data)


def _check_files(files, where) -> dict:
    if not isinstance(files, dict) or not all_safe_rel(files):
        raise FormatError(f"{where}: unsafe path in 'files'")
    out = {}
    for k, v in files.items():
        if type(v) is not list or len(v) != 2 or type(v[0]) is not int or type(v[1]) is not int \
                or v[0] < 0 or not 0 <= v[1] < 1 << 32:
            raise FormatError(f"{where}: files[{k!r}]: record {str(v)[:60]} is not [size, crc32c]")
        out[k] = (v[0], v[1])
    return out


# -------------------------------------------------------------------------------------- all records at once
# Opening a checkpoint of thousands of small arrays spent more time checking records one by one than
# parsing the JSON. The functions below run the same checks over all parameter records together: C-level
# passes over columns (types, paths in one regex call) and, per distinct array geometry, one record checked
# by ``ManifestArray.from_json`` standing for the others with equal (type-exact) geometry values. They
# return None at the first doubt; ``ManifestParam.from_json`` then checks record by record and names it.

def _params_at_once(ps, where, version) -> list | None:
    """Every parameter record checked as ``ManifestParam.from_json`` would, or None."""
    if not ps or set(map(type, ps)) != {dict}:
        return None
    try:
        names, paths, states = (list(map(itemgetter(k), ps)) for k in ("name", "path", "states"))
    except KeyError:
        return None
    metas = [p.get("meta", {}) for p in ps]
    if set(map(type, names)) != {str} or set(map(type, states)) != {dict} or set(map(type, metas)) != {dict} \
            or not all_safe_rel(paths) or "/" in "".join(paths):
        return None
    if not (names == paths and all_encode_to_themselves(names)):
        try:
            if list(map(encode_param, names)) != paths:
                return None
        except Exception:
            return None
    orders = _state_orders(ps, states)
    if orders is None:
        return None
    state_names = set(chain.from_iterable(orders))
    if not all_safe_rel(state_names) or "/" in "".join(state_names):
        return None
    keys = [(i, st) for i, o in enumerate(orders) for st in o]
    arrays = _arrays_at_once([states[i][st] for i, st in keys], [f"{paths[i]}/{st}" for i, st in keys],
                             [(where, names[i], st) for i, st in keys], version)
    if arrays is None:
        return None
    out = [ManifestParam(n, p, m, {}) for n, p, m in zip(names, paths, metas)]
    for (i, st), a in zip(keys, arrays):
        out[i].states[st] = a
    return out


def _state_orders(ps, states) -> list | None:
    """Each record's states in saved order: its ``state_order`` when that lists exactly its states
    (each once), else the states as stored; None when any ``state_order`` is otherwise."""
    orders = []
    try:
        for p, s in zip(ps, states):
            o = p.get("state_order")
            if o is None:
                o = list(s)
            elif type(o) is not list or len(o) != len(s) or s.keys() != set(o):
                return None
            orders.append(o)
    except TypeError:  # an unhashable entry in a state_order
        return None
    return orders


def _arrays_at_once(recs, want, wheres, version) -> list | None:
    """Complete array records ``recs`` (whose paths must be ``want``) checked as ``ManifestArray.from_json``
    would, or None."""
    if not recs or set(map(type, recs)) != {dict}:
        return None
    if [r.get("path") for r in recs] != want or max(map(len, want)) >= MAX_PATH:
        return None
    shapes, chunks, inners = ([r.get(k) for r in recs] for k in ("shape", "chunks", "inner_chunks"))
    lists = shapes + chunks + [i for i in inners if i is not None]
    if set(map(type, lists)) != {list} or not set(map(type, chain.from_iterable(lists))) <= {int}:
        return None  # geometry values are lists of exact ints: equal keys below mean identical records
    geoms = list(zip([r.get("dtype") for r in recs], [r.get("storage_dtype") for r in recs],
                     map(tuple, shapes), map(tuple, chunks), [i if i is None else tuple(i) for i in inners]))
    try:
        first = {}
        for j, g in enumerate(geoms):
            if g not in first:
                first[g] = ManifestArray.from_json(recs[j], _Where(*wheres[j]), want[j], version)
    except (FormatError, TypeError):  # TypeError: an unhashable dtype value
        return None
    out = []
    for r, p, g in zip(recs, want, geoms):
        a = first[g]
        sizes = _chunk_sizes(a.shape, a.chunks, a.inner_chunks, a.dtype)
        table = r.get("chunk_table")
        if sizes is None or type(table) is not dict or len(table) != len(sizes):
            return None
        table = _listed_table(table, sizes, 2 if a.inner_chunks is None or version < 2 else 3)
        if table is None:
            return None
        out.append(ManifestArray(p, a.dtype, a.shape, a.chunks, table, a.inner_chunks, version))
    return out
