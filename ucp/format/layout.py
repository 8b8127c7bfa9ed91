"""Default chunking, chunk keys, zarr.json documents, index normalization, canonical JSON.

Chunk-grid arithmetic lives in ``ucp.plan.grid.ChunkGrid``; flat ranges in ``ucp.plan.boxes.flat_to_boxes``."""
from __future__ import annotations

import json
import math
import operator

from ucp.errors import UcpError
from ucp.format import dtypes

DEFAULT_CHUNK_BYTES = 4 << 20  # plain row chunks (when chunk_bytes= is given or sharding is off)
DEFAULT_SHARD_BYTES = 32 << 20  # see spec/FORMAT.md "Default chunking" for the figures behind these
DEFAULT_INNER_BYTES = 256 << 10
DEFAULT_COL_SPLIT = 8  # the last dim is cut into this many column blocks when wide enough
MIN_COL_BYTES = 256  # ... as long as each column block keeps at least this many bytes per row
CRC_BYTES = 4


def default_sharding(shape, itemsize, shard_bytes=None, inner_bytes=None, col_split=None):
    """``(shard shape, inner chunk shape)`` of the default sharded layout, or None for a small array.

    Inner chunks: the last dim cut into ``col_split`` column blocks (when each block keeps
    >= MIN_COL_BYTES per row and ndim >= 2), then row blocks of about ``inner_bytes``. Shards: the
    inner chunk grown over whole trailing dims, then over rows, to about ``shard_bytes``.
    """
    shard_bytes = int(shard_bytes or DEFAULT_SHARD_BYTES)
    inner_bytes = int(inner_bytes or DEFAULT_INNER_BYTES)
    k = DEFAULT_COL_SPLIT if col_split is None else int(col_split)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s == 0 for s in shape) or math.prod(shape) * itemsize <= inner_bytes:
        return None
    cols = shape[-1]
    if len(shape) >= 2 and k > 1 and cols * itemsize >= k * min(MIN_COL_BYTES, max(1, inner_bytes // 64)):
        cols = -(-cols // k)
    inner = list(default_chunks(shape[:-1] + (cols,), itemsize, inner_bytes, balance=False))
    shard = list(inner)
    nbytes = math.prod(inner) * itemsize
    for d in range(len(shape) - 1, -1, -1):
        g = -(-shape[d] // inner[d])  # inner chunks along d
        per = nbytes // inner[d] * inner[d]  # bytes of the shard per inner extent of d
        m = max(1, min(g, shard_bytes // max(1, per)))
        m = -(-g // -(-g // m))  # balanced
        if m == g:  # the shard covers dim d: least padding in the last inner chunk
            inner[d] = _balance(shape[d], inner[d])
        shard[d] = inner[d] * m
        nbytes = per * m
        if m < g:
            break
    return tuple(shard), tuple(inner)


def default_chunks(shape, itemsize, target=None, balance=True):
    """Contiguous row blocks of about ``target`` bytes; trailing dims split only when one row is larger."""
    target = int(target or DEFAULT_CHUNK_BYTES)
    shape = tuple(int(s) for s in shape)
    if not shape:
        return ()
    return tuple(1 if s == 0 else max(1, c) for s, c in zip(shape, _rows(shape, itemsize, target, balance)))


def _rows(shape, itemsize, target, balance=True):
    if len(shape) == 1:
        n = shape[0]
        r = max(1, min(n, target // itemsize))
        return (_balance(n, r, balance),)
    row = math.prod(shape[1:]) * itemsize
    if row == 0:
        return (max(1, shape[0]),) + tuple(shape[1:])
    if row <= target:
        r = max(1, min(shape[0], target // row))
        return (_balance(shape[0], r, balance),) + tuple(shape[1:])
    return (1,) + _rows(shape[1:], itemsize, target, balance)


def _balance(n, r, on=True):
    """Same number of chunks, least padding in the last one."""
    if not on:
        return r
    if n <= 0:
        return 1
    k = -(-n // r)
    return -(-n // k)


def check_shards(shape, shards, inner):
    shards, inner = check_chunks(shape, shards), check_chunks(shape, inner)
    if any(s % c for s, c in zip(shards, inner)):
        raise UcpError(f"shards {shards} must be a multiple of the inner chunks {inner} in every dim")
    return shards, inner


def check_chunks(shape, chunks):
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != len(shape) or any(c < 1 for c in chunks):
        raise UcpError(f"chunks {chunks} do not fit shape {tuple(shape)}: one positive extent per dim")
    return chunks


def chunk_key(idx) -> str:
    return "c/" + "/".join(map(str, idx)) if idx else "c"


def array_doc(shape, chunks, dtype_name, attrs=None, inner=None) -> dict:
    bytes_codec = {"name": "bytes"}
    if dtypes.itemsize(dtype_name) > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    codecs = [bytes_codec, {"name": "crc32c"}]
    if inner is not None:
        codecs = [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(inner), "codecs": codecs,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}]
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": dtypes.zarr_dtype(dtype_name),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": dtypes.fill_value(dtype_name),
        "codecs": codecs,
        "attributes": {"ucp": {"dtype": dtype_name, **(attrs or {})}},
        "storage_transformers": [],
    }


def group_doc(attrs=None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attrs or {}}


# The two JSON encodings, built once: ``json.dumps`` with any non-default option builds a new encoder
# on every call (about a quarter of encoding a small document: a journal line, a zarr.json). An
# encoder holds only its options, so one serves every thread.
_DOC = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def doc_bytes(doc) -> bytes:
    return _DOC.encode(doc).encode()


def canonical(obj) -> bytes:
    return _CANONICAL.encode(obj).encode()


def normalize_index(index, shape):
    """numpy basic indexing (ints, step-1 slices, Ellipsis) -> (start, stop, squeeze dims)."""
    ndim = len(shape)
    if index is None:
        return [0] * ndim, list(shape), []
    if not isinstance(index, tuple):
        index = (index,)
    n_ell = sum(1 for i in index if i is Ellipsis)
    if n_ell > 1:
        raise UcpError("an index can only have a single ellipsis ('...')")
    n_real = len(index) - n_ell
    if n_real > ndim:
        raise UcpError(f"too many indices for array of shape {tuple(shape)}: {index!r}")
    if n_ell:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (ndim - n_real) + index[k + 1:]
    else:
        index = index + (slice(None),) * (ndim - n_real)
    start, stop, squeeze = [], [], []
    for d, (ix, n) in enumerate(zip(index, shape)):
        if isinstance(ix, slice):
            if ix.step not in (None, 1):
                raise UcpError(f"slice step {ix.step} in dim {d} is not supported (only step 1)")
            a, b, _ = ix.indices(n)
            b = max(a, b)
            start.append(a)
            stop.append(b)
        else:
            try:
                i = operator.index(ix)
            except TypeError:
                raise UcpError(f"unsupported index {ix!r} in dim {d}: use ints, slices or ...") from None
            if i < -n or i >= n:
                raise UcpError(f"index {i} is out of bounds for dim {d} of size {n}")
            i %= n
            start.append(i)
            stop.append(i + 1)
            squeeze.append(d)
    return start, stop, squeeze
