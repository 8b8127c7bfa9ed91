"""The engine's whole-state gather (``ucp.engine.to_universal.write_state``): of a source that
offers ``read_into``, a state that no replica averages and of at most GATHER_MAX_BYTES is read
piece by piece into one buffer — straight into place where ``read_into`` takes the piece, else
copied from ``read`` — and written as one box, so the writer takes every chunk whole. And the shard encoder that then pads
edge chunks itself (``ucp.format.shard.encode``) instead of a padded copy of the whole chunk.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ucp
from ucp.engine import bind_layout, convert, parse_spec
from ucp.format import shard as shards
from ucp.format import dtypes, layout, verify
from ucp.format.array_writer import ArrayWriter
from ucp.sources import Source, SourceLayout, SourceParam

FLAT = 'spec f\naxes dp\nparam "**" = flat(over=dp)\n'


class FlatSource(Source, register=False):
    """ZeRO-like: every state flat-partitioned over 3 ranks, held in memory. ``read_into``
    serves only pieces of rank 1 and counts them, ``view`` only rank 2's; the others go
    through ``read``."""
    name = "test-flat-gather"
    description = "test plug-in: flat partitions, read_into for rank 1"

    def layout(self):
        full = self.options["full"]
        shapes = {n: tuple(t.shape) for n, t in full.items()}
        flat = bind_layout(parse_spec(FLAT, "flat"), list(shapes), {"dp": 3}).fragments_by_param(shapes)
        self.straight = self.viewed = 0
        return SourceLayout([SourceParam(n, shapes[n], {"param": full[n].dtype}, fragments=flat[n]) for n in shapes],
                            degrees={"dp": 3})

    def local(self, fragment, state):
        from ucp.plan import split

        return split(self.options["full"][fragment.name], fragment)

    def read_into(self, fragment, state, piece, out):
        """``out``: the engine's gather buffer, numpy in the storage dtype (bfloat16 as uint16)."""
        if fragment.coord("dp") != 1:
            return False
        assert isinstance(out, np.ndarray) and out.flags.c_contiguous
        out[...] = dtypes.to_storage_numpy(self.read(fragment, state, piece))
        self.straight += 1
        return True

    def view(self, fragment, state, piece):
        if fragment.coord("dp") != 2:
            return None
        self.viewed += 1
        return self.read(fragment, state, piece).clone()


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("gather", [True, "bands", False])
def test_gathered_states_equal_the_source_on_both_read_paths(tmp_path, monkeypatch, gather):
    """Gathered (rank 1's pieces through ``read_into``, the others through ``read``), whole or
    in row bands of whole shards (``GATHER_BAND_BYTES``), or, for bands above
    ``GATHER_MAX_BYTES``, written box by box: the same tensors, bit for bit."""
    from ucp.engine import to_universal

    if not gather:
        monkeypatch.setattr(to_universal, "GATHER_MAX_BYTES", 0)
    if gather == "bands":  # bands of one 32 KB shard (below), cutting across the ranks' flat ranges
        monkeypatch.setattr(to_universal, "GATHER_BAND_BYTES", 40_000)
    g = torch.Generator().manual_seed(3)
    full = {"emb": torch.randn(1003, 72, generator=g), "bias": torch.randn(37, generator=g),
            "half": torch.randn(13, 11, generator=g).bfloat16()}
    src = FlatSource("<memory>", full=full)
    writes = []
    real_write = ArrayWriter.write
    monkeypatch.setattr(ArrayWriter, "write", lambda self, offset, t: (writes.append((self.name, self.chunks,
                                                                                   tuple(offset), tuple(t.shape))),
                                                                     real_write(self, offset, t)))
    if gather == "bands":  # "emb" (288 KB) in shards of 112 rows (32 KB), gathered a band per shard
        monkeypatch.setattr(layout, "DEFAULT_SHARD_BYTES", 32 << 10)
        monkeypatch.setattr(layout, "DEFAULT_INNER_BYTES", 4 << 10)
    convert(src, tmp_path / "uni")
    emb = [(chunks, offset, shape) for name, chunks, offset, shape in writes if name == "emb"]
    if gather == "bands":  # one write per band, each whole shards of full rows, the bands tiling the state
        rows = emb[0][0][0]
        assert len(emb) == 9 and sorted(o for _, o, _ in emb) == [(r, 0) for r in range(0, 1003, rows)]
        assert all(s == (min(rows, 1003 - o[0]), 72) for _, o, s in emb)
        assert src.viewed == 3   # the bands inside rank 2's rows 669..1003 (672, 784, 896): the source's view
    else:
        assert src.viewed == 0   # whole states span every rank; box by box never asks for a view
    if gather is True:
        assert len(emb) == 1
    # gathered: rank 1's pieces of every parameter went straight into place; box by box: none did
    assert src.straight >= len(full) if gather else src.straight == 0
    assert verify(tmp_path / "uni") == []
    ck = ucp.open(tmp_path / "uni")
    for n, t in full.items():
        assert torch.equal(_bits(ck.read(n)), _bits(t)), n


