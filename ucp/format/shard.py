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


POOL_MAX = 4  # encode/read buffers kept for reuse, process-wide (each about one shard)
_pool: list = []
_pool_lock = __import__("threading").Lock()


def acquire(n):
    """A bytearray of >= n bytes from the process-wide pool (first touch of fresh memory is slow on
    the VMs measured, so shard-sized buffers are reused across writers and readers)."""
    with _pool_lock:
        best = None
        for i, b in enumerate(_pool):
            if len(b) >= n and (best is None or len(b) < len(_pool[best])):
                best = i
        if best is not None:
            return _pool.pop(best)
    return bytearray(n)


def release(buf):
    with _pool_lock:
        if len(_pool) < POOL_MAX:
            _pool.append(buf)
        else:  # keep the largest ones
            i = min(range(len(_pool)), key=lambda j: len(_pool[j]))
            if len(_pool[i]) < len(buf):
                _pool[i] = buf


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
    out = []
    for pos in positions:
        end = int(entries[pos, 0]) + int(entries[pos, 1])
        out.append((end - CRC_BYTES, end))
    return out


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


def encode(buf: np.ndarray, shard, inner, lim, scratch=None):
    """Buffers of the shard file for ``buf`` (see :class:`ShardBytes`), all at once.
    Returns (buffers, file size, crc32c of the index, content crc32c)."""
    sb = ShardBytes(buf, shard, inner, lim, scratch)
    bufs = [b for batch in sb.batches() for b in batch]
    return bufs, sb.size, sb.index_crc, sb.content_crc


class ShardBytes:
    """The shard file for ``buf`` (shard-local data covering the shard's valid region, with or
    without the padding up to ``lim`` tiles; missing padding is the fill value): ``size`` and
    ``index_crc`` at once (the index depends only on the geometry), the buffers from
    :meth:`batches`, and ``content_crc`` once they have all been taken.

    Contiguous whole tiles are handed out from ``buf`` as they are; the others are copied into
    ``scratch`` (a callable ``n -> writable buffer of >= n bytes``, reused across shards), or into
    new arrays without it, edge tiles padded there: no padded copy of the whole shard is made.
    With ``batch_bytes`` the scratch holds about that many bytes of copied tiles (at least one
    tile), reused for each batch: a writer that writes each batch before taking the next touches
    that much fresh memory, not a shard's worth (the first touch of fresh memory runs at
    0.4 GB/s on the VMs measured, against 5 GB/s for a copy into memory already touched)."""

    def __init__(self, buf: np.ndarray, shard, inner, lim, scratch=None, batch_bytes=None):
        self._buf, self._inner, self._scratch, self._batch_bytes = buf, tuple(inner), scratch, batch_bytes
        self._locals = list(itertools.product(*(range(k) for k in lim)))
        self._tile_bytes = math.prod(inner) * buf.itemsize
        nb = self._tile_bytes + CRC_BYTES
        ig = inner_grid(shard, inner)
        index = np.full((math.prod(ig), 2), EMPTY, dtype="<u8")
        for i, local in enumerate(self._locals):   # the tiles back to back in C order of ``lim``
            index[linear(local, ig)] = (i * nb, nb)
        self._index = index.tobytes()
        self.index_crc = crc32c.crc32c(self._index)
        self.size = len(self._locals) * nb + len(self._index) + CRC_BYTES
        self.content_crc = None

    def _tiles(self):
        for local in self._locals:
            yield self._buf[tuple(slice(i * c, (i + 1) * c) for i, c in zip(local, self._inner))]

    def _copied(self, tile) -> bool:
        return tile.shape != self._inner or not tile.flags.c_contiguous

    def _scratch_bytes(self) -> int:
        ncopy = sum(1 for t in self._tiles() if self._copied(t))
        if self._batch_bytes is None:
            return ncopy * self._tile_bytes
        if not ncopy:
            return 0
        # the same size for every shard with tiles up to batch_bytes: one pooled buffer serves them all
        return max(self._tile_bytes, self._batch_bytes)

    def batches(self):
        """Lists of buffers, the whole file in order; a list may share scratch memory with the next,
        so it must be consumed (written, copied) before the next is asked for."""
        n = self._scratch_bytes() if self._scratch is not None else 0
        sbuf = self._scratch(n) if n else None
        out, spos, content = [], 0, 0
        for tile in self._tiles():
            if self._copied(tile):
                if sbuf is not None and spos + self._tile_bytes > len(sbuf):
                    yield out                      # the scratch is full: hand over, then reuse it
                    out, spos = [], 0
                if sbuf is not None:
                    dst = np.frombuffer(sbuf, dtype=self._buf.dtype, count=math.prod(self._inner),
                                        offset=spos).reshape(self._inner)
                    spos += self._tile_bytes
                else:
                    dst = np.empty(self._inner, dtype=self._buf.dtype)
                _fill_tile(dst, tile)
                tile = dst
            word = crc32c.crc32c(memoryview(tile).cast("B")).to_bytes(4, "little")
            content = crc32c.crc32c(word, content)
            out += [tile, word]
        self.content_crc = content
        yield out + [self._index, self.index_crc.to_bytes(4, "little")]


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
