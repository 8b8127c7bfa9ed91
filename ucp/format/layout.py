"""Chunk grids, chunk keys, zarr.json documents, index normalization, canonical JSON."""
from __future__ import annotations

import itertools
import json
import math
import operator

from ucp.errors import UcpError
from ucp.format import dtypes

DEFAULT_CHUNK_BYTES = 4 << 20  # see spec/FORMAT.md "Default chunking" for the figures behind it
CRC_BYTES = 4


def default_chunks(shape, itemsize, target=None):
    """Contiguous row blocks of about ``target`` bytes; trailing dims split only when one row is larger."""
    target = int(target or DEFAULT_CHUNK_BYTES)
    shape = tuple(int(s) for s in shape)
    if not shape:
        return ()
    return tuple(1 if s == 0 else max(1, c) for s, c in zip(shape, _rows(shape, itemsize, target)))


def _rows(shape, itemsize, target):
    if len(shape) == 1:
        n = shape[0]
        r = max(1, min(n, target // itemsize))
        return (_balance(n, r),)
    row = math.prod(shape[1:]) * itemsize
    if row == 0:
        return (max(1, shape[0]),) + tuple(shape[1:])
    if row <= target:
        r = max(1, min(shape[0], target // row))
        return (_balance(shape[0], r),) + tuple(shape[1:])
    return (1,) + _rows(shape[1:], itemsize, target)


def _balance(n, r):
    """Same number of chunks, least padding in the last one."""
    if n <= 0:
        return 1
    k = -(-n // r)
    return -(-n // k)


def check_chunks(shape, chunks):
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != len(shape) or any(c < 1 for c in chunks):
        raise UcpError(f"chunks {chunks} do not fit shape {tuple(shape)}: one positive extent per dim")
    return chunks


def grid(shape, chunks):
    return tuple(-(-s // c) for s, c in zip(shape, chunks))


def chunk_key(idx) -> str:
    return "c/" + "/".join(map(str, idx)) if idx else "c"


def all_chunk_indices(shape, chunks):
    return itertools.product(*(range(g) for g in grid(shape, chunks)))


def chunk_ranges(start, stop, chunks):
    """Per dim: range of chunk indices intersecting [start, stop)."""
    return [range(a // c, -(-b // c)) if b > a else range(0) for a, b, c in zip(start, stop, chunks)]


def array_doc(shape, chunks, dtype_name, attrs=None) -> dict:
    bytes_codec = {"name": "bytes"}
    if dtypes.itemsize(dtype_name) > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": dtypes.zarr_dtype(dtype_name),
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": dtypes.fill_value(dtype_name),
        "codecs": [bytes_codec, {"name": "crc32c"}],
        "attributes": {"ucp": {"dtype": dtype_name, **(attrs or {})}},
        "storage_transformers": [],
    }


def group_doc(attrs=None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attrs or {}}


def doc_bytes(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


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


def flat_to_boxes(shape, a, b):
    """Decompose the C-order flat range [a, b) of an array of ``shape`` into at most 2*ndim-1 boxes.

    Returns [(start, stop, offset)] with ``offset`` the position of the box's first element in [a, b).
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if not 0 <= a <= b <= n:
        raise UcpError(f"flat range [{a}, {b}) outside an array of {n} elements (shape {shape})")
    out = []

    def rec(prefix, shp, lo, hi, off):
        if lo >= hi:
            return
        if not shp:
            out.append((prefix, tuple(p + 1 for p in prefix), off))
            return
        c = math.prod(shp[1:])
        if len(shp) == 1:
            out.append((prefix + (lo,), tuple(p + 1 for p in prefix) + (hi,), off))
            return
        r0, r1 = lo // c, hi // c
        if r0 == r1:
            rec(prefix + (r0,), shp[1:], lo - r0 * c, hi - r0 * c, off)
            return
        if lo % c:
            rec(prefix + (r0,), shp[1:], lo % c, c, off)
            off += c - lo % c
            r0 += 1
        if r1 > r0:
            out.append((prefix + (r0,) + (0,) * (len(shp) - 1),
                        tuple(p + 1 for p in prefix) + (r1,) + tuple(shp[1:]), off))
            off += (r1 - r0) * c
        if hi % c:
            rec(prefix + (r1,), shp[1:], 0, hi % c, off)

    rec((), shape, a, b, 0)
    return out