@pytest.mark.parametrize("shape,shard,inner", [((1365, 512), (1366, 512), (683, 64)),
                                               ((15619, 16), (16384, 16), (1024, 16)),
                                               ((1003,), (1024,), (256,)), ((5, 7), (8, 8), (4, 4))])
def test_shard_encoder_pads_edge_chunks_like_a_padded_copy(shape, shard, inner):
    """Encoding only the valid region gives the same file bytes and checksums as encoding the
    region zero-padded to whole inner chunks (what the writer used to build first)."""
    data = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    padded_shape = tuple(-(-v // c) * c for v, c in zip(shape, inner))
    padded = np.zeros(padded_shape, dtype=np.float32)
    padded[tuple(slice(0, n) for n in shape)] = data
    lim = tuple(p // c for p, c in zip(padded_shape, inner))

    def file_bytes(buf, out):
        got, size, icrc, content = shards.encode(buf, shard, inner, lim, out)
        assert size == shards.file_size(shape, shard, inner, (0,) * len(shape), 4)
        raw = bytes(got[:size])
        assert len(raw) == size
        return raw, icrc, content

    pool = bytearray(1 << 24)
    want = file_bytes(padded, None)
    for out in (None, memoryview(pool)):
        pool[:] = b"\x07" * len(pool)  # stale bytes in a reused buffer must not leak into padding
        assert file_bytes(data, out) == want


def test_gather_buffers_keep_a_band_beside_a_budget_of_smaller_ones():
    """The engine's gather pool (``ReadBuffers(keep=GATHER_KEEP_BYTES)``) keeps a band's buffer
    while a pipeline budget of smaller states' buffers comes and goes, so the next band (an
    embedding's next states, the output layer after the layers) reuses its memory instead of
    faulting in fresh pages. No page is touched here."""
    from ucp.engine.buffers import ReadBuffers
    from ucp.engine.pipeline import BUDGET_BYTES
    from ucp.engine.to_universal import GATHER_BAND_BYTES, GATHER_KEEP_BYTES

    pool = ReadBuffers(keep=GATHER_KEEP_BYTES)
    band = pool.take(GATHER_BAND_BYTES)
    del band
    # a layer's states in flight together (the pipeline's budget; the first takes the one free
    # buffer, the band's), then freed: the band's buffer must stay in the pool
    layer = [pool.take(BUDGET_BYTES // 4) for _ in range(4)]
    del layer
    assert pool.free_bytes == GATHER_BAND_BYTES + 3 * (BUDGET_BYTES // 4)
    again = pool.take(GATHER_BAND_BYTES)    # the next band: the kept buffer, no fresh memory
    assert pool.free_bytes == 3 * (BUDGET_BYTES // 4)
    del again


def test_gather_bands_are_whole_chunk_rows_tiling_the_state():
    from ucp.engine.to_universal import GATHER_BAND_BYTES, GATHER_MAX_BYTES, gather_bands
    from ucp.plan import Box

    rows = GATHER_BAND_BYTES // (4 * 1000) // 3     # a band holds 3 chunk rows of 1000 fp32 columns
    bands = gather_bands((10 * rows + 5, 1000), 4, (rows, 500))
    assert [b.start[0] for b in bands] == list(range(0, 10 * rows + 5, 3 * rows))
    assert all(b.stop[1] == 1000 and b.start[1] == 0 for b in bands) and bands[-1].stop[0] == 10 * rows + 5
    assert gather_bands((7, 3), 4, (2, 3)) == [Box((0, 0), (7, 3))]          # small: whole
    assert gather_bands((7, 3), 4, None) == [Box((0, 0), (7, 3))]
    assert gather_bands((GATHER_MAX_BYTES,), 2, None) is None                  # unknown chunks, too large
    assert gather_bands((4, GATHER_MAX_BYTES // 2), 4, (1, 1024)) is None     # one row above the limit
    assert len(gather_bands((GATHER_MAX_BYTES,), 2, (1 << 20,))) == GATHER_MAX_BYTES * 2 // GATHER_BAND_BYTES
