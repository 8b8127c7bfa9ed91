"""Sharded arrays (zarr v3 ``sharding_indexed``): shard geometry, index encoding, validation.

A shard file holds the inner chunks of one shard (the chunk of the outer regular grid) that intersect
the array, each encoded as its C-order little-endian bytes + CRC32C, written back to back in C order
of the inner grid, followed by the index: for every inner position of the shard (C order) the pair
``(offset, nbytes)`` as little-endian uint64, ``(2**64-1, 2**64-1)`` for an inner chunk wholly
outside the array, then the CRC32C of the index bytes. The index depends only on the geometry, so the
manifest also records the shard's *content crc32c*: the CRC32C of the inner chunks' CRC32C values
(4 bytes little-endian each) in index order, which binds the file's data to this one shard of this
one array. spec/FORMAT.md §4.3 is normative.
"""
from __future__ import annotations

import functools
import itertools
import math

import crc32c
import numpy as np

from ucp.format.layout import CRC_BYTES
from ucp.plan.grid import ChunkGrid

EMPTY = (1 << 64) - 1
ENTRY_BYTES = 16


class ShardError(ValueError):
    """A shard file that does not check out (message says why)."""


def inner_grid(shard, inner):
    """Inner chunks per shard, per dim."""
    return tuple(s // c for s, c in zip(shard, inner))


def n_inner(shard, inner):
    return math.prod(inner_grid(shard, inner))


def index_nbytes(shard, inner):
    return n_inner(shard, inner) * ENTRY_BYTES + CRC_BYTES


@functools.lru_cache(maxsize=1 << 16)
def file_size(shape, shard, inner, sidx, itemsize):
    """Size of the (only valid) file of shard ``sidx``: its present inner chunks plus the index."""
    _it, lim = present(shape, shard, inner, sidx)
    return math.prod(lim) * (math.prod(inner) * itemsize + CRC_BYTES) + index_nbytes(shard, inner)


def content_crc(crc_words) -> int:
    """The shard's content crc32c from its inner chunks' stored crc32c words (bytes) in index order."""
    c = 0
    for w in crc_words:
        c = crc32c.crc32c(w, c)
    return c


def crc_word_ranges(entries, positions):
    """Byte ranges ``(start, stop)`` of the stored crc32c word of each inner chunk at ``positions``."""
    sel = entries[list(positions)]
    return [(end - CRC_BYTES, end) for end in (sel[:, 0] + sel[:, 1]).tolist()]


def present_positions(shape, shard, inner, sidx):
    """Index positions (C order, ascending) of shard ``sidx``'s inner chunks that intersect the array."""
    it, _lim = present(shape, shard, inner, sidx)
    ig = inner_grid(shard, inner)
    return [linear(local, ig) for local in it]


def present(shape, shard, inner, sidx):
    """Local inner indices (C order) of shard ``sidx`` that intersect the array, and their extent per dim."""
    valid = ChunkGrid(shape, shard).valid_shape(sidx)
    lim = tuple(min(g, n) for g, n in zip(inner_grid(shard, inner), ChunkGrid(valid, inner).grid))
    return _indices(lim), lim


def _indices(lim):
    """C-order indices below ``lim``, generated lazily: ``itertools.product`` alone turns each range
    into a tuple when called, so a caller wanting only ``lim`` from a crafted geometry of 2^23 inner
    chunks would pay hundreds of MB before any size check could refuse it."""
    yield from itertools.product(*(range(k) for k in lim))


def linear(local, ig):
    """C-order position of local inner index ``local`` in an inner grid ``ig``."""
    p = 0
    for i, g in zip(local, ig):
        p = p * g + i
    return p


def encode(buf: np.ndarray, shard, inner, lim, out=None):
    """The shard file of ``buf`` (shard-local data covering the shard's valid region, with or
    without the padding up to ``lim`` tiles; missing padding is the fill value), laid out in
    ``out``: a writable buffer of at least the file's size (:func:`file_size`), new when None.
    Returns (out, file size, crc32c of the index, content crc32c).

    Each tile is copied once, straight to where the file holds it (edge tiles padded there), so
    the file's bytes are one buffer: the store writes it as it is (with O_DIRECT where it can)
    instead of copying scattered tiles into the page cache."""
    ig = inner_grid(shard, inner)
    index = np.full((math.prod(ig), 2), EMPTY, dtype="<u8")
    tile_n = math.prod(inner)
    nb = tile_n * buf.itemsize + CRC_BYTES
    size = math.prod(lim) * nb + index.nbytes + CRC_BYTES
    out = memoryview(bytearray(size) if out is None else out).cast("B")
    off, content = 0, 0
    for local in itertools.product(*(range(k) for k in lim)):
        tile = buf[tuple(slice(i * c, (i + 1) * c) for i, c in zip(local, inner))]
        _fill_tile(np.frombuffer(out, dtype=buf.dtype, count=tile_n, offset=off).reshape(inner), tile)
        word = crc32c.crc32c(out[off:off + nb - CRC_BYTES]).to_bytes(CRC_BYTES, "little")
        out[off + nb - CRC_BYTES:off + nb] = word
        content = crc32c.crc32c(word, content)
        index[linear(local, ig)] = (off, nb)
        off += nb
    ib = index.tobytes()
    icrc = crc32c.crc32c(ib)
    out[off:off + len(ib)] = ib
    out[off + len(ib):size] = icrc.to_bytes(CRC_BYTES, "little")
    return out, size, icrc, content


def _fill_tile(dst, tile):
    """``dst`` (a whole inner chunk) = ``tile`` (its part inside the data), the rest the fill value 0."""
    if tile.shape != dst.shape:
        dst.fill(0)
        dst = dst[tuple(slice(0, n) for n in tile.shape)]
    np.copyto(dst, tile)


def parse_index(raw, shard, inner):
    """Check the index bytes (entries + crc) and return (entries as an (n, 2) uint64 array, crc)."""
    n = n_inner(shard, inner)
    want = n * ENTRY_BYTES + CRC_BYTES
    if len(raw) != want:
        raise ShardError(f"shard index is {len(raw)} bytes, expected {want}")
    mv = memoryview(raw)
    c = crc32c.crc32c(mv[:-CRC_BYTES])
    stored = int.from_bytes(mv[-CRC_BYTES:], "little")
    if c != stored:
        raise ShardError(f"shard index crc32c mismatch (computed {c:#010x}, stored {stored:#010x})")
    return np.frombuffer(mv[:-CRC_BYTES], dtype="<u8").reshape(n, 2), c


def check_entry(entries, pos, inner_nb, data_end, where):
    off, nb = int(entries[pos, 0]), int(entries[pos, 1])
    if off == EMPTY and nb == EMPTY:
        raise ShardError(f"{where}: missing from the shard index")
    if nb != inner_nb or off + nb > data_end:
        raise ShardError(f"{where}: index entry (offset {off}, nbytes {nb}) is invalid "
                         f"(expected nbytes {inner_nb} within the first {data_end} bytes)")
    return off, nb


def check_shard(data, shape, shard, inner, sidx, itemsize):
    """Deep check of a whole shard file; returns (index crc32c, content crc32c). Raises ShardError."""
    ilen = index_nbytes(shard, inner)
    if len(data) < ilen:
        raise ShardError(f"shard file is {len(data)} bytes, shorter than its index ({ilen})")
    mv = memoryview(data)
    data_end = len(data) - ilen
    entries, icrc = parse_index(mv[data_end:], shard, inner)
    ig = inner_grid(shard, inner)
    inner_nb = math.prod(inner) * itemsize + CRC_BYTES
    it, _lim = present(shape, shard, inner, sidx)
    want = set()
    spans = []
    content = 0
    for local in it:
        pos = linear(local, ig)
        want.add(pos)
        off, nb = check_entry(entries, pos, inner_nb, data_end, f"inner chunk {list(local)}")
        spans.append((off, nb, local))
        c = crc32c.crc32c(mv[off:off + nb - CRC_BYTES])
        word = mv[off + nb - CRC_BYTES:off + nb]
        content = crc32c.crc32c(word, content)
        s = int.from_bytes(word, "little")
        if c != s:
            raise ShardError(f"inner chunk {list(local)}: crc32c mismatch (computed {c:#010x}, stored {s:#010x})")
    for pos in range(len(entries)):
        if pos not in want and not (int(entries[pos, 0]) == EMPTY and int(entries[pos, 1]) == EMPTY):
            raise ShardError(f"index entry {pos} points at an inner chunk wholly outside the array")
    spans.sort()
    end = 0
    if sum(nb for _o, nb, _l in spans) != data_end:
        raise ShardError(f"shard file has {data_end - sum(nb for _o, nb, _l in spans)} bytes not covered "
                         "by any inner chunk")
    for off, nb, local in spans:
        if off < end:
            raise ShardError(f"inner chunk {list(local)} overlaps another one in the shard file")
        end = off + nb
    if end != data_end:
        raise ShardError(f"shard file has {data_end - end} bytes not covered by any inner chunk")
    return icrc, content
